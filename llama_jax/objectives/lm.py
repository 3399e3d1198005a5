"""The causal-LM loss (pretraining, and SFT over assistant-only loss masks). It returns the summed loss and the token
count, so that gradient accumulation and data-parallel reduction divide once, by the whole batch's count, and match
full-batch training exactly.

The causal-LM loss starts from the final hidden states, not from logits: at a 128K vocabulary and 8K positions the
float32 logits are the largest activation of a step (4 GiB per sequence), so they are made `chunk_len` positions at
a time, and each chunk's gradients are made right after its logits (`lm_loss_sum`): no logits are kept for the
backward pass, and none are recomputed for it.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

from llama_jax.errors import ConfigError

LogitsFn = Callable[[jnp.ndarray], jnp.ndarray]  # hidden states [..., dim] -> float32 logits [..., vocab]


def token_nll(logits_btv: jnp.ndarray, targets_bt: jnp.ndarray, z_loss: float = 0.0,
              grad_dtype: jnp.dtype = jnp.float32) -> jnp.ndarray:
    """Negative log-likelihood of each target token, in float32, plus `z_loss` x log(Z)^2 (PaLM's auxiliary loss:
    it keeps the softmax normaliser near 1, so the logits cannot drift to large magnitudes in long runs).

    `grad_dtype`: the dtype the logits' gradient is rounded to after this function (the compute dtype, in which the
    vocabulary head's backward products run). It changes how the gradient is written, not its value (see
    `_token_nll_bwd`)."""
    return _token_nll(logits_btv.astype(jnp.float32), targets_bt, z_loss, jnp.dtype(grad_dtype) == jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _token_nll(logits_btv, targets_bt, z_loss, scatter_target):
    return _token_nll_fwd(logits_btv, targets_bt, z_loss, scatter_target)[0]


def _token_nll_fwd(logits_btv, targets_bt, z_loss, scatter_target):
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return log_z_bt - target_logit_bt + z_loss * jnp.square(log_z_bt), (logits_btv, targets_bt, log_z_bt)


def _token_nll_bwd(z_loss, scatter_target, residuals, g_bt):
    """softmax x (1 + 2 z log Z) - onehot(target), times the cotangent: written out so that it is one pass over the
    [tokens, vocabulary] logits (autodiff's form writes the float32 softmax and reads it back twice).

    The pass must write the gradient once. Rounded to bfloat16 next, its one consumer is that rounding, and the
    one-hot part, a select over the vocabulary, fuses into it: the logits and the rounded gradient are the only
    buffers of their size (1.5 float32 logits). In float32 its consumers are the two matmuls, and XLA's CPU backend
    would fuse the select into each and keep the softmax as a buffer of its own (3 float32 logits); there the
    one-hot is a scatter into the pass's output, in place (2)."""
    logits_btv, targets_bt, log_z_bt = residuals
    weight_bt = g_bt * (1.0 + 2.0 * z_loss * log_z_bt)
    softmax_part_btv = jnp.exp(logits_btv - log_z_bt[..., None]) * weight_bt[..., None]
    if scatter_target:
        rows = tuple(jnp.indices(targets_bt.shape, sparse=True))
        return softmax_part_btv.at[(*rows, targets_bt)].add(-g_bt), None
    vocab_v = jnp.arange(logits_btv.shape[-1], dtype=targets_bt.dtype)
    return softmax_part_btv - jnp.where(vocab_v == targets_bt[..., None], g_bt[..., None], 0.0), None


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def lm_loss_sum(logits_fn: LogitsFn, h_btd: jnp.ndarray, targets_bt: jnp.ndarray, loss_mask_bt: jnp.ndarray, *,
                chunk_len: int = 0, z_loss: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Causal LM: (sum of masked token NLL (+ z-loss, see `token_nll`), number of counted tokens) of
    `logits_fn(h_btd)`.

    With 0 < `chunk_len` < t, the logits of only `chunk_len` positions per row exist at a time. Chunk j holds
    positions j, j + n, j + 2n, ... (n = t / chunk_len): strided rather than contiguous, so that a sequence split
    over the context-parallel axis stays split the same way in every chunk.

    Under differentiation, each chunk's gradients (of `h_btd` and of the arrays `logits_fn` closes over, the head's
    weights) are made in the forward pass, right after its logits, as for a cotangent of 1: the sum is linear in its
    cotangent, so the backward pass only scales them. No logits are kept or recomputed for the backward pass, and
    the head's three products run once each.
    """
    mask_bt = loss_mask_bt.astype(jnp.float32)
    t = targets_bt.shape[1]
    chunked = 0 < chunk_len < t
    if chunked and t % chunk_len:
        raise ConfigError(f"sequence length {t} is not a multiple of objective.loss_chunk_len={chunk_len}: use a "
                          f"chunk length that divides every data.seq_len (or 0 for no chunking)")
    n = t // chunk_len if chunked else 1
    head_fn, head_params = jax.closure_convert(logits_fn, h_btd[:, :t // n])
    total = _head_nll_sum(head_fn, n, float(z_loss), h_btd, targets_bt, mask_bt, *head_params)
    return total, jnp.sum(mask_bt)


def strided_chunks(n: int, x: jax.Array) -> jax.Array:
    """[b, t, ...] -> [n, b, t / n, ...], chunk j holding positions j, j + n, j + 2n, ..."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // n, n, *x.shape[2:]), 2, 0)


def _unstrided(x: jnp.ndarray) -> jnp.ndarray:
    n, b, c = x.shape[:3]
    return jnp.moveaxis(x, 0, 2).reshape(b, c * n, *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _head_nll_sum(head_fn, n, z_loss, h_btd, targets_bt, mask_bt, *head_params):
    def chunk_sum(chunk):
        h_bcd, targets_bc, mask_bc = chunk
        return jnp.sum(token_nll(head_fn(h_bcd, *head_params), targets_bc, z_loss, h_bcd.dtype) * mask_bc)

    return jnp.sum(jax.lax.map(chunk_sum, tuple(strided_chunks(n, x) for x in (h_btd, targets_bt, mask_bt))))


def _head_nll_sum_fwd(head_fn, n, z_loss, h_btd, targets_bt, mask_bt, *head_params):
    scatter_target = jnp.dtype(h_btd.dtype) == jnp.float32

    def sum_and_grads(chunk):
        """The chunk's loss sum, and its gradients for a cotangent of 1: of the head's arrays (in float32) and of
        its hidden states."""
        h_bcd, targets_bc, mask_bc = chunk
        logits_bcv, pull = jax.vjp(head_fn, h_bcd, *head_params)
        nll_bc, residuals = _token_nll_fwd(logits_bcv.astype(jnp.float32), targets_bc, z_loss, scatter_target)
        dlogits_bcv, _ = _token_nll_bwd(z_loss, scatter_target, residuals, mask_bc)
        dh_bcd, *dparams = pull(dlogits_bcv.astype(logits_bcv.dtype))
        return (jnp.sum(nll_bc * mask_bc), [d.astype(jnp.promote_types(d.dtype, jnp.float32)) for d in dparams]), dh_bcd

    def accumulate(sums, chunk):
        (total, param_grads), dh_bcd = sum_and_grads(chunk)
        return (sums[0] + total, [acc + d for acc, d in zip(sums[1], param_grads)]), dh_bcd

    # The first chunk outside the loop starts the sums with its own values (not zeros), so that under shard_map
    # they vary over the same mesh axes as what is added to them.
    chunks = tuple(strided_chunks(n, x) for x in (h_btd, targets_bt, mask_bt))
    first, dh_bcd = sum_and_grads(tuple(x[0] for x in chunks))
    (total, param_grads), dh_nbcd = jax.lax.scan(accumulate, first, tuple(x[1:] for x in chunks))
    dh_nbcd = jnp.concatenate([dh_bcd[None], dh_nbcd])
    return total, (_unstrided(dh_nbcd), [g.astype(p.dtype) for g, p in zip(param_grads, head_params)])


def _head_nll_sum_bwd(head_fn, n, z_loss, residuals, g):
    dh_btd, param_grads = residuals
    return ((dh_btd * g).astype(dh_btd.dtype), None, None, *((d * g).astype(d.dtype) for d in param_grads))


_head_nll_sum.defvjp(_head_nll_sum_fwd, _head_nll_sum_bwd)
