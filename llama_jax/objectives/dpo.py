"""Direct preference optimisation, Llama 3's variant (Rafailov et al. 2023; Llama 3 paper, section 4.1.4).

For a pair (chosen y_w, rejected y_l) after prompt x, with the policy pi and the frozen reference pi_ref:

    margin = beta * ([log pi(y_w|x) - log pi_ref(y_w|x)] - [log pi(y_l|x) - log pi_ref(y_l|x)])
    loss   = mean over pairs of -log sigmoid(margin)  +  nll_coef * (NLL of y_w per token)

The log-probabilities sum over the responses' content tokens only: the header and end tokens (`<|eot_id|>`, ...)
are masked out of them (the batch's `loss_mask`), because both responses share them and they would only add noise to
the margin; the NLL term keeps them (`nll_mask`), so the policy still learns to stop. The reference's log-
probabilities are computed in the same step, from a frozen copy of the starting parameters, under the same sharding.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from llama_jax.model.llama import LayersFn, Llama
from llama_jax.objectives.pairs import Batch, hidden, pair_count, rejected_rows, strided_row_sums, valid_pairs


def counts(batch: Batch) -> dict[str, jax.Array]:
    """The whole batch's denominators: pairs, chosen NLL tokens, and response tokens (the KL's)."""
    return {
        "pairs": pair_count(batch),
        "nll_tokens": jnp.maximum(jnp.sum(batch["nll_mask"]), 1.0),
        "response_tokens": jnp.maximum(jnp.sum(batch["loss_mask"]) + jnp.sum(batch["rejected_loss_mask"]), 1.0),
    }


def response_stats(policy: Llama, reference: Llama, rows: Batch, nll_mask, layers_fn: LayersFn | None,
                   chunk_len: int) -> tuple[jax.Array, ...]:
    """Per row: (policy log p of the masked response tokens, the reference's, the policy's log p over `nll_mask`,
    the summed per-token KL(policy || reference) over the masked response tokens)."""
    h_pol = hidden(policy, rows, layers_fn)
    h_ref = jax.lax.stop_gradient(hidden(reference, rows, layers_fn))

    def sums(h_pol, h_ref, targets, mask, nll):
        logp_pol = jax.nn.log_softmax(policy.logits(h_pol).astype(jnp.float32), axis=-1)
        logp_ref = jax.lax.stop_gradient(jax.nn.log_softmax(reference.logits(h_ref).astype(jnp.float32), axis=-1))
        tok_pol = jnp.take_along_axis(logp_pol, targets[..., None], axis=-1)[..., 0]
        tok_ref = jnp.take_along_axis(logp_ref, targets[..., None], axis=-1)[..., 0]
        kl = jnp.sum(jnp.exp(logp_pol) * (logp_pol - logp_ref), axis=-1)
        return (jnp.sum(tok_pol * mask, 1), jnp.sum(tok_ref * mask, 1), jnp.sum(tok_pol * nll, 1),
                jnp.sum(kl * mask, 1))

    mask = rows["loss_mask"].astype(jnp.float32)
    return strided_row_sums(sums, (h_pol, h_ref, rows["targets"], mask, nll_mask.astype(jnp.float32)), chunk_len)


def dpo_loss(policy: Llama, reference: Llama, batch: Batch, totals: dict[str, jax.Array], *, beta: float,
             nll_coef: float, layers_fn: LayersFn | None = None, chunk_len: int = 0) -> tuple[jax.Array, dict]:
    """(loss, metrics) of the pairs in `batch`, each a sum divided by the whole batch's `totals` (see `counts`), so
    microbatches' values add up to the full batch's."""
    pol_c, ref_c, nll_c, kl_c = response_stats(policy, reference, batch, batch["nll_mask"], layers_fn, chunk_len)
    rejected = rejected_rows(batch)
    pol_r, ref_r, _, kl_r = response_stats(policy, reference, rejected, jnp.zeros_like(rejected["loss_mask"]),
                                           layers_fn, chunk_len)
    valid = valid_pairs(batch)
    margin = beta * ((pol_c - ref_c) - (pol_r - ref_r))
    pairs = totals["pairs"]
    dpo = jnp.sum(valid * -jax.nn.log_sigmoid(margin)) / pairs
    nll = -jnp.sum(nll_c) / totals["nll_tokens"]
    metrics = {
        "dpo_loss": dpo,
        "nll": nll,
        "reward_accuracy": jnp.sum(valid * (margin > 0)) / pairs,
        "reward_margin": jnp.sum(valid * margin) / pairs,
        "logps_chosen": jnp.sum(valid * pol_c) / pairs,
        "logps_rejected": jnp.sum(valid * pol_r) / pairs,
        "kl": (jnp.sum(kl_c) + jnp.sum(kl_r)) / totals["response_tokens"],
    }
    return dpo + nll_coef * nll, metrics


class ReferenceState(NamedTuple):
    """The optimizer's state beside the frozen reference parameters, which no update ever touches."""

    inner: optax.OptState
    reference: dict


def keep_reference(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """`tx` whose state also holds a copy of the parameters it was initialised with: DPO's reference. Kept in the
    train state, it is sharded like the parameters, saved in checkpoints and restored with them, so a resumed or
    rolled-back run compares against exactly the same reference; it is not a parameter, so it gets no gradient,
    no update and no optimizer moments."""

    def init(params):
        return ReferenceState(tx.init(params), jax.tree.map(lambda x: x, params))

    def update(updates, state, params=None):
        updates, inner = tx.update(updates, state.inner, params)
        return updates, ReferenceState(inner, state.reference)

    return optax.GradientTransformation(init, update)


def reference_of(opt_state: ReferenceState) -> dict:
    return opt_state.reference
