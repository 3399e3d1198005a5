"""Tests for llama_jax.data.pipeline: packed batches are correct, complete, deterministic and resumable.

The corpora here hold token t at flat position t - 1 (every token is unique), so a token names its own
position: a pair (input, target) is right iff target == input + 1 inside one document, and the set of
inputs seen tells exactly which pairs were trained on.
"""

import itertools

import numpy as np
import pytest

from llama_jax.data.pipeline import chunk_table, eval_batches, lm_batches
from llama_jax.data.sources import TokenizedCorpus
from llama_jax.errors import DataError

SEQ_LEN = 16
# Short and long documents, documents exactly seq_len + 1 long, and ones with no pair at all (0 or 1 token).
LENGTHS = [5, 40, 17, 1, 3, 0, 70, 9, 16, 18, 2, 33, 12, 8, 100, 4, 6, 25]


def unique_token_corpus(lengths=LENGTHS) -> TokenizedCorpus:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(1, offsets[-1] + 1, dtype=np.uint32)
    return TokenizedCorpus(tokens, offsets)


def all_pair_inputs(corpus: TokenizedCorpus) -> np.ndarray:
    """Every input token that has a target in its own document: all but each document's last token."""
    return np.concatenate([np.asarray(corpus[i][:-1]) for i in range(len(corpus))])


def seen_inputs(batches) -> np.ndarray:
    return np.concatenate([b["tokens"][b["loss_mask"] == 1] for b in batches])


def document_of(corpus: TokenizedCorpus, tokens: np.ndarray) -> np.ndarray:
    return np.searchsorted(corpus.offsets, tokens.astype(np.int64) - 1, side="right") - 1


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def one_epoch(corpus, **kwargs):
    return list(lm_batches(corpus, seq_len=SEQ_LEN, repeat=False, **kwargs))


def test_batch_shapes_and_dtypes():
    batch = next(iter(lm_batches(unique_token_corpus(), seq_len=SEQ_LEN, batch_size=4, seed=0)))
    assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
    for key, value in batch.items():
        assert value.shape == (4, SEQ_LEN), key
        assert value.dtype == (np.float32 if key == "loss_mask" else np.int32), key


def test_targets_are_the_next_token_of_the_same_document():
    corpus = unique_token_corpus()
    for batch in one_epoch(corpus, batch_size=3, seed=1):
        real = batch["loss_mask"] == 1
        tokens, targets = batch["tokens"][real], batch["targets"][real]
        np.testing.assert_array_equal(targets, tokens + 1)
        np.testing.assert_array_equal(document_of(corpus, targets), document_of(corpus, tokens))


def check_row(tokens, targets, segments, positions, mask, pad_id):
    """Real cells come first; segments count 1, 2, ...; positions restart at 0 where the segment changes."""
    padding = segments == 0
    np.testing.assert_array_equal(mask, (~padding).astype(np.float32))
    assert np.all(tokens[padding] == pad_id) and np.all(targets[padding] == pad_id) and np.all(positions[padding] == 0)
    n = int((~padding).sum())
    assert not padding[:n].any(), "padding only at the end of a row"
    real_segments, real_positions = segments[:n], positions[:n]
    assert real_segments[0] == 1
    assert set(np.diff(real_segments).tolist()) <= {0, 1}
    same_segment = real_segments[1:] == real_segments[:-1]
    assert real_positions[0] == 0
    np.testing.assert_array_equal(real_positions[1:], np.where(same_segment, real_positions[:-1] + 1, 0))
    # Within a segment the tokens are consecutive text of one document.
    assert np.all(np.diff(tokens[:n])[same_segment] == 1)


def test_segment_ids_positions_and_padding_are_consistent():
    pad_id = 7777
    for batch in one_epoch(unique_token_corpus(), batch_size=3, seed=2, pad_id=pad_id):
        rows = zip(*(batch[k] for k in ("tokens", "targets", "segment_ids", "positions", "loss_mask")))
        for row in rows:
            check_row(*row, pad_id=pad_id)


@pytest.mark.parametrize("shuffle", [True, False])
def test_one_epoch_covers_every_pair_exactly_once(shuffle):
    corpus = unique_token_corpus()
    inputs = seen_inputs(one_epoch(corpus, batch_size=3, seed=3, shuffle=shuffle))
    np.testing.assert_array_equal(np.sort(inputs), all_pair_inputs(corpus))


def test_long_documents_are_split_into_chunks_overlapping_by_one_token():
    corpus = unique_token_corpus([40])
    np.testing.assert_array_equal(chunk_table(corpus, SEQ_LEN), [[0, 17], [16, 33], [32, 40]])
    assert len(chunk_table(unique_token_corpus([SEQ_LEN + 1]), SEQ_LEN)) == 1
    assert len(chunk_table(unique_token_corpus([0, 1]), SEQ_LEN)) == 0


def test_non_repeating_epoch_pads_the_last_batch_to_full_size():
    # Three full-length chunks in batches of two: the second batch has one real row.
    corpus = unique_token_corpus([SEQ_LEN + 1] * 3)
    batches = one_epoch(corpus, batch_size=2, seed=0)
    assert len(batches) == 2
    assert all(b[key].shape == (2, SEQ_LEN) for b in batches for key in b)
    np.testing.assert_array_equal(batches[1]["loss_mask"].sum(axis=1), [SEQ_LEN, 0])
    np.testing.assert_array_equal(np.sort(seen_inputs(batches)), all_pair_inputs(corpus))


def test_repeat_continues_with_a_differently_shuffled_epoch():
    # 12 documents of exactly seq_len + 1 tokens: one chunk per row, 3 batches of 4 per epoch.
    corpus = unique_token_corpus([SEQ_LEN + 1] * 12)
    batches = take(iter(lm_batches(corpus, seq_len=SEQ_LEN, batch_size=4, seed=0)), 6)
    epochs = [seen_inputs(batches[:3]), seen_inputs(batches[3:])]
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), all_pair_inputs(corpus))
    assert not np.array_equal(epochs[0], epochs[1])


def test_same_seed_same_order_different_seed_different_order():
    corpus = unique_token_corpus()
    first = take(iter(lm_batches(corpus, seq_len=SEQ_LEN, batch_size=3, seed=5)), 8)
    again = take(iter(lm_batches(corpus, seq_len=SEQ_LEN, batch_size=3, seed=5)), 8)
    other = take(iter(lm_batches(corpus, seq_len=SEQ_LEN, batch_size=3, seed=6)), 8)
    assert_batches_equal(first, again)
    assert not np.array_equal(seen_inputs(first), seen_inputs(other))


@pytest.mark.parametrize("consumed", [0, 3, 11])  # 11 batches cross an epoch boundary.
def test_get_state_set_state_resumes_exactly(consumed):
    corpus = unique_token_corpus()
    make = lambda: iter(lm_batches(corpus, seq_len=SEQ_LEN, batch_size=3, seed=4))
    uninterrupted = make()
    take(uninterrupted, consumed)
    state = uninterrupted.get_state()
    expected = take(uninterrupted, 5)
    resumed = make()  # A fresh pipeline, as after a restart.
    take(resumed, 2)  # Wherever it stood, set_state moves it.
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), expected)


def test_two_processes_see_disjoint_halves_that_cover_the_corpus():
    corpus = unique_token_corpus()
    shards = [
        seen_inputs(one_epoch(corpus, batch_size=2, seed=0, process_index=p, process_count=2)) for p in (0, 1)
    ]
    assert len(shards[0]) and len(shards[1])
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    np.testing.assert_array_equal(np.sort(np.concatenate(shards)), all_pair_inputs(corpus))


def test_eval_batches_are_fixed_and_the_same_for_any_process_count():
    corpus = unique_token_corpus()
    single = eval_batches(corpus, seq_len=SEQ_LEN, batch_size=4, max_batches=3)
    assert len(single) == 3
    assert_batches_equal(single, eval_batches(corpus, seq_len=SEQ_LEN, batch_size=4, max_batches=3))
    halves = [
        eval_batches(corpus, seq_len=SEQ_LEN, batch_size=2, max_batches=3, process_index=p, process_count=2)
        for p in (0, 1)
    ]
    assert len(halves[0]) == len(halves[1]) == 3
    for whole, part0, part1 in zip(single, *halves):
        for key in whole:
            np.testing.assert_array_equal(whole[key], np.concatenate([part0[key], part1[key]]))


def test_eval_batches_stop_at_the_end_of_the_corpus():
    corpus = unique_token_corpus()
    batches = eval_batches(corpus, seq_len=SEQ_LEN, batch_size=4, max_batches=1000)
    assert len(batches) < 1000
    np.testing.assert_array_equal(np.sort(seen_inputs(batches)), all_pair_inputs(corpus))


def test_built_corpus_flows_through_the_pipeline(tmp_path):
    class ByteTokenizer:
        def encode_documents(self, texts):
            return [[256, *t.encode(), 257] for t in texts]

    texts = ["hello world", "x", "a longer document " * 5]
    corpus = TokenizedCorpus.build(texts, ByteTokenizer(), tmp_path / "c")
    batch = next(iter(lm_batches(corpus, seq_len=SEQ_LEN, batch_size=8, seed=0, repeat=False, shuffle=False)))
    first_row = batch["tokens"][0][batch["segment_ids"][0] == 1]
    np.testing.assert_array_equal(first_row, [256, *b"hello world"])


@pytest.mark.parametrize(
    "kwargs",
    [dict(seq_len=0), dict(batch_size=0), dict(process_index=2, process_count=2), dict(process_index=-1)],
)
def test_bad_arguments_raise_data_error(kwargs):
    args = dict(seq_len=SEQ_LEN, batch_size=2, seed=0) | kwargs
    with pytest.raises(DataError):
        lm_batches(unique_token_corpus(), **args)


def test_corpus_without_any_pair_raises_data_error():
    with pytest.raises(DataError, match="no data"):
        lm_batches(unique_token_corpus([1, 0, 1]), seq_len=SEQ_LEN, batch_size=2, seed=0)
