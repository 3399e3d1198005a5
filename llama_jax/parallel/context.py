"""Context parallelism: the sequence split over the `context` mesh axis, with attention over the whole of it.

Each device keeps its slice of queries and, per layer, all-gathers the keys, values and segment ids of the full
sequence (the Llama 3 paper's all-gather context parallelism: K/V are small under grouped-query attention).

Load balance. Under a causal mask a contiguous split gives the last device all the work that is not masked and the
first almost none. So the sequence is laid out zig-zag: cut into 2C chunks, device c holds chunks c and 2C-1-c, and
every device holds the same amount of unmasked (query, key) pairs. The layout is applied to the host batch before it
is sharded (`zigzag_order`); positions travel with their tokens, so RoPE needs nothing, and the loss is a sum over
tokens, which a permutation does not change. Attention masks by each position's original index: the dense kernels
through a [t, s] mask built here, flash attention (model/flash.py) from the permuted positions themselves, block by
block, so that nothing of size [t, s] exists.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llama_jax.model.attention import MASKED_ATTENTION, AttentionFn
from llama_jax.model.flash import flash_attention
from llama_jax.parallel.mesh import logical_to_spec


def zigzag_order(seq_len: int, context: int) -> np.ndarray:
    """Original positions in the order the context axis holds them: chunks c and 2C-1-c on device c."""
    chunks = np.arange(seq_len).reshape(2 * context, seq_len // (2 * context))
    return np.concatenate([np.concatenate([chunks[c], chunks[2 * context - 1 - c]]) for c in range(context)])


def to_zigzag(batch: dict[str, np.ndarray], context: int) -> dict[str, np.ndarray]:
    """A host batch of [rows, seq_len] arrays laid out for `context` devices (identity for one)."""
    if context == 1:
        return batch
    order = zigzag_order(next(iter(batch.values())).shape[1], context)
    return {key: value[:, order] for key, value in batch.items()}


def context_attention(implementation: str, context: int) -> AttentionFn:
    """Attention over a zig-zag-laid-out sequence split over `context` devices (inside jit, under the run's mesh)."""
    whole_length = P(P.UNCONSTRAINED, None, P.UNCONSTRAINED, P.UNCONSTRAINED)

    def attention(q_btnh, k_bskh, v_bskh, segment_ids_bt):
        order_t = jnp.asarray(zigzag_order(q_btnh.shape[1], context))
        k_bskh = jax.lax.with_sharding_constraint(k_bskh, whole_length)
        v_bskh = jax.lax.with_sharding_constraint(v_bskh, whole_length)
        segment_ids_bs = jax.lax.with_sharding_constraint(segment_ids_bt, P(P.UNCONSTRAINED, None))
        if implementation == "flash":
            positions_bt = jnp.broadcast_to(order_t, segment_ids_bt.shape)
            positions_bs = jax.lax.with_sharding_constraint(positions_bt, P(P.UNCONSTRAINED, None))
            out_btnh = flash_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt, segment_ids_bs, positions_bt,
                                       positions_bs)
        else:
            same_doc_bts = segment_ids_bt[:, :, None] == segment_ids_bs[:, None, :]
            causal_ts = order_t[:, None] >= order_t[None, :]
            out_btnh = MASKED_ATTENTION[implementation](q_btnh, k_bskh, v_bskh, same_doc_bts & causal_ts[None])
        return jax.lax.with_sharding_constraint(out_btnh, logical_to_spec(("batch", "length", "heads", None)))

    return attention
