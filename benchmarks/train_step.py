"""Training-step throughput on a ladder of model sizes: llama_jax against Hugging Face transformers + PyTorch.

    python benchmarks/train_step.py [--sizes 10m,50m,150m] [--steps 3] [--rounds 1]

Per size, the full step (forward, backward, AdamW update with clipping) of a Llama 3-architecture model with float32
parameters and a 32,000-token vocabulary, on the same batch and with the same thread count, each framework in a
process of its own (so each gets a clean thread pool and its own peak memory):
  llama_jax: jitted, donated step, bfloat16 compute (its default), the loss in chunks of 1,024 tokens, flash
    attention (on this CPU 1.3x faster than XLA's attention at 10m, more at longer sequences, and linear in
    memory), the layers unrolled (`model.scan_layers=False`: 9-23% faster than the layer scan here, compiling up
    to twice as long);
  PyTorch eager: `LlamaForCausalLM` + `torch.optim.AdamW`, float32 and bfloat16 autocast, and the faster of the two
    again with huge pages and with the heap malloc (below); the fastest of the four reported;
  PyTorch compiled: `torch.compile` of the model, in the faster of those two dtypes, with glibc's default malloc,
    huge pages and the heap malloc, the fastest reported (skipped with --no-compile).
llama_jax runs as its command line does, with glibc's `glibc.malloc.hugetlb=1` tunable (llama_jax/huge_pages.py:
each step's large host buffers get transparent huge pages), and again with the heap malloc (`MALLOC`: no mmap, so
that the memory one step frees serves the next instead of being mapped and zeroed again), the faster reported with
its setting. PyTorch's large tensors come from malloc too, so it is offered the same settings.
`--rounds N` runs every one of those measurements N times, in rounds one after the other, and keeps each setting's
fastest: this machine's speed drifts between runs, and not alike for both frameworks, so interleaved repeats are the
fair comparison.
The same run measures XLA's float32 matmul peak on this machine; MFU is the model FLOPs per second over it. It also
times a 2048^3 matmul in float32 and bfloat16 in XLA and in PyTorch, since the ratio follows them: on a CPU with AMX,
PyTorch's oneDNN runs bfloat16 matmuls on it, while XLA does so only for bfloat16 operands with a float32 result
(timed too, "xla_bfloat16_to_float32": the form llama_jax's projections use, `model/matmul.py`).
Per size it prints tokens/s, ratios (> 1: llama_jax is faster), MFU, our compilation time (PyTorch's: the first
step's extra time), our first step's extra time beyond the compilation (the first use of its memory) and each
process's peak resident memory. The last line is one JSON object:
{"machine": {"processor", "cores", "bfloat16_units"}, "peak_gflops", "matmul_gflops": {"xla_float32", "xla_bfloat16",
"xla_bfloat16_to_float32", "torch_float32", "torch_bfloat16"}, "sizes": [{"name", "params", "tokens_per_s",
"torch_tokens_per_s", "torch_compile_tokens_per_s", "ratio", "mfu", "compile_s", "first_step_s", ...}]}, `ratio` =
llama_jax / PyTorch eager. The machine is printed first (`llama_jax/cpu_info.py`): the ratios follow its bfloat16
matmul units, so a table means little without it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from llama_jax.cpu_info import describe_cpu
from llama_jax.huge_pages import environ_with_huge_pages

# name: (model shape, batch, seq_len); about 10M, 50M and 150M parameters at vocabulary 32,000.
SIZES = {
    "10m": (dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_dim=768, tie_embeddings=True), 16, 512),
    "50m": (dict(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=1536, tie_embeddings=True), 8, 1024),
    "150m": (dict(dim=768, n_layers=12, n_heads=12, n_kv_heads=4, ffn_dim=2048, tie_embeddings=False), 2, 2048),
}
VOCAB = 32000
# glibc malloc settings each framework is measured with, the fastest kept: "default"; "huge_pages", what our command
# line sets (llama_jax/huge_pages.py); "heap", huge pages and no mmap at all, in one arena never trimmed, so that
# memory a step frees is reused by the next instead of mapped again, and zeroed, by the kernel: PyTorch eager and
# torch.compile ran 20-30% faster with it at 50m, ours 11%, at up to 2.5 times the peak memory
# (benchmarks/README.md).
MALLOC = ("default", "huge_pages", "heap")
HEAP_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.arena_max=1:glibc.malloc.trim_threshold=68719476736"


def time_steps(step, steps: int) -> tuple[float, float]:
    """(median seconds per step over `steps` calls, seconds of the first call beyond that): the first call compiles."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    median = float(np.median(times))
    return median, max(first - median, 0.0)


def model_cfg(size: str):
    from llama_jax.config import default_config, model_section

    shape, batch, seq = SIZES[size]
    cfg = default_config()
    cfg.model = model_section("tiny", vocab_size=VOCAB, max_seq_len=seq, remat="none", rope_type="default",
                              attention="flash", scan_layers=False, **shape)
    cfg.data.batch_size, cfg.data.seq_len = batch, seq
    # 1,024 tokens of logits at a time: on this CPU the head's products run faster on chunks that fit in its caches,
    # while each chunk adds one pass over the head's weight gradient (measured: benchmarks/README.md).
    cfg.objective.loss_chunk_len = 1024 // batch
    cfg.mesh.data = 1
    return cfg


def tokens_for(size: str) -> np.ndarray:
    _, batch, seq = SIZES[size]
    return np.random.default_rng(0).integers(0, VOCAB, (batch, seq), dtype=np.int32)


def run_llama_jax(size: str, steps: int) -> dict:
    return time_llama_jax(model_cfg(size), tokens_for(size), steps)


def time_llama_jax(cfg, tokens: np.ndarray, steps: int) -> dict:
    """Our jitted, donated training step on one device for one batch of `tokens` [b, t]: median seconds per step,
    the compilation's seconds (lowering and compiling, ahead of the first call), and the first call's seconds
    beyond the median. The last is the first use of the step's memory: on this project's CPU VM the host hands a
    process's fresh huge pages over at about 0.2 GB/s (4 GB: 19-26 s the first time, 0.5 s after), so the first
    step can take longer than the compilation."""
    import tempfile

    import jax

    from llama_jax import train_step, trainer
    from llama_jax.optim import lr_schedule

    b, t = tokens.shape
    run = trainer.setup(cfg, tempfile.mkdtemp(), devices=jax.devices()[:1])
    batch = run.to_global(dict(
        tokens=tokens, targets=np.roll(tokens, -1, axis=1), segment_ids=np.ones((b, t), np.int32),
        positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(), loss_mask=np.ones((b, t), np.float32),
    ))
    with jax.set_mesh(run.mesh):
        state = run.init()
        step_fn = jax.jit(train_step.make_train_step(run.model_def, run.tx, lr_schedule(cfg.optim, 1000), 1,
                                                  loss_chunk_len=cfg.objective.loss_chunk_len), donate_argnums=0)
        start = time.perf_counter()
        compiled = step_fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - start

        def step():
            nonlocal state
            state, metrics = compiled(state, batch)
            jax.block_until_ready(metrics)

        seconds, first_step_s = time_steps(step, steps)
    return {"seconds": seconds, "compile_s": compile_s, "first_step_s": first_step_s}


def run_torch(size: str, steps: int, dtype: str, compiled: bool) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count())
    return time_torch(model_cfg(size).model, tokens_for(size), steps, dtype, compiled)


def time_torch(m, tokens: np.ndarray, steps: int, dtype: str, compiled: bool, device: str = "cpu") -> dict:
    """transformers' `LlamaForCausalLM` of our model section `m`, float32 parameters (under bfloat16 autocast when
    `dtype` is bfloat16) and `torch.optim.AdamW`, one training step on `tokens`, as `time_steps` gives."""
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    hf_cfg = HFConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim or m.dim // m.n_heads,
        tie_word_embeddings=m.tie_embeddings, rms_norm_eps=m.norm_eps, max_position_embeddings=m.max_seq_len,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf_cfg).to(device).train()
    forward = torch.compile(model) if compiled else model
    # the fused (one-kernel) AdamW on a GPU, PyTorch's default elsewhere
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                  fused=True if device.startswith("cuda") else None)
    inputs = torch.tensor(tokens, dtype=torch.long, device=device)

    def step():
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = forward(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # waits for the device

    seconds, compile_s = time_steps(step, steps)
    return {"seconds": seconds, "compile_s": compile_s}


def measure_peak_gflops(dtype: str = "float32", n: int = 2048, repeats: int = 10, result_dtype=None) -> float:
    import jax
    import jax.numpy as jnp

    x = jnp.ones((n, n), dtype)
    matmul = jax.jit(lambda a: jnp.matmul(a, a, preferred_element_type=result_dtype))
    seconds, _ = time_steps(lambda: matmul(x).block_until_ready(), repeats)
    return 2 * n**3 / seconds / 1e9


def measure_torch_gflops(dtype: str, n: int = 2048, repeats: int = 10) -> float:
    import torch

    torch.set_num_threads(os.cpu_count())
    x = torch.ones((n, n), dtype=getattr(torch, dtype))
    seconds, _ = time_steps(lambda: x @ x, repeats)
    return 2 * n**3 / seconds / 1e9


def in_subprocess(*args: str, timeout: float = 3600, script: str = __file__, xla_flags: str = "",
                  malloc: str = "default") -> dict | None:
    """One measurement in a fresh process running `script --child ARGS` with `xla_flags` only (not the caller's:
    the test suite's fake devices), and glibc's malloc as `malloc` says (`MALLOC`, where this C library has the
    tunables); its result and peak resident memory, or None when it failed (its last lines of errors printed)."""
    env = dict(os.environ, XLA_FLAGS=xla_flags, TOKENIZERS_PARALLELISM="false")
    env.pop("GLIBC_TUNABLES", None)
    if malloc != "default":
        env = environ_with_huge_pages(env) or env
    if malloc == "heap" and "GLIBC_TUNABLES" in env:
        env["GLIBC_TUNABLES"] += ":" + HEAP_TUNABLES
    proc = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    if proc.returncode != 0:
        errors = "\n    ".join(proc.stderr.strip().splitlines()[-3:]) or f"exit status {proc.returncode}"
        print(f"  ({' '.join(args)} failed:\n    {errors})")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(args: list[str]) -> None:
    kind, size, steps = args[0], args[1], int(args[2])
    if kind == "peak":
        result = {f"xla_{dtype}": measure_peak_gflops(dtype) for dtype in ("float32", "bfloat16")}
        result["xla_bfloat16_to_float32"] = measure_peak_gflops("bfloat16", result_dtype="float32")
    elif kind == "torch_peak":
        result = {f"torch_{dtype}": measure_torch_gflops(dtype) for dtype in ("float32", "bfloat16")}
    elif kind == "jax":
        result = run_llama_jax(size, steps)
    else:
        _, dtype, mode = kind.split(":")
        result = run_torch(size, steps, dtype, compiled=mode == "compile")
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10m,50m,150m")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure every setting this many times, in rounds, and keep each one's fastest")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    from llama_jax.config import model_config
    from llama_jax.model import flops_per_token, param_count

    machine = describe_cpu()
    print(f"Machine: {machine['processor']}, {machine['cores']} cores, bfloat16 matmul units: "
          f"{', '.join(machine['bfloat16_units']) or 'none'}")
    matmuls = {**in_subprocess("peak", "-", "0"), **(in_subprocess("torch_peak", "-", "0") or {})}
    matmuls.pop("peak_rss_mb", None)
    peak = matmuls["xla_float32"]
    print(f"XLA float32 matmul peak: {peak:.0f} GFLOP/s; 2048^3 matmuls: "
          + ", ".join(f"{name.replace('_', ' ')} {gflops:.0f}" for name, gflops in matmuls.items()) + " GFLOP/s")
    rows = []
    for size in args.sizes.split(","):
        cfg = model_cfg(size)
        tokens = cfg.data.batch_size * cfg.data.seq_len
        ours, eager, compiled_runs = {}, {}, {}
        for _ in range(args.rounds):  # whole rounds one after the other: a drift of the machine reaches every setting
            for malloc in MALLOC[1:]:
                keep_faster(ours, malloc, in_subprocess("jax", size, str(args.steps), malloc=malloc))
            for dtype in ("float32", "bfloat16"):
                keep_faster(eager, (dtype, "default"), in_subprocess(f"torch:{dtype}:eager", size, str(args.steps)))
            best_dtype = fastest(eager)[0][0]
            for malloc in MALLOC[1:]:
                keep_faster(eager, (best_dtype, malloc),
                            in_subprocess(f"torch:{best_dtype}:eager", size, str(args.steps), malloc=malloc))
            for malloc in () if args.no_compile else MALLOC:
                keep_faster(compiled_runs, (best_dtype, malloc),
                            in_subprocess(f"torch:{best_dtype}:compile", size, str(args.steps), malloc=malloc))
        ours_malloc, ours = fastest(ours)
        eager_setting, eager_run = fastest(eager)
        best_dtype = eager_setting[0]
        compiled = fastest(compiled_runs)
        row = {
            "name": size, "params": param_count(model_config(cfg)), "batch": cfg.data.batch_size,
            "seq": cfg.data.seq_len, "tokens_per_s": tokens / ours["seconds"],
            "torch_tokens_per_s": tokens / eager_run["seconds"], "torch_dtype": best_dtype, "malloc": ours_malloc,
            "torch_malloc": eager_setting[1], "torch_compile_malloc": compiled[0][1] if compiled else None,
            "torch_compile_tokens_per_s": tokens / compiled[1]["seconds"] if compiled else None,
            "mfu": tokens / ours["seconds"] * flops_per_token(model_config(cfg), cfg.data.seq_len) / (peak * 1e9),
            "compile_s": ours["compile_s"], "first_step_s": ours["first_step_s"],
            "torch_compile_s": compiled[1]["compile_s"] if compiled else None,
            "peak_rss_mb": ours["peak_rss_mb"], "torch_peak_rss_mb": eager_run["peak_rss_mb"],
        }
        row["ratio"] = row["tokens_per_s"] / row["torch_tokens_per_s"]
        row["ratio_vs_compile"] = row["tokens_per_s"] / row["torch_compile_tokens_per_s"] if compiled else None
        rows.append(row)
        print(f"{size}: {row['params'] / 1e6:.0f}M params, {row['batch']}x{row['seq']} tokens | llama_jax "
              f"{row['tokens_per_s']:,.0f} tok/s ({_malloc_words(row['malloc'])}, MFU {row['mfu']:.0%}, compile "
              f"{row['compile_s']:.1f} s, first step "
              f"+{row['first_step_s']:.1f} s, "
              f"{row['peak_rss_mb']:,.0f} MB) | torch eager {torch_setting(row)} {row['torch_tokens_per_s']:,.0f} "
              f"({row['torch_peak_rss_mb']:,.0f} MB) | torch.compile {compiled_figure(row)} | ratio {row['ratio']:.2f}x")
    print("\nThe table for README.md's Performance section:\n" + readme_table(rows))
    print(json.dumps({"machine": machine, "peak_gflops": peak, "matmul_gflops": matmuls, "sizes": rows}))


def keep_faster(runs: dict, setting, result: dict | None) -> None:
    """Records `result` as `setting`'s run unless that setting has a faster one (a failed run, None, never wins)."""
    if result is not None and (runs.get(setting) is None or result["seconds"] < runs[setting]["seconds"]):
        runs[setting] = result
    runs.setdefault(setting, None)


def fastest(runs: dict) -> tuple | None:
    """The setting (a malloc setting, or (dtype, malloc setting)) of the fastest run that succeeded, and its result
    (None: none did)."""
    return min(((setting, run) for setting, run in runs.items() if run), key=lambda item: item[1]["seconds"],
               default=None)


def _malloc_words(malloc: str) -> str:
    return {"default": "", "huge_pages": "huge pages", "heap": "heap malloc"}[malloc]


def torch_setting(row: dict) -> str:
    return ", ".join(filter(None, [row["torch_dtype"], _malloc_words(row["torch_malloc"])]))


def compiled_figure(row: dict) -> str:
    if row["torch_compile_tokens_per_s"] is None:
        return "-"
    words = _malloc_words(row["torch_compile_malloc"])
    return f"{row['torch_compile_tokens_per_s']:,.0f}" + (f" ({words})" if words else "")


def readme_table(rows: list[dict]) -> str:
    def figure(value, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    return markdown_table(
        ["size", "params", "batch x seq", "llama_jax tokens/s", "MFU", "compile", "first step", "peak RSS", "PyTorch eager",
         "torch.compile", "ours / eager", "ours / compile"],
        [[row["name"], f"{row['params'] / 1e6:.0f}M", f"{row['batch']} x {row['seq']:,}",
          f"{row['tokens_per_s']:,.0f}" + (" (heap malloc)" if row["malloc"] == "heap" else ""),
          f"{row['mfu']:.0%}", f"{row['compile_s']:.1f} s", f"+{row['first_step_s']:.1f} s", f"{row['peak_rss_mb'] / 1e3:.1f} GB",
          f"{row['torch_tokens_per_s']:,.0f} ({torch_setting(row)})", compiled_figure(row),
          f"{row['ratio']:.2f}x", figure(row["ratio_vs_compile"], ".2f") + ("x" if row["ratio_vs_compile"] else "")]
         for row in rows], "lrlrrrrrrrrr")


def markdown_table(headers: list[str], rows: list[list[str]], align: str) -> str:
    """A Markdown table; `align` has one letter per column, l(eft) or r(ight)."""
    lines = [headers, ["---:" if a == "r" else "---" for a in align], *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


if __name__ == "__main__":
    main()
