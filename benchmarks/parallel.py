"""Step time of each 4D-parallel mesh on 8 fake CPU devices, relative to the same step on one device, and the fit
plan's memory estimate against what XLA compiles.

    python benchmarks/parallel.py [--preset tiny] [--batch 16] [--seq 256] [--steps 3]

Fake CPU devices share this machine's cores and "communicate" through memory: the ratios show the overhead each
layout adds to the program (collectives, pipeline bubble and ticks, relayouts), nothing about real interconnects.
On a TPU pod or GPU cluster run the same meshes with real devices. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from llama_jax.parallel.cpu_threads import reserve_collective_threads  # noqa: E402

reserve_collective_threads()

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from llama_jax import train_step, trainer  # noqa: E402
from llama_jax.config import default_config, model_section  # noqa: E402
from llama_jax.optim import lr_schedule  # noqa: E402
from llama_jax.plan import plan  # noqa: E402

MESHES = [
    dict(data=8),
    dict(fsdp=8),
    dict(tensor=8),
    dict(data=2, fsdp=2, tensor=2),
    dict(stage=2, fsdp=2, tensor=2),
    dict(stage=4, data=2),
    dict(stage=2, data=4, schedule="circular"),
    dict(stage=4, data=2, microbatches=8),  # GPipe, then the table-driven schedules on the same layout
    dict(stage=4, data=2, microbatches=8, schedule="1f1b"),
    dict(stage=4, data=2, microbatches=8, schedule="zb-h1"),
    dict(context=2, fsdp=4),
    dict(context=2, stage=2, tensor=2),
]
PIPELINE_KEYS = ("schedule", "microbatches")


def make_cfg(preset: str, batch: int, seq: int, layout: dict):
    cfg = default_config()
    cfg.model = model_section(preset, n_kv_heads=8, remat="none")  # 8 KV heads: tensor=8 splits every head
    cfg.data.batch_size, cfg.data.seq_len = batch, seq
    for axis in ("data", "stage", "fsdp", "context", "tensor"):
        cfg.mesh[axis] = layout.get(axis, 1)
    for key in PIPELINE_KEYS:
        if key in layout:
            cfg.pipeline[key] = layout[key]
    return cfg


def compiled_step(cfg, devices=None):
    run = trainer.setup(cfg, Path(tempfile.mkdtemp()), devices)
    step = jax.jit(train_step.make_train_step(run.model_def, run.tx, lr_schedule(cfg.optim, 1000), 1, run.layers_fn,
                                           run.scheduled_grads),
                   in_shardings=(run.state_shardings, run.batch_sharding), donate_argnums=0)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, t), dtype=np.int32)
    batch = run.to_global(dict(tokens=tokens, targets=np.roll(tokens, -1, axis=1),
                               segment_ids=np.ones((b, t), np.int32), loss_mask=np.ones((b, t), np.float32),
                               positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()))
    return run, step, batch


def seconds_per_step(cfg, steps: int, devices=None) -> tuple[float, float]:
    """(median seconds per step after the first, seconds of the first call: compile + one step)."""
    run, step, batch = compiled_step(cfg, devices)
    with jax.set_mesh(run.mesh):
        state = run.init()
        start = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        first = time.perf_counter() - start
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = step(state, batch)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    return float(np.median(times)), first


def compiled_bytes(cfg) -> int:
    """XLA's per-device bytes for the step: arguments + outputs not aliased to donated arguments + temporaries."""
    run, step, batch = compiled_step(cfg)
    with jax.set_mesh(run.mesh):
        memory = step.lower(run.abstract_state, batch).compile().memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)


def name(layout: dict) -> str:
    return " x ".join(f"{k} {v}" for k, v in layout.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    single, single_first = seconds_per_step(make_cfg(args.preset, args.batch, args.seq, {}), args.steps,
                                            devices=jax.devices()[:1])
    print(f"{args.preset}, batch {args.batch} x {args.seq}, float32 params, {jax.device_count()} fake CPU devices")
    print(f"one device: {single * 1e3:.0f} ms/step (first call {single_first:.1f} s)\n")
    print(f"{'mesh':<36} {'ms/step':>8} {'vs 1 device':>12} {'plan MiB':>9} {'XLA MiB':>8} {'plan/XLA':>9}")
    rows = []
    for layout in MESHES:
        cfg = make_cfg(args.preset, args.batch, args.seq, layout)
        seconds, first = seconds_per_step(cfg, args.steps)
        estimate, compiled = plan(cfg).total_bytes, compiled_bytes(cfg)
        rows.append(dict(mesh=name(layout), ms_per_step=seconds * 1e3, ratio=seconds / single, first_call_s=first,
                         plan_bytes=estimate, xla_bytes=compiled, plan_over_xla=estimate / compiled))
        print(f"{name(layout):<36} {seconds * 1e3:>8.0f} {seconds / single:>11.2f}x {estimate / 2**20:>9.1f} "
              f"{compiled / 2**20:>8.1f} {estimate / compiled:>9.2f}")
    print(json.dumps(dict(preset=args.preset, batch=args.batch, seq=args.seq, single_ms_per_step=single * 1e3,
                          meshes=rows)))


if __name__ == "__main__":
    main()
