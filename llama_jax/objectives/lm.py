"""The causal-LM loss (pretraining, and SFT over assistant-only loss masks). It returns the summed loss and the token
count, so that gradient accumulation and data-parallel reduction divide once, by the whole batch's count, and match
full-batch training exactly.

The causal-LM loss starts from the final hidden states, not from logits: at a 128K vocabulary and 8K positions the
float32 logits are the largest activation of a step (4 GiB per sequence), so they are made `chunk_len` positions at
a time and recomputed in the backward pass instead of being kept (`jax.checkpoint` inside a `lax.map`).
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

    With 0 < `chunk_len` < t, the logits of only `chunk_len` positions per row exist at a time, in the forward and
    the backward pass. Chunk j holds positions j, j + n, j + 2n, ... (n = t / chunk_len): strided rather than
    contiguous, so that a sequence split over the context-parallel axis stays split the same way in every chunk.
    """
    mask_bt = loss_mask_bt.astype(jnp.float32)
    count = jnp.sum(mask_bt)
    b, t = targets_bt.shape
    if not chunk_len or chunk_len >= t:
        return jnp.sum(token_nll(logits_fn(h_btd), targets_bt, z_loss, h_btd.dtype) * mask_bt), count
    if t % chunk_len:
        raise ConfigError(f"sequence length {t} is not a multiple of objective.loss_chunk_len={chunk_len}: use a "
                          f"chunk length that divides every data.seq_len (or 0 for no chunking)")
    n = t // chunk_len

    def strided(x):  # [b, t, ...] -> [n, b, chunk_len, ...]
        return jnp.moveaxis(x.reshape(b, chunk_len, n, *x.shape[2:]), 2, 0)

    @jax.checkpoint
    def chunk_sum(chunk):
        h_bcd, targets_bc, mask_bc = chunk
        return jnp.sum(token_nll(logits_fn(h_bcd), targets_bc, z_loss, h_bcd.dtype) * mask_bc)

    sums = jax.lax.map(chunk_sum, (strided(h_btd), strided(targets_bt), strided(mask_bt)))
    return jnp.sum(sums), count
