"""Training objectives, chosen by `objective.name`: each a pure loss over a batch.

- `lm.py`: causal LM (pretraining), and SFT, which is the same loss over chat rows whose `loss_mask` covers only
  the assistant's tokens (the prompt is context, not text to learn).
- `dpo.py`: direct preference optimisation against a frozen reference, Llama 3's variant (+ NLL on the chosen).
- `reward.py`: a scalar-head reward model trained on preference pairs (Bradley-Terry).

Every loss divides by counts of the *whole* batch (tokens, pairs), given to it from outside, so that gradient
accumulation over microbatches and data-parallel reduction give exactly the full-batch gradient.
"""

from llama_jax.model import flops_per_token
from llama_jax.objectives.lm import LogitsFn, lm_loss_sum, token_nll

__all__ = ["LogitsFn", "lm_loss_sum", "token_nll"]


def pair_objective(objective_cfg, model_of, reference_of, layers_fn=None, chunk_len: int = 0):
    """For `reward` and `dpo`: (counts(batch) -> the whole batch's denominators,
    loss(params, opt_state, microbatch, totals, index) -> (loss, metrics)), the loss differentiable in params.
    `model_of(params, index)` is the model being trained from its parameters (the reward head taken out) and the
    microbatch's index (LoRA: the base with the adapters, whose dropout masks depend on it); `reference_of(opt_state)`
    is DPO's frozen reference model."""
    from llama_jax.objectives import dpo, reward

    if objective_cfg.name == "dpo":
        def dpo_loss(params, opt_state, mb, totals, index):
            return dpo.dpo_loss(model_of(params, index), reference_of(opt_state), mb, totals,
                                beta=objective_cfg.dpo_beta, nll_coef=objective_cfg.dpo_nll, layers_fn=layers_fn,
                                chunk_len=chunk_len)

        return dpo.counts, dpo_loss
    if objective_cfg.name == "reward":
        def reward_loss(params, opt_state, mb, totals, index):
            body, head = reward.split_params(params)
            return reward.reward_loss(model_of(body, index), head, mb, totals, layers_fn=layers_fn)

        return reward.counts, reward_loss
    raise ValueError(f"{objective_cfg.name!r} is not a pair objective")


def flops_per_row_token(objective_cfg, model_cfg, seq_len: int) -> float:
    """Training FLOPs per token of a batch row (`model.flops_per_token` for the LM loss). A pair objective's row is
    two sequences (chosen and rejected). DPO also runs its reference's forward pass over both, a third of a forward
    and backward. A reward model never computes the vocabulary projection: its scalar head reads the last hidden
    state, so that projection's 6 x vocab x dim is left out."""
    per_token = flops_per_token(model_cfg, seq_len)
    if objective_cfg.name == "dpo":
        return 2 * (1 + 1 / 3) * per_token
    if objective_cfg.name == "reward":
        return 2 * (per_token - 6.0 * model_cfg.vocab_size * model_cfg.dim)
    return per_token
