"""Packed language-model batches from a `TokenizedCorpus`, as a resumable grain pipeline.

    chunk table ─► shard by process ─► shuffle (per epoch) ─► repeat ─► read (tokens, targets)
        ─► first-fit pack into rows of seq_len ─► batch ─► segment ids, positions, loss mask

Each document in the corpus is already framed by its tokenizer's rule and ended by eos
(`Tokenizer.encode_documents`): with Llama 3's tokenizer `<|begin_of_text|> text <|end_of_text|>`. Packing adds
nothing between documents; segment ids keep attention inside each one.

The unit of data is a *chunk*: at most seq_len (input, target) pairs from one document. A document of n
tokens has n - 1 pairs (inputs d[:-1], targets d[1:]); documents longer than seq_len + 1 tokens are cut
into chunks that overlap by one token, so every pair is trained on exactly once per epoch and no target
ever belongs to another document. Chunks are what gets sharded and shuffled, which keeps the shards of
equal size and spreads the pieces of a long document over the epoch.

Everything is deterministic: the batches are a pure function of (corpus, seed, number of batches
consumed), and `iter(ds).get_state()` / `set_state()` resume exactly.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

from llama_jax.data.sources import TokenizedCorpus
from llama_jax.errors import DataError

Batch = dict[str, np.ndarray]


def lm_batches(
    corpus: TokenizedCorpus,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    pad_id: int = 0,
) -> grain.IterDataset:
    """Batches of this process's share of the corpus, each a dict of [batch_size, seq_len] arrays.

    Keys: `tokens`, `targets`, `segment_ids` (1-based document within the row, 0 = padding), `positions`
    (0-based, restarting with each chunk) as int32, and `loss_mask` float32 (1 where the target is real).
    `batch_size` is per process; process p reads chunks p, p + process_count, ... so all processes together
    make the global batch. With `repeat=False` the last batch is padded to full size with empty rows
    (loss_mask 0), so every batch has one shape and no data is dropped; processes may then get different
    numbers of batches, which is why multi-process evaluation uses `eval_batches`.
    """
    _check_arguments(seq_len=seq_len, batch_size=batch_size, process_index=process_index, process_count=process_count)
    all_chunks = chunk_table(corpus, seq_len)
    chunks = all_chunks[process_index::process_count]
    if len(chunks) == 0:
        raise DataError(
            f"Process {process_index} of {process_count} gets no data: the corpus has {len(corpus)} documents "
            f"and only {len(all_chunks)} chunks with at least 2 tokens. "
            "Fix: use a larger corpus (documents need at least 2 tokens to give a training target)."
        )
    ds = grain.MapDataset.source(chunks)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if repeat:
        ds = ds.repeat()
    ds = ds.map(functools.partial(_read_chunk, corpus.tokens))
    packed = grain.experimental.FirstFitPackIterDataset(
        # Reading a chunk is a slice of a memory map: reader threads would only add overhead.
        ds.to_iter_dataset(grain.ReadOptions(num_threads=0)),
        length_struct={"tokens": seq_len, "targets": seq_len},
        # One packing group per batch: groups are emitted whole, so batches stay aligned with groups.
        num_packing_bins=batch_size,
        seed=seed,
        shuffle_bins=False,
        padding_struct={"tokens": pad_id, "targets": pad_id},
    )
    batched = packed.batch(batch_size, drop_remainder=False)
    return batched.map(functools.partial(_finalize, batch_size=batch_size, pad_id=pad_id))


def eval_batches(
    corpus: TokenizedCorpus,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[Batch]:
    """A fixed evaluation set: the first `max_batches` unshuffled batches, this process's rows of each.

    Unlike `lm_batches`, every process packs the *global* batches and keeps its own slice of rows, so all
    processes get the same number of batches (a multi-host eval loop never waits on a process that ran out)
    and the evaluation set is the same whatever the number of processes.
    """
    _check_arguments(seq_len=seq_len, batch_size=batch_size, process_index=process_index, process_count=process_count)
    if max_batches < 1:
        raise DataError(f"max_batches must be at least 1, got {max_batches}. Fix: raise the number of eval batches.")
    global_batches = lm_batches(
        corpus, seq_len=seq_len, batch_size=batch_size * process_count, seed=0, shuffle=False, repeat=False
    )
    rows = slice(process_index * batch_size, (process_index + 1) * batch_size)
    batches = []
    for batch in global_batches:
        batches.append({key: value[rows] for key, value in batch.items()})
        if len(batches) == max_batches:
            break
    return batches


def chunk_table(corpus: TokenizedCorpus, seq_len: int) -> np.ndarray:
    """[num_chunks, 2] int64 (start, stop) token offsets: each chunk holds at most seq_len + 1 tokens.

    Consecutive chunks of a document share one token (the last target of one is the first input of the
    next). Documents with fewer than 2 tokens have no (input, target) pair and give no chunk.
    """
    starts, stops = np.asarray(corpus.offsets[:-1]), np.asarray(corpus.offsets[1:])
    num_pairs = np.maximum(stops - starts - 1, 0)
    chunks_per_doc = -(-num_pairs // seq_len)
    doc = np.repeat(np.arange(len(starts)), chunks_per_doc)
    first_chunk_of_doc = np.repeat(np.cumsum(chunks_per_doc) - chunks_per_doc, chunks_per_doc)
    chunk_start = starts[doc] + (np.arange(len(doc)) - first_chunk_of_doc) * seq_len
    chunk_stop = np.minimum(chunk_start + seq_len + 1, stops[doc])
    return np.stack([chunk_start, chunk_stop], axis=1).astype(np.int64)


def _read_chunk(tokens: np.ndarray, chunk: np.ndarray) -> Batch:
    piece = np.asarray(tokens[chunk[0] : chunk[1]], dtype=np.int32)
    return {"tokens": piece[:-1], "targets": piece[1:]}


def _finalize(rows: Batch, batch_size: int, pad_id: int) -> Batch:
    """Renames grain's packing features, derives the loss mask, and pads a short final batch with empty rows."""
    batch = {
        "tokens": rows["tokens"],
        "targets": rows["targets"],
        "segment_ids": rows["tokens_segment_ids"],
        "positions": rows["tokens_positions"],
    }
    missing = batch_size - len(batch["tokens"])
    if missing:
        fill = {"tokens": pad_id, "targets": pad_id, "segment_ids": 0, "positions": 0}
        batch = {k: np.pad(v, ((0, missing), (0, 0)), constant_values=fill[k]) for k, v in batch.items()}
    batch = {k: v.astype(np.int32, copy=False) for k, v in batch.items()}
    batch["loss_mask"] = (batch["segment_ids"] > 0).astype(np.float32)
    return batch


def _check_arguments(*, seq_len: int, batch_size: int, process_index: int, process_count: int) -> None:
    if seq_len < 1 or batch_size < 1:
        raise DataError(
            f"seq_len and batch_size must be positive, got seq_len={seq_len}, batch_size={batch_size}. "
            "Fix: set data.seq_len and data.batch_size to positive values."
        )
    if not 0 <= process_index < process_count:
        raise DataError(
            f"process_index={process_index} is not in [0, process_count={process_count}). "
            "Fix: pass jax.process_index() and jax.process_count()."
        )
