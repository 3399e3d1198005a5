"""Training objectives. Each returns the summed loss and the token count, so that gradient accumulation and
data-parallel reduction divide once, by the whole batch's count, and match full-batch training exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_nll(logits_btv: jnp.ndarray, targets_bt: jnp.ndarray) -> jnp.ndarray:
    """Negative log-likelihood of each target token, in float32."""
    logits_btv = logits_btv.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    return log_z_bt - target_logit_bt


def lm_loss_sum(logits_btv: jnp.ndarray, targets_bt: jnp.ndarray, loss_mask_bt: jnp.ndarray):
    """Causal LM: (sum of masked token NLL, number of counted tokens)."""
    mask_bt = loss_mask_bt.astype(jnp.float32)
    return jnp.sum(token_nll(logits_btv, targets_bt) * mask_bt), jnp.sum(mask_bt)
