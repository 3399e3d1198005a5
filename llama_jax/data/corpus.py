"""Chooses and prepares the training corpus named by `cfg.data` (the glue between config and data modules)."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import ml_collections

from llama_jax.data.sources import (
    PreparedCorpus,
    TokenizedCorpus,
    atomic_directory,
    prepare_stdlib_corpus,
    source_files,
    stdlib_documents,
    text_file_documents,
)
from llama_jax.data.tokenizer import Tokenizer, tokenizer_files, train_bpe
from llama_jax.errors import DataError

EVAL_FRACTION = 0.02
# Part of every user-corpus cache key; bumped whenever what a cached document holds changes
# (2: documents framed by the tokenizer's own bos rule, `Tokenizer.encode_documents`; 3: empty documents skipped).
_CACHE_FORMAT = 3


def load_corpus(data_cfg: ml_collections.ConfigDict, vocab_size: int) -> PreparedCorpus:
    """The tokenized train/eval corpus and its tokenizer, built on first use and cached in data.cache_dir.

    Without `data.tokenizer`, a BPE tokenizer of `vocab_size` tokens is trained on the train split.
    """
    cache_dir = Path(data_cfg.cache_dir).expanduser()
    if data_cfg.source == "stdlib" and not data_cfg.tokenizer:
        return prepare_stdlib_corpus(cache_dir, vocab_size)
    if data_cfg.tokenizer and not Path(data_cfg.tokenizer).expanduser().exists():
        raise DataError(f"data.tokenizer={data_cfg.tokenizer!r} does not exist: give the path of a tokenizer file")
    root = cache_dir / f"corpus-{_cache_key(data_cfg, vocab_size)}"
    if not root.exists():
        _build(data_cfg, vocab_size, root)
    tokenizer_path = Path(data_cfg.tokenizer).expanduser() if data_cfg.tokenizer else root / "tokenizer.model"
    return PreparedCorpus(tokenizer_path, TokenizedCorpus.load(root / "train"), TokenizedCorpus.load(root / "eval"))


def _cache_key(data_cfg: ml_collections.ConfigDict, vocab_size: int) -> str:
    """A digest of everything the cached corpus is made from: the source files' names and bytes (the standard
    library's by Python version), the tokenizer files' bytes and the vocabulary size. An edited, added or removed
    file therefore gives a new cache entry, never a stale one; hashing costs a read of the files per run."""
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{vocab_size}|{data_cfg.source}|{data_cfg.text_field}|".encode())
    if data_cfg.source == "stdlib":
        digest.update(sys.version.encode())
        files = []
    else:
        files = source_files(data_cfg.source)
    if data_cfg.tokenizer:
        files += tokenizer_files(Path(data_cfg.tokenizer).expanduser())
    for path in files:
        with path.open("rb") as f:
            digest.update(f"{path.as_posix()}|".encode() + hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()[:16]


def _build(data_cfg: ml_collections.ConfigDict, vocab_size: int, root: Path) -> None:
    """Builds the cache entry in a temporary directory renamed into place, so a killed build is simply redone."""
    print(f"Preparing corpus {data_cfg.source!r} in {root} (first use only)...", file=sys.stderr, flush=True)
    if data_cfg.source == "stdlib":
        train_texts, eval_texts = stdlib_documents()
    else:
        train_texts, eval_texts = _split(text_file_documents(data_cfg.source, data_cfg.text_field))
    with atomic_directory(root) as tmp:
        if data_cfg.tokenizer:
            tokenizer = Tokenizer.from_file(Path(data_cfg.tokenizer).expanduser())
        else:
            tokenizer = train_bpe(train_texts, vocab_size, tmp / "tokenizer.model")
        TokenizedCorpus.build(train_texts, tokenizer, tmp / "train")
        TokenizedCorpus.build(eval_texts, tokenizer, tmp / "eval")


def _split(texts: list[str]) -> tuple[list[str], list[str]]:
    """A stable held-out split by content hash; at least one document on each side."""
    if len(texts) < 2:
        raise DataError(f"data.source has {len(texts)} document(s): at least 2 are needed (one is held out for eval)")
    held_out = [int(hashlib.md5(t.encode()).hexdigest(), 16) % 10_000 < EVAL_FRACTION * 10_000 for t in texts]
    if not any(held_out):
        held_out[-1] = True
    if all(held_out):
        held_out[0] = False
    train = [t for t, h in zip(texts, held_out) if not h]
    return train, [t for t, h in zip(texts, held_out) if h]
