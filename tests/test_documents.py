"""Tests for llama_jax.data.documents: formats, globs, order, bad-data accounting, built-in and remote sources."""

import ast
import gzip
import hashlib
import importlib
import importlib.util
import itertools
import json
import shutil
import sysconfig
import time
from pathlib import Path
from typing import ClassVar

import fsspec
import zstandard
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from llama_jax.data import documents
from llama_jax.data.documents import ReadReport, file_digest, list_files, read_documents, read_records
from llama_jax.errors import DataError


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    return path


def write_parquet(path: Path, columns: dict, row_group_size: int = 1000) -> Path:
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def write_tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------
# Formats


def test_text_files_are_one_document_each(tmp_path):
    write_tree(tmp_path, {"a.txt": "plain", "b.md": "# title", "c.py": "x = 1\n", "d.rst": "Title\n=====\n"})
    assert list(read_documents(str(tmp_path / "*"))) == ["plain", "# title", "x = 1\n", "Title\n=====\n"]


def test_jsonl_reads_the_configured_text_field(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "first", "text": "not this"}, {"content": "second"}])
    assert list(read_documents(str(tmp_path / "a.jsonl"), text_field="content")) == ["first", "second"]


@pytest.mark.parametrize("name", ["a.jsonl.gz", "a.json.gz"])
def test_gzipped_jsonl(tmp_path, name):
    write_jsonl(tmp_path / name, [{"text": "zipped"}, {"text": "twice"}], opener=gzip.open)
    assert list(read_documents(str(tmp_path / name))) == ["zipped", "twice"]


def write_zstd_jsonl(path: Path, frames: list[list[dict]]) -> Path:
    """JSON Lines compressed as Zstandard, one frame per list of records, the frames one after the other (as `zstd`
    writes a file it compressed in parts)."""
    compress = zstandard.ZstdCompressor().compress
    path.write_bytes(b"".join(compress("".join(json.dumps(r) + "\n" for r in records).encode()) for records in frames))
    return path


@pytest.mark.parametrize("name", ["a.jsonl.zst", "a.json.zst"])
def test_zstandard_jsonl_of_one_or_more_frames(tmp_path, name, monkeypatch):
    """SlimPajama and DCLM ship .jsonl.zst; it was an unsupported file type."""
    monkeypatch.setattr(documents, "_ZSTD_READ_BYTES", 100)  # lines and frames across the reads' boundaries
    many = [{"text": f"document {i} " + "word " * (i % 50)} for i in range(2000)]
    write_zstd_jsonl(tmp_path / name, [many, [{"text": "second frame"}]])
    assert list(read_documents(str(tmp_path / name))) == [r["text"] for r in many] + ["second frame"]


def test_zstandard_data_cut_inside_a_frame_is_unreadable_not_shorter(tmp_path):
    """zstandard's stream reader ends quietly where the data does, so a truncated download would have read as a
    whole, shorter file."""
    whole = write_zstd_jsonl(tmp_path / "whole.jsonl.zst", [[{"text": "x" * 100}] * 100]).read_bytes()
    (tmp_path / "cut.jsonl.zst").write_bytes(whole[:len(whole) // 2])
    report = ReadReport()
    with pytest.raises(DataError, match="skipped 1 unreadable file"):
        list(read_documents(str(tmp_path / "cut.jsonl.zst"), report=report))
    with pytest.raises(DataError, match=r"cut\.jsonl\.zst cannot be read to its end \(EOFError: the Zstandard data "
                                        r"ends inside a frame\)"):
        list(read_records(tmp_path / "cut.jsonl.zst"))


def test_parquet_reads_the_text_column_across_row_groups(tmp_path):
    texts = [f"row {i}" for i in range(2500)]
    write_parquet(tmp_path / "a.parquet", {"id": list(range(2500)), "body": texts})
    assert list(read_documents(str(tmp_path / "a.parquet"), text_field="body")) == texts


def test_parquet_without_the_column_names_file_column_and_fix(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"id": [1], "body": ["x"]})
    with pytest.raises(DataError) as e:
        list(read_documents(str(tmp_path / "a.parquet")))
    message = str(e.value)
    assert "a.parquet" in message and "'text'" in message and "id, body" in message and "data.text_field" in message


def test_parquet_column_that_is_not_text_is_an_error(tmp_path):
    write_parquet(tmp_path / "a.parquet", {"text": [1, 2]})
    with pytest.raises(DataError, match="int64, not text"):
        list(read_documents(str(tmp_path / "a.parquet")))


# ---------------------------------------------------------------------------------------------------------
# Files: globs, directories, order


@pytest.fixture
def tree(tmp_path):
    write_tree(tmp_path, {
        "x.txt": "x", "notes.csv": "a,b", "b/y.txt": "y", "b/c/z.txt": "z", "b/c/w.md": "w", ".hidden/h.txt": "h",
    })
    return tmp_path


def names(paths, root) -> list[str]:
    return [Path(p).relative_to(root).as_posix() for p in paths]


def test_glob_matches_one_directory_level(tree):
    assert names(list_files(f"{tree}/*.txt"), tree) == ["x.txt"]
    assert names(list_files(f"{tree}/*/*.txt"), tree) == ["b/y.txt"]


def test_recursive_glob_spans_any_depth_and_skips_hidden_directories(tree):
    assert names(list_files(f"{tree}/**/*.txt"), tree) == ["b/c/z.txt", "b/y.txt", "x.txt"]
    assert names(list_files(f"{tree}/b/**/*.txt"), tree) == ["b/c/z.txt", "b/y.txt"]


def test_relative_patterns(tree, monkeypatch):
    monkeypatch.chdir(tree)
    assert [str(p) for p in list_files("*.txt")] == ["x.txt"]
    assert [str(p) for p in list_files("**/*.md")] == ["b/c/w.md"]


def test_directory_means_its_supported_files_recursively(tree):
    assert names(list_files(str(tree)), tree) == ["b/c/w.md", "b/c/z.txt", "b/y.txt", "x.txt"]
    assert list(read_documents(str(tree))) == ["w", "z", "y", "x"]


def test_unsupported_file_in_a_glob_is_an_error_before_reading(tree):
    with pytest.raises(DataError) as e:
        read_documents(f"{tree}/**")
    assert "notes.csv" in str(e.value) and "narrow" in str(e.value)


def test_order_follows_sorted_paths_not_creation_order(tmp_path):
    for name in ["c.txt", "a.txt", "b.jsonl"]:
        if name.endswith(".jsonl"):
            write_jsonl(tmp_path / name, [{"text": "b1"}, {"text": "b2"}])
        else:
            (tmp_path / name).write_text(name[0])
    pattern = str(tmp_path / "*")
    assert list(read_documents(pattern)) == ["a", "b1", "b2", "c"]
    assert list(read_documents(pattern)) == list(read_documents(pattern))


@pytest.mark.parametrize("pattern", ["no_such_dir/*.txt", "no_such_file.jsonl", "no_such_dir/**/*.txt"])
def test_nothing_matching_is_an_error_naming_the_pattern(tmp_path, pattern):
    with pytest.raises(DataError, match="No files match") as e:
        read_documents(str(tmp_path / pattern))
    assert pattern in str(e.value)
    for built_in in ("stdlib", "stdlib_docstrings", "pydoc_topics", "stdlib_chat", "stdlib_preferences"):
        assert built_in in str(e.value)  # every name a source may take instead of a path


@pytest.mark.parametrize("pattern", ["", "  "])
def test_an_empty_source_is_an_error_not_the_working_directory(tmp_path, monkeypatch, pattern):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DataError, match=r"An empty source names no files. Fix: give a file, a directory \('.' for"):
        list_files(pattern)


def test_url_scheme_epath_does_not_know_is_an_error():
    with pytest.raises(DataError, match="memory://"):
        list_files("memory://corpus/*.txt")


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    data = bytes(range(256)) * 5000  # over 1 MiB, so more than one block
    (tmp_path / "a.bin").write_bytes(data)
    assert file_digest(epath.Path(tmp_path / "a.bin")) == hashlib.sha256(data).hexdigest()
    with pytest.raises(DataError, match="missing.bin"):
        file_digest(epath.Path(tmp_path / "missing.bin"))


# ---------------------------------------------------------------------------------------------------------
# Bad data


def test_a_file_that_cannot_be_opened_stops_the_read_naming_it(tmp_path):
    """Unlike a file whose reading fails part-way (counted), a file named by the source that cannot be opened at all
    would leave out all of it: the cache key's digest and the reader both stop, naming it and the fix."""
    (tmp_path / "a.jsonl").write_text('{"text": "good one"}\n{"text": "good two"}\n')
    (tmp_path / "b.jsonl").symlink_to("gone.jsonl")
    message = rf"Cannot open {tmp_path / 'b.jsonl'} \(.*No such file.*\)\. Fix: check that it exists and is readable"
    with pytest.raises(DataError, match=message):
        list(read_documents(str(tmp_path)))
    with pytest.raises(DataError, match=message):
        file_digest(tmp_path / "b.jsonl")


def test_bad_records_are_counted_skipped_and_located(tmp_path, capsys):
    lines = [
        b'{"text": "good one"}',
        b'{"text": "   "}',
        b"{not json",
        b'{"title": "no text"}',
        b'{"text": 7}',
        b'["not", "an", "object"]',
        b'{"text": "caf\xe9"}',
        b'{"text": "half a pair \\ud800 is no text"}',  # scraped JSON has these; no tokenizer can encode them
        b"",
        b'{"text": "good two \\ud83d\\ude00"}',  # a whole pair is one character
    ]
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "b.txt").write_text(" \n\t")
    (tmp_path / "c.txt").write_bytes(b"line one\nbad \xff byte")
    report = ReadReport()

    assert list(read_documents(str(tmp_path / "*"), report=report)) == ["good one", "good two \U0001F600"]
    assert (report.documents, report.files) == (2, 3)
    assert (report.empty, report.bad_json, report.missing_field, report.invalid_utf8) == (2, 1, 3, 3)
    a = tmp_path / "a.jsonl"
    assert report.examples["missing_field"] == [f"{a}:4 has title", f"{a}:5 has text as int", f"{a}:6 is a list"]
    summary = report.summary()
    assert summary.startswith("read 2 documents from 3 files; skipped ")
    for expected in [f"1 malformed JSON line ({a}:3)", f"{a}:2, {tmp_path / 'b.txt'})",
                     f"({a}:7, {a}:8, {tmp_path / 'c.txt'}:2)"]:
        assert expected in summary
    assert capsys.readouterr().err.count(summary) == 1


def test_summary_keeps_the_first_few_examples():
    report = ReadReport()
    for line in range(1, 9):
        report.skip("bad_json", f"a.jsonl:{line}")
    assert report.summary() == (
        "read 0 documents from 0 files; skipped 8 malformed JSON lines "
        "(a.jsonl:1, a.jsonl:2, a.jsonl:3, a.jsonl:4, a.jsonl:5, ...)"
    )


def test_clean_data_prints_nothing(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("fine")
    report = ReadReport()
    assert list(read_documents(str(tmp_path / "a.txt"), report=report)) == ["fine"]
    assert report.summary() == "read 1 document from 1 file"
    assert capsys.readouterr().err == ""


def test_no_usable_document_is_an_error_with_the_summary(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": ""}, {"body": "wrong field"}])
    with pytest.raises(DataError) as e:
        list(read_documents(str(tmp_path / "a.jsonl")))
    assert f"1 record without a string text field ({tmp_path / 'a.jsonl'}:2 has body)" in str(e.value)


def test_damaged_files_are_counted_as_unreadable(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "kept"}])
    write_jsonl(tmp_path / "b.jsonl.gz", [{"text": "x" * 100}] * 100, opener=gzip.open)
    (tmp_path / "b.jsonl.gz").write_bytes((tmp_path / "b.jsonl.gz").read_bytes()[:40])
    (tmp_path / "c.parquet").write_bytes(b"not parquet at all")
    report = ReadReport()
    assert list(read_documents(str(tmp_path / "*"), report=report)) == ["kept"]
    assert report.unreadable == 2 and report.examples["unreadable"][1] == f"{tmp_path / 'c.parquet'}:1"


def test_a_shared_report_accounts_for_several_sources(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "b.txt").write_text("b")
    report = ReadReport()
    for name in ["a.txt", "b.txt"]:
        list(read_documents(str(tmp_path / name), report=report))
    assert (report.documents, report.files) == (2, 2)


# ---------------------------------------------------------------------------------------------------------
# Streaming


def test_first_document_of_a_huge_jsonl_arrives_without_reading_the_file(tmp_path, monkeypatch):
    path = tmp_path / "huge.jsonl"
    path.write_text("".join(f'{{"text": "document {i}"}}\n' for i in range(200_000)))
    opened = []
    original_open = type(epath.Path(path)).open

    def recording_open(self, *args, **kwargs):
        opened.append(original_open(self, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(type(epath.Path(path)), "open", recording_open)
    start = time.perf_counter()
    stream = read_documents(str(path))
    assert next(stream) == "document 0"
    assert time.perf_counter() - start < 1.0
    assert opened[0].raw.tell() < path.stat().st_size / 100, "only the first buffer's worth was read"
    assert list(itertools.islice(stream, 2)) == ["document 1", "document 2"]


# ---------------------------------------------------------------------------------------------------------
# Built-in sources


@pytest.fixture
def fake_stdlib(tmp_path, monkeypatch):
    """A stdlib directory holding the real json package's __init__.py, a third-party file and a module without docs."""
    real_json = Path(sysconfig.get_paths()["stdlib"]) / "json" / "__init__.py"
    (tmp_path / "json").mkdir()
    shutil.copy(real_json, tmp_path / "json" / "__init__.py")
    write_tree(tmp_path, {
        "site-packages/third_party.py": '"""Third party."""\n',
        "dist-packages/other.py": '"""Debian third party."""\n',
        "undocumented.py": "x = 1\n",
        "broken.py": '"""Docs."""\ndef (:\n',
    })
    monkeypatch.setattr(documents.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    return tmp_path


def test_stdlib_is_every_standard_library_file_without_third_party_packages(fake_stdlib):
    assert names(list_files("stdlib"), fake_stdlib) == ["broken.py", "json/__init__.py", "undocumented.py"]
    texts = list(read_documents("stdlib"))
    assert len(texts) == 3 and texts[1] == (fake_stdlib / "json" / "__init__.py").read_text()


def test_stdlib_docstrings_are_one_document_per_documented_module(fake_stdlib):
    report = ReadReport()
    (text,) = read_documents("stdlib_docstrings", report=report)
    assert text.startswith("JSON (JavaScript Object Notation) <https://json.org> is a subset of")
    assert "Serialize ``obj`` to a JSON formatted ``str``." in text
    assert "\n\nSerialize ``obj`` as a JSON formatted stream" in text
    assert report.unparsable == 1 and report.examples["unparsable"] == [f"{fake_stdlib / 'broken.py'}:2"]


def test_module_docstrings_follow_source_order():
    tree = ast.parse('"""Module."""\nclass A:\n    """A."""\n    def f(self):\n        """f."""\ndef g():\n    """g."""\n')
    assert documents.module_docstrings(tree) == "Module.\n\nA.\n\nf.\n\ng."


def test_real_stdlib_sources_are_deterministic():
    for name in ["stdlib", "stdlib_docstrings"]:
        first = list(itertools.islice(read_documents(name), 3))
        assert len(first) == 3 and all(text.strip() for text in first)
        assert first == list(itertools.islice(read_documents(name), 3))
    (future_docs,) = itertools.islice(read_documents("stdlib_docstrings"), 1)
    assert future_docs.startswith("Record of phased-in incompatible language changes.")


def test_pydoc_topics_are_one_document_per_topic_in_name_order():
    from pydoc_data.topics import topics

    texts = list(read_documents("pydoc_topics"))
    assert texts == [topics[name] for name in sorted(topics)]
    assert any("Assert statements are a convenient way" in text for text in texts)


# ---------------------------------------------------------------------------------------------------------
# Remote


@pytest.fixture
def bucket(monkeypatch):
    """gs:// served from memory: fsspec's in-memory filesystem under the gs protocol, reached through epath.

    epath resolves gs:// with fsspec.filesystem("gcs"), so registering the in-memory class there runs the
    production path (epath -> fsspec backend) with no network and no gcsfs.
    """
    yield from _served_as_gcs(InMemoryGCS, monkeypatch)


class InMemoryGCS(MemoryFileSystem):
    protocol = ("gs", "gcs")
    store: ClassVar[dict] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return str(path).removeprefix("gs://").removeprefix("gcs://").rstrip("/")


def _served_as_gcs(filesystem: type, monkeypatch):
    if importlib.util.find_spec("tensorflow"):
        pytest.skip("with TensorFlow installed epath reads gs:// through tf.io.gfile, not fsspec")
    registry = importlib.import_module("fsspec.registry")._registry
    for protocol in filesystem.protocol:
        monkeypatch.setitem(registry, protocol, filesystem)
    epath.backend.fsspec_backend._get_filesystem.cache_clear()
    yield epath.Path("gs://bucket/corpus")
    epath.backend.fsspec_backend._get_filesystem.cache_clear()


def test_remote_files_through_epath(bucket):
    (bucket / "b" / "deep").mkdir(parents=True)
    (bucket / "a.jsonl").write_text('{"text": "remote one"}\n{"text": "remote two"}\n')
    (bucket / "b" / "c.txt").write_text("remote three")
    (bucket / "b" / "deep" / "d.md").write_text("remote four")
    with (bucket / "e.parquet").open("wb") as f:
        pq.write_table(pa.table({"text": ["remote five"]}), f)

    assert [str(p) for p in list_files("gs://bucket/corpus/*.jsonl")] == ["gs://bucket/corpus/a.jsonl"]
    assert [str(p) for p in list_files("gs://bucket/corpus/**/*.md")] == ["gs://bucket/corpus/b/deep/d.md"]
    assert list(read_documents("gs://bucket/corpus")) == [
        "remote one", "remote two", "remote three", "remote four", "remote five",
    ]
    assert file_digest(bucket / "b" / "c.txt") == hashlib.sha256(b"remote three").hexdigest()
    assert fsspec.filesystem("gcs").exists("bucket/corpus/a.jsonl")


def test_remote_pattern_without_matches_is_an_error(bucket):
    with pytest.raises(DataError, match="gs://bucket/corpus/nothing"):
        list_files("gs://bucket/corpus/nothing/*.txt")


class ClientError(Exception):
    """What a storage client raises of its own, not an OSError: hf:// without a network raised httpx's ConnectError."""


class UnreachableGCS(InMemoryGCS):
    def info(self, path, **kwargs):
        raise ClientError("Name or service not known")

    def ls(self, path, detail=True, **kwargs):
        raise ClientError("Name or service not known")


@pytest.fixture
def unreachable_bucket(monkeypatch):
    yield from _served_as_gcs(UnreachableGCS, monkeypatch)


def test_a_remote_source_that_cannot_be_reached_is_one_error(unreachable_bucket):
    with pytest.raises(DataError, match=r"Cannot list 'gs://bucket/corpus/\*\*/\*.txt' \(ClientError: Name or service "
                                        r"not known\)\. Fix: check the URL, this machine's network and your credentials"):
        list_files("gs://bucket/corpus/**/*.txt")


def test_a_run_whose_remote_source_cannot_be_reached_stops_in_one_error(unreachable_bucket, tmp_path):
    """The corpus first asks whether the source is a prepared directory, where the client's error came out whole."""
    from test_corpus import data_section

    from llama_jax.data import corpus

    with pytest.raises(DataError, match=r"Cannot list 'gs://bucket/corpus' \(ClientError"):
        corpus.load_corpus(data_section(tmp_path, "gs://bucket/corpus"), vocab_size=1024)
