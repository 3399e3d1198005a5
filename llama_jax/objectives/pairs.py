"""What the preference objectives (DPO, reward model) share: the layout of a batch of pairs and its counts.

A pair batch holds, row for row, a chosen sequence under the usual keys (`tokens`, `targets`, `segment_ids`,
`positions`, `loss_mask`) and its rejected sequence under the same keys prefixed `rejected_`; `nll_mask` marks the
chosen response's tokens with their end tokens (DPO's NLL term). Every key is a [batch, seq_len] array, so the
trainer shards, splits into microbatches and lays out for context parallelism a pair batch exactly as a text batch,
and a pair never straddles two microbatches or devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.model.llama import LayersFn, Llama
from llama_jax.objectives.lm import strided_chunks

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")
REJECTED = "rejected_"
PAIR_KEYS = ROW_KEYS + ("nll_mask",) + tuple(REJECTED + key for key in ROW_KEYS)

Batch = dict[str, jax.Array]


def rejected_rows(batch: Batch) -> Batch:
    """The rejected sequences under the plain row keys."""
    return {key: batch[REJECTED + key] for key in ROW_KEYS}


def valid_pairs(batch: Batch) -> jax.Array:
    """1.0 for rows holding a pair, 0.0 for padding rows (evaluation pads its last batch). Told by the segment ids,
    not the response mask: an empty chosen response (silence preferred to a harmful answer) masks no token."""
    return jnp.any(batch["segment_ids"] > 0, axis=1).astype(jnp.float32)


def pair_count(batch: Batch) -> jax.Array:
    """Pairs in the whole batch, at least 1 (the denominator of every per-pair mean)."""
    return jnp.maximum(jnp.sum(valid_pairs(batch)), 1.0)


def hidden(model: Llama, rows: Batch, layers_fn: LayersFn | None) -> jax.Array:
    return model.hidden(rows["tokens"], segment_ids=rows["segment_ids"], positions=rows["positions"],
                        layers_fn=layers_fn)


def strided_row_sums(fn, arrays: tuple[jax.Array, ...], chunk_len: int) -> tuple[jax.Array, ...]:
    """`fn(*arrays)` -> per-row sums ([b] arrays), computed `chunk_len` positions at a time in the strided chunks
    `lm_loss_sum` takes, and recomputed in the backward pass, so that no [b, t, vocab] array ever exists whole."""
    t = arrays[0].shape[1]
    if not chunk_len or chunk_len >= t:
        return fn(*arrays)
    chunks = tuple(strided_chunks(t // chunk_len, x) for x in arrays)
    sums = jax.lax.map(jax.checkpoint(lambda chunk: fn(*chunk)), chunks)
    return tuple(jnp.sum(s, axis=0) for s in sums)
