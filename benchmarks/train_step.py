"""Training-step throughput: llama_jax vs Hugging Face transformers + PyTorch (eager), same model, same batch.

    python benchmarks/train_step.py [--preset tiny] [--batch 16] [--seq 256] [--steps 5]

Both sides run AdamW on a Llama of the preset's shape with float32 parameters; llama_jax computes in its
configured dtype (bfloat16 by default), PyTorch in float32 (its CPU bf16 autocast is slower for training).
Prints a table and ends with one JSON line: tokens/s of each and their ratio (> 1: llama_jax is faster).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from llama_jax import trainer
from llama_jax.config import default_config, model_config, model_section
from llama_jax.metrics import peak_flops_per_second
from llama_jax.model import flops_per_token
from llama_jax.optim import lr_schedule


def time_steps(step, steps: int) -> float:
    """Seconds per step: the median of `steps` timed calls after one warm-up (compile) call."""
    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def jax_step_seconds(cfg, tokens: np.ndarray, steps: int) -> float:
    run = trainer.setup(cfg, Path("/tmp/llama_jax_bench"))
    b, t = tokens.shape
    batch = run.to_global(dict(
        tokens=tokens, targets=np.roll(tokens, -1, axis=1), segment_ids=np.ones((b, t), np.int32),
        positions=np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(), loss_mask=np.ones((b, t), np.float32),
    ))
    with jax.set_mesh(run.mesh):
        state = run.init()
        step_fn = jax.jit(trainer.make_train_step(run.model_def, run.tx, lr_schedule(cfg.optim, 1000), 1),
                          donate_argnums=0)

        def step():
            nonlocal state
            state, metrics = step_fn(state, batch)
            jax.block_until_ready(metrics)

        return time_steps(step, steps)


def torch_step_seconds(cfg, tokens: np.ndarray, steps: int) -> float:
    import torch
    from transformers import LlamaConfig as HFConfig
    from transformers import LlamaForCausalLM

    m = cfg.model
    hf_cfg = HFConfig(
        vocab_size=m.vocab_size, hidden_size=m.dim, intermediate_size=m.ffn_dim, num_hidden_layers=m.n_layers,
        num_attention_heads=m.n_heads, num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim or m.dim // m.n_heads,
        tie_word_embeddings=m.tie_embeddings, rms_norm_eps=m.norm_eps, max_position_embeddings=m.max_seq_len,
    )
    model = LlamaForCausalLM(hf_cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    inputs = torch.tensor(tokens, dtype=torch.long)

    def step():
        loss = model(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return time_steps(step, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()

    cfg = default_config()
    cfg.model = model_section(args.preset, remat="none")
    cfg.data.batch_size, cfg.data.seq_len = args.batch, args.seq
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (args.batch, args.seq), dtype=np.int32)
    tokens_per_step = args.batch * args.seq

    ours = tokens_per_step / jax_step_seconds(cfg, tokens, args.steps)
    torch_tps = tokens_per_step / torch_step_seconds(cfg, tokens, args.steps)
    mfu = ours * flops_per_token(model_config(cfg), args.seq) / peak_flops_per_second()
    print(f"{'':24s}{'tokens/s':>12s}")
    print(f"{'llama_jax (jit)':24s}{ours:12,.0f}   MFU {100 * mfu:.1f}%")
    print(f"{'transformers (eager)':24s}{torch_tps:12,.0f}")
    print(json.dumps({"preset": args.preset, "batch": args.batch, "seq": args.seq, "device": jax.devices()[0].device_kind,
                      "llama_jax_tokens_per_s": round(ours, 1), "transformers_tokens_per_s": round(torch_tps, 1),
                      "ratio": round(ours / torch_tps, 3), "llama_jax_mfu": round(mfu, 4)}))


if __name__ == "__main__":
    main()
