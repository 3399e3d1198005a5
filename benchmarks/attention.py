"""Attention forward + backward on this machine: time and XLA's compiled temporary memory of the reference, xla and
flash implementations (and the machine's fused kernels: cudnn and triton on an NVIDIA GPU, splash on a TPU) at a few
sequence lengths, with flash's ratios to the others.

    python benchmarks/attention.py [--seqs 1024,2048,4096] [--heads 8] [--kv_heads 2] [--head_dim 64] \
        [--dtype bfloat16] [--repeats 3] [--impls reference,xla,flash,...]

One packed row of the given length (four documents) with grouped-query attention. Memory is what XLA's buffer
assignment reserves for temporaries (nothing is allocated to measure it), so the quadratic growth of the dense
kernels' [t, t] scores and the linear growth of flash's [t, 256] tiles show at any length; times are the best of
`--repeats` runs after one compile-and-warm-up run. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model.attention import ATTENTION
from llama_jax.model.flash import BLOCK

FUSED = {"gpu": ("cudnn", "triton"), "tpu": ("splash",)}  # model/fused_attention.py, by backend


def forward_backward(name: str):
    attention = ATTENTION[name]

    def run(q_btnh, k_btkh, v_btkh, segment_ids_bt, dout_btnh):
        out_btnh, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segment_ids_bt), q_btnh, k_btkh, v_btkh)
        return out_btnh, vjp(dout_btnh)

    return jax.jit(run)


def inputs(t: int, n: int, k: int, h: int, dtype) -> tuple:
    rng = np.random.default_rng(0)
    q, key, value, dout = (jnp.asarray(rng.normal(size=(1, t, heads, h)), dtype) for heads in (n, k, k, n))
    segment_ids = jnp.asarray(np.repeat(np.arange(1, 5), t // 4)[None], jnp.int32)
    return q, key, value, segment_ids, dout


def measure(name: str, args: tuple, repeats: int) -> dict:
    step = forward_backward(name)
    compiled = step.lower(*args).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "temp_mib": temp_mib}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", default="1024,2048,4096", help="comma-separated sequence lengths (multiples of 4)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", help="comma-separated kernels (default: reference, xla, flash and this machine's "
                                        "fused ones)")
    args = parser.parse_args(argv)
    default = ("reference", "xla", "flash", *FUSED.get(jax.default_backend(), ()))
    implementations = tuple(args.impls.split(",")) if args.impls else default
    if "flash" not in implementations or any(name not in ATTENTION for name in implementations):
        parser.error(f"--impls={args.impls!r}: name kernels among {sorted(ATTENTION)}, flash included (the base of "
                     "the ratios)")
    elsewhere = [name for backend, names in FUSED.items() for name in names
                 if name in implementations and backend != jax.default_backend()]
    if elsewhere:
        parser.error(f"--impls: {', '.join(elsewhere)} cannot run on this {jax.default_backend()} backend")
    try:
        seqs = [int(s) for s in args.seqs.split(",")]
    except ValueError:
        parser.error(f"--seqs={args.seqs!r}: give comma-separated integers, e.g. 1024,2048,4096")
    if any(t <= 0 or t % 4 for t in seqs) or args.heads % args.kv_heads:
        parser.error("sequence lengths must be positive multiples of 4, and --heads a multiple of --kv_heads")

    print(f"attention forward + backward, 1 row, {args.heads} heads / {args.kv_heads} KV heads of "
          f"{args.head_dim}, {args.dtype}, flash block {BLOCK}, {jax.devices()[0].platform}")
    print(f"{'seq':>6} {'impl':>9} {'time ms':>9} {'temp MiB':>9} {'flash time':>11} {'flash mem':>10}")
    results = []
    for t in seqs:
        batch = inputs(t, args.heads, args.kv_heads, args.head_dim, jnp.dtype(args.dtype))
        row = {name: measure(name, batch, args.repeats) for name in implementations}
        for name in implementations:
            figures = row[name]
            time_ratio = row["flash"]["seconds"] / figures["seconds"]
            memory_ratio = row["flash"]["temp_mib"] / figures["temp_mib"]
            print(f"{t:>6} {name:>9} {figures['seconds'] * 1e3:>9.1f} {figures['temp_mib']:>9.1f} "
                  f"{time_ratio:>10.2f}x {memory_ratio:>9.3f}x")
        results.append({"seq": t, **{f"{name}_{key}": round(value, 4) for name in implementations
                                     for key, value in row[name].items()}})
    growth = {name: round(results[-1][f"{name}_temp_mib"] / results[0][f"{name}_temp_mib"], 2)
              for name in implementations}
    print(f"temp memory growth from {seqs[0]} to {seqs[-1]} tokens ({seqs[-1] / seqs[0]:g}x): "
          + ", ".join(f"{name} {value}x" for name, value in growth.items()))
    print(json.dumps({"benchmark": "attention", "heads": args.heads, "kv_heads": args.kv_heads,
                      "head_dim": args.head_dim, "dtype": args.dtype, "block": BLOCK, "results": results,
                      "temp_growth": growth}))


if __name__ == "__main__":
    main(sys.argv[1:])
