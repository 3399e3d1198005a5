"""AdamW with warmup + cosine decay and global-norm clipping, as in the Llama 3 recipe."""

from __future__ import annotations

import jax
import ml_collections
import optax


def lr_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio`, then constant."""
    decay_steps = optim_cfg.decay_steps or max(total_steps - optim_cfg.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim_cfg.lr,
        warmup_steps=optim_cfg.warmup_steps,
        decay_steps=optim_cfg.warmup_steps + decay_steps,
        end_value=optim_cfg.lr * optim_cfg.min_lr_ratio,
    )


def _decay_mask(params):
    """Weight decay on matrices only: norm scales (named `scale`) are left alone."""
    return jax.tree_util.tree_map_with_path(lambda path, _: getattr(path[-1], "key", None) != "scale", params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    adamw = optax.adamw(
        lr_schedule(optim_cfg, total_steps),
        b1=optim_cfg.b1,
        b2=optim_cfg.b2,
        eps=optim_cfg.eps,
        weight_decay=optim_cfg.weight_decay,
        mask=_decay_mask,
    )
    if optim_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(optim_cfg.grad_clip), adamw)
    return adamw
