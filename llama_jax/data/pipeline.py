"""Training batches as a pure function of (seed, step): one global order, whatever the number of processes.

    per source: documents ─► shuffled per epoch ─► concatenated ─► cut into rows of seq_len pairs
                 ─► rows shuffled within windows
    mixture:    global row r ─► (source, that source's row index)         (data/mixture.py)
    schedule:   step ─► (stage, global batch size, seq_len)                (data/schedule.py)
    process p:  reads only rows [p·B/P, (p+1)·B/P) of each global batch ─► dict of [B/P, seq_len] arrays

Each document is already framed by its tokenizer's rule and ended by eos (`Tokenizer.encode_documents`). A
document of n tokens gives n - 1 (input, target) pairs. An epoch of a source is its documents in an order
shuffled by (seed, epoch), concatenated into one stream of pairs; the epochs follow each other. Rows are
consecutive runs of seq_len pairs of that stream (no padding; a document that does not fit continues in
another row), shuffled within windows of `shuffle_window` rows so that the rows of one long document spread
over many batches. Segment ids (1-based per document piece) and positions (restarting with each piece) keep
attention inside each document.

Because every row's content is computed from its index alone, a process builds just its own rows; the
sequence of global batches depends on (sources, seed, schedule) only, so a run resumed with another number of
processes or another data-parallel size continues with exactly the batch the old run would have seen next.
A change of seq_len or batch size (the schedule's stages) continues each source's stream where the previous
stage stopped: no document is skipped or repeated.

Chat examples (stores with a loss mask) are the exception to cutting: a row holds whole conversations, packed
in order, then padding (`WholeDocumentStream`), so an answer is never trained without its prompt.
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import grain
import numpy as np

from llama_jax.data.conversations import without_end_tokens
from llama_jax.data.mixture import Mixture
from llama_jax.data.schedule import BatchSchedule, Stage
from llama_jax.errors import DataError

Batch = dict[str, np.ndarray]
DEFAULT_SHUFFLE_WINDOW = 4096  # rows
_MIX, _WINDOW, _EPOCH = 1, 2, 3  # tags that keep the random streams of different purposes apart


class StreamPosition(NamedTuple):
    """Where reading a source's stream stopped: in its units (pairs, or a chat stream's rows), and the seq_len of
    the rows it read last (chat rows are planned for one length)."""

    units: int
    seq_len: int


class DocumentStore(Protocol):
    """What the pipeline reads: documents by index, and all their lengths up front (the plan needs no tokens)."""

    lengths: np.ndarray  # int64 [num_documents]: tokens per document
    has_loss_mask: bool

    def read(self, index: int) -> np.ndarray: ...

    def read_loss_mask(self, index: int) -> np.ndarray: ...


class PairStream:
    """One source's documents as an endless stream of (input, target) pairs, epoch after epoch.

    With `shuffle`, epoch e visits the documents in an order drawn from (seed, e); without, in stored order.
    """

    def __init__(self, store: DocumentStore, *, seed: Sequence[int], shuffle: bool, name: str = "data"):
        self.store = store
        self.seed = tuple(seed)
        self.shuffle = shuffle
        pairs = np.maximum(np.asarray(store.lengths, dtype=np.int64) - 1, 0)
        self._usable = np.flatnonzero(pairs)
        self._pairs = pairs[self._usable]
        self.pairs_per_epoch = int(self._pairs.sum())
        self._epoch = _cache_per_stream(self._epoch_order)
        if self.pairs_per_epoch == 0:
            raise DataError(
                f"source {name!r} has {len(pairs)} documents and none with 2 or more tokens, so nothing to train "
                "on. Fix: check that source's files (documents need at least 2 tokens to give a training target)."
            )

    def pieces(self, start: int, count: int) -> list[tuple[int, int, int]]:
        """(document, first pair, number of pairs) covering stream pairs [start, start + count)."""
        pieces = []
        while count > 0:
            epoch, offset = divmod(start, self.pairs_per_epoch)
            order, ends = self._epoch(epoch)
            position = int(np.searchsorted(ends, offset, side="right"))
            first = offset - (int(ends[position - 1]) if position else 0)
            take = min(count, int(ends[position]) - offset)
            pieces.append((int(order[position]), first, take))
            start, count = start + take, count - take
        return pieces

    def read(self, start: int, count: int) -> Batch:
        """Pairs [start, start + count) as one unpadded row: tokens, targets, segment_ids, positions, loss_mask."""
        parts = []
        for segment, (document, first, n) in enumerate(self.pieces(start, count), start=1):
            tokens = np.asarray(self.store.read(document)[first : first + n + 1], dtype=np.int32)
            if self.store.has_loss_mask:
                mask = np.asarray(self.store.read_loss_mask(document)[first + 1 : first + n + 1], np.float32)
            else:
                mask = np.ones(n, np.float32)
            parts.append((tokens[:-1], tokens[1:], np.full(n, segment, np.int32), np.arange(n, dtype=np.int32), mask))
        keys = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
        return {key: np.concatenate([p[i] for p in parts]) for i, key in enumerate(keys)}

    def units_per_row(self, seq_len: int) -> int:
        """Rows are seq_len consecutive pairs: a stage's cursor moves seq_len pairs per row."""
        return seq_len

    def continue_at(self, position: StreamPosition, seq_len: int) -> int:
        """Pairs do not depend on the row length: reading goes on at the next pair."""
        return position.units

    def read_row(self, start: int, seq_len: int) -> Batch:
        return self.read(start, seq_len)

    def first_epoch_rows(self, seq_len: int) -> int:
        return -(-self.pairs_per_epoch // seq_len)

    def first_epoch_row(self, row: int, seq_len: int, pad_id: int) -> Batch:
        """Row `row` of one unrepeated pass, the last one padded (evaluation)."""
        count = min(seq_len, self.pairs_per_epoch - row * seq_len)
        return _padded(self.read(row * seq_len, count), seq_len, pad_id)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's document order and the cumulative pair count at the end of each document in it."""
        if self.shuffle:
            rng = np.random.default_rng([*self.seed, _EPOCH, epoch])
            permutation = rng.permutation(len(self._usable))
        else:
            permutation = np.arange(len(self._usable))
        return self._usable[permutation], np.cumsum(self._pairs[permutation])


class WholeDocumentStream:
    """Chat examples: each row holds whole documents (next fit, in an order shuffled per epoch), then padding.

    A conversation cut across rows would train its answer without its prompt, so these documents are never
    split. A row's place is its index in the endless row stream (the epochs' rows one after another), and an
    epoch's rows are planned from the document lengths alone. Documents with more than seq_len pairs cannot
    fit any row: they are counted and left out.
    """

    def __init__(self, store: DocumentStore, *, seed: Sequence[int], shuffle: bool, pad_id: int, name: str = "data"):
        self.store = store
        self.seed = tuple(seed)
        self.shuffle = shuffle
        self.pad_id = pad_id
        self.name = name
        self._pairs = np.maximum(np.asarray(store.lengths, dtype=np.int64) - 1, 0)
        self._epoch_rows: dict[int, list[int]] = {}  # seq_len -> rows of epochs 0, 1, ... (planned so far)
        self._lock = threading.Lock()  # reader threads extend _epoch_rows
        self._plan = _cache_per_stream(self._planned_epoch)

    def units_per_row(self, seq_len: int) -> int:
        """A stage's cursor counts rows."""
        return 1

    def continue_at(self, position: StreamPosition, seq_len: int) -> int:
        """The row to go on at in rows of `seq_len`: the next one, or with another row length (which plans other
        rows) the first of the epoch after the one in progress, so that no example comes twice in an epoch."""
        if position.seq_len == seq_len or position.units == 0:
            return position.units
        epoch, row = self._locate(position.units, position.seq_len)
        return sum(len(self._plan(e, seq_len)[1]) - 1 for e in range(epoch + (row > 0)))

    def read_row(self, start: int, seq_len: int) -> Batch:
        epoch, row = self._locate(start, seq_len)
        return self._row(epoch, row, seq_len)

    def first_epoch_rows(self, seq_len: int) -> int:
        return len(self._plan(0, seq_len)[1]) - 1

    def first_epoch_row(self, row: int, seq_len: int, pad_id: int) -> Batch:
        return self._row(0, row, seq_len)

    def _row(self, epoch: int, row: int, seq_len: int) -> Batch:
        order, row_starts = self._plan(epoch, seq_len)
        parts = []
        for segment, document in enumerate(order[row_starts[row] : row_starts[row + 1]], start=1):
            tokens = np.asarray(self.store.read(int(document)), dtype=np.int32)
            n = len(tokens) - 1
            mask = np.asarray(self.store.read_loss_mask(int(document))[1:], np.float32)
            parts.append((tokens[:-1], tokens[1:], np.full(n, segment, np.int32), np.arange(n, dtype=np.int32), mask))
        keys = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
        row_batch = {key: np.concatenate([p[i] for p in parts]) for i, key in enumerate(keys)}
        return _padded(row_batch, seq_len, self.pad_id)

    def _locate(self, row: int, seq_len: int) -> tuple[int, int]:
        """(epoch, row within it) of a row of the endless stream."""
        with self._lock:
            counts = self._epoch_rows.setdefault(seq_len, [])
            epoch = 0
            while True:
                if epoch == len(counts):
                    counts.append(len(self._plan(epoch, seq_len)[1]) - 1)
                if row < counts[epoch]:
                    return epoch, row
                row -= counts[epoch]
                epoch += 1

    def _planned_epoch(self, epoch: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's fitting documents in order, and where each row starts in that order (plus the end)."""
        fits = np.flatnonzero((self._pairs > 0) & (self._pairs <= seq_len))
        if len(fits) == 0:
            raise DataError(
                f"source {self.name!r}: none of its {len(self._pairs)} examples fits a row of {seq_len} tokens. "
                "Fix: raise data.seq_len, or prepare the examples with a lower --max_tokens."
            )
        if epoch == 0 and len(fits) < np.count_nonzero(self._pairs):
            print(f"source {self.name!r}: {np.count_nonzero(self._pairs) - len(fits)} examples longer than "
                  f"seq_len {seq_len} are left out (never truncated).", file=sys.stderr, flush=True)
        order = fits[np.random.default_rng([*self.seed, _EPOCH, epoch]).permutation(len(fits))] if self.shuffle else fits
        row_starts, used = [0], 0
        for position, pairs in enumerate(self._pairs[order].tolist()):
            if used + pairs > seq_len:
                row_starts.append(position)
                used = 0
            used += pairs
        row_starts.append(len(order))
        return order, np.asarray(row_starts)


def _cache_per_stream(compute):
    """A few recent results of one stream's `compute`. A `functools.lru_cache` on the method would be one cache for
    every stream of the mixture: with more sources than its size, each row would redo its source's epoch order."""
    return functools.lru_cache(maxsize=4)(compute)


def make_stream(store: DocumentStore, *, seed: Sequence[int], shuffle: bool, pad_id: int,
                name: str) -> PairStream | WholeDocumentStream:
    """Text is cut into rows of pairs; chat examples (stores with a loss mask) are packed whole."""
    if store.has_loss_mask:
        return WholeDocumentStream(store, seed=seed, shuffle=shuffle, pad_id=pad_id, name=name)
    return PairStream(store, seed=seed, shuffle=shuffle, name=name)


class TrainBatches:
    """The plan of every training batch: which source rows make global batch `step`, and their contents.

    `sources` are the document stores of the mixture, `weights` their shares of the rows. Any step's batch,
    or any process's share of it, is computed directly; `dataset` wraps that in a grain pipeline whose
    iterator state (the next step) goes into checkpoints.

    A later phase of a run goes on reading a source where the phases before it stopped: it gives the source the same
    `stream_seeds` entry (its epochs' order), its `starts` entry (`end_positions` of the phase that read it last),
    and those phases give their `stop_step`, so that their last shuffle window holds exactly the rows they read.
    """

    def __init__(
        self,
        sources: Sequence[DocumentStore],
        weights: Sequence[float],
        schedule: BatchSchedule,
        *,
        seed: int,
        shuffle_window: int = DEFAULT_SHUFFLE_WINDOW,
        names: Sequence[str] | None = None,
        pad_id: int = 0,
        stream_seeds: Sequence[Sequence[int]] | None = None,
        starts: Sequence[StreamPosition | None] | None = None,
        stop_step: int | None = None,
    ):
        if len(sources) != len(weights) or not sources:
            raise DataError(f"got {len(sources)} sources and {len(weights)} weights: give one weight per source")
        if shuffle_window < 1:
            raise DataError(f"shuffle_window must be at least 1 row, got {shuffle_window}: fix data.shuffle_window")
        self.names = list(names) if names is not None else [f"source{i}" for i in range(len(sources))]
        stream_seeds = stream_seeds or [(seed, i) for i in range(len(sources))]
        self.streams = [
            make_stream(store, seed=stream_seed, shuffle=True, pad_id=pad_id, name=name)
            for store, stream_seed, name in zip(sources, stream_seeds, self.names)
        ]
        whole = [name for name, store in zip(self.names, sources) if store.has_loss_mask]
        if whole and len({stage.seq_len for stage in schedule.stages}) > 1:
            raise DataError(
                f"sources {whole} hold chat examples, packed whole into rows of one length, so data.ramp cannot change "
                "seq_len for them. Fix: keep seq_len constant in data.ramp (batch sizes may change)."
            )
        self.schedule = schedule
        self.seed = seed
        self.window = shuffle_window
        self.mixtures = [Mixture(weights, seed=(seed, _MIX, s)) for s in range(len(schedule.stages))]
        self.stop_step = stop_step
        self._stage_rows, self._stage_start_units, self._end_units = self._stage_layout(starts or [None] * len(sources))

    def local_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch:
        """Rows [p·B/P, (p+1)·B/P) of global batch `step`, as [B/P, seq_len] arrays."""
        stage_index = self.schedule.stage_index(step)
        stage = self.schedule.stages[stage_index]
        local = _local_rows(stage.batch_size, process_index, process_count)
        first = (step - stage.start_step) * stage.batch_size + local.start
        sources, indices = self.mixtures[stage_index].assign(np.arange(first, first + len(local)))
        rows = [self._row(stage_index, stage, int(s), int(j)) for s, j in zip(sources, indices)]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def rows_per_source(self, stop_step: int) -> np.ndarray:
        """How many rows of the global batches [0, stop_step) each source supplied (the realised mixture)."""
        counts = np.zeros(len(self.streams), np.int64)
        for index, stage in enumerate(self.schedule.stages):
            if stop_step <= stage.start_step:
                break
            steps = stop_step - stage.start_step if stage.stop_step is None else min(stop_step, stage.stop_step) - stage.start_step
            counts += self.mixtures[index].rows_before(steps * stage.batch_size)
        return counts

    def end_positions(self) -> list[StreamPosition]:
        """Where each source's stream stands after step `stop_step - 1`: where a later phase goes on reading it."""
        if self.stop_step is None:
            raise ValueError("an endless plan has no end position")
        seq_len = self.schedule.stage(self.stop_step - 1).seq_len
        return [StreamPosition(int(units), seq_len) for units in self._end_units]

    def dataset(self, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
        """Step i -> this process's share of global batch i, up to `stop_step` (or endless)."""
        for stage in self.schedule.stages:
            _local_rows(stage.batch_size, process_index, process_count)  # refuses an impossible split up front
        build = functools.partial(self.local_batch, process_index=process_index, process_count=process_count)
        return grain.MapDataset.range(2**62 if self.stop_step is None else self.stop_step).map(build)

    def _row(self, stage_index: int, stage: Stage, source: int, index: int) -> Batch:
        """Row `index` of `source` in a stage: its place in the stream after shuffling within its window."""
        window, slot = divmod(index, self.window)
        size = self.window
        stage_rows = self._stage_rows[stage_index][source]
        if stage_rows is not None:
            size = min(size, stage_rows - window * self.window)
        shuffled = window * self.window + int(self._window_order(stage_index, source, window, size)[slot])
        stream = self.streams[source]
        start = self._stage_start_units[stage_index][source] + shuffled * stream.units_per_row(stage.seq_len)
        return stream.read_row(start, stage.seq_len)

    @functools.lru_cache(maxsize=64)
    def _window_order(self, stage_index: int, source: int, window: int, size: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _WINDOW, stage_index, source, window]).permutation(size)

    def _stage_layout(self, first: Sequence[StreamPosition | None]
                      ) -> tuple[list[list[int | None]], list[list[int]], np.ndarray]:
        """Per stage and source: how many rows the stage takes from it (None: endless), and the stream position
        (in the stream's units: pairs, or rows) at which the stage starts reading it (where the previous stopped);
        and the positions after the last stage (a finite plan's)."""
        rows: list[list[int | None]] = []
        starts: list[list[int]] = []
        seq_len = self.schedule.stages[0].seq_len
        cursor = np.array([0 if position is None else stream.continue_at(position, seq_len)
                           for stream, position in zip(self.streams, first)], np.int64)
        for index, stage in enumerate(self.schedule.stages):
            starts.append([int(c) for c in cursor])
            ends = [end for end in (stage.stop_step, self.stop_step) if end is not None]
            stop = min(ends) if ends else None
            if stop is None:
                rows.append([None] * len(self.streams))
                continue
            taken = self.mixtures[index].rows_before(max(0, stop - stage.start_step) * stage.batch_size)
            rows.append([int(t) for t in taken])
            cursor += taken * np.array([stream.units_per_row(stage.seq_len) for stream in self.streams])
        return rows, starts, cursor


def eval_batches(
    store: DocumentStore,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    pad_id: int = 0,
) -> list[Batch]:
    """A fixed evaluation set: the first `max_batches` global batches of the unshuffled documents, one pass.

    Each process keeps its rows of every global batch, so all processes get the same number of batches and the
    evaluation set is the same whatever the number of processes. The last row and batch are padded (loss_mask 0).
    """
    if max_batches < 1 or seq_len < 1 or batch_size < 1:
        raise DataError(
            f"eval needs positive max_batches, seq_len and batch_size, got {max_batches}, {seq_len}, {batch_size}: "
            "fix data.eval_batches, data.seq_len or data.batch_size"
        )
    local = _local_rows(batch_size, process_index, process_count)
    stream = make_stream(store, seed=(0,), shuffle=False, pad_id=pad_id, name="eval")
    num_rows = min(stream.first_epoch_rows(seq_len), max_batches * batch_size)
    empty = _padding_row(seq_len, pad_id)
    batches = []
    for first in range(0, num_rows, batch_size):
        rows = [stream.first_epoch_row(row, seq_len, pad_id) if row < num_rows else empty
                for row in range(first + local.start, first + local.stop)]
        batches.append({key: np.stack([row[key] for row in rows]) for key in rows[0]})
    return batches


def _padded(row: Batch, seq_len: int, pad_id: int) -> Batch:
    missing = seq_len - len(row["tokens"])
    if not missing:
        return row
    fill = _padding_row(missing, pad_id)
    return {key: np.concatenate([row[key], fill[key]]) for key in row}


def _padding_row(length: int, pad_id: int) -> Batch:
    ints = {key: np.full(length, pad_id if key in ("tokens", "targets") else 0, np.int32)
            for key in ("tokens", "targets", "segment_ids", "positions")}
    return {**ints, "loss_mask": np.zeros(length, np.float32)}


def _local_rows(batch_size: int, process_index: int, process_count: int) -> range:
    if not 0 <= process_index < process_count:
        raise DataError(
            f"process_index={process_index} is not in [0, process_count={process_count}). "
            "Fix: pass jax.process_index() and jax.process_count()."
        )
    if batch_size % process_count:
        raise DataError(
            f"a global batch of {batch_size} sequences cannot be split over {process_count} processes: "
            f"make data.batch_size (and every data.ramp batch size) a multiple of {process_count}"
        )
    per_process = batch_size // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


class PreferenceBatches:
    """Batches of preference pairs, as a pure function of (seed, step) like `TrainBatches`.

    The store holds pair i as documents 2i (prompt + chosen) and 2i + 1 (prompt + rejected), each with a mask of its
    response's tokens and end tokens (`python -m llama_jax.data.preferences` writes it). Row r of a batch is one
    pair: the chosen sequence under the usual keys, with `loss_mask` its response without the end tokens (the DPO
    log-probabilities') and `nll_mask` with them (the NLL term's), and the rejected one under `rejected_` keys; both
    padded to seq_len. One pair per row keeps each pair's two log-probabilities in one row of one device. Pairs whose
    longer sequence exceeds seq_len are left out, counted, never cut. Epochs visit the pairs in an order drawn from
    (seed, epoch).
    """

    def __init__(self, store: DocumentStore, schedule: BatchSchedule, *, seed: int, pad_id: int = 0,
                 name: str = "data"):
        if len(schedule.stages) > 1:
            raise DataError("preference pairs are batched at one batch size and seq_len: set data.ramp = ()")
        self.store, self.schedule, self.seed, self.pad_id = store, schedule, seed, pad_id
        self.names = [name]
        self.pairs = preference_pairs(store, schedule.stages[0].seq_len, name)

    def local_batch(self, step: int, process_index: int = 0, process_count: int = 1) -> Batch:
        """Rows [p·B/P, (p+1)·B/P) of global batch `step`."""
        stage = self.schedule.stages[0]
        local = _local_rows(stage.batch_size, process_index, process_count)
        first = step * stage.batch_size + local.start
        rows = [pair_row(self.store, int(self._pair(g)), stage.seq_len, self.pad_id)
                for g in range(first, first + len(local))]
        return {key: np.stack([row[key] for row in rows]) for key in rows[0]}

    def dataset(self, process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
        """Step i -> this process's share of global batch i, endless."""
        _local_rows(self.schedule.stages[0].batch_size, process_index, process_count)
        build = functools.partial(self.local_batch, process_index=process_index, process_count=process_count)
        return grain.MapDataset.range(2**62).map(build)

    def rows_per_source(self, stop_step: int) -> np.ndarray:
        return np.asarray([stop_step * self.schedule.stages[0].batch_size], np.int64)

    def _pair(self, index: int) -> int:
        epoch, k = divmod(index, len(self.pairs))
        return self.pairs[self._order(epoch)[k]]

    @functools.lru_cache(maxsize=4)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, _EPOCH, epoch]).permutation(len(self.pairs))


def preference_pairs(store: DocumentStore, seq_len: int, name: str = "data") -> np.ndarray:
    """Indices of the store's pairs whose chosen and rejected sequences both fit a row of seq_len pairs."""
    if not store.has_loss_mask or len(store.lengths) % 2:
        raise DataError(f"source {name!r} is not a preference store (pairs of masked documents): prepare it with "
                        "python -m llama_jax.data.preferences --source PAIRS.jsonl --tokenizer T --out DIR")
    lengths = np.asarray(store.lengths, np.int64).reshape(-1, 2)
    fits = np.flatnonzero(lengths.max(axis=1) - 1 <= seq_len)
    if len(fits) == 0:
        raise DataError(f"source {name!r}: none of its {len(lengths)} pairs fits a row of {seq_len} tokens. Fix: raise "
                        "data.seq_len, or prepare the pairs with a lower --max_tokens.")
    if len(fits) < len(lengths):
        print(f"source {name!r}: {len(lengths) - len(fits)} preference pairs longer than seq_len {seq_len} are left "
              "out (never truncated).", file=sys.stderr, flush=True)
    return fits


def pair_row(store: DocumentStore, pair: int, seq_len: int, pad_id: int) -> Batch:
    """Pair `pair` as one row of a pair batch (see `PreferenceBatches`)."""
    row: Batch = {}
    for prefix, document in (("", 2 * pair), ("rejected_", 2 * pair + 1)):
        tokens = np.asarray(store.read(document), np.int32)
        response = np.asarray(store.read_loss_mask(document), np.uint8)
        n = len(tokens) - 1
        sequence = {"tokens": tokens[:-1], "targets": tokens[1:], "segment_ids": np.ones(n, np.int32),
                    "positions": np.arange(n, dtype=np.int32),
                    "loss_mask": without_end_tokens(response)[1:].astype(np.float32)}
        sequence = _padded(sequence, seq_len, pad_id)
        row.update({prefix + key: value for key, value in sequence.items()})
        if not prefix:
            row["nll_mask"] = np.pad(response[1:].astype(np.float32), (0, seq_len - n))
    return row


def eval_pair_batches(store: DocumentStore, *, seq_len: int, batch_size: int, max_batches: int,
                      process_index: int = 0, process_count: int = 1, pad_id: int = 0) -> list[Batch]:
    """A fixed held-out set of pairs, in stored order, as in `eval_batches`: padding rows have empty masks."""
    local = _local_rows(batch_size, process_index, process_count)
    pairs = preference_pairs(store, seq_len, "eval")[: max_batches * batch_size]
    empty = {key: np.zeros_like(value) for key, value in pair_row(store, int(pairs[0]), seq_len, pad_id).items()}
    batches = []
    for first in range(0, len(pairs), batch_size):
        rows = [pair_row(store, int(pairs[i]), seq_len, pad_id) if i < len(pairs) else empty
                for i in range(first + local.start, first + local.stop)]
        batches.append({key: np.stack([row[key] for row in rows]) for key in rows[0]})
    return batches
