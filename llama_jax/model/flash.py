"""Memory-efficient attention (FlashAttention-2) in pure JAX, so that 128K-token sequences fit.

The other kernels materialise each head's [t, s] scores, and their backward passes keep the probabilities and
their gradients too: tens of GiB for one 128K-token sequence. Here the forward pass walks over blocks of `block`
keys with an online softmax (a float32 running max and sum per query) and keeps only the output and those two
statistics; the backward pass (a `jax.custom_vjp`) recomputes each block's probabilities from them. Neither pass
holds more than one [t, block] tile of scores per head, plus O(t) statistics, so memory grows linearly in s.

Masks are computed per block, never as a [t, s] array: `flash_attention` takes the positions and segment ids of
queries and keys (query i sees key j when they share a segment id and position_j <= position_i), which also
describes context parallelism's permuted sequence; `flash_masked` reads blocks of a boolean [b, t, s] mask given by
the caller (the KV cache's decoding mask, small there). Segment id 0 (padding) is a document like any other, as in
`attention.document_causal_mask`.

The loop runs over key blocks with every query in each tile: the query axis stays a plain array axis, which
context parallelism shards over devices (a loop over query blocks would walk a sharded axis). So within one call,
blocks that causal order masks entirely are computed and masked, not skipped; the self-attention form
(`flash_segment_attention`) calls it per chunk of queries with only the keys up to the chunk's end. It is a
`lax.while_loop`, not a scan: the model's remat policies would otherwise split a scan and keep per-block masks (and
under "dots" the scores) for every block.

Masked scores take float32's lowest value, as in `attention.reference_masked`, so a query that sees no key averages
all the values exactly as the reference does (no NaN); keys that only fill up the last block get -inf and count for
nothing. Shapes and grouped-query attention as in `attention`: query head i reads KV head i // (n // k).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from llama_jax.errors import ConfigError

BLOCK = 256  # keys per tile: the plan's memory model (plan.py) uses it
CAUSAL_CHUNKS = 4  # query chunks of causal self-attention (`flash_segment_attention`)
_MASKED = float(jnp.finfo(jnp.float32).min)

# (query info, one block of key info) -> boolean [b, block, t]: which queries see each key of the block
MaskFn = Callable[[Any, Any], jnp.ndarray]


def flash_attention(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray, q_segment_bt: jnp.ndarray,
                    k_segment_bs: jnp.ndarray, q_position_bt: jnp.ndarray, k_position_bs: jnp.ndarray, *,
                    block: int = BLOCK) -> jnp.ndarray:
    """Attention [b, t, n, h] where query i sees key j when their segment ids are equal and k_position_j <=
    q_position_i. `block` need not divide s (the last block is filled with keys that count for nothing)."""
    _check_block(block)
    return _from_kernel_layout(_flash(_kernel_layout(q_btnh, k_bskh.shape[2]), k_bskh, v_bskh,
                                      (q_segment_bt, q_position_bt), (k_segment_bs, k_position_bs), _document_causal,
                                      min(block, k_bskh.shape[1])))


def flash_masked(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray, mask_bts: jnp.ndarray, *,
                 block: int = BLOCK) -> jnp.ndarray:
    """The masked form (`attention.MASKED_ATTENTION`): the caller's boolean [b, t, s] mask, read a block at a time."""
    _check_block(block)
    return _from_kernel_layout(_flash(_kernel_layout(q_btnh, k_bskh.shape[2]), k_bskh, v_bskh, (),
                                      jnp.swapaxes(mask_bts, 1, 2), _given_mask, min(block, k_bskh.shape[1])))


def flash_segment_attention(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray,
                            segment_ids_bt: jnp.ndarray, *, block: int = BLOCK) -> jnp.ndarray:
    """The `attention.ATTENTION` form: causal by index within a row (as `document_causal_mask`), same document.

    Queries and keys are one sequence here, so the queries are taken in up to `CAUSAL_CHUNKS` chunks of whole key
    blocks, each attending only to the keys up to its own end: the key blocks after it are masked for all of its
    queries, and skipping them leaves every sum as it was (they add exact zeros). At 4 chunks that is 10/16 of the
    tiles; more chunks would save little more and compile one more loop each. The chunks share one transposition
    of the queries into the kernel's layout and one of the output out of it (on the CPU each costs about as much as
    one block's softmax)."""
    _check_block(block)
    t = q_btnh.shape[1]
    positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_bt.shape)
    blocks = -(-t // block)
    chunks = min(blocks, CAUSAL_CHUNKS)
    ends = [min(t, (c + 1) * blocks // chunks * block) for c in range(chunks)]
    q_bkgth = _kernel_layout(q_btnh, k_bskh.shape[2])
    # split, not sliced: the queries' gradient is then one concatenation of the chunks' (slices' gradients are
    # padded to the whole sequence and added, which XLA fused with the transposition out of the kernel's layout)
    q_chunks = jnp.split(q_bkgth, ends[:-1], axis=3)
    outs = []
    for q_chunk, start, end in zip(q_chunks, [0] + ends[:-1], ends):
        rows, keys = slice(start, end), slice(0, end)
        outs.append(_flash(q_chunk, k_bskh[:, keys], v_bskh[:, keys],
                           (segment_ids_bt[:, rows], positions_bt[:, rows]),
                           (segment_ids_bt[:, keys], positions_bt[:, keys]), _document_causal, min(block, end)))
    return _from_kernel_layout(jnp.concatenate(outs, axis=4))


def _check_block(block: int) -> None:
    if not isinstance(block, int) or block <= 0:
        raise ConfigError(f"flash attention block={block!r} must be a positive number of keys, e.g. {BLOCK}")


def _document_causal(q_info, k_info_block) -> jnp.ndarray:
    (q_segment_bt, q_position_bt), (k_segment_bc, k_position_bc) = q_info, k_info_block
    same_doc_bct = k_segment_bc[:, :, None] == q_segment_bt[:, None, :]
    return same_doc_bct & (k_position_bc[:, :, None] <= q_position_bt[:, None, :])


def _given_mask(q_info, mask_bct) -> jnp.ndarray:
    return mask_bct


def _kernel_layout(q_btnh, kv: int):
    """[b, t, n, h] -> [b, k, g, t, h]: the query heads grouped by the KV head they read (g = n // k)."""
    b, t, n, h = q_btnh.shape
    return jnp.transpose(q_btnh.reshape(b, t, kv, n // kv, h), (0, 2, 3, 1, 4))


def _from_kernel_layout(out_bkhgt):
    """The kernel's output [b, k, h, g, t] -> [b, t, n, h]."""
    b, kv, h, g, t = out_bkhgt.shape
    return jnp.transpose(out_bkhgt, (0, 4, 1, 3, 2)).reshape(b, t, kv * g, h)


# ---------------------------------------------------------------------------------------------- the kernel
# Inside, queries are grouped by the KV head they read: q [b, k, g, t, h] with g = n // k. Each tile of scores is
# [b, k, c, g, t], keys c of one block by queries: the queries are the minor axes. Every product then contracts
# its left operand's last axes (the form XLA's CPU backend runs fastest, see matmul.py), and the softmax's passes
# over a tile read it in order; with the keys minor, XLA transposed each float32 tile between the product and the
# softmax. Statistics are [b, k, g, t]; the output and the queries' gradient accumulate as [b, k, h, g, t].
# Probabilities are rounded to the inputs' dtype as soon as they are computed, and that rounded tile is what the
# sums, the products and the softmax's backward read: in bfloat16 a tile is then written and read at half the
# bytes, and the normaliser sums exactly the weights the values are multiplied by.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q_bkgth, k_bskh, v_bskh, q_info, k_info, mask_fn: MaskFn, block: int):
    return _forward(q_bkgth, k_bskh, v_bskh, q_info, k_info, mask_fn, block)[0]


def _flash_fwd(q_bkgth, k_bskh, v_bskh, q_info, k_info, mask_fn, block):
    out_bkhgt, max_bkgt, sum_bkgt = _forward(q_bkgth, k_bskh, v_bskh, q_info, k_info, mask_fn, block)
    return out_bkhgt, (q_bkgth, k_bskh, v_bskh, q_info, k_info, out_bkhgt, max_bkgt, sum_bkgt)


def _forward(q_bkgth, k_bskh, v_bskh, q_info, k_info, mask_fn, block):
    """Output [b, k, h, g, t], and each query's running max and sum of exp(score - max) over all keys (float32)."""
    b, kv, g, t, h = q_bkgth.shape
    s = k_bskh.shape[1]
    count, (k_bksh, v_bksh, k_info) = _padded(k_bskh, v_bskh, k_info, block)
    v_bkhs = jnp.swapaxes(v_bksh, 2, 3)

    def step(index, carry):
        max_bkgt, sum_bkgt, acc_bkhgt = carry
        scores_bkcgt = _block_scores(q_bkgth, k_bksh, q_info, k_info, mask_fn, index, block, s)
        new_max_bkgt = jnp.maximum(max_bkgt, scores_bkcgt.max(axis=2))
        probs_bkcgt = jnp.exp(scores_bkcgt - new_max_bkgt[:, :, None]).astype(v_bksh.dtype)
        rescale_bkgt = jnp.exp(max_bkgt - new_max_bkgt)
        sum_bkgt = sum_bkgt * rescale_bkgt + probs_bkcgt.sum(axis=2, dtype=jnp.float32)
        acc_bkhgt = acc_bkhgt * rescale_bkgt[:, :, None] + jnp.einsum(
            "bkhc,bkcgt->bkhgt", _slice(v_bkhs, index, block, 3), probs_bkcgt, preferred_element_type=jnp.float32)
        return new_max_bkgt, sum_bkgt, acc_bkhgt

    stats_shape = (b, kv, g, t)
    init = _varying_like((jnp.full(stats_shape, _MASKED, jnp.float32), jnp.zeros(stats_shape, jnp.float32),
                          jnp.zeros((b, kv, h, g, t), jnp.float32)), (q_bkgth, k_bskh, v_bskh, q_info, k_info))
    max_bkgt, sum_bkgt, acc_bkhgt = _over_blocks(count, step, init)
    out_bkhgt = acc_bkhgt / sum_bkgt[:, :, None]
    return out_bkhgt.astype(q_bkgth.dtype), max_bkgt, sum_bkgt


def _flash_bwd(mask_fn, block, residuals, dout_bkhgt):
    """FlashAttention-2's backward: per key block, probabilities from the saved statistics, then the gradients of
    that block's keys and values and this block's share of the queries' gradient."""
    q_bkgth, k_bskh, v_bskh, q_info, k_info, out_bkhgt, max_bkgt, sum_bkgt = residuals
    b, kv, g, t, h = q_bkgth.shape
    s = k_bskh.shape[1]
    dout_bkgth = jnp.transpose(dout_bkhgt, (0, 1, 3, 4, 2)).astype(q_bkgth.dtype)
    # softmax's backward: dscore = p * (dp - sum_j p_j dp_j), and sum_j p_j dp_j = dout . out per query
    delta_bkgt = jnp.einsum("bkhgt,bkhgt->bkgt", dout_bkhgt.astype(jnp.float32), out_bkhgt.astype(jnp.float32))
    inv_sum_bkgt = 1.0 / sum_bkgt
    # A masked score's probability is exactly 0 in a row that sees some key, so its gradient is 0 without a mask.
    # A row that sees no key (its max is still the masked value) averages all values uniformly, as the reference
    # does; the reference's mask then stops every score gradient of that row, which its scale of 0 does here.
    scale_bkgt = jnp.where(max_bkgt > _MASKED, h**-0.5, 0.0)
    count, (k_bksh, v_bksh, k_info) = _padded(k_bskh, v_bskh, k_info, block)
    k_bkhs = jnp.swapaxes(k_bksh, 2, 3)

    def step(index, carry):
        dq_bkhgt, dk_bksh, dv_bksh = carry
        scores_bkcgt = _block_scores(q_bkgth, k_bksh, q_info, k_info, mask_fn, index, block, s)
        probs_bkcgt = (jnp.exp(scores_bkcgt - max_bkgt[:, :, None]) * inv_sum_bkgt[:, :, None]).astype(v_bksh.dtype)
        dv_bkch = jnp.einsum("bkcgt,bkgth->bkch", probs_bkcgt, dout_bkgth, preferred_element_type=jnp.float32)
        dprobs_bkcgt = jnp.einsum("bkch,bkgth->bkcgt", _slice(v_bksh, index, block, 2), dout_bkgth,
                                  preferred_element_type=jnp.float32)
        dscores_bkcgt = probs_bkcgt * (dprobs_bkcgt - delta_bkgt[:, :, None]) * scale_bkgt[:, :, None]
        dscores_bkcgt = dscores_bkcgt.astype(q_bkgth.dtype)
        dq_bkhgt = dq_bkhgt + jnp.einsum("bkhc,bkcgt->bkhgt", _slice(k_bkhs, index, block, 3), dscores_bkcgt,
                                         preferred_element_type=jnp.float32)
        dk_bkch = jnp.einsum("bkcgt,bkgth->bkch", dscores_bkcgt, q_bkgth, preferred_element_type=jnp.float32)
        dk_bksh = jax.lax.dynamic_update_slice_in_dim(dk_bksh, dk_bkch, index * block, axis=2)
        dv_bksh = jax.lax.dynamic_update_slice_in_dim(dv_bksh, dv_bkch, index * block, axis=2)
        return dq_bkhgt, dk_bksh, dv_bksh

    # The key and value gradients are gathered in float32 and rounded once at the end: XLA's CPU backend writes a
    # block into a bfloat16 array by converting the whole array to float32 and back, every block.
    init = _varying_like((jnp.zeros((b, kv, h, g, t), jnp.float32), jnp.zeros(k_bksh.shape, jnp.float32),
                          jnp.zeros(v_bksh.shape, jnp.float32)), (residuals, dout_bkhgt))
    dq_bkhgt, dk_bksh, dv_bksh = _over_blocks(count, step, init)
    no_cotangent = jax.tree.map(lambda _: None, (q_info, k_info))
    dq_bkgth = jnp.transpose(dq_bkhgt, (0, 1, 3, 4, 2)).astype(q_bkgth.dtype)
    dk_bskh = jnp.swapaxes(dk_bksh, 1, 2)[:, :s].astype(k_bskh.dtype)
    dv_bskh = jnp.swapaxes(dv_bksh, 1, 2)[:, :s].astype(v_bskh.dtype)
    return (dq_bkgth, dk_bskh, dv_bskh, *no_cotangent)


_flash.defvjp(_flash_fwd, _flash_bwd)


def _over_blocks(count: int, step, init):
    """`init` through `step(index, carry)` for each key block: a while loop, not a scan, so that no remat policy
    around the model's layers can split it and stack a per-block value into [blocks, t, block] residuals (autodiff
    never enters it: the custom_vjp is its derivative)."""
    def body(carry):
        index, state = carry
        return index + 1, step(index, state)

    return jax.lax.while_loop(lambda carry: carry[0] < count, body, (jnp.int32(0), init))[1]


def _varying_like(init, inputs):
    """`init` typed as varying over the manual mesh axes that `inputs` vary over: inside a `jax.shard_map` (the
    pipeline's, over stage) a loop's carry must keep one type, and the carries computed from the inputs vary."""
    zero = sum(jnp.zeros_like(x, shape=(), dtype=jnp.float32) for x in jax.tree.leaves(inputs))
    return jax.tree.map(lambda x: x + zero.astype(x.dtype), init)


def _padded(k_bskh, v_bskh, k_info, block: int):
    """The number of key blocks; keys and values [b, k, s', h] and key info [b, s', ...], filled up along s to that
    many whole blocks."""
    s = k_bskh.shape[1]
    count = -(-s // block)

    def pad(x):
        return jnp.pad(x, [(0, 0), (0, count * block - s)] + [(0, 0)] * (x.ndim - 2))

    return count, (jnp.swapaxes(pad(k_bskh), 1, 2), jnp.swapaxes(pad(v_bskh), 1, 2), jax.tree.map(pad, k_info))


def _slice(x: jnp.ndarray, index, block: int, axis: int) -> jnp.ndarray:
    """Key block `index` of `x`, whose keys run along `axis`."""
    if x.dtype == jnp.bfloat16:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16)
        return jax.lax.bitcast_convert_type(jax.lax.dynamic_slice_in_dim(bits, index * block, block, axis=axis),
                                            jnp.bfloat16)
    return jax.lax.dynamic_slice_in_dim(x, index * block, block, axis=axis)


def _block_scores(q_bkgth, k_bksh, q_info, k_info, mask_fn: MaskFn, index, block: int, s: int):
    """Scaled float32 scores [b, k, c, g, t] of key block `index`, masked."""
    scores_bkcgt = jnp.einsum("bkch,bkgth->bkcgt", _slice(k_bksh, index, block, 2), q_bkgth,
                              preferred_element_type=jnp.float32)
    scores_bkcgt = scores_bkcgt * (q_bkgth.shape[-1] ** -0.5)
    mask_bct = mask_fn(q_info, jax.tree.map(lambda x: _slice(x, index, block, 1), k_info))
    scores_bkcgt = jnp.where(mask_bct[:, None, :, None], scores_bkcgt, _MASKED)
    real_c = index * block + jnp.arange(block) < s
    return jnp.where(real_c[:, None, None], scores_bkcgt, -jnp.inf)
