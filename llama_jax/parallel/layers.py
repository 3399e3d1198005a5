"""How the layer stack runs on a mesh: the one place that combines pipeline stages, context-parallel attention and
the activations' sharding at block boundaries into the `LayersFn` the model is called with."""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
from jax.sharding import Mesh, PartitionSpec as P

from llama_jax.model import LlamaConfig
from llama_jax.model.config import PALLAS_ATTENTION
from llama_jax.model.attention import ATTENTION, AttentionFn
from llama_jax.model.llama import LayersFn, ModelDef, apply_blocks
from llama_jax.parallel.context import context_attention
from llama_jax.parallel.mesh import constrain
from llama_jax.parallel.pipeline import pipeline_layers, scheduled_value_and_grad

# (params, batch, loss(model, h_btd, rows) -> summed loss) -> (loss, grads like params)
ScheduledGrads = Callable[[dict, dict, Callable], tuple]


def make_layers_fn(model_cfg: LlamaConfig, mesh: Mesh, *, microbatches: int = 1, repeats: int = 1) -> LayersFn:
    """Blocks in order (or pipelined over `stage` with `microbatches`, `repeats` chunks per stage)."""
    run = _run_blocks(model_cfg, mesh)
    if mesh.shape["stage"] == 1:
        return run
    pipelined = functools.partial(pipeline_layers, stages=mesh.shape["stage"], microbatches=microbatches,
                                  repeats=repeats, run_chunk=run)

    def layers_fn(blocks, x_btd, cos_btp, sin_btp, segment_ids_bt):
        """The pipeline's output reaches every stage; its rows are then split over the stages too, so that the
        final norm, the output layer and the loss run on 1/S of the rows per stage, not all of them on each."""
        out_btd = pipelined(blocks, x_btd, cos_btp, sin_btp, segment_ids_bt)
        if out_btd.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["stage"]):
            return out_btd
        return jax.lax.with_sharding_constraint(out_btd, P(("data", "fsdp", "stage"), "context", None))

    return layers_fn


def make_scheduled_grads(model_def: ModelDef, mesh: Mesh, *, microbatches: int, schedule: str) -> ScheduledGrads:
    """`(params, batch, loss) -> (loss, grads)` through the pipeline with hand-placed backward units (1F1B, ZB-H1),
    for the trainer to use instead of autodiff of `make_layers_fn`'s forward."""
    return functools.partial(scheduled_value_and_grad, model_def, stages=mesh.shape["stage"],
                             microbatches=microbatches, schedule=schedule, run_chunk=_run_blocks(model_def.cfg, mesh))


def _run_blocks(model_cfg: LlamaConfig, mesh: Mesh) -> LayersFn:
    """Blocks in order, each output kept split over batch and length only: between blocks the residual stream is
    never split over tensor (each tensor-parallel block ends in a row-parallel matmul whose partial sums are
    reduced there)."""
    context = mesh.shape["context"]
    if context > 1:
        attention = context_attention(model_cfg.attention, context)
    elif model_cfg.attention in PALLAS_ATTENTION:
        attention = _per_device(ATTENTION[model_cfg.attention], model_cfg, mesh)
    else:
        attention = ATTENTION[model_cfg.attention]
    return functools.partial(apply_blocks, remat=model_cfg.remat, scan=model_cfg.scan_layers, attention=attention,
                             after_block=lambda x_btd: constrain(x_btd, ("batch", "length", None)))


def _per_device(kernel: AttentionFn, model_cfg: LlamaConfig, mesh: Mesh) -> AttentionFn:
    """A Pallas kernel is opaque to XLA's partitioner, so on a mesh XLA would gather every operand and compute all
    rows and heads on every device (cuDNN's call carries its own partitioning rules in JAX). It runs instead as
    `kernel` on each device's rows (split over data and fsdp) and heads (over tensor, when it divides both the
    query and the KV heads; otherwise every tensor device computes all heads, as with fewer KV heads than devices
    the projections already keep them all)."""
    tensor = mesh.shape["tensor"]
    heads = "tensor" if tensor > 1 and model_cfg.n_heads % tensor == 0 and model_cfg.n_kv_heads % tensor == 0 else None

    def attention(q_btnh, k_bskh, v_bskh, segment_ids_bt):
        rows = tuple(axis for axis in ("data", "fsdp") if mesh.shape[axis] > 1)
        if q_btnh.shape[0] % math.prod(mesh.shape[axis] for axis in rows):
            rows = ()  # rows that do not split evenly: each device takes them all
        manual = frozenset(rows + ((heads,) if heads else ()))
        if not manual:
            return kernel(q_btnh, k_bskh, v_bskh, segment_ids_bt)
        rows_spec = rows or None
        heads_spec = P(rows_spec, None, heads, None)
        # check_vma=False: a Pallas call does not say how its outputs vary over the manual axes
        return jax.shard_map(kernel, in_specs=(heads_spec, heads_spec, heads_spec, P(rows_spec, None)),
                             out_specs=heads_spec, axis_names=manual, check_vma=False)(q_btnh, k_bskh, v_bskh,
                                                                                       segment_ids_bt)

    return attention

