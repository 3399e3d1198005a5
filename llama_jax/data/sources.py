"""Where training text comes from, and the on-disk token store the pipeline reads.

The default job trains on the Python standard library's own sources: real text that every machine with
Python already has, so a first run needs no download. Documents are tokenized once into a
`TokenizedCorpus` (a flat token array plus document offsets, memory-mapped), which gives the pipeline
cheap random access to any document.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import shutil
import sys
import sysconfig
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from llama_jax.errors import DataError

EVAL_FRACTION = 0.02
MIN_EVAL_DOCUMENTS = 8
_ENCODE_CHUNK_DOCUMENTS = 256


class TokenizerLike(Protocol):
    """The part of `llama_jax.data.tokenizer.Tokenizer` that building a corpus needs."""

    def encode_documents(self, texts: list[str]) -> list[list[int]]: ...


# ---------------------------------------------------------------------------------------------------------
# Documents


def stdlib_documents() -> tuple[list[str], list[str]]:
    """(train, eval) texts of the standard library's .py files, one document per file.

    Paths are sorted and the eval split is picked by a hash of each relative path, so every machine with
    the same Python gets the same split, and a file's side of the split does not depend on which other
    files exist (apart from the few files at the cut).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    documents = dict(_stdlib_files(root))
    if not documents:
        raise DataError(
            f"No readable .py files under the standard library directory {root}. "
            "Fix: use a full Python installation, or point data.source at your own files."
        )
    ranked = sorted(documents, key=_stable_fraction)
    num_eval = max(MIN_EVAL_DOCUMENTS, round(EVAL_FRACTION * len(documents)))
    eval_paths = set(ranked[:num_eval])
    train = [text for path, text in documents.items() if path not in eval_paths]
    eval_ = [text for path, text in documents.items() if path in eval_paths]
    return train, eval_


def _stdlib_files(root: Path) -> Iterator[tuple[str, str]]:
    """(relative path, text) of each non-empty UTF-8 .py file in sorted order, third-party packages excluded."""
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.py"))
    for relative in paths:
        if {"site-packages", "dist-packages"} & set(relative.split("/")):
            continue
        try:
            text = (root / relative).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # A few test files are deliberately latin-1 or broken; they are not worth a special case.
        if text.strip():
            yield relative, text


def _stable_fraction(relative_path: str) -> float:
    """A number in [0, 1) fixed by the path alone (Python's hash() is salted per process)."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


# ---------------------------------------------------------------------------------------------------------
# Token store

_TOKENS_FILE = "tokens.npy"
_OFFSETS_FILE = "offsets.npy"


class TokenizedCorpus:
    """Documents as one flat uint32 token array plus int64 offsets (document i is tokens[offsets[i]:offsets[i+1]]).

    Loaded memory-mapped, so opening a large corpus is instant and many processes share the page cache.
    A corpus of chat examples also holds a uint8 `loss_mask` beside the tokens (1 on the tokens to learn).
    """

    def __init__(self, tokens: np.ndarray, offsets: np.ndarray, loss_mask: np.ndarray | None = None):
        self.tokens = tokens
        self.offsets = offsets
        self.loss_mask = loss_mask

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(np.asarray(self.offsets))

    @property
    def has_loss_mask(self) -> bool:
        return self.loss_mask is not None

    def read(self, index: int) -> np.ndarray:
        return self[index]

    def read_loss_mask(self, index: int) -> np.ndarray:
        if self.loss_mask is None:
            raise DataError("this corpus has no loss mask. Fix: build it from chat examples, or read tokens only.")
        return self.loss_mask[self.offsets[index] : self.offsets[index + 1]]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range for a corpus of {len(self)} documents")
        return self.tokens[self.offsets[index] : self.offsets[index + 1]]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @classmethod
    def build(
        cls,
        texts: Sequence[str],
        tokenizer: TokenizerLike,
        directory: str | os.PathLike,
    ) -> TokenizedCorpus:
        """Tokenizes `texts` and writes the store, replacing any previous one at `directory`.

        Each document is stored as `tokenizer.encode_documents` frames it (the tokenizer's own bos rule, then eos),
        so packed training rows hold exactly what the tokenizer's files say a text looks like.

        The files are written to a temporary sibling directory that is renamed into place at the end, so a
        process killed mid-build never leaves a store that `load` would accept.
        """
        directory = Path(directory)
        tokens, offsets = _tokenize(texts, tokenizer)
        try:
            with atomic_directory(directory) as tmp:
                np.save(tmp / _TOKENS_FILE, tokens)
                np.save(tmp / _OFFSETS_FILE, offsets)
        except OSError as e:  # a full disk or a quota: numpy's short write names neither the file nor the reason
            raise DataError(f"could not write {tokens.nbytes + offsets.nbytes:,} bytes of tokens into {directory} ({e}): "
                            "free space there, or set data.cache_dir to a directory with room") from e
        return cls.load(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> TokenizedCorpus:
        directory = Path(directory)
        fix = f"Fix: rebuild it with TokenizedCorpus.build (or delete {directory} to let the cache rebuild)."
        try:
            tokens = np.load(directory / _TOKENS_FILE, mmap_mode="r")
            offsets = np.load(directory / _OFFSETS_FILE, mmap_mode="r")
        except FileNotFoundError as e:
            raise DataError(f"No tokenized corpus at {directory} ({e.filename} is missing). {fix}") from e
        except ValueError as e:
            raise DataError(f"The tokenized corpus at {directory} is unreadable ({e}). {fix}") from e
        problem = _layout_problem(tokens, offsets)
        if problem:
            raise DataError(f"The tokenized corpus at {directory} is corrupt: {problem}. {fix}")
        return cls(tokens, offsets)


def _tokenize(texts: Sequence[str], tokenizer: TokenizerLike) -> tuple[np.ndarray, np.ndarray]:
    """Encodes in chunks so that batch encoding (parallel in tiktoken) is used without holding every list at once."""
    token_chunks: list[np.ndarray] = []
    lengths: list[int] = []
    for start in range(0, len(texts), _ENCODE_CHUNK_DOCUMENTS):
        documents = tokenizer.encode_documents(list(texts[start : start + _ENCODE_CHUNK_DOCUMENTS]))
        lengths.extend(len(d) for d in documents)
        token_chunks.append(np.fromiter(itertools.chain.from_iterable(documents), dtype=np.int64))
    tokens = np.concatenate(token_chunks) if token_chunks else np.zeros(0, np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint32).max):
        raise DataError("The tokenizer produced ids outside the uint32 range. Fix: check the tokenizer file.")
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    return tokens.astype(np.uint32), offsets


def _layout_problem(tokens: np.ndarray, offsets: np.ndarray) -> str | None:
    if tokens.ndim != 1 or tokens.dtype != np.uint32:
        return f"tokens must be a 1-D uint32 array, found {tokens.dtype} with shape {tokens.shape}"
    if offsets.ndim != 1 or offsets.dtype != np.int64 or len(offsets) == 0:
        return f"offsets must be a non-empty 1-D int64 array, found {offsets.dtype} with shape {offsets.shape}"
    if offsets[0] != 0 or offsets[-1] != len(tokens) or np.any(np.diff(offsets) < 0):
        return "offsets do not partition the token array"
    return None


class atomic_directory:
    """Context manager yielding a temporary directory that replaces `target` only if the block succeeds.

    `replace=False` is for cache entries named by a digest of what they are built from: several processes on a host
    (one per GPU) may build the same entry at once, and deleting the copy another one published first could pull it
    from under a reader, so the first published copy is kept and the others are dropped.
    """

    def __init__(self, target: Path, *, replace: bool = True):
        """`target` is resolved first: a symbolic link's own directory is replaced, not the link."""
        target = Path(target).resolve()
        self.target, self.replace = target, replace
        self.tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> Path:
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.target.exists():
            if not self.replace:
                shutil.rmtree(self.tmp, ignore_errors=True)
                return
            shutil.rmtree(self.target)
        try:
            os.rename(self.tmp, self.target)
        except OSError:
            # Another process published the same build between our rmtree and rename: keep theirs.
            if not self.target.exists():
                raise
            shutil.rmtree(self.tmp, ignore_errors=True)


def unigram_entropy(corpus: TokenizedCorpus) -> float:
    """Entropy (nats/token) of the corpus's token frequencies: the loss of the best context-free model.

    A language model that has learned anything beyond token frequencies has an eval loss far below this.
    """
    if corpus.num_tokens == 0:
        raise DataError("Cannot compute the unigram entropy of an empty corpus. Fix: add documents.")
    counts = np.bincount(np.asarray(corpus.tokens))
    p = counts[counts > 0] / corpus.num_tokens
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------------------------------------------------
# The default corpus, prepared once and cached


@dataclasses.dataclass(frozen=True)
class PreparedCorpus:
    tokenizer_path: Path
    train: TokenizedCorpus
    eval: TokenizedCorpus


def prepare_stdlib_corpus(cache_dir: str | os.PathLike, vocab_size: int) -> PreparedCorpus:
    """The standard-library corpus with a tokenizer trained on its train split, built once per cache entry.

    The cache entry is keyed by Python version (the stdlib differs between them) and vocabulary size. It is
    assembled in a temporary directory and renamed into place, so a killed build is simply redone.
    """
    root = Path(cache_dir) / f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-v{vocab_size}"
    if not root.exists():
        _build_stdlib_cache(root, vocab_size)
    tokenizer_path = root / "tokenizer.model"
    try:
        if not tokenizer_path.is_file():
            raise DataError(f"{tokenizer_path} is missing.")
        return PreparedCorpus(tokenizer_path, TokenizedCorpus.load(root / "train"), TokenizedCorpus.load(root / "eval"))
    except DataError as e:
        raise DataError(f"The corpus cache {root} is damaged: {e} Fix: delete {root}; the next run rebuilds it.") from e


def _build_stdlib_cache(root: Path, vocab_size: int) -> None:
    # Lazy: the tokenizer pulls in tiktoken, not needed to load.
    from llama_jax.data.tokenizer import train_bpe

    print(f"Preparing the standard-library corpus in {root} (first use only, some seconds)...", file=sys.stderr, flush=True)
    train_texts, eval_texts = stdlib_documents()
    with atomic_directory(root, replace=False) as tmp:
        tokenizer = train_bpe(train_texts, vocab_size, tmp / "tokenizer.model")
        train = TokenizedCorpus.build(train_texts, tokenizer, tmp / "train")
        eval_ = TokenizedCorpus.build(eval_texts, tokenizer, tmp / "eval")
    print(
        f"Prepared {len(train)} train documents ({train.num_tokens:,} tokens) and "
        f"{len(eval_)} eval documents ({eval_.num_tokens:,} tokens).",
        file=sys.stderr,
        flush=True,
    )
