"""Tests for llama_jax.data.shards: the prepared-corpus format, its checks on open, verify, and reading."""

import concurrent.futures
import hashlib
import json
import pickle
import shutil

import numpy as np
import pytest

from llama_jax.data import shards
from llama_jax.data.shards import ShardedCorpus, ShardWriter, tokenizer_hash
from llama_jax.data.tokenizer import train_bpe
from llama_jax.errors import DataError

RNG = np.random.default_rng(0)
DOCUMENTS = [RNG.integers(0, 50_000, size=n, dtype=np.uint32) for n in [5, 1, 40, 7, 300, 2, 9, 60, 3, 11]]


def write(directory, documents=DOCUMENTS, **kwargs):
    with ShardWriter(directory, **kwargs) as writer:
        for tokens in documents:
            writer.write(tokens)
    return writer.manifest


@pytest.fixture
def corpus_dir(tmp_path):
    write(tmp_path / "corpus", shard_tokens=64, metadata={"tokenizer": {"path": "t", "tokenizer_hash": "abc"}})
    return tmp_path / "corpus"


def test_round_trip_across_shards(corpus_dir):
    corpus = ShardedCorpus.open(corpus_dir)
    assert len(corpus) == len(DOCUMENTS) and corpus.num_tokens == sum(map(len, DOCUMENTS))
    for i, tokens in enumerate(DOCUMENTS):
        np.testing.assert_array_equal(corpus.read(i), tokens)
        assert corpus.read(i).dtype == np.uint32
    np.testing.assert_array_equal(corpus.lengths, [len(d) for d in DOCUMENTS])
    assert isinstance(corpus.lengths, np.memmap) and corpus.lengths.dtype == np.int64
    assert not corpus.has_loss_mask
    with pytest.raises(IndexError):
        corpus.read(len(DOCUMENTS))


def test_manifest_describes_every_shard(corpus_dir):
    manifest = json.loads((corpus_dir / "manifest.json").read_text())
    # 64 tokens per shard at most; the 300-token document gets a shard of its own, never split.
    assert [s["tokens"] for s in manifest["shards"]] == [53, 300, 11, 63, 11]
    assert sum(s["documents"] for s in manifest["shards"]) == manifest["documents"] == len(DOCUMENTS)
    for entry in [*manifest["shards"], manifest["lengths"]]:
        data = (corpus_dir / entry["file"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
    assert manifest["tokenizer"] == {"path": "t", "tokenizer_hash": "abc"}
    assert manifest["format_version"] == 1 and manifest["loss_mask"] is False and "created" in manifest
    assert sorted(p.name for p in corpus_dir.iterdir()) == sorted(
        ["manifest.json", "lengths.npy"] + [s["file"] for s in manifest["shards"]])


def test_loss_masks_round_trip(tmp_path):
    masks = [RNG.integers(0, 2, size=len(d), dtype=np.uint8) for d in DOCUMENTS]
    with ShardWriter(tmp_path / "sft", loss_mask=True) as writer:
        for tokens, mask in zip(DOCUMENTS, masks):
            writer.write(tokens, mask)
        with pytest.raises(DataError, match="one mask value per token"):
            writer.write(DOCUMENTS[0])
    corpus = ShardedCorpus.open(tmp_path / "sft")
    assert corpus.has_loss_mask
    for i in range(len(DOCUMENTS)):
        np.testing.assert_array_equal(corpus.read(i), DOCUMENTS[i])
        np.testing.assert_array_equal(corpus.read_loss_mask(i), masks[i])


def test_loss_mask_is_refused_where_there_is_none(corpus_dir, tmp_path):
    with pytest.raises(DataError, match="holds no loss masks"):
        ShardedCorpus.open(corpus_dir).read_loss_mask(0)
    with pytest.raises(DataError, match="without loss_mask=True"), ShardWriter(tmp_path / "x") as writer:
        writer.write([1, 2], [1, 1])


def test_writer_accepts_lists_and_refuses_ids_outside_uint32(tmp_path):
    write(tmp_path / "lists", [[1, 2, 3], [4]])
    assert ShardedCorpus.open(tmp_path / "lists").read(0).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="uint32"):
        write(tmp_path / "bad", [np.array([1, -1])])
    with pytest.raises(DataError, match="integer token ids"):
        write(tmp_path / "bad", [np.array([1.5])])


def test_a_failed_write_leaves_nothing_and_keeps_the_previous_corpus(corpus_dir, tmp_path):
    before = (corpus_dir / "manifest.json").read_text()
    with pytest.raises(RuntimeError), ShardWriter(corpus_dir) as writer:
        writer.write([1, 2, 3])
        raise RuntimeError("killed")
    assert (corpus_dir / "manifest.json").read_text() == before
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "new") as writer:
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"], "no temporary directory is left behind"


def test_an_empty_corpus_is_valid(tmp_path):
    write(tmp_path / "empty", [])
    corpus = ShardedCorpus.open(tmp_path / "empty")
    assert (len(corpus), corpus.num_tokens) == (0, 0)


def test_reads_are_thread_safe(corpus_dir):
    corpus = ShardedCorpus.open(corpus_dir)
    order = RNG.permutation(np.repeat(np.arange(len(DOCUMENTS)), 50)).tolist()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: corpus.read(i).tolist(), order))
    assert results == [DOCUMENTS[i].tolist() for i in order]


def test_a_bounded_number_of_readers_stays_open(corpus_dir, monkeypatch):
    monkeypatch.setattr(shards, "MAX_OPEN_READERS", 2)
    corpus = ShardedCorpus.open(corpus_dir)
    order = RNG.permutation(np.repeat(np.arange(len(DOCUMENTS)), 20)).tolist()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: corpus.read(i).tolist(), order))
    assert results == [DOCUMENTS[i].tolist() for i in order]
    assert len(corpus._readers) == 2


def test_pickles_without_its_readers_and_works_as_a_data_source(corpus_dir):
    corpus = ShardedCorpus.open(corpus_dir)
    corpus.read(0)  # opens a reader, which could not be pickled
    clone = pickle.loads(pickle.dumps(corpus))
    assert len(pickle.dumps(corpus)) < 10_000, "the lengths are reopened, not copied"
    np.testing.assert_array_equal(clone[4], DOCUMENTS[4])


# ---------------------------------------------------------------------------------------------------------
# What open refuses


def test_open_refuses_a_directory_without_manifest(tmp_path):
    with pytest.raises(DataError, match=r"no prepared corpus at .*missing.*llama_jax.data.prepare"):
        ShardedCorpus.open(tmp_path)
    write(tmp_path / "prepared" / "train", DOCUMENTS[:2])
    with pytest.raises(DataError, match="holds prepared splits"):
        ShardedCorpus.open(tmp_path / "prepared")


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda m: "{not json", "unreadable"),
        (lambda m: json.dumps({**m, "format_version": 99}), "format version 99"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "shards"}), "required fields"),
        (lambda m: json.dumps([m]), "not a llama_jax prepared-corpus manifest"),
    ],
)
def test_open_refuses_an_invalid_manifest(corpus_dir, mangle, message):
    path = corpus_dir / "manifest.json"
    path.write_text(mangle(json.loads(path.read_text())))
    with pytest.raises(DataError, match=message):
        ShardedCorpus.open(corpus_dir)


def test_open_refuses_a_missing_or_truncated_shard(corpus_dir):
    shard = corpus_dir / "shard-00001.array_record"
    size = shard.stat().st_size
    with shard.open("r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(DataError, match=rf"shard-00001.*{size - 10} bytes but the manifest says {size}.*truncated"):
        ShardedCorpus.open(corpus_dir)
    shard.unlink()
    with pytest.raises(DataError, match="shard-00001.array_record is missing"):
        ShardedCorpus.open(corpus_dir)


def test_open_refuses_a_missing_or_inconsistent_lengths_file(corpus_dir):
    lengths_path = corpus_dir / "lengths.npy"
    lengths = np.load(lengths_path)
    np.save(lengths_path, lengths[:-1])
    with pytest.raises(DataError, match="manifest describes 10 documents"):
        ShardedCorpus.open(corpus_dir)
    np.save(lengths_path, lengths + 1)
    with pytest.raises(DataError, match="disagrees with the manifest's token counts"):
        ShardedCorpus.open(corpus_dir)
    lengths_path.write_bytes(b"garbage")
    with pytest.raises(DataError, match="lengths.npy is unreadable"):
        ShardedCorpus.open(corpus_dir)
    lengths_path.unlink()
    with pytest.raises(DataError, match="lengths.npy is missing"):
        ShardedCorpus.open(corpus_dir)


def test_a_record_that_disagrees_with_lengths_is_named(corpus_dir):
    # Documents 0 and 1 (5 and 1 tokens) share the first shard: swapping their lengths keeps every shard's sum.
    lengths = np.load(corpus_dir / "lengths.npy")
    lengths[[0, 1]] = lengths[[1, 0]]
    np.save(corpus_dir / "lengths.npy", lengths)
    corpus = ShardedCorpus.open(corpus_dir)
    with pytest.raises(DataError, match=r"record 1 of .*shard-00000.array_record has 4 bytes, but lengths.npy says 5"):
        corpus.read(1)


def test_a_shard_whose_bytes_changed_is_named_when_read(corpus_dir):
    shard = corpus_dir / "shard-00002.array_record"
    data = bytearray(shard.read_bytes())
    for offset in range(100, len(data) - 100, 97):
        data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    corpus = ShardedCorpus.open(corpus_dir)  # the size is unchanged: only reading its records tells
    with pytest.raises(DataError, match=r"record \d+ of .*shard-00002.array_record cannot be read \(the shard is "
                                        r"corrupt: .*\): re-run `python -m llama_jax.data.prepare`"):
        for index in range(len(corpus)):
            corpus.read(index)


def test_open_refuses_another_tokenizer(corpus_dir):
    assert len(ShardedCorpus.open(corpus_dir, tokenizer_hash="abc")) == len(DOCUMENTS)
    with pytest.raises(DataError, match=r"prepared with another tokenizer \(t\).*--tokenizer.*data.tokenizer"):
        ShardedCorpus.open(corpus_dir, tokenizer_hash="def")


def test_verify_detects_a_flipped_byte(corpus_dir):
    ShardedCorpus.open(corpus_dir).verify()
    shard = corpus_dir / "shard-00002.array_record"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    corpus = ShardedCorpus.open(corpus_dir)  # the size is unchanged: only the digest tells
    with pytest.raises(DataError, match="shard-00002.array_record does not match its sha256"):
        corpus.verify()


# ---------------------------------------------------------------------------------------------------------
# tokenizer_hash


def test_tokenizer_hash_follows_the_files_not_their_place(tmp_path):
    train_bpe(["some text to learn a few merges from, some text"] * 20, 600, tmp_path / "a" / "tokenizer.model")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    assert tokenizer_hash(tmp_path / "a" / "tokenizer.model") == tokenizer_hash(tmp_path / "b")
    (tmp_path / "b" / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    assert tokenizer_hash(tmp_path / "a") != tokenizer_hash(tmp_path / "b"), "the framing config is part of it"
