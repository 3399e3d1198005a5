"""AdamW with a learning-rate schedule and global-norm clipping, as in the Llama 3 recipe (warmup + cosine), plus
the schedules scaling-law and continued-pretraining work uses: linear, constant and warmup-stable-decay (WSD).

Options that change memory, not maths: `optim.state_dtype = "bfloat16"` keeps AdamW's two moments in bfloat16
(half the optimizer memory, the update still computed in float32).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from llama_jax.errors import ConfigError
from llama_jax.phases import RunPlan

SCHEDULES = ("cosine", "linear", "constant", "wsd")
STATE_DTYPES = ("float32", "bfloat16")


def lr_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then `optim.schedule` over `decay_steps` (0: to the end):

    cosine / linear: from `lr` down to `lr * min_lr_ratio`, then constant there;
    constant: `lr` for ever;
    wsd: `lr` until the last `wsd_decay_fraction` of the decay span, then linearly down to `lr * min_lr_ratio`,
    so that a run can be extended (or branched into an annealing) from any checkpoint of its stable phase.
    """
    warmup = optim_cfg.warmup_steps
    return _warmup_then(optim_cfg, warmup, optim_cfg.decay_steps or max(total_steps - warmup, 1))


def run_lr_schedule(optim_cfg: ml_collections.ConfigDict, plan: RunPlan) -> optax.Schedule:
    """The whole run's learning rate by step: `lr_schedule` in steps or, with `optim.schedule_unit = "tokens"`, in
    tokens trained on (`warmup_tokens`, `decay_tokens`), its decay by default spanning the run up to its first
    annealing phase; a phase with lr="anneal" instead decays linearly from where the schedule stands to its `lr_end`."""
    end = next((p.start_step for p in plan.phases if p.lr == "anneal"), plan.total_steps)
    if optim_cfg.schedule_unit == "tokens":
        tokens_fn, warmup = plan.tokens_fn(), optim_cfg.warmup_tokens
        by_tokens = _warmup_then(optim_cfg, warmup, optim_cfg.decay_tokens or max(plan.tokens_before(end) - warmup, 1))

        def base(step):
            return by_tokens(tokens_fn(step))
    else:
        base = lr_schedule(optim_cfg, end)
    segments, boundaries = [base], []
    for p in plan.phases[1:]:
        if p.lr == "anneal":
            start_lr = float(optax.join_schedules(segments, boundaries)(p.start_step))
            segments.append(optax.linear_schedule(start_lr, p.lr_end, max(p.num_steps, 1)))
        else:
            segments.append(lambda step, offset=p.start_step: base(step + offset))
        boundaries.append(p.start_step)
    return optax.join_schedules(segments, boundaries) if boundaries else base


def check_choices(optim_cfg: ml_collections.ConfigDict) -> None:
    """optim.schedule and optim.state_dtype name things this module has; `config.validate` asks before any data is
    prepared, and building a schedule or optimizer asks again for configs made in code."""
    if optim_cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={optim_cfg.schedule!r} is not one of {SCHEDULES}")
    if optim_cfg.state_dtype not in STATE_DTYPES:
        raise ConfigError(f"optim.state_dtype={optim_cfg.state_dtype!r} is not one of {STATE_DTYPES}")


def _warmup_then(optim_cfg: ml_collections.ConfigDict, warmup: int, span: int) -> optax.Schedule:
    """Linear warmup over `warmup` units (steps or tokens), then `optim.schedule` over `span` units."""
    check_choices(optim_cfg)
    peak = optim_cfg.lr
    floor = peak * optim_cfg.min_lr_ratio
    if optim_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, span, alpha=optim_cfg.min_lr_ratio)
    elif optim_cfg.schedule == "linear":
        after = optax.linear_schedule(peak, floor, span)
    elif optim_cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:
        if not 0 < optim_cfg.wsd_decay_fraction <= 1:
            raise ConfigError(f"optim.wsd_decay_fraction must be in (0, 1], got {optim_cfg.wsd_decay_fraction}")
        decay = max(round(span * optim_cfg.wsd_decay_fraction), 1)
        after = optax.join_schedules([optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)],
                                     [span - decay])
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def decay_mask(params, *, embeddings: bool = True):
    """Which parameters weight decay applies to: matrices, never norm scales (named `scale`); the embedding (and
    output) tables only if `embeddings`."""
    def decayed(path, _) -> bool:
        names = [getattr(key, "key", None) for key in path]
        return names[-1] != "scale" and (embeddings or names[0] not in ("embed", "lm_head"))

    return jax.tree_util.tree_map_with_path(decayed, params)


def _state_in(dtype: str, inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """`inner` with its floating-point state stored in `dtype` and computed in float32."""
    if dtype == "float32":
        return inner

    def cast(tree, to):
        return jax.tree.map(lambda x: x.astype(to) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

    def init(params):
        return cast(inner.init(params), dtype)

    def update(updates, state, params=None):
        updates, state = inner.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(init, update)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int,
                   schedule: optax.Schedule | None = None) -> optax.GradientTransformation:
    """AdamW, after clipping when `optim.grad_clip` > 0, following `schedule`, by default
    `lr_schedule(optim_cfg, total_steps)`."""
    check_choices(optim_cfg)
    adamw = optax.adamw(
        schedule or lr_schedule(optim_cfg, total_steps),
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=lambda params: decay_mask(params, embeddings=optim_cfg.decay_embeddings),
    )
    adamw = _state_in(optim_cfg.state_dtype, adamw)
    # Clipping or not, one chain: the optimizer state then has one structure, and a run resumed with clipping turned
    # on or off reads its checkpoints (a state of another structure failed to restore, and was taken for damage).
    clip = clip_by_global_norm(optim_cfg.grad_clip) if optim_cfg.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax's clipping as one scalar factor, min(1, max_norm / norm), times each gradient: XLA fuses a product
    with a scalar into the moments' updates, where optax's select between the gradient and gradient / norm
    materialised the quotient, one more pass over every gradient."""
    def update(updates, state, params=None):
        factor = jnp.minimum(1.0, max_norm / optax.tree.norm(updates))
        return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)
