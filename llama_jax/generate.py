"""Text generation: greedy or temperature + top-k + nucleus (top-p) sampling, as a Python function and a CLI.

This first version has no KV cache: every step runs the model over one fixed-length buffer (prompt plus all new
tokens, right-padded) and reads the logits at each row's current position. Causal attention makes the padding
after that position irrelevant, and the fixed shape means the step compiles once per call instead of once per
token. Rows may have prompts of different lengths; each advances its own position.

    python -m llama_jax.generate --checkpoint PATH --prompt TEXT --max_new_tokens N [--chat] [--temperature T ...]
                                 [--mesh tensor=2,fsdp=4]

PATH is a Hugging Face directory (it has config.json) or a llama_jax training checkpoint / workdir. The prompt is
framed as the checkpoint's tokenizer files say (see `llama_jax.data.tokenizer`); with --chat it is a user message
rendered with the checkpoint's chat template. Stop tokens and sampling settings come from its
generation_config.json unless a flag overrides them (see `llama_jax.generation_config`). With --mesh the model is
read straight into its shards on that device mesh (for one too large for a single device) and generation runs on it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import re
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.convert import open_checkpoint
from llama_jax.data.chat import ChatFormat
from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.model import Llama
from llama_jax.parallel.mesh import MESH_AXES, make_mesh

_BUFFER_MULTIPLE = 64  # buffer lengths are rounded up to this, so calls of similar lengths share one compilation


def generate(
    model: Llama,
    prompt_ids: list[int] | list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_ids: Sequence[int] = (),
    mesh: Mesh | None = None,
) -> list[list[int]]:
    """The new tokens for each prompt (a single prompt is a batch of one), the stop token included when produced.

    `temperature == 0` is greedy decoding. Otherwise the next token is drawn from softmax(logits / temperature)
    restricted, in transformers' order, to the `top_k` most likely tokens (0: no limit) and then to the nucleus: the
    smallest set of most likely tokens whose probability reaches `top_p`. All randomness comes from `seed`, so the
    same call gives the same tokens. A row stops after emitting any of `stop_ids`.

    `mesh` is the mesh a sharded model lives on (e.g. `load_hf(path, mesh=mesh)`): the token buffers are replicated
    over it and every step runs under `jax.set_mesh(mesh)`, so XLA partitions the model's matmuls as its parameters are.
    """
    single = len(prompt_ids) > 0 and isinstance(prompt_ids[0], (int, np.integer))
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    _check_arguments(prompts, max_new_tokens, temperature, top_k, top_p)
    lengths_b = np.array([len(p) for p in prompts], np.int32)
    buffer_len = -(-(lengths_b.max() + max_new_tokens) // _BUFFER_MULTIPLE) * _BUFFER_MULTIPLE
    tokens_bt = np.zeros((len(prompts), buffer_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens_bt[row, : len(prompt)] = prompt

    graphdef, state = nnx.split(model)
    place = functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec()) if mesh is not None else None)
    tokens_bt, cur_b, done_b = place(tokens_bt), place(lengths_b), place(np.zeros(len(prompts), bool))
    key = jax.random.key(seed)
    sampling = dict(greedy=temperature == 0.0, temperature=jnp.float32(max(temperature, 1e-6)), top_k=jnp.int32(top_k),
                    top_p=jnp.float32(top_p), stop_s=jnp.asarray(list(stop_ids) or [-1], jnp.int32))
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        for step in range(max_new_tokens):
            tokens_bt, cur_b, done_b = _step(graphdef, state, tokens_bt, cur_b, done_b, jax.random.fold_in(key, step),
                                             **sampling)
            if bool(done_b.all()):
                break
    tokens_bt, cur_b = np.asarray(tokens_bt), np.asarray(cur_b)
    return [tokens_bt[row, lengths_b[row] : cur_b[row]].tolist() for row in range(len(prompts))]


def _check_arguments(prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token: give a non-empty prompt")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(
            "need max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
            f"{max_new_tokens}, {temperature}, {top_k}, {top_p}"
        )


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy"))
def _step(graphdef, state, tokens_bt, cur_b, done_b, key, greedy, temperature, top_k, top_p, stop_s):
    """Appends one token to every unfinished row at its position `cur_b`; finished rows stay as they are.

    Only the hidden state at each row's last filled position goes through the output projection, so the
    vocabulary-sized matmul costs one position per row, not the whole buffer. `greedy` is static; the sampling
    settings and stop ids are traced, so changing them does not recompile (a new buffer shape does).
    """
    model = nnx.merge(graphdef, state)
    h_btd = model.hidden(tokens_bt)
    last_b1d = jnp.take_along_axis(h_btd, (cur_b - 1)[:, None, None], axis=1)
    logits_bv = model.logits(last_b1d)[:, 0]
    if greedy:
        next_b = jnp.argmax(logits_bv, axis=-1)
    else:
        next_b = sample_top_p(key, keep_top_k(logits_bv / temperature, top_k), top_p)
    rows_b = jnp.arange(tokens_bt.shape[0])
    tokens_bt = tokens_bt.at[rows_b, cur_b].set(jnp.where(done_b, tokens_bt[rows_b, cur_b], next_b))
    return tokens_bt, jnp.where(done_b, cur_b, cur_b + 1), done_b | jnp.isin(next_b, stop_s)


def keep_top_k(logits_bv: jax.Array, top_k: int | jax.Array) -> jax.Array:
    """Logits outside each row's `top_k` largest set to -inf (ties with the k-th kept); `top_k == 0` keeps all."""
    k = jnp.clip(top_k, 1, logits_bv.shape[-1])
    kth_b1 = jnp.take_along_axis(-jnp.sort(-logits_bv, axis=-1), (k - 1)[None, None], axis=-1)
    return jnp.where((logits_bv >= kth_b1) | (top_k == 0), logits_bv, -jnp.inf)


def sample_top_p(key: jax.Array, logits_bv: jax.Array, top_p: float | jax.Array) -> jax.Array:
    """One token per row from the nucleus: the fewest most-likely tokens whose probability mass reaches `top_p`.

    A token is kept when the mass of the tokens strictly more likely than it is still below `top_p`; the most
    likely token is therefore always kept. `top_p >= 1` keeps every token, whatever the float rounding of the sums.
    """
    probs_bv = jax.nn.softmax(logits_bv.astype(jnp.float32), axis=-1)
    sorted_bv = -jnp.sort(-probs_bv, axis=-1)
    mass_before_bv = jnp.cumsum(sorted_bv, axis=-1) - sorted_bv
    n_kept_b = jnp.sum(mass_before_bv < top_p, axis=-1)
    threshold_b1 = jnp.take_along_axis(sorted_bv, n_kept_b[:, None] - 1, axis=-1)
    masked_bv = jnp.where((probs_bv >= threshold_b1) | (top_p >= 1.0), logits_bv, -jnp.inf)
    return jax.random.categorical(key, masked_bv, axis=-1)


# ------------------------------------------------------------------------------------------------------- CLI


def parse_mesh(spec: str) -> dict[str, int]:
    """`--mesh` text such as "tensor=2,fsdp=4" as a mesh config: a size for every axis of `MESH_AXES`, 1 where the
    text names none (one axis may be -1, "the rest", as in `cfg.mesh`)."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    named = set()
    for item in spec.split(","):
        axis, equals, size = (part.strip() for part in item.partition("="))
        if not equals:
            problem = f"{item.strip()!r} is not AXIS=SIZE"
        elif axis not in MESH_AXES:
            problem = f"unknown axis {axis!r}"
        elif axis in named:
            problem = f"axis {axis!r} is given twice"
        elif not re.fullmatch(r"-?\d+", size):
            problem = f"size {size!r} of axis {axis!r} is not an integer"
        else:
            sizes[axis] = int(size)
            named.add(axis)
            continue
        raise ConfigError(f"--mesh {spec!r}: {problem}. Give comma-separated AXIS=SIZE pairs with axes among "
                          f"{', '.join(MESH_AXES)}, e.g. --mesh tensor=2,fsdp=4")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.generate", description=__doc__.split("\n")[0],
        epilog="Unset flags take the checkpoint's own settings: generation_config.json, then config.json, then the "
               "tokenizer and transformers' defaults (greedy; when sampling temperature 1.0, top-k 50, top-p 1.0). "
               "The line printed to stderr before the output says which value came from where.",
    )
    parser.add_argument("--checkpoint", required=True, help="Hugging Face model directory, or a llama_jax workdir/checkpoint")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--chat", action="store_true",
                        help="treat the prompt as a user message, rendered with the checkpoint's chat template "
                             "(its tokenizer_config.json or chat_template.jinja; else the Llama 3 format)")
    parser.add_argument("--system", default=None, help="with --chat: a system message before the prompt")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy; > 0 samples")
    parser.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus: the most likely tokens up to this mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", default=None,
                        help="shard the model over a device mesh, e.g. tensor=2,fsdp=4 (axes data, stage, fsdp, context, "
                             "tensor; unnamed axes are 1, one may be -1 for the rest); default: one device")
    args = parser.parse_args(argv)
    try:
        mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None
        opened = open_checkpoint(args.checkpoint, mesh=mesh)
        tokenizer = opened.tokenizer
        settings = opened.generation.override(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if args.chat:
            messages = [{"role": "system", "content": args.system}] if args.system is not None else []
            messages.append({"role": "user", "content": args.prompt})
            prompt_ids = ChatFormat.from_directory(opened.files, tokenizer).render_ids(messages, add_generation_prompt=True)
        else:
            prompt_ids = tokenizer.encode(args.prompt, allow_special=True)  # as transformers' tokenizer(prompt)
        print(settings.describe(), file=sys.stderr)
        new_ids = generate(opened.model, prompt_ids, args.max_new_tokens, seed=args.seed, stop_ids=settings.stop_ids,
                           mesh=mesh, **settings.sampling)[0]
        continuation = tokenizer.decode([i for i in new_ids if i not in settings.stop_ids])
    except (LlamaJaxError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(continuation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
