"""Generation speed: KV-cache decoding (llama_jax.generate) against the uncached decoder it replaced, on a small random
model, greedy, same prompts and token budget.

    python benchmarks/generate.py [--batch 4] [--prompt-len 64] [--new-tokens 128] [--dim 256] [--layers 4]

The peer is the previous implementation, kept here: every new token re-runs the model over one fixed buffer (prompt plus
all new tokens, right-padded to a multiple of 64) and reads the logits at each row's position, one jitted step per
token. Both are compiled before timing (compilation is reported apart) and both must produce the same tokens. The
cached decoder costs O(buffer) attention per token instead of O(buffer) whole forward passes, so its advantage grows
with the buffer. Prints tokens/s of each and the ratio; ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.generate import generate_timed
from llama_jax.model import Llama, LlamaConfig


def uncached_generate(model: Llama, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], float]:
    """The previous decoder (greedy): the new tokens of each row and the seconds its steps took after compilation."""
    graphdef, state = nnx.split(model)
    lengths_b = np.array([len(p) for p in prompts], np.int32)
    buffer_len = -(-(lengths_b.max() + max_new_tokens) // 64) * 64
    tokens_bt = np.zeros((len(prompts), buffer_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens_bt[row, : len(prompt)] = prompt

    @functools.partial(jax.jit, donate_argnums=1)
    def step(state, tokens_bt, cur_b):
        model = nnx.merge(graphdef, state)
        last_b1d = jnp.take_along_axis(model.hidden(tokens_bt), (cur_b - 1)[:, None, None], axis=1)
        next_b = jnp.argmax(model.logits(last_b1d)[:, 0], axis=-1).astype(jnp.int32)
        return tokens_bt.at[jnp.arange(tokens_bt.shape[0]), cur_b].set(next_b), cur_b + 1

    jax.block_until_ready(step(state, jnp.asarray(tokens_bt), jnp.asarray(lengths_b)))  # compile
    buffer_bt, cur_b = jnp.asarray(tokens_bt), jnp.asarray(lengths_b)
    start = time.perf_counter()
    for _ in range(max_new_tokens):
        buffer_bt, cur_b = step(state, buffer_bt, cur_b)
        int(cur_b[0])  # the old loop synchronised every step (it checked whether all rows had stopped)
    seconds = time.perf_counter() - start
    out_bt = np.asarray(buffer_bt)
    return [out_bt[row, n: n + max_new_tokens].tolist() for row, n in enumerate(lengths_b)], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64, help="longest prompt; the others are shorter")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--dtype", default="float32", help="compute dtype (CPU: float32 is faster than bfloat16)")
    args = parser.parse_args()
    cfg = LlamaConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=max(args.dim // 64, 1),
                      n_kv_heads=max(args.dim // 256, 1), ffn_dim=3 * args.dim, dtype=args.dtype, max_seq_len=4096)
    with nnx.use_eager_sharding(False):
        model = Llama(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    lengths = np.linspace(args.prompt_len, max(args.prompt_len // 2, 1), args.batch).astype(int)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in lengths]
    print(f"{jax.devices()[0].platform}: model dim {cfg.dim}, {cfg.n_layers} layers, {cfg.n_heads} heads "
          f"({cfg.n_kv_heads} kv), vocab {cfg.vocab_size}, {cfg.dtype}; batch {args.batch}, prompts "
          f"{lengths.min()}-{lengths.max()} tokens, {args.new_tokens} new tokens", flush=True)

    first = generate_timed(model, prompts, args.new_tokens)  # compiles
    cached = generate_timed(model, prompts, args.new_tokens)
    cached_seconds = cached.prefill_seconds + cached.decode_seconds
    uncached_tokens, uncached_seconds = uncached_generate(model, prompts, args.new_tokens)
    new_tokens = args.batch * args.new_tokens
    same = cached.tokens == uncached_tokens
    figures = {
        "batch": args.batch, "new_tokens": new_tokens, "dim": cfg.dim, "layers": cfg.n_layers,
        "cached_tokens_per_s": new_tokens / cached_seconds,
        "cached_prefill_tokens_per_s": cached.prompt_tokens / cached.prefill_seconds,
        "cached_decode_tokens_per_s": (cached.new_tokens - args.batch) / cached.decode_seconds,
        "uncached_tokens_per_s": new_tokens / uncached_seconds,
        "cached_compile_s": first.compile_seconds,
        "same_tokens": same,
    }
    figures["speedup"] = figures["cached_tokens_per_s"] / figures["uncached_tokens_per_s"]
    print(f"cached:   {figures['cached_tokens_per_s']:.0f} new tokens/s end to end ({cached.describe()})")
    print(f"uncached: {figures['uncached_tokens_per_s']:.0f} new tokens/s")
    print(f"ratio cached / uncached: {figures['speedup']:.2f}x; same greedy tokens: {same}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
