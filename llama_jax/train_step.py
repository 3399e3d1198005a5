"""The training and evaluation steps as pure functions: the objective's gradients (over microbatches, by autodiff or
a pipeline schedule's own backward, for LoRA adapters or all parameters) and the optax update.

The trainer compiles them once with explicit shardings; tests and benchmarks call them on their own, so they hold
no state, meshes or data: `TrainState(step, params, opt_state)` in, the next state and the step's metrics out.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from llama_jax import lora as lora_lib
from llama_jax.config import PAIR_OBJECTIVES
from llama_jax.model import ModelDef
from llama_jax.model.llama import LayersFn, Llama
from llama_jax.objectives import lm_loss_sum, pair_objective
from llama_jax.objectives import dpo as dpo_objective
from llama_jax.objectives import reward as reward_objective
from llama_jax.objectives.pairs import valid_pairs
from llama_jax.parallel.layers import ScheduledGrads

Batch = dict[str, jax.Array]


class TrainState(NamedTuple):
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def init_state(model_def: ModelDef, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = model_def.init(seed)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def make_train_step(model_def: ModelDef, tx, schedule: optax.Schedule, grad_accum: int,
                    layers_fn: LayersFn | None = None, scheduled_grads: ScheduledGrads | None = None, *,
                    loss_chunk_len: int = 0, z_loss: float = 0.0, skip_bad: bool = False,
                    objective: ml_collections.ConfigDict | None = None,
                    lora: lora_lib.LoraStep | None = None) -> Callable:
    """(state, batch) -> (state, metrics); with `skip_bad`, (state, batch, max_loss) -> (state, metrics), where a
    step whose loss or gradient norm is not finite, or whose loss exceeds `max_loss`, leaves the parameters as they
    were (the optimizer sees a zero gradient for it; metrics["skipped"] says so). With grad_accum > 1 the batch is
    split into microbatches whose gradients are summed; every loss is divided by the whole batch's token count, so
    the result equals the full-batch gradient. `layers_fn` runs the layer stack on the mesh
    (`trainer.Run.layers_fn`); None: in order. `scheduled_grads` (`trainer.Run.scheduled_grads`) replaces autodiff
    by a pipeline schedule's own backward.
    `loss_chunk_len`: positions whose logits exist at a time (`objectives.lm_loss_sum`); 0: all. `z_loss`: the
    coefficient of log(Z)^2 added to each token's loss (the logged `loss` includes it). `objective` (cfg.objective):
    "reward" and "dpo" train on pair batches (`_pair_loss_and_grads`); otherwise the LM loss over `loss_mask`
    (pretraining, and SFT, whose masks cover the assistant's tokens only). `lora` (LoRA): state.params are
    adapters (and the reward head), and the step takes the frozen base as its last argument; the model runs on
    base + scale·A·B (`lora_lib.training_model`, with its dropout), and DPO's reference is the base."""
    pairs = objective is not None and objective.name in PAIR_OBJECTIVES

    def step_fn(state: TrainState, batch: Batch, max_loss, base: dict | None = None):
        def merge(params: dict, microbatch) -> Llama:
            if base is None:
                return model_def.merge(params)
            return lora_lib.training_model(model_def, base, params, lora, state.step, microbatch)

        def reference(opt_state) -> Llama:  # DPO's; with LoRA the frozen base itself, so no second copy exists
            if base is None:
                return model_def.merge(dpo_objective.reference_of(opt_state))
            return model_def.merge(jax.tree.map(lambda w: w.astype(jnp.float32), base))

        if pairs:
            pair_loss = pair_objective(objective, merge, reference, layers_fn, loss_chunk_len)
            loss, grads, extra = _pair_loss_and_grads(pair_loss, grad_accum, state, batch)
        else:
            loss, grads, extra = (*lm_loss_and_grads(state, batch, merge), {})
        grad_norm = optax.tree.norm(grads)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step), **extra}
        if skip_bad:
            good = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (loss <= max_loss)
            grads = jax.tree.map(lambda g: jnp.where(good, g, 0), grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        if skip_bad:
            updates = jax.tree.map(lambda u: jnp.where(good, u, 0), updates)
            metrics["skipped"] = 1.0 - good.astype(jnp.float32)
        params = optax.apply_updates(state.params, updates)
        metrics["param_norm"] = optax.tree.norm(params)
        return TrainState(state.step + 1, params, opt_state), metrics

    def lm_loss_and_grads(state: TrainState, batch: Batch, merge: Callable[[dict, jax.Array | int], Llama]):
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        def token_loss(model: Llama, h_btd, rows: Batch):
            nll_sum, _ = lm_loss_sum(model.logits, h_btd, rows["targets"], rows["loss_mask"], chunk_len=loss_chunk_len,
                                     z_loss=z_loss)
            return nll_sum / n_tokens

        def loss_fn(params, mb: Batch, microbatch):
            model = merge(params, microbatch)
            h_btd = model.hidden(mb["tokens"], segment_ids=mb["segment_ids"], positions=mb["positions"],
                                 layers_fn=layers_fn)
            return token_loss(model, h_btd, mb)

        def grad_fn(params, mb: Batch, microbatch=0):
            if scheduled_grads is None:
                return jax.value_and_grad(loss_fn)(params, mb, microbatch)
            return scheduled_grads(params, mb, token_loss)

        if grad_accum == 1:
            loss, grads = grad_fn(state.params, batch)
        else:
            micro = _microbatches(batch, grad_accum)

            def accumulate(carry, indexed_mb):
                loss, grads = grad_fn(state.params, *indexed_mb)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))
        return loss, grads

    if skip_bad:
        return step_fn
    return lambda state, batch, *base: step_fn(state, batch, jnp.inf, *base)


def _microbatches(batch: Batch, grad_accum: int) -> Batch:
    """[A, B / A, ...] arrays: microbatch j takes rows j, j + A, j + 2A, ..., so each device keeps its own rows."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch)


def _pair_loss_and_grads(pair_loss, grad_accum: int, state: TrainState, batch: Batch):
    """(loss, gradient, metrics) of a pair objective (`objectives.pair_objective`), its microbatches' values summed:
    each is already divided by the whole batch's counts."""
    counts, loss_fn = pair_loss
    totals = counts(batch)
    grad_fn = jax.value_and_grad(lambda params, mb, index: loss_fn(params, state.opt_state, mb, totals, index),
                                 has_aux=True)
    if grad_accum == 1:
        (loss, metrics), grads = grad_fn(state.params, batch, 0)
        return loss, grads, metrics

    def accumulate(carry, indexed_mb):
        (loss, metrics), grads = grad_fn(state.params, *indexed_mb)
        return jax.tree.map(jnp.add, carry, (loss, metrics, grads)), None

    micro = (_microbatches(batch, grad_accum), jnp.arange(grad_accum))
    shapes = jax.eval_shape(grad_fn, state.params, *jax.tree.map(lambda x: x[0], micro))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[0][0], shapes[0][1], shapes[1]))
    (loss, metrics, grads), _ = jax.lax.scan(accumulate, zeros, micro)
    return loss, grads, metrics


def make_eval_step(model_def: ModelDef, layers_fn: LayersFn | None = None, *, loss_chunk_len: int = 0,
                   objective: ml_collections.ConfigDict | None = None, microbatches: int = 1) -> Callable:
    """params, batch -> (loss sum, count), or (loss sum, count, {name: sum}) for other held-out figures. Reward: the
    pairwise loss over pairs, and the correctly ordered pairs; otherwise the LM loss over `loss_mask`, or over a DPO
    pair batch's `nll_mask` (the chosen responses, with end tokens). The batch goes through in `microbatches` parts
    (the run's optim.grad_accum), so that evaluating a batch never needs more memory than training on it."""
    if objective is not None and objective.name == "reward":
        def eval_fn(params, batch: Batch):
            base, head = reward_objective.split_params(params)
            totals = {"pairs": jnp.ones((), jnp.float32)}
            loss, metrics = reward_objective.reward_loss(model_def.merge(base), head, batch, totals,
                                                         layers_fn=layers_fn)
            return loss, jnp.sum(valid_pairs(batch)), {"pairwise_accuracy": metrics["pairwise_accuracy"]}
    else:
        def eval_fn(params, batch: Batch):
            model = model_def.merge(params)
            h_btd = model.hidden(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                                 layers_fn=layers_fn)
            mask_bt = batch["nll_mask"] if "nll_mask" in batch else batch["loss_mask"]
            return lm_loss_sum(model.logits, h_btd, batch["targets"], mask_bt, chunk_len=loss_chunk_len)

    if microbatches == 1:
        return eval_fn

    def in_microbatches(params, batch: Batch):
        def add(sums, mb: Batch):
            return jax.tree.map(jnp.add, sums, eval_fn(params, mb)), None

        micro = _microbatches(batch, microbatches)
        first = eval_fn(params, jax.tree.map(lambda x: x[0], micro))  # the sums start from it: no zeros to shape
        return jax.lax.scan(add, first, jax.tree.map(lambda x: x[1:], micro))[0]

    return in_microbatches
