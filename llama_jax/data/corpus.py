"""From `cfg.data` to the training sources: each a named, weighted pair of train and eval document stores; and the
evaluation-only sets of `data.eval_sources`.

A source is raw text (files, globs, remote paths, built-in names) tokenized on first use into a cache keyed by
content, a directory written by `python -m llama_jax.data.prepare`, read in place, or a built-in chat or preference
name (`documents.BUILTIN_CHAT_SOURCES`), prepared with the run's tokenizer into the cache on first use. Without
`data.tokenizer` a BPE tokenizer is trained on the raw sources' train splits. An evaluation-only source is held out
whole (raw text: every document; a prepared directory: its eval split) and tokenized with the run's tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import ml_collections
from etils import epath

from llama_jax.data import documents, stdlib_chat
from llama_jax.data.pipeline import DocumentStore
from llama_jax.data.shards import ShardedCorpus, local_directory, tokenizer_hash
from llama_jax.data.sources import (
    TokenizedCorpus,
    atomic_directory,
    prepare_stdlib_corpus,
    stdlib_documents,
)
from llama_jax.data.tokenizer import Tokenizer, tokenizer_files, train_bpe
from llama_jax.errors import ConfigError, DataError
from llama_jax.workdir import as_path, is_remote

EVAL_FRACTION = 0.02
# Part of every raw-text cache key; bumped whenever what a cached document holds changes
# (2: documents framed by the tokenizer's own bos rule; 3: empty documents skipped; 4: one entry per mixture).
_CACHE_FORMAT = 4
_MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    name: str
    source: str
    weight: float
    text_field: str

    @property
    def origin(self) -> tuple[str, str]:
        """What its documents are, whatever the mixture names it."""
        return self.source, self.text_field

    @functools.cached_property
    def prepared(self) -> bool:
        """A directory written by the preparation CLI (it holds train/ and eval/ shard directories). One in a bucket is
        refused with the fix (`shards.local_directory`): searched for raw text, it would give none."""
        if not is_remote(self.source):
            return (Path(self.source).expanduser() / "train" / _MANIFEST).is_file()
        if _holds_manifest(self.source):
            local_directory(self.source, f"source {self.name!r}")
        return False


def _holds_manifest(url: str) -> bool:
    try:
        return (epath.Path(url) / "train" / _MANIFEST).is_file()
    except Exception:  # an unknown scheme, no gcsfs, no network (the client's own errors): listing the source says so
        return False


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    weight: float
    train: DocumentStore
    eval: DocumentStore
    origin: tuple[str, str]  # its SourceSpec's


@dataclasses.dataclass(frozen=True)
class Corpus:
    tokenizer_path: Path
    sources: list[Source]
    held_out: dict[str, DocumentStore] = dataclasses.field(default_factory=dict)  # data.eval_sources, by name


def source_specs(data_cfg: ml_collections.ConfigDict) -> list[SourceSpec]:
    """`data.mixture`'s entries in the order written, or `data.source` alone (named "data")."""
    if not data_cfg.mixture:
        return [SourceSpec("data", data_cfg.source, 1.0, data_cfg.text_field)]
    return [SourceSpec(name, e.source, float(e.weight), e.text_field) for name, e in data_cfg.mixture.items()]


def load_corpus(data_cfg: ml_collections.ConfigDict, vocab_size: int, run: Corpus | None = None) -> Corpus:
    """The tokenizer and every source's train/eval stores, building raw-text caches on first use.

    `run`, for a later phase of a run: the first phase's corpus, whose tokenizer the phase uses and whose stores of
    the same documents it shares. Loading those again by the tokenizer's path would tokenize them a second time
    whenever the run trained its tokenizer, since that cache entry is keyed without it (13 s for the stdlib)."""
    corpus = _training_sources(data_cfg, vocab_size) if run is None else _later_sources(data_cfg, vocab_size, run)
    cache_dir = Path(data_cfg.cache_dir).expanduser()
    held_out = {name: held_out_store(name, entry.source, corpus.tokenizer_path, cache_dir, entry.text_field)
                for name, entry in data_cfg.eval_sources.items()}
    return dataclasses.replace(corpus, held_out=held_out)


def _later_sources(data_cfg: ml_collections.ConfigDict, vocab_size: int, run: Corpus) -> Corpus:
    cache_dir = Path(data_cfg.cache_dir).expanduser()
    with writing_cache(cache_dir):
        specs = [_built_in_prepared(spec, run.tokenizer_path, cache_dir) for spec in source_specs(data_cfg)]
    read = {source.origin: source for source in run.sources}
    new = [spec for spec in specs if spec.origin not in read]
    if new:
        rest = ml_collections.ConfigDict(data_cfg.to_dict())
        rest.tokenizer = str(run.tokenizer_path)
        if rest.mixture:
            rest.mixture = {spec.name: data_cfg.mixture[spec.name] for spec in new}
        read.update((source.origin, source) for source in _training_sources(rest, vocab_size).sources)
    return Corpus(run.tokenizer_path, [dataclasses.replace(read[spec.origin], name=spec.name, weight=spec.weight)
                                       for spec in specs])


def _training_sources(data_cfg: ml_collections.ConfigDict, vocab_size: int) -> Corpus:
    tokenizer = as_path(data_cfg.tokenizer) if data_cfg.tokenizer else None  # a URL too: a bucket's checkpoint
    if tokenizer is not None and not tokenizer.exists():
        raise DataError(f"data.tokenizer={data_cfg.tokenizer!r} does not exist: give the path of a tokenizer file")
    cache_dir = Path(data_cfg.cache_dir).expanduser()
    with writing_cache(cache_dir):
        specs = [_built_in_prepared(spec, tokenizer, cache_dir) for spec in source_specs(data_cfg)]
        if tokenizer is None and any(spec.prepared for spec in specs):
            prepared = next(spec for spec in specs if spec.prepared)
            raise ConfigError(
                f"source {prepared.name!r} ({prepared.source}) is prepared shards, tokenized by a fixed tokenizer: "
                "set data.tokenizer to the tokenizer it was prepared with"
            )
        if tokenizer is None and [s.source for s in specs] == ["stdlib"]:
            default = prepare_stdlib_corpus(cache_dir, vocab_size)  # the default job's long-standing cache entry
            return Corpus(default.tokenizer_path,
                          [Source(specs[0].name, 1.0, default.train, default.eval, specs[0].origin)])
        return _training_corpus(specs, tokenizer, vocab_size, cache_dir)


def _built_in_prepared(spec: SourceSpec, tokenizer: Path | epath.Path | None, cache_dir: Path) -> SourceSpec:
    """A built-in chat or preference source (`documents.BUILTIN_CHAT_SOURCES`) as the directory it is prepared into,
    with the run's tokenizer, on first use; any other source as it is."""
    if spec.source not in documents.BUILTIN_CHAT_SOURCES:
        return spec
    if tokenizer is None:
        raise ConfigError(f"source {spec.name!r} ({spec.source}) is prepared with the run's tokenizer: set "
                          "data.tokenizer (configs/sft_tiny.py takes its checkpoint's)")
    return dataclasses.replace(spec, source=stdlib_chat.prepared(spec.source, tokenizer, cache_dir))


@contextlib.contextmanager
def writing_cache(cache_dir: Path) -> Iterator[None]:
    """Names the setting to change when the cache cannot be written (a read-only or foreign directory, a path
    through a file), where the OS error would name only a file deep inside it, or a directory above it that could
    not be made. A cache complete on first use is only read, so a shared read-only cache still works."""
    try:
        yield
    except OSError as e:
        failed = None if e.filename is None else Path(os.fsdecode(e.filename))
        if failed is None or not (failed.is_relative_to(cache_dir) or cache_dir.is_relative_to(failed)):
            raise
        raise DataError(f"the cache directory {cache_dir} cannot be written ({e.strerror or e}: {e.filename}): give a "
                        "writable one (data.cache_dir; --cache_dir of python -m llama_jax.evaluate)") from e


def _training_corpus(specs: list[SourceSpec], tokenizer: Path | epath.Path | None, vocab_size: int,
                     cache_dir: Path) -> Corpus:
    raw = [spec for spec in specs if not spec.prepared]
    root = cache_dir / f"corpus-{_cache_key(raw, tokenizer, vocab_size)}"
    if raw and not root.exists():
        _build(raw, tokenizer, vocab_size, root)
    tokenizer_path = tokenizer if tokenizer is not None else root / "tokenizer.model"
    expected_hash = tokenizer_hash(tokenizer_path)
    sources = []
    for spec in specs:
        if spec.prepared:
            directory = Path(spec.source).expanduser()
            train, eval_ = (_open_prepared(spec, directory / split, expected_hash) for split in ("train", "eval"))
        else:
            train, eval_ = (TokenizedCorpus.load(root / spec.name / split) for split in ("train", "eval"))
        sources.append(Source(spec.name, spec.weight, train, eval_, spec.origin))
    return Corpus(tokenizer_path, sources)


def held_out_store(name: str, source: str, tokenizer_path: Path, cache_dir: Path, text_field: str = "text"
                   ) -> DocumentStore:
    """An evaluation-only source's documents (raw text: all of them; a prepared directory: its eval split), tokenized
    by `tokenizer_path` on first use into a cache keyed by content and tokenizer."""
    with writing_cache(cache_dir):
        spec = _built_in_prepared(SourceSpec(name, source, 0.0, text_field), tokenizer_path, cache_dir)
    if spec.prepared:
        return _open_prepared(spec, Path(spec.source).expanduser() / "eval", tokenizer_hash(tokenizer_path))
    root = cache_dir / f"heldout-{_cache_key([spec], tokenizer_path, 0)}"
    if not root.exists():
        print(f"Preparing the evaluation set {spec.name!r} ({spec.source!r}) in {root} (first use only)...",
              file=sys.stderr, flush=True)
        texts = list(documents.read_documents(spec.source, text_field=spec.text_field))
        with writing_cache(cache_dir), atomic_directory(root, replace=False) as tmp:
            TokenizedCorpus.build(texts, Tokenizer.from_file(tokenizer_path), tmp / "eval")
    return TokenizedCorpus.load(root / "eval")


def _open_prepared(spec: SourceSpec, directory: Path, expected_hash: str) -> ShardedCorpus:
    if not (directory / _MANIFEST).is_file():
        raise DataError(
            f"source {spec.name!r}: {directory} is missing (prepared without an eval split?). "
            f"Fix: re-run python -m llama_jax.data.prepare with --eval_fraction above 0."
        )
    return ShardedCorpus.open(directory, tokenizer_hash=expected_hash)


def _cache_key(specs: list[SourceSpec], tokenizer: Path | None, vocab_size: int) -> str:
    """A digest of everything the cached corpora are made from: each source's name, field and files' names and
    bytes (built-in sources by Python version), the tokenizer files' bytes and the vocabulary size. An edited,
    added or removed file therefore gives a new cache entry, never a stale one."""
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{vocab_size}|".encode())
    for spec in specs:
        digest.update(f"{spec.name}|{spec.source}|{spec.text_field}|".encode())
        if spec.source in documents.BUILTIN_SOURCES:
            digest.update(sys.version.encode())
            continue
        for path in documents.list_files(spec.source):
            digest.update(f"{path}|{documents.file_digest(path)}|".encode())
    for path in tokenizer_files(tokenizer) if tokenizer is not None else []:
        digest.update(f"{path.name}|{documents.file_digest(path)}|".encode())
    return digest.hexdigest()[:16]


def _build(specs: list[SourceSpec], tokenizer_path: Path | None, vocab_size: int, root: Path) -> None:
    """Builds the cache entry in a temporary directory renamed into place, so a killed build is simply redone."""
    print(f"Preparing {', '.join(repr(s.source) for s in specs)} in {root} (first use only)...", file=sys.stderr,
          flush=True)
    splits = {spec.name: _split_documents(spec) for spec in specs}
    with atomic_directory(root, replace=False) as tmp:
        if tokenizer_path is not None:
            tokenizer = Tokenizer.from_file(tokenizer_path)
        else:
            every_train_text = [text for train, _ in splits.values() for text in train]
            tokenizer = train_bpe(every_train_text, vocab_size, tmp / "tokenizer.model")
        for name, (train, eval_) in splits.items():
            TokenizedCorpus.build(train, tokenizer, tmp / name / "train")
            TokenizedCorpus.build(eval_, tokenizer, tmp / name / "eval")


def _split_documents(spec: SourceSpec) -> tuple[list[str], list[str]]:
    if spec.source == "stdlib":
        return stdlib_documents()  # split by file path, as the default job's cache is
    return _split(list(documents.read_documents(spec.source, text_field=spec.text_field)), spec)


def _split(texts: list[str], spec: SourceSpec) -> tuple[list[str], list[str]]:
    """A stable held-out split by content hash; at least one document on each side."""
    if len(texts) < 2:
        raise DataError(
            f"source {spec.name!r} ({spec.source}) has {len(texts)} document(s): at least 2 are needed (one is held "
            "out for eval). Fix: add documents."
        )
    held_out = [int(hashlib.md5(t.encode()).hexdigest(), 16) % 10_000 < EVAL_FRACTION * 10_000 for t in texts]
    if not any(held_out):
        held_out[-1] = True
    if all(held_out):
        held_out[0] = False
    train = [t for t, h in zip(texts, held_out) if not h]
    return train, [t for t, h in zip(texts, held_out) if h]
