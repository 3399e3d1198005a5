"""Tests for llama_jax.data.pipeline: batches are correct, complete, deterministic, and one global order.

The corpora here hold token t at flat position t - 1 (every token is unique), so a token names its own
position: a pair (input, target) is right iff target == input + 1 inside one document, and the inputs seen
tell exactly which pairs were trained on. Sources of a mixture use disjoint token ranges, so a token also
names its source.
"""

import grain
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.data.mixture import BLOCK_ROWS
from llama_jax.data.pipeline import PairStream, TrainBatches, eval_batches
from llama_jax.data.schedule import BatchSchedule
from llama_jax.data.sources import TokenizedCorpus
from llama_jax.errors import DataError
from llama_jax.model import Llama, LlamaConfig

SEQ_LEN = 16
# Short and long documents, documents exactly seq_len + 1 long, and ones with no pair at all (0 or 1 token).
# Their pairs sum to 384 = 24 rows of 16, so an epoch is a whole number of shuffle windows of 4 rows.
LENGTHS = [5, 40, 17, 1, 3, 0, 70, 9, 16, 18, 2, 33, 12, 8, 100, 4, 6, 25, 33]
WINDOW = 4
SOURCE_STRIDE = 1_000_000


def unique_token_corpus(lengths=LENGTHS, first_token: int = 1) -> TokenizedCorpus:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.arange(first_token, first_token + offsets[-1], dtype=np.uint32)
    return TokenizedCorpus(tokens, offsets)


def pairs_per_epoch(lengths=LENGTHS) -> int:
    return sum(max(n - 1, 0) for n in lengths)


def plan(sources=None, weights=None, batch_size=4, seq_len=SEQ_LEN, ramp=(), seed=0, window=WINDOW):
    sources = sources or [unique_token_corpus()]
    weights = weights or [1.0] * len(sources)
    return TrainBatches(sources, weights, BatchSchedule(batch_size, seq_len, ramp), seed=seed, shuffle_window=window)


def steps(train: TrainBatches, first: int, last: int, **kwargs) -> list[dict]:
    return [train.local_batch(step, **kwargs) for step in range(first, last)]


def inputs_of(batches) -> np.ndarray:
    return np.concatenate([b["tokens"][b["loss_mask"] == 1] for b in batches])


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def concat_processes(train: TrainBatches, step: int, process_count: int) -> dict:
    parts = [train.local_batch(step, p, process_count) for p in range(process_count)]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


def test_pairs_per_epoch_is_a_whole_number_of_windows():
    assert pairs_per_epoch() == 384 and 384 % (SEQ_LEN * WINDOW) == 0


def test_batch_shapes_dtypes_and_full_rows():
    batch = plan().local_batch(0)
    assert set(batch) == {"tokens", "targets", "segment_ids", "positions", "loss_mask"}
    for key, value in batch.items():
        assert value.shape == (4, SEQ_LEN), key
        assert value.dtype == (np.float32 if key == "loss_mask" else np.int32), key
    assert np.all(batch["loss_mask"] == 1) and np.all(batch["segment_ids"] >= 1), "training rows are never padded"


def test_targets_are_the_next_token_of_the_same_document():
    corpus = unique_token_corpus()
    for batch in steps(plan(), 0, 12):
        np.testing.assert_array_equal(batch["targets"], batch["tokens"] + 1)
        doc_of_input = np.searchsorted(corpus.offsets, batch["tokens"] - 1, side="right") - 1
        doc_of_target = np.searchsorted(corpus.offsets, batch["targets"] - 1, side="right") - 1
        np.testing.assert_array_equal(doc_of_input, doc_of_target)


def test_segment_ids_and_positions_follow_the_document_pieces():
    corpus = unique_token_corpus()
    for batch in steps(plan(), 0, 12):
        doc = np.searchsorted(corpus.offsets, batch["tokens"] - 1, side="right") - 1
        new_piece = np.concatenate([np.ones((4, 1), bool), doc[:, 1:] != doc[:, :-1]], axis=1)
        np.testing.assert_array_equal(batch["segment_ids"], np.cumsum(new_piece, axis=1))
        for row in range(4):
            starts = np.flatnonzero(new_piece[row])
            expected = np.concatenate([np.arange(n) for n in np.diff(np.append(starts, SEQ_LEN))])
            np.testing.assert_array_equal(batch["positions"][row], expected)


def test_every_pair_is_trained_on_exactly_once_per_epoch():
    corpus = unique_token_corpus()
    every_pair = np.concatenate([np.asarray(corpus[i][:-1]) for i in range(len(corpus))])
    rows_per_epoch = pairs_per_epoch() // SEQ_LEN
    batches = steps(plan(), 0, 2 * rows_per_epoch // 4)  # two epochs
    seen = inputs_of(batches)
    np.testing.assert_array_equal(np.sort(seen), np.sort(np.concatenate([every_pair, every_pair])))
    first_epoch = inputs_of(batches[: rows_per_epoch // 4])
    np.testing.assert_array_equal(np.sort(first_epoch), np.sort(every_pair))


def test_each_epoch_and_each_window_has_its_own_order():
    stream = PairStream(unique_token_corpus(), seed=(0, 0), shuffle=True)
    orders = [stream._epoch(e)[0] for e in range(3)]
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    unshuffled = steps(plan(window=1), 0, 6)
    shuffled = steps(plan(window=WINDOW), 0, 6)
    assert not np.array_equal(inputs_of(unshuffled), inputs_of(shuffled))
    # The window permutes rows only among themselves: the same rows, in another order.
    np.testing.assert_array_equal(np.sort(inputs_of(unshuffled)), np.sort(inputs_of(shuffled)))


def test_same_seed_same_batches_different_seed_different_batches():
    assert_batches_equal(steps(plan(seed=3), 0, 5), steps(plan(seed=3), 0, 5))
    assert not np.array_equal(inputs_of(steps(plan(seed=3), 0, 5)), inputs_of(steps(plan(seed=4), 0, 5)))


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_rows_of_the_same_global_batches(process_count):
    train = plan(batch_size=8)
    for step in range(10):
        assert_batches_equal([concat_processes(train, step, process_count)], [train.local_batch(step)])


@pytest.mark.parametrize("consumed", [0, 3, 7])
def test_iterator_state_resumes_on_any_number_of_processes(consumed):
    """Save after `consumed` steps on 2 processes; resume on 1 and on 4: the next global batch is the same."""
    train = plan(batch_size=8, sources=[unique_token_corpus(), unique_token_corpus(first_token=SOURCE_STRIDE)],
                 weights=[0.7, 0.3])
    iterators = [iter(train.dataset(p, 2).to_iter_dataset()) for p in range(2)]
    for it in iterators:
        for _ in range(consumed):
            next(it)
    state = iterators[0].get_state()
    assert state == iterators[1].get_state()
    uninterrupted = [train.local_batch(step) for step in range(consumed, consumed + 3)]
    for process_count in (1, 2, 4):
        resumed = []
        for p in range(process_count):
            it = iter(train.dataset(p, process_count).to_iter_dataset())
            it.set_state(state)
            resumed.append([next(it) for _ in range(3)])
        joined = [{k: np.concatenate([r[i][k] for r in resumed]) for k in resumed[0][i]} for i in range(3)]
        assert_batches_equal(joined, uninterrupted)


def test_grain_iterator_with_reader_threads_matches_the_plan():
    train = plan(batch_size=8)
    it = iter(train.dataset().to_iter_dataset(grain.ReadOptions(num_threads=3, prefetch_buffer_size=4)))
    assert_batches_equal([next(it) for _ in range(6)], steps(train, 0, 6))


def test_schedule_switch_neither_skips_nor_repeats_a_pair():
    """Stage 0 (4 x 16) for 8 steps, then (8 x 32): together they read one prefix of the stream exactly once."""
    ramp = [(8 * 4 * SEQ_LEN, 8, 32)]
    corpus = unique_token_corpus(LENGTHS * 4)  # four copies: the consumption below stays inside one epoch
    train = plan(sources=[corpus], ramp=ramp)
    assert [s.start_step for s in train.schedule.stages] == [0, 8]
    batches = steps(train, 0, 8 + 2)  # the 2 later steps = 16 rows of 32 = 4 whole windows
    assert batches[7]["tokens"].shape == (4, SEQ_LEN) and batches[8]["tokens"].shape == (8, 32)
    seen = inputs_of(batches)
    assert len(np.unique(seen)) == len(seen) == 8 * 4 * SEQ_LEN + 2 * 8 * 32
    stream = train.streams[0]
    prefix = np.concatenate([np.asarray(corpus[d][f : f + n]) for d, f, n in stream.pieces(0, len(seen))])
    np.testing.assert_array_equal(np.sort(seen), np.sort(prefix))


def test_resuming_across_a_schedule_switch_gives_the_uninterrupted_batches():
    ramp = [(5 * 4 * SEQ_LEN, 8, 32)]
    train = plan(ramp=ramp)
    it = iter(train.dataset().to_iter_dataset())
    for _ in range(4):
        next(it)
    state = it.get_state()
    resumed = iter(plan(ramp=ramp).dataset(1, 2).to_iter_dataset())
    resumed.set_state(state)
    for step in range(4, 8):
        np.testing.assert_array_equal(next(resumed)["tokens"], train.local_batch(step, 1, 2)["tokens"])


def test_mixture_proportions_match_the_weights_and_are_reported():
    weights = [0.5, 0.3, 0.2]
    sources = [unique_token_corpus(first_token=1 + s * SOURCE_STRIDE) for s in range(3)]
    train = plan(sources=sources, weights=weights, batch_size=16)
    num_steps = 2 * BLOCK_ROWS // 16 + 5
    rows = np.concatenate([b["tokens"][:, 0] for b in steps(train, 0, num_steps)]) // SOURCE_STRIDE
    realised = np.bincount(rows, minlength=3)
    np.testing.assert_array_equal(realised, train.rows_per_source(num_steps))
    np.testing.assert_allclose(realised / realised.sum(), weights, atol=0.01)
    for step in (64, 128):  # whole blocks of 1,024 rows: the weights rounded to 1/1024 exactly
        np.testing.assert_allclose(train.rows_per_source(step) / (16 * step), weights, atol=1 / BLOCK_ROWS)
    per_batch = rows.reshape(num_steps, 16)
    for s, weight in enumerate(weights):  # every batch, not just every block, holds each share to within 2 rows
        counts = (per_batch == s).sum(axis=1)
        assert np.all(np.abs(counts - 16 * weight) <= 2), (s, counts)


def test_a_small_source_is_repeated_more_often_than_a_large_one():
    small = unique_token_corpus([17, 17], first_token=1)  # 32 pairs: 2 rows per epoch
    large = unique_token_corpus(LENGTHS, first_token=SOURCE_STRIDE)
    train = plan(sources=[small, large], weights=[0.5, 0.5], batch_size=8)
    seen = inputs_of(steps(train, 0, 8))
    small_rows, large_rows = train.rows_per_source(8)
    small_counts = np.bincount(seen[seen < SOURCE_STRIDE])[np.asarray(small[0][:-1])]
    assert len(seen[seen < SOURCE_STRIDE]) == small_rows * SEQ_LEN
    assert set(small_counts) <= {small_rows // 2, -(-small_rows // 2)} and small_rows // 2 >= 12  # 12+ epochs
    large_counts = np.bincount(seen[seen >= SOURCE_STRIDE] - SOURCE_STRIDE)
    assert large_rows < 2 * 24 and large_counts.max() == 2  # under two epochs of 24 rows


def test_rows_never_attend_across_documents_through_the_model():
    """A packed row's logits equal those of each of its document pieces run alone."""
    with nnx.use_eager_sharding(False):
        model = Llama(LlamaConfig(vocab_size=512, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                                  max_seq_len=64, attention="reference", remat="none"), rngs=nnx.Rngs(0))
    corpus = unique_token_corpus([9, 4, 7, 12, 3, 20])
    batch = plan(sources=[corpus], window=1).local_batch(0)
    row = int(np.argmax(batch["segment_ids"].max(axis=1)))
    assert batch["segment_ids"][row].max() >= 3, "the test needs a row with several documents"
    tokens, segments, positions = (jnp.asarray(batch[k][row : row + 1]) for k in ("tokens", "segment_ids", "positions"))
    packed = model(tokens, segment_ids=segments, positions=positions)
    for segment in np.unique(batch["segment_ids"][row]):
        cols = np.flatnonzero(batch["segment_ids"][row] == segment)
        alone = model(tokens[:, cols])
        np.testing.assert_allclose(np.asarray(packed[0, cols]), np.asarray(alone[0]), rtol=2e-5, atol=2e-5)


def test_eval_batches_are_fixed_and_the_same_for_any_process_count():
    corpus = unique_token_corpus()
    single = eval_batches(corpus, seq_len=SEQ_LEN, batch_size=4, max_batches=3)
    assert_batches_equal(single, eval_batches(corpus, seq_len=SEQ_LEN, batch_size=4, max_batches=3))
    halves = [eval_batches(corpus, seq_len=SEQ_LEN, batch_size=4, max_batches=3, process_index=p, process_count=2)
              for p in range(2)]
    joined = [{k: np.concatenate([h[i][k] for h in halves]) for k in single[i]} for i in range(3)]
    assert_batches_equal(joined, single)


def test_eval_batches_cover_the_corpus_once_and_pad_the_end():
    lengths = LENGTHS[:-1] + [9]  # 360 pairs: 22 full rows and one of 8
    corpus = unique_token_corpus(lengths)
    batches = eval_batches(corpus, seq_len=SEQ_LEN, batch_size=5, max_batches=100, pad_id=7)
    assert len(batches) == 5  # 23 rows, the last batch padded with two empty rows
    every_pair = np.concatenate([np.asarray(corpus[i][:-1]) for i in range(len(corpus))])
    np.testing.assert_array_equal(inputs_of(batches), every_pair)  # unshuffled: in stored order
    last = batches[-1]
    assert last["loss_mask"][-1].sum() == 0 and np.all(last["tokens"][-1] == 7) and np.all(last["segment_ids"][-1] == 0)
    assert last["loss_mask"][-2].sum() == 0 and last["loss_mask"][-3].sum() == 360 - 22 * SEQ_LEN


@pytest.mark.parametrize(
    "kwargs", [dict(process_index=2, process_count=2), dict(process_index=-1, process_count=2),
               dict(process_index=0, process_count=3)]
)
def test_impossible_process_splits_raise_data_error(kwargs):
    with pytest.raises(DataError, match="process"):
        plan().local_batch(0, **kwargs)
    with pytest.raises(DataError, match="process"):
        plan().dataset(**kwargs)


def test_a_source_without_any_pair_raises_data_error():
    with pytest.raises(DataError, match="none with 2 or more tokens"):
        plan(sources=[unique_token_corpus([1, 0, 1])])


def test_mismatched_weights_and_bad_windows_raise_data_error():
    with pytest.raises(DataError, match="one weight per source"):
        TrainBatches([unique_token_corpus()], [0.5, 0.5], BatchSchedule(4, SEQ_LEN), seed=0)
    with pytest.raises(DataError, match="shuffle_window"):
        plan(window=0)


def test_plans_are_pure_functions_of_the_step():
    train = plan(batch_size=8)
    forward = steps(train, 0, 6)
    backward = [train.local_batch(step) for step in reversed(range(6))][::-1]
    assert_batches_equal(forward, backward)


# ---------------------------------------------------------------------------------------------------------
# Chat examples: stores with a loss mask are packed whole


CHAT_LENGTHS = [5, 9, 3, 12, 7, 2, 16, 30, 4, 6, 11, 8]  # 30 tokens = 29 pairs: longer than a row of 16


def chat_corpus(lengths=CHAT_LENGTHS) -> TokenizedCorpus:
    """Unique tokens; the mask marks the second half of each example (its "answer")."""
    corpus = unique_token_corpus(lengths)
    mask = np.concatenate([(np.arange(n) >= n // 2).astype(np.uint8) for n in lengths])
    return TokenizedCorpus(corpus.tokens, corpus.offsets, mask)


def test_chat_examples_are_packed_whole_with_their_masks_and_padding(capsys):
    corpus = chat_corpus()
    train = TrainBatches([corpus], [1.0], BatchSchedule(4, SEQ_LEN), seed=0, shuffle_window=1, pad_id=99)
    batches = steps(train, 0, 6)
    assert "1 examples longer than seq_len 16 are left out" in capsys.readouterr().err
    fitting = [d for d, n in enumerate(CHAT_LENGTHS) if 2 <= n <= SEQ_LEN + 1]
    seen_docs = []  # in stream order: with a window of 1 row, rows come unshuffled
    for batch in batches:
        for row in range(4):
            for segment in range(1, batch["segment_ids"][row].max() + 1):
                cols = np.flatnonzero(batch["segment_ids"][row] == segment)
                doc = int(np.searchsorted(corpus.offsets, batch["tokens"][row, cols[0]] - 1, side="right") - 1)
                whole = np.asarray(corpus[doc])
                np.testing.assert_array_equal(batch["tokens"][row, cols], whole[:-1])  # whole, never cut
                np.testing.assert_array_equal(batch["positions"][row, cols], np.arange(len(cols)))
                np.testing.assert_array_equal(batch["loss_mask"][row, cols], corpus.read_loss_mask(doc)[1:])
                seen_docs.append(doc)
            pad = batch["segment_ids"][row] == 0
            assert np.all(batch["tokens"][row, pad] == 99) and np.all(batch["loss_mask"][row, pad] == 0)
    assert len(seen_docs) > 2 * len(fitting)
    for epoch in range(2):
        docs = seen_docs[epoch * len(fitting) : (epoch + 1) * len(fitting)]
        assert sorted(docs) == fitting, "every fitting example exactly once per epoch"


def test_chat_examples_resume_on_any_topology_and_evaluate_whole():
    train = TrainBatches([chat_corpus()], [1.0], BatchSchedule(4, SEQ_LEN, [(2000, 8, SEQ_LEN)]), seed=1)
    for step in range(0, 12, 3):
        assert_batches_equal([concat_processes(train, step, 2)], [train.local_batch(step)])
    evaluation = eval_batches(chat_corpus(), seq_len=SEQ_LEN, batch_size=4, max_batches=10)
    seen = inputs_of(evaluation)
    expected = np.concatenate([np.asarray(chat_corpus()[d][:-1])[chat_corpus().read_loss_mask(d)[1:] == 1]
                               for d, n in enumerate(CHAT_LENGTHS) if 2 <= n <= SEQ_LEN + 1])
    np.testing.assert_array_equal(seen, expected)


def test_chat_examples_refuse_a_ramp_that_changes_seq_len():
    with pytest.raises(DataError, match="keep seq_len constant"):
        TrainBatches([chat_corpus()], [1.0], BatchSchedule(4, SEQ_LEN, [(1000, 4, 32)]), seed=0)
    with pytest.raises(DataError, match="none of its"):
        TrainBatches([chat_corpus([40, 50])], [1.0], BatchSchedule(4, SEQ_LEN), seed=0).local_batch(0)


@pytest.mark.parametrize("corpus", [unique_token_corpus, chat_corpus])
def test_each_source_computes_its_epoch_order_once_however_many_sources(corpus):
    """A cache shared by the mixture's streams held 4 epoch orders: with 6 sources, every row recomputed its own."""
    train = TrainBatches([corpus() for _ in range(6)], [1.0] * 6, BatchSchedule(8, SEQ_LEN), seed=0,
                         shuffle_window=WINDOW)
    steps(train, 0, 2)  # 16 rows: each source's within its first epoch
    cached = [getattr(stream, "_epoch", None) or stream._plan for stream in train.streams]
    assert [c.cache_info().misses for c in cached] == [1] * 6


def test_a_chat_source_read_on_at_another_seq_len_starts_the_next_epoch():
    """Chat rows are planned per seq_len, so a later phase with another one cannot go on at the same row: it starts the
    epoch after the one in progress, and no example comes twice in an epoch."""
    first = TrainBatches([chat_corpus()], [1.0], BatchSchedule(4, SEQ_LEN), seed=0, stop_step=2)
    (position,) = first.end_positions()
    assert position == (8, SEQ_LEN)
    stream = first.streams[0]
    epoch, row = stream._locate(position.units, SEQ_LEN)
    assert row > 0  # mid-epoch
    later = TrainBatches([chat_corpus()], [1.0], BatchSchedule(4, 2 * SEQ_LEN), seed=0, starts=[position])
    assert later._stage_start_units[0][0] == sum(len(stream._plan(e, 2 * SEQ_LEN)[1]) - 1 for e in range(epoch + 1))
    assert later.streams[0]._locate(later._stage_start_units[0][0], 2 * SEQ_LEN) == (epoch + 1, 0)
    same = TrainBatches([chat_corpus()], [1.0], BatchSchedule(4, SEQ_LEN), seed=0, starts=[position])
    assert same._stage_start_units[0][0] == position.units
