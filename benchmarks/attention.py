"""Attention forward + backward on this machine: time and XLA's compiled temporary memory of the reference, xla and
flash implementations (and the machine's fused kernels: cudnn and triton on an NVIDIA GPU, splash on a TPU) at a few
sequence lengths, with flash's ratios to the others.

    python benchmarks/attention.py [--seqs 1024,2048,4096] [--heads 8] [--kv_heads 2] [--head_dim 64] \
        [--batch 1] [--dtype bfloat16] [--repeats 3] [--impls reference,xla,flash,...] [--torch]

`--batch` packed rows of the given length (four documents each) with grouped-query attention. Memory is what XLA's
buffer assignment reserves for temporaries (nothing is allocated to measure it), so the quadratic growth of the dense
kernels' [t, t] scores and the linear growth of flash's [t, 256] tiles show at any length; times (forward alone, and
forward + backward) are the best of `--repeats` runs after one compile-and-warm-up run. `--torch` adds PyTorch's
fused `scaled_dot_product_attention` on the same shapes and dtype, causal over the whole row (its fused CPU kernel
takes no document mask; the work is the same, since flash computes every causal block of a packed row too): the
peer that PyTorch's side of `benchmarks/train_step.py` runs. Ends with one JSON line of the figures.
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


def forward(name: str):
    """The forward pass alone, called with `forward_backward`'s arguments (the output's cotangent unused)."""
    attention = ATTENTION[name]
    return jax.jit(lambda q_btnh, k_btkh, v_btkh, segment_ids_bt, _: attention(q_btnh, k_btkh, v_btkh, segment_ids_bt))


def inputs(t: int, n: int, k: int, h: int, dtype, batch: int = 1) -> tuple:
    rng = np.random.default_rng(0)
    q, key, value, dout = (jnp.asarray(rng.normal(size=(batch, t, heads, h)), dtype) for heads in (n, k, k, n))
    segment_ids = jnp.asarray(np.repeat(np.arange(1, 5), t // 4)[None].repeat(batch, axis=0), jnp.int32)
    return q, key, value, segment_ids, dout


def best_time(run, repeats: int) -> float:
    """The fastest of `repeats` calls of `run`, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(name: str, args: tuple, repeats: int) -> dict:
    compiled = forward_backward(name).lower(*args).compile()
    temp_mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    forward_only = forward(name).lower(*args).compile()
    return {"seconds": best_time(lambda: jax.block_until_ready(compiled(*args)), repeats),
            "forward_seconds": best_time(lambda: jax.block_until_ready(forward_only(*args)), repeats),
            "temp_mib": temp_mib}


def measure_torch(args: tuple, repeats: int) -> dict:
    """PyTorch's fused attention, forward and forward + backward, on the same shapes, dtype and values."""
    import torch
    import torch.nn.functional as F

    dtype = {jnp.bfloat16: torch.bfloat16, jnp.float32: torch.float32}[args[0].dtype.type]
    q_btnh, k_btkh, v_btkh, _, dout_btnh = args
    q, k, v, dout = (torch.tensor(np.asarray(x, np.float32)).to(dtype).transpose(1, 2).contiguous()
                     for x in (q_btnh, k_btkh, v_btkh, dout_btnh))  # PyTorch's layout: [b, heads, t, h]
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def attend():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def forward_backward_torch():
        for x in (q, k, v):
            x.grad = None
        attend().backward(dout)

    with torch.no_grad():
        forward_seconds = best_time(attend, repeats)
    return {"seconds": best_time(forward_backward_torch, repeats), "forward_seconds": forward_seconds}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqs", default="1024,2048,4096", help="comma-separated sequence lengths (multiples of 4)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv_heads", type=int, default=2)
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="rows per call")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--impls", help="comma-separated kernels (default: reference, xla, flash and this machine's "
                                        "fused ones)")
    parser.add_argument("--torch", action="store_true", help="time PyTorch's scaled_dot_product_attention too")
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
    if any(t <= 0 or t % 4 for t in seqs) or args.heads % args.kv_heads or args.batch < 1:
        parser.error("sequence lengths must be positive multiples of 4, --heads a multiple of --kv_heads, and "
                     "--batch at least 1")
    if args.torch:
        try:
            import torch  # noqa: F401
        except ImportError:
            parser.error("--torch needs PyTorch: pip install torch")

    print(f"attention, {args.batch} row(s), {args.heads} heads / {args.kv_heads} KV heads of {args.head_dim}, "
          f"{args.dtype}, flash block {BLOCK}, {jax.devices()[0].platform}; times: forward, forward + backward; "
          "ratios: flash's time over the kernel's (> 1: flash is slower)")
    print(f"{'seq':>6} {'impl':>11} {'fwd ms':>8} {'f+b ms':>8} {'temp MiB':>9} {'flash fwd':>10} {'flash f+b':>10} "
          f"{'flash mem':>10}")
    results = []
    for t in seqs:
        batch = inputs(t, args.heads, args.kv_heads, args.head_dim, jnp.dtype(args.dtype), args.batch)
        row = {name: measure(name, batch, args.repeats) for name in implementations}
        if args.torch:
            row["torch_sdpa"] = measure_torch(batch, args.repeats)
        for name, figures in row.items():
            flash = row["flash"]
            temp, memory_ratio = ((f"{figures['temp_mib']:.1f}", f"{flash['temp_mib'] / figures['temp_mib']:.3f}x")
                                  if "temp_mib" in figures else ("-", "-"))  # PyTorch's is not XLA's to plan
            print(f"{t:>6} {name:>11} {figures['forward_seconds'] * 1e3:>8.1f} {figures['seconds'] * 1e3:>8.1f} "
                  f"{temp:>9} {flash['forward_seconds'] / figures['forward_seconds']:>9.2f}x "
                  f"{flash['seconds'] / figures['seconds']:>9.2f}x {memory_ratio:>10}")
        results.append({"seq": t, **{f"{name}_{key}": round(value, 4) for name, figures in row.items()
                                     for key, value in figures.items()}})
    growth = {name: round(results[-1][f"{name}_temp_mib"] / results[0][f"{name}_temp_mib"], 2)
              for name in implementations}
    print(f"temp memory growth from {seqs[0]} to {seqs[-1]} tokens ({seqs[-1] / seqs[0]:g}x): "
          + ", ".join(f"{name} {value}x" for name, value in growth.items()))
    print(json.dumps({"benchmark": "attention", "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
                      "head_dim": args.head_dim, "dtype": args.dtype, "block": BLOCK, "results": results,
                      "temp_growth": growth}))


if __name__ == "__main__":
    main(sys.argv[1:])
