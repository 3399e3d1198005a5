"""Training documents streamed from files of any supported format, local or remote, with bad data counted.

Preparing a corpus reads every document exactly once, and real corpora outgrow memory, live in buckets and
hold a few broken records. So documents come from a generator that reads each file incrementally, in an order
fixed by the sorted file paths; and a broken record is counted, with its file:line, and skipped, because
aborting a long preparation over one bad line is as unhelpful as dropping data without a word.

Paths are `etils.epath` paths, as in grain and Orbax: local paths, and gs://, s3://, az:// and hf:// URLs
through fsspec (gcsfs, s3fs, ... must be installed) or through tf.io.gfile when TensorFlow is installed. epath
knows no other scheme, not even fsspec's memory://, so any other URL is a DataError rather than a second,
differently behaving path layer. The tests read "remote" files without a network by registering fsspec's
in-memory filesystem under the gs protocol, so they run exactly the code that reads a real bucket.

epath refuses `**` in glob (it could mean thousands of bucket requests) and its fsspec walk returns directories
without their scheme, so recursive patterns are matched here: walk from the pattern's literal prefix, rebuild
each directory's path from its place below that prefix, and match the glob component by component.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fnmatch
import functools
import gzip
import hashlib
import importlib.util
import json
import posixpath
import sys
import sysconfig
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, BinaryIO

import zstandard
from etils import epath

from llama_jax.errors import DataError

if TYPE_CHECKING:
    import pyarrow.parquet as pq

BUILTIN_SOURCES = ("stdlib", "stdlib_docstrings", "pydoc_topics")
# Built-in chat and preference names for data.source (and an eval source), with the kind of corpus each is:
# `stdlib_chat`'s records, prepared with the run's tokenizer under the run's data.cache_dir when the data is opened,
# not when a config file is read (before the command line's overrides of data.cache_dir apply).
BUILTIN_CHAT_SOURCES = {"stdlib_chat": "sft", "stdlib_preferences": "preferences"}
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".jsonl.zst", ".json.zst")
PARQUET_SUFFIXES = (".parquet",)
RECORD_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES  # files of records (chat data, prompts), not of plain text
MAX_EXAMPLES = 5
_DIGEST_BLOCK = 1 << 20
_PARQUET_BATCH_ROWS = 1024
_ZSTD_READ_BYTES = 1 << 20
_GLOB_CHARS = "*?["
_THIRD_PARTY_DIRS = frozenset({"site-packages", "dist-packages"})
# What a damaged file (a truncated gzip, say) raises mid-read, as opposed to a file that cannot be opened at all.
_READ_ERRORS = (OSError, EOFError, zlib.error, zstandard.ZstdError)
_SUFFIXES = " ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)
_SUPPORTED = (
    f"{' '.join(TEXT_SUFFIXES)} (a whole file is one document), {' '.join(JSONL_SUFFIXES)} "
    f"(one JSON object per line) and {' '.join(PARQUET_SUFFIXES)}"
)

# reason: (singular, plural), as the summary reads.
_REASONS = {
    "empty": ("empty or whitespace-only document", "empty or whitespace-only documents"),
    "invalid_utf8": ("document that is not valid UTF-8", "documents that are not valid UTF-8"),
    "bad_json": ("malformed JSON line", "malformed JSON lines"),
    "missing_field": ("record without a string text field", "records without a string text field"),
    "unparsable": ("Python file that does not parse", "Python files that do not parse"),
    "unreadable": ("unreadable file", "unreadable files"),
}


# ---------------------------------------------------------------------------------------------------------
# Accounting


@dataclasses.dataclass
class ReadReport:
    """What was read and what was skipped and why, so a user can judge whether the skipped data matters.

    Each skip reason keeps its first `MAX_EXAMPLES` locations: "file:line" (the row, from 1, for Parquet),
    the bare file for a whole-file document, "pydoc_topics:NAME" for a topic. One report may be shared by
    several `read_documents` calls, to account for a whole mixture.
    """

    documents: int = 0
    files: int = 0
    empty: int = 0
    invalid_utf8: int = 0
    bad_json: int = 0
    missing_field: int = 0
    unparsable: int = 0
    unreadable: int = 0
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, location: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        kept = self.examples.setdefault(reason, [])
        if len(kept) < MAX_EXAMPLES:
            kept.append(location)

    @property
    def skipped(self) -> int:
        return sum(getattr(self, reason) for reason in _REASONS)

    def summary(self) -> str:
        read = f"read {_count(self.documents, 'document', 'documents')} from {_count(self.files, 'file', 'files')}"
        skips = [self._describe(reason) for reason in _REASONS if getattr(self, reason)]
        return f"{read}; skipped {', '.join(skips)}" if skips else read

    def _describe(self, reason: str) -> str:
        number = getattr(self, reason)
        examples = self.examples.get(reason, [])
        more = ", ..." if number > len(examples) else ""
        return f"{_count(number, *_REASONS[reason])} ({', '.join(examples)}{more})"


def _count(number: int, singular: str, plural: str) -> str:
    return f"{number:,} {singular if number == 1 else plural}"


# ---------------------------------------------------------------------------------------------------------
# Files


def list_files(pattern: str) -> list[epath.Path]:
    """The files a source names, sorted by path string so that every machine reads them in the same order.

    `pattern` is a file, a directory (its supported files, recursively), or a glob where `**` spans
    directories; local or a URL epath knows. Hidden files and directories are left out, as glob does.
    A built-in source names the files its documents come from, so that manifests and cache keys cover it too.
    """
    if not pattern.strip():
        raise DataError("An empty source names no files. Fix: give a file, a directory ('.' for this one), a glob or "
                        f"a built-in source: {', '.join(BUILTIN_SOURCES)}.")
    if pattern in BUILTIN_SOURCES:
        files = _builtin_files(pattern)
    else:
        try:
            files = _matching_files(pattern)
        except (OSError, ImportError) as e:
            raise DataError(
                f"Cannot list {pattern!r} ({e}). Fix: for a local path check its permissions; for gs://, s3:// "
                "or az:// install gcsfs, s3fs or adlfs and check your credentials."
            ) from e
        except Exception as e:  # a remote filesystem's client raises its own errors (hf:// without a network: httpx's)
            if "://" not in pattern:
                raise
            raise DataError(f"Cannot list {pattern!r} ({type(e).__name__}: {e}). Fix: check the URL, this machine's "
                            "network and your credentials.") from e
    if not files:
        raise DataError(
            f"No files match {pattern!r}. Fix: check the path and the glob (** matches subdirectories; a "
            f"directory is searched for {_SUFFIXES} files), or use a built-in source: {', '.join(BUILTIN_SOURCES)}, "
            f"or, with data.tokenizer set, the built-in chat data: {', '.join(BUILTIN_CHAT_SOURCES)}."
        )
    return sorted(files, key=str)


def file_digest(path: epath.PathLike) -> str:
    """The sha256 of a file's bytes, streamed so that a large shard costs no memory, for manifests and cache keys."""
    digest = hashlib.sha256()
    with _open(epath.Path(path)) as f:
        for block in iter(functools.partial(f.read, _DIGEST_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def _matching_files(pattern: str) -> list[epath.Path]:
    root, glob = _split_glob(pattern)
    base = _to_path(root)
    if glob and "**" in glob.split("/"):
        segments = glob.split("/")
        return [p for p in _walk_files(base) if _glob_match(p.relative_to(base).parts, segments)]
    if glob:
        return [p for p in base.glob(glob) if p.is_file()]
    if base.is_dir():
        return [p for p in _walk_files(base) if _format(p)]
    return [base] if base.exists() else []


def _split_glob(pattern: str) -> tuple[str, str]:
    """(literal prefix, glob): only the part below the first component with a glob character needs listing."""
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in _GLOB_CHARS):
            root = "/".join(parts[:i]) or ("/" if pattern.startswith("/") else ".")
            return root, "/".join(parts[i:])
    return pattern, ""


def _to_path(text: str) -> epath.Path:
    try:
        return epath.Path(text)
    except KeyError:
        raise DataError(
            f"{text!r} has a URL scheme that etils.epath cannot read. "
            "Fix: use a local path or a gs://, s3://, az:// or hf:// URL."
        ) from None


def _walk_files(top: epath.Path, skip_dirs: frozenset[str] = frozenset()) -> Iterator[epath.Path]:
    """Every non-hidden file under `top`, one listing per directory.

    epath's fsspec walk yields directories without their scheme (gs://b/d comes back as b/d), so each is
    rebuilt from its path relative to the first directory yielded, which is `top` itself.
    """
    first = None
    for directory, dirs, files in top.walk():
        first = str(directory) if first is None else first
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip_dirs]
        here = top / posixpath.relpath(str(directory), first)
        yield from (here / name for name in files if not name.startswith("."))


def _glob_match(parts: tuple[str, ...], segments: list[str]) -> bool:
    """Whether path components match glob segments, where a `**` segment matches any number of components."""
    if not segments:
        return not parts
    if segments[0] == "**":
        return any(_glob_match(parts[i:], segments[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], segments[0]) and _glob_match(parts[1:], segments[1:])


def _format(path: epath.Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("text", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


@contextlib.contextmanager
def _open(path: epath.Path) -> Iterator[BinaryIO]:
    try:
        f = path.open("rb")
    except OSError as e:
        raise DataError(
            f"Cannot open {path} ({e}). Fix: check that it exists and is readable, or remove it from the source."
        ) from e
    with f:
        yield f


# ---------------------------------------------------------------------------------------------------------
# Documents

# A reader yields (location, text) for each candidate document of one file and counts what it skips itself.
_Reader = Callable[[epath.Path, ReadReport], Iterator[tuple[str, str]]]


def read_documents(pattern: str, *, text_field: str = "text", report: ReadReport | None = None) -> Iterator[str]:
    """The documents of a source, streamed in a fixed order: files sorted by path, then each file's own order.

    The files are listed and their formats checked now, so a wrong pattern fails before any work is done;
    the returned generator reads them. Bad records are counted in `report` and skipped; the summary goes to
    stderr at the end when anything was skipped, and a source that yields no document at all is a DataError.
    """
    report = ReadReport() if report is None else report
    if pattern in BUILTIN_SOURCES:
        reader = _BUILTIN_READERS[pattern]
        sources = [(path, reader) for path in list_files(pattern)]
    else:
        sources = [(path, _reader_for(path, pattern, text_field)) for path in list_files(pattern)]
    return _stream(pattern, sources, report)


def _reader_for(path: epath.Path, pattern: str, text_field: str) -> _Reader:
    kind = _format(path)
    if kind == "text":
        return _whole_file_documents
    if kind == "jsonl":
        return functools.partial(_jsonl_documents, text_field=text_field)
    if kind == "parquet":
        return functools.partial(_parquet_documents, text_field=text_field)
    raise DataError(
        f"{path} has an unsupported file type. Supported: {_SUPPORTED}. "
        f"Fix: narrow {pattern!r} to supported files, or convert this one."
    )


def _stream(pattern: str, sources: list[tuple[epath.Path, _Reader]], report: ReadReport) -> Iterator[str]:
    skipped_before, yielded = report.skipped, 0
    for path, reader in sources:
        report.files += 1
        for location, text in reader(path, report):
            if not text.strip():
                report.skip("empty", location)
                continue
            report.documents += 1
            yielded += 1
            yield text
    if not yielded:
        raise DataError(
            f"{pattern!r} holds no usable document: {report.summary()}. "
            "Fix: check the files, and for .jsonl or Parquet that data.text_field (prepare: --text_field) names the "
            "field with the text."
        )
    if report.skipped > skipped_before:
        print(report.summary(), file=sys.stderr, flush=True)


def _whole_file_documents(path: epath.Path, report: ReadReport) -> Iterator[tuple[str, str]]:
    text = _read_text(path, report)
    if text is not None:
        yield str(path), text


def _read_text(path: epath.Path, report: ReadReport) -> str | None:
    with _open(path) as f:
        try:
            data = f.read()
        except _READ_ERRORS:
            report.skip("unreadable", str(path))
            return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        report.skip("invalid_utf8", f"{path}:{line}")
        return None


def _jsonl_documents(path: epath.Path, report: ReadReport, text_field: str) -> Iterator[tuple[str, str]]:
    with _lines(path) as lines:
        line_number = 0
        try:
            for line_number, line in enumerate(lines, start=1):
                location = f"{path}:{line_number}"
                text = _jsonl_text(line, location, text_field, report)
                if text is not None:
                    yield location, text
        except _READ_ERRORS:
            report.skip("unreadable", f"{path}:{line_number + 1}")


@contextlib.contextmanager
def _lines(path: epath.Path) -> Iterator[Iterable[bytes]]:
    """The file's lines, decompressed: gzip (.gz), or Zstandard (.zst, as SlimPajama and DCLM ship JSON Lines)."""
    with _open(path) as raw:
        name = path.name.lower()
        if name.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as unzipped:
                yield unzipped
        elif name.endswith(".zst"):
            yield _zstd_lines(raw)
        else:
            yield raw


def _zstd_lines(raw: BinaryIO) -> Iterator[bytes]:
    """The lines of Zstandard data of one or more frames. Data that ends inside a frame (a truncated download) raises
    EOFError, as gzip's reader does; zstandard's own stream reader ends there silently, as if the file were whole."""
    decompressor = zstandard.ZstdDecompressor()
    frame, in_frame, pending = decompressor.decompressobj(), False, b""
    while compressed := raw.read(_ZSTD_READ_BYTES):
        while compressed:
            pending += frame.decompress(compressed)
            in_frame, compressed = True, b""
            if frame.eof:  # the next frame begins in what this one left
                compressed = frame.unused_data
                frame, in_frame = decompressor.decompressobj(), False
        *lines, pending = pending.split(b"\n")
        yield from lines
    if in_frame:
        raise EOFError("the Zstandard data ends inside a frame")
    if pending:
        yield pending


def read_records(path: epath.PathLike) -> Iterator[tuple[str, bytes | dict]]:
    """The records of a JSON Lines file (.jsonl; compressed, .jsonl.gz, .json.gz, .jsonl.zst, .json.zst) or a
    Parquet file, for the readers of structured records (post-training data, evaluation tasks), each of which parses
    a line its own way: ("file:line", the line) for each non-blank line, ("file:row", the row as a dict) for Parquet.
    A file that cannot be read to its end (a truncated download) is a DataError: its records so far would be taken
    for all of them."""
    path = epath.Path(path)
    try:
        if _format(path) == "parquet":
            with _open(path) as f:
                yield from _parquet_records(path, f)
            return
        with _lines(path) as lines:
            for number, line in enumerate(lines, start=1):
                if line.strip():
                    yield f"{path}:{number}", line
    except _READ_ERRORS as err:
        raise _cut_short(path, err) from err


class NotUtf8(ValueError):
    """A JSON line whose text is not UTF-8; its message says where."""


def json_line(line: bytes) -> object:
    """The JSON value of one line. Raises NotUtf8 where the text is not UTF-8, JSON's `\\u` escapes included: one
    that spells half a surrogate pair (`"\\ud800"`, common in scraped web text) decodes to a string no tokenizer
    can encode, which would end the run there rather than be skipped with its line. Raises ValueError where the line
    is not JSON."""
    try:
        value = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise NotUtf8(f"{e.reason} at byte {e.start}") from None
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise NotUtf8("a \\u escape spells half a surrogate pair") from None
    return value


def _parquet_records(path: epath.Path, f: BinaryIO) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    row = 0
    try:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=_PARQUET_BATCH_ROWS):
            for record in batch.to_pylist():
                row += 1
                yield f"{path}:{row}", record
    except pa.ArrowException as err:
        raise _cut_short(path, err) from err


def _cut_short(path: epath.Path, err: Exception) -> DataError:
    return DataError(f"{path} cannot be read to its end ({type(err).__name__}: {err}): download or write it again")


def _jsonl_text(line: bytes, location: str, text_field: str, report: ReadReport) -> str | None:
    """The line's text, or None after counting why there is none; blank lines are no record and not counted."""
    if not line.strip():
        return None
    try:
        record = json_line(line)
    except NotUtf8:
        report.skip("invalid_utf8", location)
        return None
    except json.JSONDecodeError:
        report.skip("bad_json", location)
        return None
    text = record.get(text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        report.skip("missing_field", f"{location} {_what_it_has(record, text_field)}")
        return None
    return text


def _what_it_has(record, text_field: str) -> str:
    """What a record without a string text field holds instead ("has id/title", "has text as int", "is a list"), so
    that the summary shows which field the text is in."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}"
    if text_field in record:
        return f"has {text_field} as {type(record[text_field]).__name__}"
    names = sorted(record)
    return "has no fields" if not names else "has " + "/".join(names[:6]) + ("/..." if len(names) > 6 else "")


def _parquet_documents(path: epath.Path, report: ReadReport, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow as pa  # Lazy: only Parquet sources need pyarrow.
    import pyarrow.parquet as pq

    with _open(path) as raw:
        row = 0
        try:
            parquet = pq.ParquetFile(raw)
            _check_text_column(parquet, path, text_field)
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if isinstance(text, str):
                        yield f"{path}:{row}", text
                    else:
                        report.skip("missing_field", f"{path}:{row}")
        except (*_READ_ERRORS, pa.ArrowException):
            report.skip("unreadable", f"{path}:{row + 1}")


def _check_text_column(parquet: pq.ParquetFile, path: epath.Path, text_field: str) -> None:
    """A missing or non-text column is the same mistake in every row, so it stops the run instead of being counted."""
    import pyarrow as pa

    schema = parquet.schema_arrow
    fix = (f"Fix: set data.text_field (prepare: --text_field) to the column that holds the text (columns: "
           f"{', '.join(schema.names)}).")
    if text_field not in schema.names:
        raise DataError(f"{path} has no column {text_field!r}. {fix}")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise DataError(f"{path}: column {text_field!r} holds {kind}, not text. {fix}")


# ---------------------------------------------------------------------------------------------------------
# Built-in sources: text every Python installation has, for a mixture that needs no download


def _builtin_files(name: str) -> list[epath.Path]:
    if name == "pydoc_topics":
        spec = importlib.util.find_spec("pydoc_data.topics")
        if spec is None or spec.origin is None:
            raise DataError(
                "This Python has no pydoc_data.topics (some distributions package it separately). "
                "Fix: install the full standard library, or drop pydoc_topics from the source."
            )
        return [epath.Path(spec.origin)]
    root = epath.Path(sysconfig.get_paths()["stdlib"])
    return [p for p in _walk_files(root, skip_dirs=_THIRD_PARTY_DIRS) if p.name.endswith(".py")]


def _docstring_documents(path: epath.Path, report: ReadReport) -> Iterator[tuple[str, str]]:
    """A module's docstrings as one document: the prose of the standard library without its code."""
    source = _read_text(path, report)
    if source is None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Invalid escapes in old test files warn; the docstrings are fine.
            tree = ast.parse(source)
    except (SyntaxError, ValueError) as e:
        report.skip("unparsable", f"{path}:{getattr(e, 'lineno', None) or 1}")
        return
    text = module_docstrings(tree)
    if text:
        yield str(path), text


def module_docstrings(tree: ast.Module) -> str:
    """The docstrings of a module and of its classes and functions, in source order, joined by blank lines."""
    definitions = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = sorted((n for n in ast.walk(tree) if isinstance(n, definitions)), key=lambda n: (n.lineno, n.col_offset))
    docstrings = (ast.get_docstring(node) for node in (tree, *nodes))
    return "\n\n".join(doc for doc in docstrings if doc)


def _topic_documents(path: epath.Path, report: ReadReport) -> Iterator[tuple[str, str]]:
    """The help() topics (language reference prose), which ship as a dict in pydoc_data rather than as files."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield f"pydoc_topics:{name}", topics[name]


_BUILTIN_READERS: dict[str, _Reader] = {
    "stdlib": _whole_file_documents,
    "stdlib_docstrings": _docstring_documents,
    "pydoc_topics": _topic_documents,
}
