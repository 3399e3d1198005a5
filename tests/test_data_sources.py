"""Tests for llama_jax.data.sources: the stdlib corpus, the token store, local text files, the entropy baseline."""

import math
import resource
import sys
import types

import numpy as np
import pytest

from llama_jax.data import sources
from llama_jax.data.sources import (
    TokenizedCorpus,
    prepare_stdlib_corpus,
    stdlib_documents,
    unigram_entropy,
)
from llama_jax.errors import DataError


class ByteTokenizer:
    """Bytes are ids 0-255; the same methods as llama_jax.data.tokenizer.Tokenizer that the store uses."""

    vocab_size, bos_id, eos_id, pad_id = 258, 256, 257, 0

    def encode_documents(self, texts):
        return [[self.bos_id, *text.encode("utf-8"), self.eos_id] for text in texts]


# ---------------------------------------------------------------------------------------------------------
# stdlib_documents


def test_stdlib_documents_are_deterministic_with_a_held_out_split():
    train, eval_ = stdlib_documents()
    assert len(train) > 100 and len(eval_) >= sources.MIN_EVAL_DOCUMENTS
    assert len(eval_) < 0.05 * len(train)
    assert all(text.strip() for text in train + eval_)
    assert (train, eval_) == stdlib_documents()


def test_stdlib_documents_skip_third_party_and_undecodable_files(tmp_path, monkeypatch):
    for name in ["b.py", "a.py", "pkg/c.py", "pkg/d.py", "x.py", "y.py", "z.py", "w.py", "v.py", "u.py"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    (tmp_path / "site-packages").mkdir()
    (tmp_path / "site-packages" / "third_party.py").write_text("# third party\n")
    (tmp_path / "latin1.py").write_bytes("# caf\u00e9\n".encode("latin-1"))
    (tmp_path / "empty.py").write_text("")
    monkeypatch.setattr(sources.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})

    train, eval_ = stdlib_documents()
    assert len(eval_) == sources.MIN_EVAL_DOCUMENTS
    assert sorted(train + eval_) == sorted(f"# {n}\n" for n in ["a.py", "b.py", "pkg/c.py", "pkg/d.py", "x.py",
                                                                "y.py", "z.py", "w.py", "v.py", "u.py"])
    assert train == sorted(train), "documents follow sorted paths"


# ---------------------------------------------------------------------------------------------------------
# TokenizedCorpus


def test_tokenized_corpus_round_trip(tmp_path):
    texts = ["hello", "", "wörld", "x" * 1000]
    built = TokenizedCorpus.build(texts, ByteTokenizer(), tmp_path / "corpus")
    loaded = TokenizedCorpus.load(tmp_path / "corpus")
    assert len(built) == len(loaded) == 4
    for i, text in enumerate(texts):
        expected = [256, *text.encode("utf-8"), 257]
        np.testing.assert_array_equal(loaded[i], expected)
    assert loaded.num_tokens == sum(len(t.encode()) + 2 for t in texts)
    assert loaded.tokens.dtype == np.uint32 and loaded.offsets.dtype == np.int64
    assert isinstance(loaded.tokens, np.memmap)
    with pytest.raises(IndexError):
        loaded[4]


def test_build_stores_the_tokenizers_framing_and_replaces_an_old_store(tmp_path):
    class UnframedTokenizer(ByteTokenizer):
        def encode_documents(self, texts):
            return [list(text.encode("utf-8")) for text in texts]

    TokenizedCorpus.build(["old", "store"], ByteTokenizer(), tmp_path / "c")
    corpus = TokenizedCorpus.build(["ab"], UnframedTokenizer(), tmp_path / "c")
    assert len(corpus) == 1
    np.testing.assert_array_equal(corpus[0], list(b"ab"))
    assert [p.name for p in tmp_path.iterdir()] == ["c"], "no temporary directory left behind"


def test_build_that_fails_midway_leaves_nothing(tmp_path):
    class FailingTokenizer(ByteTokenizer):
        def encode_documents(self, texts):
            raise KeyboardInterrupt  # As if the process were stopped mid-build.

    with pytest.raises(KeyboardInterrupt):
        TokenizedCorpus.build(["a"], FailingTokenizer(), tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


def test_a_store_that_does_not_fit_on_disk_is_a_data_error_that_leaves_nothing(tmp_path):
    """A full disk, as the OS reports it to the writer: here a file-size limit (EFBIG) on this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, hard))
    try:
        with pytest.raises(DataError, match=r"could not write 800,0\d\d bytes of tokens into .*/c \(.+\): free space "
                                            r"there, or set data.cache_dir to a directory with room"):
            TokenizedCorpus.build(["x" * 100_000, "y" * 100_000], ByteTokenizer(), tmp_path / "c")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert list(tmp_path.iterdir()) == []


def test_load_missing_or_corrupt_store_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="No tokenized corpus"):
        TokenizedCorpus.load(tmp_path / "missing")
    TokenizedCorpus.build(["abc", "de"], ByteTokenizer(), tmp_path / "c")
    np.save(tmp_path / "c" / "offsets.npy", np.array([0, 3, 99], dtype=np.int64))
    with pytest.raises(DataError, match="corrupt"):
        TokenizedCorpus.load(tmp_path / "c")
    (tmp_path / "c" / "tokens.npy").write_bytes(b"not a numpy file")
    with pytest.raises(DataError, match="unreadable"):
        TokenizedCorpus.load(tmp_path / "c")


# ---------------------------------------------------------------------------------------------------------
# unigram_entropy


def test_unigram_entropy_matches_a_hand_computed_value():
    corpus = TokenizedCorpus(np.array([1, 1, 2, 3, 1, 1, 2, 3], np.uint32), np.array([0, 3, 8], np.int64))
    # Frequencies 1/2, 1/4, 1/4: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2.
    assert unigram_entropy(corpus) == pytest.approx(1.5 * math.log(2))
    with pytest.raises(DataError):
        unigram_entropy(TokenizedCorpus(np.zeros(0, np.uint32), np.zeros(1, np.int64)))


# ---------------------------------------------------------------------------------------------------------
# prepare_stdlib_corpus

SMALL_TRAIN = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n", "class A:\n    pass\n"] * 20
SMALL_EVAL = ["def g(y):\n    return y * 2\n"]


@pytest.fixture
def small_stdlib(monkeypatch):
    monkeypatch.setattr(sources, "stdlib_documents", lambda: (SMALL_TRAIN, SMALL_EVAL))


@pytest.fixture
def fake_train_bpe(monkeypatch):
    """Stands in for llama_jax.data.tokenizer so that the caching logic is tested on its own."""
    calls = []

    def train_bpe(texts, vocab_size, path):
        calls.append(vocab_size)
        if vocab_size == 0:
            raise KeyboardInterrupt  # As if the process were stopped mid-build.
        path.write_text("fake tokenizer")
        return ByteTokenizer()

    monkeypatch.setitem(sys.modules, "llama_jax.data.tokenizer", types.SimpleNamespace(train_bpe=train_bpe))
    return calls


def test_prepare_stdlib_corpus_builds_once_then_loads(tmp_path, small_stdlib, fake_train_bpe, capsys):
    first = prepare_stdlib_corpus(tmp_path, 1000)
    assert "Preparing" in capsys.readouterr().err
    second = prepare_stdlib_corpus(tmp_path, 1000)
    assert fake_train_bpe == [1000], "the second call loads the cache"
    assert capsys.readouterr().err == ""
    assert first.tokenizer_path == second.tokenizer_path and first.tokenizer_path.is_file()
    assert len(second.train) == len(SMALL_TRAIN) and len(second.eval) == len(SMALL_EVAL)
    np.testing.assert_array_equal(second.eval[0], [256, *SMALL_EVAL[0].encode(), 257])
    prepare_stdlib_corpus(tmp_path, 2000)
    assert fake_train_bpe == [1000, 2000], "each vocabulary size has its own cache entry"


def test_prepare_stdlib_corpus_killed_midway_rebuilds(tmp_path, small_stdlib, fake_train_bpe):
    with pytest.raises(KeyboardInterrupt):
        prepare_stdlib_corpus(tmp_path, 0)
    assert list(tmp_path.iterdir()) == []


def test_prepare_stdlib_corpus_reports_a_damaged_cache(tmp_path, small_stdlib, fake_train_bpe):
    prepared = prepare_stdlib_corpus(tmp_path, 1000)
    prepared.tokenizer_path.unlink()
    with pytest.raises(DataError, match="delete"):
        prepare_stdlib_corpus(tmp_path, 1000)


def test_a_cache_entry_another_process_published_during_our_build_is_kept(tmp_path, small_stdlib, monkeypatch):
    """Processes on one host (one per GPU) build the same entry at once: the first published copy stays, since a
    process may already be reading it, and the later builds are dropped without a trace."""
    built = []

    def train_bpe(texts, vocab_size, path):
        built.append(path)
        number = len(built)
        if number == 1:
            prepare_stdlib_corpus(tmp_path, vocab_size)  # another process builds and publishes the same entry first
        path.write_text(f"tokenizer of build {number}")
        return ByteTokenizer()

    monkeypatch.setitem(sys.modules, "llama_jax.data.tokenizer", types.SimpleNamespace(train_bpe=train_bpe))
    ours = prepare_stdlib_corpus(tmp_path, 1000)
    assert len(built) == 2 and ours.tokenizer_path.read_text() == "tokenizer of build 2"
    assert [p.name for p in tmp_path.iterdir()] == [ours.tokenizer_path.parent.name]


def test_prepare_stdlib_corpus_with_the_real_tokenizer(tmp_path, small_stdlib):
    from llama_jax.data.tokenizer import Tokenizer

    prepared = prepare_stdlib_corpus(tmp_path, 1024)
    tokenizer = Tokenizer.from_file(prepared.tokenizer_path)
    document = np.asarray(prepared.eval[0])
    assert document[0] == tokenizer.bos_id and document[-1] == tokenizer.eos_id
    assert tokenizer.decode(document[1:-1].tolist()) == SMALL_EVAL[0]
    assert 0 < unigram_entropy(prepared.train) < math.log(tokenizer.vocab_size)
