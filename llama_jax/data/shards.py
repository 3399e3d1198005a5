"""Prepared corpora on disk: pre-tokenized documents in ArrayRecord shards, described by a manifest.

A prepared directory holds `manifest.json`, `lengths.npy` (int64 tokens per document, all shards in order) and
`shard-00000.array_record`, ... One record is one document: its tokens as little-endian uint32, followed, when the
manifest says `"loss_mask": true`, by one uint8 mask byte per token. ArrayRecord gives random access to any record
(written with group_size 1, so reading one document decompresses only that document), which is what a shuffled,
resumable pipeline needs; the lengths file lets packing and mixing plan without reading a record.

The manifest records everything the corpus was made from (tokenizer hash, source files' digests, filters and what
they removed), so a training run can refuse a corpus prepared with another tokenizer instead of training on ids
that mean something else.
"""

from __future__ import annotations

import collections
import datetime
import hashlib
import json
import os
import threading
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Self

import numpy as np
from array_record.python.array_record_module import ArrayRecordReader, ArrayRecordWriter

from llama_jax.data.sources import atomic_directory
from llama_jax.data.tokenizer import tokenizer_files
from llama_jax.errors import DataError
from llama_jax.workdir import is_remote

FORMAT = "llama_jax.sharded_corpus"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
LENGTHS_FILE = "lengths.npy"
MAX_OPEN_READERS = 256  # well below the usual limit of 1024 open files per process
DEFAULT_SHARD_TOKENS = 2**27  # 512 MiB of uint32 tokens before compression
_WRITER_OPTIONS = "group_size:1"  # one record per compressed chunk: random reads decompress one document
_READER_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"  # array_record's setting for random access
_LENGTHS_FLUSH = 1 << 20


def local_directory(path: str | os.PathLike, what: str) -> Path:
    """`path`, a prepared corpus's directory, as a local path. ArrayRecord opens its files on a file system only (the
    library has no Cloud Storage support), so a URL is refused with what works instead: the bucket mounted with
    gcsfuse, as MaxText reads ArrayRecord from buckets."""
    if is_remote(path):
        raise DataError(
            f"{what} {os.fspath(path)} is a URL, but a prepared corpus is ArrayRecord files, which are written and read "
            "on a file system only: mount the bucket with gcsfuse (gcsfuse --implicit-dirs BUCKET /mnt/BUCKET) and "
            "give the path under the mount, or use a local disk"
        )
    return Path(path).expanduser()


def tokenizer_hash(path: str | os.PathLike) -> str:
    """sha256 over the names and bytes of the tokenizer's files, not their location, so a copy hashes the same."""
    digest = hashlib.sha256()
    for file in tokenizer_files(path):
        data = file.read_bytes()
        digest.update(f"{file.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class ShardWriter:
    """Writes a prepared corpus: a context manager whose `write` appends one document.

    Shards are cut at `shard_tokens` tokens (a document longer than that gets a shard of its own; documents are
    never split). Everything is written into a temporary sibling directory that replaces `directory` only when the
    block exits without an exception, so a killed preparation leaves nothing `ShardedCorpus.open` accepts.
    Entries of `metadata` (the tokenizer, sources, filters...) are added to the manifest; it may be updated until
    the block ends, since filter counts are only known then. `manifest` holds the written manifest afterwards.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        loss_mask: bool = False,
        metadata: dict | None = None,
    ) -> None:
        if shard_tokens < 1:
            raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory = Path(directory)
        self.shard_tokens = shard_tokens
        self.loss_mask = loss_mask
        self.metadata = dict(metadata or {})
        self.documents = 0
        self.tokens = 0
        self.manifest: dict | None = None
        self._atomic = atomic_directory(self.directory)
        self._shards: list[dict] = []
        self._writer: ArrayRecordWriter | None = None
        self._lengths = array("q")

    def __enter__(self) -> Self:
        self._tmp = self._atomic.__enter__()
        self._lengths_raw = (self._tmp / f"{LENGTHS_FILE}.raw").open("wb")
        return self

    def write(self, tokens: Sequence[int] | np.ndarray, loss_mask: Sequence[int] | np.ndarray | None = None) -> None:
        tokens = _as_uint32(tokens)
        record = tokens.tobytes()
        if self.loss_mask:
            if loss_mask is None or len(loss_mask) != len(tokens):
                raise DataError("this corpus stores loss masks: pass one mask value per token to write()")
            record += np.asarray(loss_mask, dtype=np.uint8).tobytes()
        elif loss_mask is not None:
            raise DataError("a loss mask was given to a ShardWriter made without loss_mask=True")
        shard = self._shards[-1] if self._shards else None
        if shard is None or (shard["tokens"] and shard["tokens"] + len(tokens) > self.shard_tokens):
            shard = self._start_shard()
        self._writer.write(record)
        shard["documents"] += 1
        shard["tokens"] += len(tokens)
        self.documents += 1
        self.tokens += len(tokens)
        self._lengths.append(len(tokens))
        if len(self._lengths) >= _LENGTHS_FLUSH:
            self._flush_lengths()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abandon(exc)
            return
        try:
            self._finish()
        except BaseException as e:
            self._abandon(e)
            raise
        self._atomic.__exit__(None, None, None)

    def _abandon(self, exc: BaseException) -> None:
        if self._writer is not None:
            self._writer.close()
        self._lengths_raw.close()
        self._atomic.__exit__(type(exc), exc, exc.__traceback__)

    def _start_shard(self) -> dict:
        self._close_shard()
        name = f"shard-{len(self._shards):05d}.array_record"
        self._writer = ArrayRecordWriter(str(self._tmp / name), _WRITER_OPTIONS)
        self._shards.append({"file": name, "documents": 0, "tokens": 0})
        return self._shards[-1]

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self._writer = None
        shard = self._shards[-1]
        path = self._tmp / shard["file"]
        shard.update(bytes=path.stat().st_size, sha256=file_sha256(path))

    def _flush_lengths(self) -> None:
        self._lengths.tofile(self._lengths_raw)
        self._lengths = array("q")

    def _finish(self) -> None:
        self._close_shard()
        self._flush_lengths()
        self._lengths_raw.close()
        lengths_path = self._write_lengths_npy()
        self.manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "documents": self.documents,
            "tokens": self.tokens,
            "loss_mask": self.loss_mask,
            "shards": self._shards,
            "lengths": {"file": LENGTHS_FILE, "bytes": lengths_path.stat().st_size, "sha256": file_sha256(lengths_path)},
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **self.metadata,
        }
        (self._tmp / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=2) + "\n", encoding="utf-8")

    def _write_lengths_npy(self) -> Path:
        """Streams the raw lengths behind an .npy header, so they never have to fit in memory at once."""
        raw = self._tmp / f"{LENGTHS_FILE}.raw"
        path = self._tmp / LENGTHS_FILE
        header = {"descr": "<i8", "fortran_order": False, "shape": (self.documents,)}
        with path.open("wb") as out, raw.open("rb") as src:
            np.lib.format.write_array_header_1_0(out, header)
            while chunk := src.read(1 << 24):
                out.write(chunk)
        raw.unlink()
        return path


def _as_uint32(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.dtype == np.uint32:
        return tokens.astype("<u4", copy=False)
    if tokens.ndim != 1 or (tokens.size and tokens.dtype.kind not in "iu"):
        raise DataError(f"a document must be a 1-D sequence of integer token ids, got {tokens.dtype} {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(np.uint32).max):
        raise DataError("token ids must fit in uint32 (0 .. 4294967295): check the tokenizer")
    return tokens.astype("<u4")


class ShardedCorpus:
    """A prepared directory, opened for random access to its documents by global index.

    `open` checks the manifest, every shard's size and the lengths file, which catches missing and truncated files
    in time proportional to the number of documents, not tokens; `verify` also checks every digest, which reads the
    whole corpus. Reading is thread-safe (array_record readers are, and the cache of them is locked), and readers
    are opened on first use, so opening costs nothing per shard. The corpus pickles without its readers,
    so grain worker processes reopen their own.
    """

    def __init__(self, directory: Path, manifest: dict, lengths: np.ndarray) -> None:
        self.directory = directory
        self.manifest = manifest
        self.lengths = lengths
        self.has_loss_mask = bool(manifest["loss_mask"])
        self._first_document = np.cumsum([0] + [s["documents"] for s in manifest["shards"]], dtype=np.int64)
        self._readers: collections.OrderedDict[int, ArrayRecordReader] = collections.OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, directory: str | os.PathLike, *, tokenizer_hash: str | None = None) -> ShardedCorpus:
        directory = local_directory(directory, "prepared corpus")
        manifest = _read_manifest(directory)
        if tokenizer_hash is not None and manifest.get("tokenizer", {}).get("tokenizer_hash") != tokenizer_hash:
            prepared_with = manifest.get("tokenizer", {}).get("path", "an unrecorded tokenizer")
            raise DataError(
                f"{directory} was prepared with another tokenizer ({prepared_with}): re-run prepare with "
                "--tokenizer X (the tokenizer you train with), or set data.tokenizer to the one it was prepared with"
            )
        fix = _fix_prepare(directory)
        for shard in manifest["shards"]:
            path = directory / shard["file"]
            if not path.is_file():
                raise DataError(f"{path} is missing from the prepared corpus {directory}: {fix}")
            if path.stat().st_size != shard["bytes"]:
                raise DataError(
                    f"{path} has {path.stat().st_size} bytes but the manifest says {shard['bytes']} "
                    f"(truncated or overwritten): {fix}"
                )
        return cls(directory, manifest, _load_lengths(directory, manifest))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.manifest["tokens"])

    def read(self, index: int) -> np.ndarray:
        """The uint32 tokens of document `index`."""
        return self._record(index)[0]

    def __getitem__(self, index: int) -> np.ndarray:
        """`read`, so that grain can use the corpus as a random-access data source."""
        return self.read(index)

    def read_loss_mask(self, index: int) -> np.ndarray:
        """The uint8 loss mask of document `index` (1: the token counts in the loss)."""
        if not self.has_loss_mask:
            raise DataError(f"{self.directory} holds no loss masks: prepare it from chat/SFT data to get them")
        return self._record(index)[1]

    def verify(self) -> None:
        """Checks every shard's and the lengths file's sha256 against the manifest (reads the whole corpus)."""
        fix = _fix_prepare(self.directory)
        files = [*self.manifest["shards"], self.manifest["lengths"]]
        for entry in files:
            path = self.directory / entry["file"]
            if file_sha256(path) != entry["sha256"]:
                raise DataError(f"{path} does not match its sha256 in the manifest (the file is corrupt): {fix}")

    def _record(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range for a corpus of {len(self)} documents")
        shard = int(np.searchsorted(self._first_document, index, side="right")) - 1
        position = index - int(self._first_document[shard])
        path = self.directory / self.manifest["shards"][shard]["file"]
        try:
            record = self._reader(shard).read([position])[0]
        except RuntimeError as error:  # array_record's checksums: bytes changed in a shard of unchanged size
            raise DataError(f"record {position} of {path} cannot be read (the shard is corrupt: {error}): "
                            + _fix_prepare(self.directory)) from None
        n = int(self.lengths[index])
        if len(record) != n * (5 if self.has_loss_mask else 4):
            raise DataError(
                f"record {position} of {path} has {len(record)} "
                f"bytes, but lengths.npy says {n} tokens (the shard is corrupt): "
                + _fix_prepare(self.directory)
            )
        tokens = np.frombuffer(record, dtype="<u4", count=n)
        mask = np.frombuffer(record, dtype=np.uint8, offset=4 * n) if self.has_loss_mask else None
        return tokens, mask

    def _reader(self, shard: int) -> ArrayRecordReader:
        """The shard's reader, from a cache of at most MAX_OPEN_READERS: a large corpus has more shards than a
        process may open files. An evicted reader is only dropped, not closed, so a thread still reading from it
        finishes; it closes itself once the last reference goes."""
        with self._lock:
            reader = self._readers.get(shard)
            if reader is None:
                path = self.directory / self.manifest["shards"][shard]["file"]
                reader = self._readers[shard] = ArrayRecordReader(str(path), _READER_OPTIONS)
                if len(self._readers) > MAX_OPEN_READERS:
                    self._readers.popitem(last=False)
            else:
                self._readers.move_to_end(shard)
        return reader

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "manifest": self.manifest}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["manifest"], _load_lengths(state["directory"], state["manifest"]))


def _fix_prepare(directory: Path) -> str:
    """The command that rebuilds a prepared corpus. Its --out is the directory above the train/ and eval/ splits that
    readers open, so naming the split itself would have written train/train/."""
    out = directory.parent if directory.name in ("train", "eval") else directory
    return f"re-run `python -m llama_jax.data.prepare` (or `data.preferences`, for pairs) with --out {out}"


def _read_manifest(directory: Path) -> dict:
    fix = _fix_prepare(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        hint = ""
        if (directory / "train" / MANIFEST_FILE).is_file():
            hint = f" (it holds prepared splits: open {directory / 'train'} or {directory / 'eval'})"
        raise DataError(f"no prepared corpus at {directory}: {MANIFEST_FILE} is missing{hint}; {fix}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}): {fix}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a llama_jax prepared-corpus manifest: {fix}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format version {manifest.get('format_version')}, this llama_jax reads version "
            f"{FORMAT_VERSION}: {fix}"
        )
    if not _has_required_fields(manifest):
        raise DataError(f"{path} lacks or mangles required fields (documents, tokens, shards, lengths): {fix}")
    return manifest


def _has_required_fields(manifest: dict) -> bool:
    try:
        return (
            all(isinstance(manifest[k], int) for k in ("documents", "tokens"))
            and isinstance(manifest["loss_mask"], bool)
            and isinstance(manifest["lengths"]["file"], str)
            and all(
                isinstance(s["file"], str)
                and all(isinstance(s[k], int) for k in ("documents", "tokens", "bytes"))
                and s["documents"] > 0
                for s in manifest["shards"]
            )
        )
    except (KeyError, TypeError):
        return False


def _load_lengths(directory: Path, manifest: dict) -> np.ndarray:
    """lengths.npy memory-mapped, checked against the manifest's per-shard counts (one pass over 8 bytes a document)."""
    fix = _fix_prepare(directory)
    path = directory / manifest["lengths"]["file"]
    try:
        lengths = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        raise DataError(f"{path} is missing from the prepared corpus: {fix}") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}): {fix}") from None
    if lengths.dtype != np.int64 or lengths.shape != (manifest["documents"],):
        raise DataError(
            f"{path} holds {lengths.dtype} {lengths.shape}, but the manifest describes {manifest['documents']} "
            f"documents (int64): {fix}"
        )
    shard_documents = [s["documents"] for s in manifest["shards"]]
    if sum(shard_documents) != manifest["documents"]:
        raise DataError(f"{directory / MANIFEST_FILE} has shard document counts that do not add up: {fix}")
    starts = np.cumsum([0] + shard_documents[:-1], dtype=np.int64)
    sums = np.add.reduceat(lengths, starts) if len(lengths) else np.zeros(0, np.int64)
    expected = [s["tokens"] for s in manifest["shards"]]
    if len(lengths) and (lengths.min() < 0 or sums.tolist() != expected):
        raise DataError(f"{path} disagrees with the manifest's token counts per shard (it is corrupt): {fix}")
    return lengths
