"""Pipeline parallelism: the layer stack split over the `stage` mesh axis, microbatches flowing through it.

Written from outside the model: `pipeline_layers` is a `LayersFn` (model/llama.py) that the trainer hands to the
model in place of its plain scan. Inside a `jax.shard_map` that is manual over `stage` only (data, fsdp, context and
tensor stay automatic, so every other kind of parallelism composes), each stage runs its own layers and passes its
output to the next with `jax.lax.ppermute` around the ring of stages.

Schedules (one loop serves both; the backward pass is the loop's autodiff transpose, run in reverse):
- GPipe (`repeats=1`): stage s holds layers [s L/S, (s+1) L/S). M microbatches take M + S - 1 ticks; bubble
  (S-1) / (M+S-1).
- Circular (`repeats=R>1`, interleaved): the layers are cut into R*S chunks and stage s holds chunks s, s+S, ...;
  a microbatch goes round the ring R times. R*M + S - 1 ticks of 1/R the work each: bubble (S-1) / (R*M+S-1).
  Needs M >= S (a microbatch is back at stage 0 before it is needed there). The stacked parameters are stored in
  layer order, contiguous per stage, so each step regroups them (an all-to-all of the layer weights over `stage`
  and of their gradients back): the price of checkpoints that do not depend on the schedule.

Every tick each stage computes (ticks where it has no microbatch compute on stale data whose results are never
used, so their gradient is zero): that idle work is the bubble.

1F1B and ZB-H1 (`scheduled_value_and_grad`): the backward is not autodiff of the loop but units placed by a table
(parallel/schedules.py): each stage alternates forwards and backwards, keeping at most S microbatches' inputs
instead of M, and the last stage computes each microbatch's loss as soon as its forward is done. The whole
gradient (embedding, stages, head) comes out of one call, equal to autodiff's.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from llama_jax.model.llama import Block, Llama, ModelDef
from llama_jax.parallel.schedules import pipeline_value_and_grad, schedule_stats

TABLE_SCHEDULES = ("1f1b", "zb-h1")  # backward units placed by a table (config.SCHEDULED_PIPELINES)
RunChunk = Callable[[Block, jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def bubble_fraction(stages: int, microbatches: int, repeats: int = 1, schedule: str = "gpipe") -> float:
    """The share of a stage's time spent waiting (or computing what is thrown away) in a step. For the table-driven
    schedules it is counted with a backward costing two forwards (parallel/schedules.py)."""
    if schedule in TABLE_SCHEDULES:
        return schedule_stats(schedule, stages, microbatches, backward_cost=2)["bubble_fraction"]
    return (stages - 1) / (repeats * microbatches + stages - 1)


def peak_microbatches(stages: int, microbatches: int, schedule: str = "gpipe") -> int:
    """How many microbatches' activations a stage holds at once: all of them under autodiff of the forward loop,
    at most `stages` under 1F1B and ZB-H1."""
    return min(stages, microbatches) if schedule in TABLE_SCHEDULES else microbatches


def pipeline_layers(blocks: Block, x_btd, cos_btp, sin_btp, segment_ids_bt, *, stages: int, microbatches: int,
                    repeats: int, run_chunk: RunChunk) -> jnp.ndarray:
    """Applies the stacked `blocks` to x as an S-stage pipeline over M microbatches (rows j, j+M, ... form
    microbatch j, so each data-parallel device keeps its own rows); same result as running them in order."""
    graphdef, state = nnx.split(blocks)
    leaves, treedef = jax.tree.flatten(state)
    n_layers = leaves[0].shape[0]
    per_chunk = n_layers // (stages * repeats)
    # [L, ...] -> [S, R, K, ...]: chunk r*S + s (layers (r*S+s)*K ...) on stage s, as repeat r.
    staged = [leaf.reshape(repeats, stages, per_chunk, *leaf.shape[1:]).swapaxes(0, 1) for leaf in leaves]
    inputs = [_split_rows(a, microbatches) for a in (x_btd, cos_btp, sin_btp, segment_ids_bt)]

    def stage_fn(staged, x_mbtd, cos_mbtp, sin_mbtp, segment_ids_mbt):
        stage = jax.lax.axis_index("stage")
        ring = [(i, (i + 1) % stages) for i in range(stages)]

        def tick(carry, t):
            incoming_btd, buffer_mbtd = carry
            m, r = (t - stage) % microbatches, jnp.clip((t - stage) // microbatches, 0, repeats - 1)
            x_btd = jnp.where(stage == 0, buffer_mbtd[t % microbatches], incoming_btd)
            chunk = nnx.merge(graphdef, jax.tree.unflatten(treedef, [leaf[0, r] for leaf in staged]))
            out_btd = run_chunk(chunk, x_btd, cos_mbtp[m], sin_mbtp[m], segment_ids_mbt[m])
            shifted_btd = jax.lax.ppermute(out_btd, "stage", ring)
            # Stage 0 receives the last stage's output for microbatch t - (S-1): the next repeat's input, or the result.
            done = t - (stages - 1)
            stored = buffer_mbtd.at[done % microbatches].set(shifted_btd)
            buffer_mbtd = jnp.where((stage == 0) & (done >= 0), stored, buffer_mbtd)
            return (shifted_btd, buffer_mbtd), None

        buffer_mbtd = jax.lax.pcast(x_mbtd, "stage", to="varying").astype(x_btd.dtype)
        carry = (jnp.zeros_like(buffer_mbtd[0]), buffer_mbtd)
        (_, buffer_mbtd), _ = jax.lax.scan(tick, carry, jnp.arange(repeats * microbatches + stages - 1))
        return jax.lax.psum(jnp.where(stage == 0, buffer_mbtd, 0).astype(jnp.float32), "stage")

    # The sums over stages (of the result, and of the input's gradient in the backward pass) run in float32: XLA's
    # CPU backend cannot compile a bfloat16 all-reduce here, and a sum of one non-zero term loses nothing to it.
    inputs[0] = inputs[0].astype(jnp.float32)
    out_mbtd = jax.shard_map(
        stage_fn, in_specs=(P("stage"), P(), P(), P(), P()), out_specs=P(), axis_names=frozenset({"stage"}),
    )(staged, *inputs)
    return _merge_rows(out_mbtd).astype(x_btd.dtype)


def _split_rows(x, microbatches: int):
    """[B, ...] -> [M, B/M, ...] with microbatch j = rows j, j+M, ...: a device's rows stay on that device."""
    return x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:]).swapaxes(0, 1)


def _merge_rows(x):
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def scheduled_value_and_grad(model_def: ModelDef, params: dict, batch: dict,
                             loss: Callable[[Llama, jnp.ndarray, dict], jnp.ndarray], *, stages: int, microbatches: int,
                             schedule: str, run_chunk: RunChunk):
    """(loss, grads like params) of `loss(head_model, h_btd, rows)` (h_btd: the final normalised hidden states)
    summed over the batch's M microbatches, with the layer stack run as an S-stage pipeline whose forward and
    backward units follow `schedule` ("1f1b", "zb-h1").
    The embedding is differentiated around the pipeline; the final norm and output projection (the "head") are
    the last stage's loss parameters."""
    model = model_def.merge(params)
    tied = model_def.cfg.tie_embeddings
    x_btd, pull_embedding = jax.vjp(lambda embed: model_def.merge({"embed": embed}).embed_tokens(batch["tokens"]),
                                    params["embed"])
    cos_btp, sin_btp = model.rotary(batch["positions"])
    graphdef, layer_state = nnx.split(model.layers)
    leaves, treedef = jax.tree.flatten(params["layers"])
    staged = [leaf.reshape(stages, leaf.shape[0] // stages, *leaf.shape[1:]) for leaf in leaves]
    head = {key: params[key] for key in ("norm", "embed" if tied else "lm_head")}

    def stage_fn(chunk_leaves, x_btd, aux):
        chunk = jax.tree.map(lambda v: v, layer_state)
        nnx.replace_by_pure_dict(chunk, jax.tree.unflatten(treedef, chunk_leaves))
        return run_chunk(nnx.merge(graphdef, chunk), x_btd, *aux)

    def head_loss(head, h_btd, rows):
        head_model = model_def.merge(head)
        return loss(head_model, head_model.norm(h_btd), rows)

    split = functools.partial(_split_rows, microbatches=microbatches)
    aux = tuple(split(a) for a in (cos_btp, sin_btp, batch["segment_ids"]))
    value, stage_grads, head_grads, x_grads = pipeline_value_and_grad(
        stage_fn, head_loss, staged, head, split(x_btd), aux, jax.tree.map(split, batch), stages=stages,
        microbatches=microbatches, schedule=schedule)
    (embedding_grad,) = pull_embedding(_merge_rows(x_grads).astype(x_btd.dtype))
    grads = dict(head_grads, layers=jax.tree.unflatten(treedef, [g.reshape(leaf.shape) for g, leaf
                                                                   in zip(stage_grads, leaves)]))
    grads["embed"] = grads["embed"] + embedding_grad if tied else embedding_grad
    return value, grads
