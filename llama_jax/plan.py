"""The fit plan: does a config's training step fit in the accelerators' memory, and how long will a step take?

`python -m llama_jax.plan --config configs/llama3_405b.py [--accelerator h100] [--devices N] [--mfu 0.4]`

Nothing is allocated and no accelerator is needed, so a 16K-GPU mesh can be planned on a laptop: the parameter,
gradient and optimizer-state shards are the trainer's own count (`trainer.train_state_bytes`: LoRA, DPO's reference
and a reward model's head included), its sharding rules applied to abstract shapes on a
`jax.sharding.AbstractMesh`, and the activations from the formula in `_activation_bytes`, which follows what the
model keeps for its backward pass under each remat policy and what the pipeline keeps per tick. That formula was
checked against XLA's own buffer assignment of the compiled step on CPU (tests/test_plan.py).
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from ml_collections import config_flags

from llama_jax import command_line
from llama_jax.config import (PAIR_OBJECTIVES, SCHEDULED_PIPELINES, batch_schedule, model_config,
                              pipeline_microbatches, pipeline_repeats, validate)
from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.model import LlamaConfig, ModelDef, param_count
from llama_jax.model.flash import BLOCK as FLASH_BLOCK
from llama_jax.objectives import flops_per_row_token
from llama_jax.parallel.mesh import MESH_AXES, mesh_shape, param_shardings
from llama_jax.parallel.pipeline import bubble_fraction
from llama_jax.parallel.schedules import make_tables, schedule_stats
from llama_jax.phases import RunPlan

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # published dense bfloat16 FLOP/s of one chip
    memory_bytes: int  # HBM of one chip, as published
    memory_label: str  # the published figure, as printed
    host_devices: int  # chips of one host: the device count when neither the mesh nor --devices gives it


ACCELERATORS = {
    "v5p": Accelerator("TPU v5p", 459e12, 95 * GiB, "95 GiB", 4),
    "v6e": Accelerator("TPU v6e", 918e12, 32 * GiB, "32 GiB", 8),
    "h100": Accelerator("H100", 989e12, 80 * 10**9, "80 GB", 8),
    "h200": Accelerator("H200", 989e12, 141 * 10**9, "141 GB", 8),
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device memory (bytes) and per-step compute of one training step; `report()` prints it."""

    accelerator: Accelerator
    mesh: dict[str, int]
    n_params: int
    batch_size: int  # global, in sequences (the largest stage of data.ramp)
    seq_len: int
    grad_accum: int
    microbatches: int  # pipeline microbatches per accumulation step (1 without a pipeline)
    schedule: str  # the pipeline's (pipeline.schedule, with its repeats when circular); "" without one
    bubble: float  # the share of a pipeline step its stages wait
    rows_per_device: int  # batch rows a device holds (a 1 / mesh.context slice of) in one accumulation step
    sequences_per_row: int  # 2 for a pair objective (reward, DPO): the chosen and the rejected sequence
    remat: str
    param_bytes: int  # the trained parameters (with LoRA: the adapters; a reward model's head included)
    base_bytes: int  # LoRA's frozen base, in lora.base_dtype (0 without LoRA)
    grad_bytes: int
    opt_bytes: int  # the optimizer's state (DPO: with the reference model it keeps there)
    reference: bool  # DPO without LoRA: the optimizer's state holds a copy of the parameters
    kept_bytes: int  # activations the backward pass reads, kept from the forward pass
    working_bytes: int  # the largest transient: one layer's backward, or the logits and their gradient
    flops_per_step: float
    mfu: float

    @property
    def devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def activation_bytes(self) -> int:
        return self.kept_bytes + self.working_bytes

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.base_bytes + self.grad_bytes + self.opt_bytes + self.activation_bytes

    @property
    def headroom_bytes(self) -> int:
        return self.accelerator.memory_bytes - self.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0

    @property
    def step_seconds(self) -> float:
        return self.flops_per_step / (self.mfu * self.accelerator.peak_flops * self.devices)

    def report(self) -> str:
        acc, mesh = self.accelerator, self.mesh
        pairs = self.sequences_per_row == 2
        lines = [
            f"accelerator   {self.devices:,} x {acc.name} ({acc.memory_label}, "
            f"{acc.peak_flops / 1e12:.0f} TFLOP/s bf16)",
            "mesh          " + " x ".join(f"{axis} {size}" for axis, size in mesh.items()),
            f"parameters    {self.n_params:,} ({_count(self.n_params)})",
            f"batch         {self.batch_size:,}{' pairs' if pairs else ''} x {self.seq_len:,} tokens, grad_accum "
            f"{self.grad_accum}: {self.rows_per_device * self.sequences_per_row} sequence(s) of "
            f"{self.seq_len // mesh['context']:,} tokens per device per accumulation step",
        ]
        if mesh["stage"] > 1:
            lines.append(f"pipeline      {mesh['stage']} stages, {self.microbatches} microbatches, {self.schedule}: "
                         f"bubble {self.bubble:.1%} (MFU cannot exceed {1 - self.bubble:.0%})")
        verdict = (f"fits, {_gib(self.headroom_bytes)} headroom" if self.fits
                   else f"does not fit, {_gib(-self.headroom_bytes)} over")
        lines += [
            "per device",
            f"  parameters      {_gib(self.param_bytes)}" + (" (the adapters)" if self.base_bytes else ""),
            *([f"  frozen base     {_gib(self.base_bytes)}"] if self.base_bytes else []),
            f"  gradients       {_gib(self.grad_bytes)}",
            f"  optimizer       {_gib(self.opt_bytes)}" + (" (with DPO's reference)" if self.reference else ""),
            f"  activations     {_gib(self.activation_bytes)} (remat {self.remat}: {_gib(self.kept_bytes)} kept for "
            f"the backward pass + {_gib(self.working_bytes)} working set)",
            f"  total           {_gib(self.total_bytes)} of {_gib(acc.memory_bytes)} "
            f"({self.total_bytes / acc.memory_bytes:.0%})",
            f"compute       {self.flops_per_step:.3g} FLOP per step: {self.step_seconds:.3g} s at {self.mfu:.0%} MFU",
            f"verdict       {verdict}",
        ]
        return "\n".join(lines)


def _check_options(devices: int | None = None, accelerator: str = "h100", mfu: float = 0.4) -> None:
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"unknown accelerator {accelerator!r}: choose one of {sorted(ACCELERATORS)}")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu={mfu} must be a fraction in (0, 1], e.g. 0.4")
    if devices is not None and devices < 1:
        raise ConfigError(f"--devices={devices} must be at least 1 (or left out: the mesh's product)")


def plan(cfg: ml_collections.ConfigDict, *, devices: int | None = None, accelerator: str = "h100",
         mfu: float = 0.4) -> Plan:
    """The plan of `cfg` on `accelerator` chips. Devices: the mesh's product when no axis is -1, else `devices`,
    else one host of the accelerator. Raises ConfigError for a config or mesh that cannot run."""
    _check_options(devices, accelerator, mfu)
    acc = ACCELERATORS[accelerator]
    validate(cfg)
    fixed = [cfg.mesh[axis] for axis in MESH_AXES]
    if devices is None:
        devices = math.prod(fixed) if -1 not in fixed else acc.host_devices
    sizes = mesh_shape(cfg.mesh, devices)
    model_cfg = model_config(cfg)
    model_def = ModelDef(model_cfg)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(model_def.abstract_state))
    from llama_jax.trainer import train_state_bytes  # imported here: it pulls in the data pipeline

    state = train_state_bytes(cfg, _abstract_mesh(sizes))  # the trainer's own: LoRA, DPO's reference, the reward head

    # The largest (batch, seq_len) of data.ramp's stages is the one that has to fit.
    batch_size, seq_len = max(batch_schedule(cfg).shapes, key=lambda shape: (shape[0] * shape[1], shape[1]))
    grad_accum, microbatches, stages = cfg.optim.grad_accum, pipeline_microbatches(cfg), sizes["stage"]
    schedule, repeats = (cfg.pipeline.schedule, pipeline_repeats(cfg)) if stages > 1 else ("", 1)
    batch_shards = sizes["data"] * sizes["fsdp"]
    if batch_size % (grad_accum * microbatches * batch_shards):
        raise ConfigError(
            f"a batch of {batch_size} sequences cannot be cut into optim.grad_accum ({grad_accum}) x pipeline "
            f"microbatches ({microbatches}) x data-parallel shards (mesh.data x mesh.fsdp = {batch_shards}): make "
            f"data.batch_size a multiple of {grad_accum * microbatches * batch_shards}"
        )
    rows = batch_size // (grad_accum * batch_shards)
    sequences = 2 if cfg.objective.name in PAIR_OBJECTIVES else 1
    # The per-device widths (heads, KV heads, MLP, vocabulary) as the tensor axis splits the weights, and a layer's
    # weights as a device holds them to compute (gathered over fsdp): the shard shapes with fsdp folded into data.
    gathered_sh = param_shardings(model_def.abstract_state, _abstract_mesh(dict(sizes, data=batch_shards, fsdp=1)))
    local = jax.tree.map(lambda p, sharding: sharding.shard_shape(p.shape), params, gathered_sh)
    kept, working = _activation_bytes(model_cfg, local, tokens=rows * sequences * seq_len // sizes["context"],
                                      seq_len=seq_len, stages=stages, microbatches=microbatches, schedule=schedule,
                                      repeats=repeats, objective=cfg.objective.name,
                                      loss_chunk_len=cfg.objective.loss_chunk_len)
    if schedule in SCHEDULED_PIPELINES:  # units placed by a table; a backward unit costs two forwards
        bubble = schedule_stats(schedule, stages, microbatches, backward_cost=2)["bubble_fraction"]
    else:
        bubble = bubble_fraction(stages, microbatches, repeats) if stages > 1 else 0.0
    return Plan(
        accelerator=acc, mesh=sizes, n_params=param_count(model_cfg), batch_size=batch_size, seq_len=seq_len,
        grad_accum=grad_accum, microbatches=microbatches, bubble=bubble, rows_per_device=rows,
        sequences_per_row=sequences, remat=model_cfg.remat,
        schedule=f"{schedule} x {repeats}" if repeats > 1 else schedule,
        param_bytes=state["parameters"], base_bytes=state.get("frozen base", 0),
        # accumulating: the running sum and a microbatch's
        grad_bytes=state["gradients"] * (2 if grad_accum > 1 else 1),
        opt_bytes=state["optimizer"], reference=cfg.objective.name == "dpo" and not cfg.lora.rank,
        kept_bytes=kept, working_bytes=working,
        flops_per_step=flops_per_row_token(cfg.objective, model_cfg, seq_len) * batch_size * seq_len,
        mfu=mfu,
    )


def _activation_bytes(m: LlamaConfig, local: dict, *, tokens: int, seq_len: int, stages: int, microbatches: int,
                      schedule: str, repeats: int, objective: str, loss_chunk_len: int) -> tuple[int, int]:
    """(kept, working) activation bytes of one device, for `tokens` = its tokens in one accumulation step.

    Notation: T = `tokens`; S = seq_len (keys per query: the whole sequence, also under context parallelism); d, h
    the model width and head size; n, k, f, v the query heads, KV heads, MLP width and vocabulary of one device's
    weights (split over tensor); c the compute dtype's size, and c' = c when that is not float32, else 0 (the copy
    made where a float32 result is cast to it). Parameters are float32. K is the width of the attention scores a
    query holds at once: the reference and xla implementations materialise the [heads, T, S] scores (K = S); flash
    attention (model/flash.py) holds one block of keys at a time (K = its block, 256, or S when shorter). P stages,
    M microbatches, R layer chunks per stage (circular), L layers.

    Kept for the backward pass, per layer and token, by remat policy:
      full: d·c (the layer's input); dots_no_batch: (2d + (n + 2k)·h + 2f)·c (input, q/k/v, the attention output
      projection, gate, up); dots: that + n·h·c + 4·n·S (the batched dots too: attention values and scores);
      none: everything the layer computes, B + (4 + c')·n·S with B = 24·d + (2d + (2n + 2k)·h + 6f)·c.
      Flash attention keeps no scores (its backward recomputes them from its output and two float32 statistics
      per query and head): dots keeps 8·n in place of 4·n·S, none 8·n + n·h·c in place of (4 + c')·n·S.
    Transients, on t tokens:
      one layer's backward, t·(B + X·n·K) + (c + c')·(the layer's weights): its recomputed activations; scores,
      probabilities and their gradients over K keys, X = 16 + c' for the dense kernels (float32, and a cast copy:
      what XLA holds at once, measured on CPU) and X = 8 + 2c for flash (float32 probabilities and their gradient,
      and the two in the compute dtype for the matmuls; XLA fuses the rest); its weights gathered over fsdp and
      cast, and their gradient; flash attention adds t·F, F = 8·n·h + 12·n: its float32 running output and query
      gradient, and the per-query statistics;
      the output layer and loss, t·(12·d + c·d) + t'·Y·v + W·(c + c')·v·d: the final norm's float32
      intermediates; logits over the t' of the t tokens whose logits exist at once (t' = t·C / S when the loss runs
      in chunks of C = objective.loss_chunk_len < S positions per row, else t); the output weight gathered and cast,
      and its gradient. The LM loss: Y = 4 + 2c = 8, the float32 logits, their gradient rounded to the compute dtype
      (objectives/lm.py writes it once) and its copy transposed for the weight gradient (in float32 the gradient
      takes the logits' buffer: 2c); W = 1. DPO: Y = 20, the policy's float32 log-probabilities, their exponent
      (the KL) and gradients beside the reference's (measured on CPU: 19-22), W = 2 (policy and reference). A
      reward model computes no logits: Y = W = 0.
    No pipeline: kept = L·T·per_layer; working = the larger transient on T tokens.
    GPipe and circular (autodiff of a loop of R·M + P - 1 ticks, each L / (P·R) layers on T / M tokens; the bubble
    ticks keep residuals too): kept = ticks · L / (P·R) · T / M · per_layer + 2·T·d·c (the microbatch buffer and its
    gradient); working = the larger of one layer's backward on T / M and the output layer on T / P (after
    the pipeline its rows are split over the stages too, when they divide).
    1F1B and ZB-H1 (units placed by a table, parallel/schedules.py): kept = (2·slots·T / M + 2·T)·d·c (the inputs
    and cotangents of the microbatches in flight, and every microbatch's embedded input and its gradient); a
    backward unit recomputes its L / P layers on T / M tokens, keeping their residuals while it runs the loss (last
    stage) and then one layer's backward at a time: working = L / P · T / M · per_layer + the larger transient on T / M.
    """
    c = jnp.dtype(m.dtype).itemsize
    narrow = c if m.dtype != "float32" else 0
    d, h, s = m.dim, m.resolved_head_dim, seq_len
    n = local["layers"]["attn"]["wq"][2]
    k = local["layers"]["attn"]["wk"][2]
    f = local["layers"]["mlp"]["w_gate"][2]
    v, embed_d = local["embed"]
    rest = 24 * d + (2 * d + (2 * n + 2 * k) * h + 6 * f) * c
    no_batch = (2 * d + (n + 2 * k) * h + 2 * f) * c
    # The fused kernels keep, like flash, O(t) statistics per head and no [t, s] probabilities, and their score
    # tiles stay on chip. While a layer runs, cuDNN's same-document mask is a dense [t, s] bias (and its boolean
    # source), and Triton's keys and values are repeated to one head per query head.
    on_chip = m.attention in ("cudnn", "triton", "splash")
    flash = m.attention == "flash" or on_chip
    keys = 0 if on_chip else min(FLASH_BLOCK, s) if flash else s
    kernel_inputs = {"cudnn": (c + 1) * s, "triton": 2 * n * h * c}.get(m.attention, 0)
    kept_attention = ({"dots": 8 * n, "none": 8 * n + n * h * c} if flash
                      else {"dots": 4 * n * s, "none": (4 + narrow) * n * s})
    per_layer = {"full": d * c, "dots_no_batch": no_batch, "dots": no_batch + n * h * c + kept_attention["dots"],
                 "none": rest + kept_attention["none"]}[m.remat]
    layer_weights = sum(math.prod(shape[1:]) for shape in jax.tree.leaves(local["layers"], is_leaf=_is_shape))
    scores = (8 + 2 * c if flash else 16 + narrow) * n * keys + (8 * n * h + 12 * n if flash else 0) + kernel_inputs

    def one_layer(t: int) -> int:
        return t * (rest + scores) + (c + narrow) * layer_weights

    logit_bytes, head_weights = {"dpo": (20, 2), "reward": (0, 0)}.get(objective, (8, 1))
    chunked = 0 < loss_chunk_len < s

    def head(t: int) -> int:
        with_logits = t * loss_chunk_len // s if chunked else t
        return t * (12 * d + c * d) + with_logits * logit_bytes * v + head_weights * (c + narrow) * v * embed_d

    micro_tokens, chunk = tokens // microbatches, m.n_layers // (stages * repeats)
    if schedule in SCHEDULED_PIPELINES:
        slots = make_tables(schedule, stages, microbatches).slots
        working = chunk * micro_tokens * per_layer + max(one_layer(micro_tokens), head(micro_tokens))
        return (2 * slots * micro_tokens + 2 * tokens) * d * c, working
    ticks = repeats * microbatches + stages - 1
    kept = ticks * chunk * micro_tokens * per_layer + (2 * tokens * d * c if stages > 1 else 0)
    return kept, max(one_layer(micro_tokens), head(tokens // stages))


def _abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    """A mesh of any size without devices: enough for shardings and shard shapes."""
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    return AbstractMesh(tuple(sizes[axis] for axis in MESH_AXES), MESH_AXES, axis_types=axis_types)


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


# ---------------------------------------------------------------------------------------------- command line

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (see configs/).", lock_config=True,
                                          sys_argv=command_line.config_first(sys.argv))
_ACCELERATOR = flags.DEFINE_enum("accelerator", "h100", sorted(ACCELERATORS), "The chips the mesh's devices are.")
_DEVICES = flags.DEFINE_integer("devices", None, "Device count, for a mesh with an axis of -1 (default: the mesh's "
                                "product, else one host of the accelerator).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilisation assumed for the step time (Llama 3 paper: 0.38-0.43).")


def plan_phases(cfg: ml_collections.ConfigDict, **options) -> list[tuple[str, Plan]]:
    """(phase name, plan) for every phase of the run (`cfg.phases`; one phase without them): each phase has its own
    batch shape, mesh and attention, and all of them have to fit."""
    _check_options(**options)  # said once, not as any phase's
    validate(cfg)
    phases = RunPlan(cfg).phases
    planned = []
    for p in phases:
        try:
            planned.append((p.name, plan(p.cfg, **options)))
        except ConfigError as err:
            raise ConfigError(f"phase {p.name}: {err}" if len(phases) > 1 else str(err)) from None
    return planned


def phases_table(planned: list[tuple[str, Plan]]) -> str:
    lines = [f"{'phase':<20} {'batch x seq_len':>17} {'mesh (data stage fsdp context tensor)':>38} {'per device':>11}  fits"]
    for name, p in planned:
        mesh = " x ".join(str(p.mesh[axis]) for axis in MESH_AXES)
        lines.append(f"{name:<20} {p.batch_size:>8,} x {p.seq_len:<7,} {mesh:>38} {_gib(p.total_bytes):>11}  "
                     f"{'yes' if p.fits else 'NO'}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # JAX logs its search for accelerators at INFO
    try:
        planned = plan_phases(_CONFIG.value, devices=_DEVICES.value, accelerator=_ACCELERATOR.value, mfu=_MFU.value)
    except LlamaJaxError as err:
        command_line.fail(str(err))
    name, largest = max(planned, key=lambda entry: entry[1].total_bytes)
    header = flags.FLAGS["config"].config_filename
    if len(planned) > 1:
        header += f"\n{phases_table(planned)}\n\nthe phase that needs the most memory: {name}"
    print(f"{header}\n{largest.report()}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=command_line.parse)
