"""Training-step throughput and MFU on one NVIDIA GPU: llama_jax against transformers + PyTorch on the same GPU.

    python benchmarks/gpu.py [--sizes 1b,8b-4l] [--attention cudnn[,triton]] [--steps 10] [--remat dots_no_batch]

Sizes (bfloat16 compute; float32 parameters and AdamW state, as in training):
  1b     Llama 3.2-1B, 2 x 8,192 tokens;
  8b-4l  Llama 3.1-8B's shape with 4 of its 32 layers, 2 x 4,096 tokens;
  smoke  the "debug" preset, 2 x 256 tokens: for machines without a GPU (the test suite runs it so that this script
         keeps working; its figures mean nothing).
First, the GPU-only checks that the test suite cannot run: each attention kernel (cuDNN, the Pallas Triton kernel,
flash, XLA) against the reference attention on packed documents in bfloat16, outputs and q/k/v gradients, their
largest error relative to the largest entry (off a GPU, cuDNN is skipped and Triton runs in Pallas's interpreter).
Then, per size, in a process of its own each:
  llama_jax: the jitted, donated training step (train_step.make_train_step: forward, backward, AdamW with clipping),
    once per attention kernel;
  PyTorch: `LlamaForCausalLM` with SDPA attention (its flash kernel for causal bfloat16), float32 parameters under
    bfloat16 autocast, fused AdamW; eager and `torch.compile` (skipped with --no-compile).
MFU is model FLOPs per second (`model.flops_per_token`: 6 x matmul parameters + full, unmasked attention products)
over the GPU's published dense bfloat16 peak (H100/H200 SXM 989 TFLOP/s; --peak-tflops for others); the same run
times an 8192^3 bfloat16 matmul in XLA as the ceiling seen in practice. The last line is one JSON object:
{"device", "peak_tflops", "matmul_tflops", "checks": {kernel: {"out", "dq", "dk", "dv"} | "skipped: ..."},
 "sizes": [{"name", "params", "batch", "seq", "attention", "tokens_per_s", "mfu", "compile_s", "peak_memory_gb",
 "torch_tokens_per_s", "torch_compile_tokens_per_s", "ratio_vs_compile"}]}.

On a GPU host: `pip install -e ".[gpu]"`; torch and transformers for the PyTorch side.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import numpy as np

from train_step import in_subprocess, markdown_table, time_llama_jax, time_steps, time_torch

# name: (preset, overrides, batch, seq_len)
SIZES = {
    "1b": ("llama3.2-1b", {}, 2, 8192),
    "8b-4l": ("llama3.1-8b", {"n_layers": 4}, 2, 4096),
    "smoke": ("debug", {}, 2, 256),
}
# dense bfloat16 TFLOP/s by device kind (vendor datasheets, without sparsity)
PUBLISHED_PEAK = {"H100": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0,
                  "L4": 121.0, "B200": 2250.0}
CHECK_TOLERANCE = 1.5e-2  # of the largest entry: tests/test_flash.py's bfloat16 bound for two correct kernels


def model_cfg(size: str, attention: str, remat: str):
    from llama_jax.config import default_config, model_section

    name, overrides, batch, seq = SIZES[size]
    cfg = default_config()
    cfg.model = model_section(name, attention=attention, remat=remat, **overrides)
    cfg.data.batch_size, cfg.data.seq_len = batch, seq
    cfg.mesh.data = 1
    return cfg


def tokens_for(size: str, vocab: int) -> np.ndarray:
    _, _, batch, seq = SIZES[size]
    return np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int32)


def check_kernels() -> dict:
    """Each kernel's outputs and q/k/v gradients against the reference attention's: the largest error over the
    largest entry, on two rows of packed documents (the second row one document), 8 query heads on 2 KV heads."""
    import jax
    import jax.numpy as jnp

    from llama_jax.errors import ConfigError
    from llama_jax.model.attention import ATTENTION, reference_attention
    from llama_jax.model.fused_attention import triton_attention

    on_gpu = jax.default_backend() == "gpu"
    b, t, n, k, h = 2, 1024 if on_gpu else 256, 8, 2, 64
    rng = np.random.default_rng(0)
    q, kk, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.bfloat16) for heads in (n, k, k))
    cotangent = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.bfloat16)
    segments = np.ones((b, t), np.int32)
    segments[0, t // 3:] = 2
    segments[0, t // 2:] = 3
    kernels = {**ATTENTION, "triton": ATTENTION["triton"] if on_gpu else
               lambda q, k, v, s: triton_attention(q, k, v, s, interpret=True)}

    inputs = (q, kk, v, jnp.asarray(segments), cotangent)

    @functools.partial(jax.jit, static_argnums=0)
    def outputs_and_grads(attention, q, k, v, segments, cotangent):
        """The inputs are arguments, not captured constants: XLA would fold the whole computation at compile time."""
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, segments), q, k, v)
        return (out, *vjp(cotangent))

    expected = outputs_and_grads(reference_attention, *inputs)
    results = {}
    for name in ("cudnn", "triton", "flash", "xla"):
        try:
            got = outputs_and_grads(kernels[name], *inputs)
        except ConfigError as error:
            results[name] = f"skipped: {error}"
            continue
        results[name] = {
            label: float(np.abs(np.asarray(g, np.float32) - np.asarray(e, np.float32)).max()
                         / np.abs(np.asarray(e, np.float32)).max())
            for label, g, e in zip(("out", "dq", "dk", "dv"), got, expected)}
    return results


def measure_matmul_tflops(n: int) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.bfloat16)
    matmul = jax.jit(lambda a: a @ a)
    seconds, _ = time_steps(lambda: matmul(x).block_until_ready(), 10)
    return 2 * n**3 / seconds / 1e12


def device_info() -> dict:
    import jax

    device = jax.devices()[0]
    n = 8192 if jax.default_backend() == "gpu" else 1024
    return {"device": device.device_kind, "backend": jax.default_backend(), "matmul_n": n,
            "matmul_tflops": measure_matmul_tflops(n)}


def run_llama_jax(size: str, steps: int, attention: str, remat: str) -> dict:
    import jax

    cfg = model_cfg(size, attention, remat)
    result = time_llama_jax(cfg, tokens_for(size, cfg.model.vocab_size), steps)
    stats = jax.devices()[0].memory_stats() or {}
    result["peak_memory_gb"] = stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None
    return result


def run_torch(size: str, steps: int, compiled: bool) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = model_cfg(size, "xla", "none").model
    result = time_torch(m, tokens_for(size, m.vocab_size), steps, "bfloat16", compiled, device)
    result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
    return result


def child(args: list[str]) -> None:
    kind, size, steps = args[0], args[1], int(args[2])
    if kind == "check":
        result = check_kernels()
    elif kind == "device":
        result = device_info()
    elif kind.startswith("jax:"):
        _, attention, remat = kind.split(":")
        result = run_llama_jax(size, steps, attention, remat)
    else:
        result = run_torch(size, steps, compiled=kind == "torch:compile")
    print(json.dumps(result))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1b,8b-4l")
    parser.add_argument("--attention", default="cudnn", help="llama_jax attention kernels to time (e.g. cudnn,triton)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--remat", default="dots_no_batch", help="llama_jax's model.remat")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bfloat16 peak, when not in the table")
    parser.add_argument("--xla-flags", default="", help="XLA_FLAGS for llama_jax's processes")
    args = parser.parse_args()
    from llama_jax.config import model_config
    from llama_jax.model import flops_per_token, param_count

    def run(*child_args: str) -> dict | None:
        return in_subprocess(*child_args, script=__file__, xla_flags=args.xla_flags)

    info = run("device", "-", "0")
    if info is None:
        sys.exit("could not start JAX on this machine (its error is above)")
    peak = args.peak_tflops or next((tflops for kind, tflops in sorted(PUBLISHED_PEAK.items(), key=lambda i: -len(i[0]))
                                     if kind in info["device"]), None)
    if peak is None:
        print(f"no published peak known for {info['device']!r}: MFU is against the measured matmul "
              "(give --peak-tflops)")
        peak = info["matmul_tflops"]
    print(f"{info['device']} ({info['backend']}): dense bfloat16 peak {peak:.3g} TFLOP/s, XLA {info['matmul_n']}^3 "
          f"bfloat16 matmul {info['matmul_tflops']:.3g} TFLOP/s")
    checks = run("check", "-", "0") or {"all": "failed to run"}
    failed = [name for name, errors in checks.items()
              if errors == "failed to run" or (isinstance(errors, dict) and max(errors.values()) > CHECK_TOLERANCE)]
    for name, errors in checks.items():
        verdict = errors if isinstance(errors, str) else ", ".join(f"{k} {e:.1e}" for k, e in errors.items()) + (
            f" FAILS the {CHECK_TOLERANCE} bound" if name in failed else " ok")
        print(f"  {name} vs reference (bfloat16, of the largest entry): {verdict}")

    rows = []
    for size in args.sizes.split(","):
        cfg = model_cfg(size, "xla", args.remat)
        tokens = cfg.data.batch_size * cfg.data.seq_len
        flops = flops_per_token(model_config(cfg), cfg.data.seq_len)
        eager = run("torch:eager", size, str(args.steps))
        compiled = None if args.no_compile else run("torch:compile", size, str(args.steps))
        for attention in args.attention.split(","):
            ours = run(f"jax:{attention}:{args.remat}", size, str(args.steps))
            if ours is None:
                continue
            row = {
                "name": size, "params": param_count(model_config(cfg)), "batch": cfg.data.batch_size,
                "seq": cfg.data.seq_len, "attention": attention, "remat": args.remat,
                "tokens_per_s": tokens / ours["seconds"], "mfu": tokens / ours["seconds"] * flops / (peak * 1e12),
                "compile_s": ours["compile_s"], "peak_memory_gb": ours["peak_memory_gb"],
                "torch_tokens_per_s": tokens / eager["seconds"] if eager else None,
                "torch_compile_tokens_per_s": tokens / compiled["seconds"] if compiled else None,
                "torch_mfu": tokens / compiled["seconds"] * flops / (peak * 1e12) if compiled else None,
            }
            row["ratio_vs_compile"] = row["tokens_per_s"] / row["torch_compile_tokens_per_s"] if compiled else None
            row["ratio"] = row["tokens_per_s"] / row["torch_tokens_per_s"] if eager else None
            rows.append(row)
            torch_runs = (("torch eager", "torch_tokens_per_s"), ("torch.compile", "torch_compile_tokens_per_s"))
            torch_text = " | ".join(f"{label} {row[key]:,.0f} tok/s" for label, key in torch_runs if row[key])
            print(f"{size} ({row['params'] / 1e9:.2f}B, {row['batch']}x{row['seq']}) {attention}: llama_jax "
                  f"{row['tokens_per_s']:,.0f} tok/s, MFU {row['mfu']:.1%}, compile {row['compile_s']:.1f} s | "
                  f"{torch_text}" + (f" | ours / compile {row['ratio_vs_compile']:.2f}x" if compiled else ""))
    print("\nThe table for README.md's Performance section:\n" + readme_table(rows))
    print(json.dumps({"device": info["device"], "peak_tflops": peak, "matmul_tflops": info["matmul_tflops"],
                      "checks": checks, "sizes": rows}))
    if failed:
        sys.exit(f"attention kernels that disagree with the reference: {', '.join(failed)}")


def readme_table(rows: list[dict]) -> str:
    def figure(value, spec: str, suffix: str = "") -> str:
        return "-" if value is None else format(value, spec) + suffix

    return markdown_table(
        ["size", "params", "batch x seq", "attention", "llama_jax tokens/s", "MFU", "compile", "peak memory",
         "PyTorch eager", "torch.compile", "torch.compile MFU", "ours / compile"],
        [[row["name"], f"{row['params'] / 1e9:.2f}B", f"{row['batch']} x {row['seq']:,}", row["attention"],
          f"{row['tokens_per_s']:,.0f}", f"{row['mfu']:.1%}", f"{row['compile_s']:.1f} s",
          figure(row["peak_memory_gb"], ".1f", " GB"), figure(row["torch_tokens_per_s"], ",.0f"),
          figure(row["torch_compile_tokens_per_s"], ",.0f"), figure(row["torch_mfu"], ".1%"),
          figure(row["ratio_vs_compile"], ".2f", "x")] for row in rows], "lrllrrrrrrrr")


if __name__ == "__main__":
    main()
