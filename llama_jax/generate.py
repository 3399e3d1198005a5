"""Text generation with a KV cache: greedy or temperature + top-k + nucleus (top-p) sampling, as a function and a CLI.

The prompts are left-padded to one length and run through the model once (prefill), filling a `KVCache` that holds
every layer's keys and values (kv heads only, compute dtype). Then one token per row per step runs against the cache
inside a single jitted `lax.while_loop`, until every row has produced a stop id or the token budget is spent. Each row
keeps its own rotary positions (its slot minus its padding) and never attends to padding, so a batch of prompts of
different lengths decodes as each prompt would alone. Shapes are bucketed (prompts to a multiple of 16 tokens, the
cache to a multiple of 64 slots), so a new call compiles only when its (batch, prompt, cache) bucket is new.

    python -m llama_jax.generate --checkpoint PATH --prompt TEXT [--prompt TEXT ...] [--prompts_file FILE]
                                 --max_new_tokens N [--chat] [--temperature T ...] [--mesh tensor=2,fsdp=4] [--fp8]

PATH is a Hugging Face directory (it has config.json) or a llama_jax training checkpoint / workdir. The prompt is
framed as the checkpoint's tokenizer files say (see `llama_jax.data.tokenizer`); with --chat it is a user message
rendered with the checkpoint's chat template. Stop tokens and sampling settings come from its
generation_config.json unless a flag overrides them (see `llama_jax.generation_config`). With --mesh the model is
read straight into its shards on that device mesh (for one too large for a single device) and generation runs on it,
the cache sharded as the logical-axis rules of `parallel/mesh.py` place its batch and kv_heads axes. With --fp8 the
linear layers' weights are stored as FP8 (`llama_jax.quantize`). One prompt prints its continuation; several print
JSON Lines {"prompt": ..., "completion": ...}. Token rates go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.convert import open_checkpoint
from llama_jax.data.chat import ChatFormat
from llama_jax.data.documents import RECORD_SUFFIXES, NotUtf8, json_line, read_records
from llama_jax.errors import ConfigError, DataError, LlamaJaxError
from llama_jax.memory import report_out_of_memory
from llama_jax.model import Llama, LlamaConfig
from llama_jax.model.kv_cache import KVCache
from llama_jax.parallel.mesh import MESH_AXES, logical_to_spec, make_mesh
from llama_jax.quantize import logit_error, quantize_fp8
from llama_jax.workdir import as_path, not_a_file, read_utf8


PROMPT_MULTIPLE = 16  # prompts are left-padded to a multiple of this ...
BUFFER_MULTIPLE = 64  # ... and the cache (prompt plus new tokens) rounded up to a multiple of this
_EXECUTABLES: dict = {}  # (function, static settings, argument shapes, dtypes, shardings) -> compiled executable


@dataclasses.dataclass(frozen=True)
class Generation:
    """The new tokens of each row (stop token included when produced) and what producing them cost."""

    tokens: list[list[int]]
    prompt_tokens: int  # real prompt tokens prefilled (padding not counted)
    new_tokens: int  # tokens emitted over all rows; the first of each row comes from the prefill
    compile_seconds: float  # compilations this call needed (0 when its bucket was compiled before)
    prefill_seconds: float
    decode_seconds: float
    compiled: int  # executables compiled by this call

    def describe(self) -> str:
        """One line of token rates for the console (compilation excluded, reported apart)."""
        if not self.new_tokens:
            return f"nothing generated (max_new_tokens 0): the {self.prompt_tokens} prompt tokens were not run"
        decoded = self.new_tokens - len(self.tokens)
        return (f"prefill: {self.prompt_tokens} tokens in {self.prefill_seconds:.3f} s "
                f"({self.prompt_tokens / max(self.prefill_seconds, 1e-9):.1f} tokens/s); decode: {decoded} tokens in "
                f"{self.decode_seconds:.3f} s ({decoded / max(self.decode_seconds, 1e-9):.1f} tokens/s); "
                f"compilation: {self.compile_seconds:.2f} s")


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
    smallest set of most likely tokens whose probability reaches `top_p`. All randomness comes from `seed` (token i of
    every row uses `fold_in(key(seed), i)`), so the same call gives the same tokens. A row stops after emitting any of
    `stop_ids`; the others go on.

    `mesh` is the mesh a sharded model lives on (e.g. `load_hf(path, mesh=mesh)`): the prompts and the KV cache are
    placed by the logical-axis rules of `parallel/mesh.py` (batch over data and fsdp, kv heads over tensor, where they
    divide) and every step runs under `jax.set_mesh(mesh)`, so XLA partitions the model's matmuls as its parameters are.
    """
    return generate_timed(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          seed=seed, stop_ids=stop_ids, mesh=mesh).tokens


def generate_timed(
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
) -> Generation:
    """`generate`, with the time spent compiling, prefilling and decoding (each measured to completion)."""
    single = len(prompt_ids) > 0 and isinstance(prompt_ids[0], (int, np.integer))
    prompts = [list(prompt_ids)] if single else [list(p) for p in prompt_ids]
    _check_arguments(prompts, max_new_tokens, temperature, top_k, top_p, seed)
    _check_token_ids(prompts, model.cfg.vocab_size)
    _check_context(max(len(p) for p in prompts), max_new_tokens, model.cfg.max_seq_len)
    lengths_b = np.array([len(p) for p in prompts], np.int32)
    if max_new_tokens == 0:
        return Generation([[] for _ in prompts], int(lengths_b.sum()), 0, 0.0, 0.0, 0.0, 0)
    prompt_len = _round_up(int(lengths_b.max()), PROMPT_MULTIPLE)
    max_len = _round_up(prompt_len + max_new_tokens, BUFFER_MULTIPLE)
    tokens_bt = np.zeros((len(prompts), prompt_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens_bt[row, prompt_len - len(prompt):] = prompt

    graphdef, state = nnx.split(model)
    shardings = cache_shardings(model.cfg, len(prompts), max_len, mesh) if mesh is not None else None
    place = functools.partial(jax.device_put, device=NamedSharding(mesh, PartitionSpec()) if mesh is not None else None)
    tokens_bt = place(tokens_bt) if mesh is None else jax.device_put(tokens_bt, _sharding(mesh, ("batch", None),
                                                                                         tokens_bt.shape))
    start_b = place(prompt_len - lengths_b)
    sampling = (place(np.float32(max(temperature, 1e-6))), place(np.int32(top_k)), place(np.float32(top_p)),
                place(np.asarray(list(stop_ids) or [-1], np.int32)))
    key = place(jax.random.key(seed))
    static = dict(graphdef=graphdef, greedy=temperature == 0.0, shardings=shardings)
    compiled_before = len(_EXECUTABLES)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        compile_start = time.perf_counter()
        prefill = _executable(_prefill, dict(static, max_len=max_len), state, tokens_bt, start_b, key, *sampling)
        compile_seconds = time.perf_counter() - compile_start
        prefill_start = time.perf_counter()
        cache, first_b = jax.block_until_ready(prefill(state, tokens_bt, start_b, key, *sampling))
        prefill_seconds = time.perf_counter() - prefill_start

        args = (state, cache, first_b, place(np.int32(max_new_tokens)), key, *sampling)
        compile_start = time.perf_counter()
        decode = _executable(_decode, static, *args)
        compile_seconds += time.perf_counter() - compile_start
        decode_start = time.perf_counter()
        out_bn, count_b = jax.block_until_ready(decode(*args))
        decode_seconds = time.perf_counter() - decode_start
    out_bn, count_b = np.asarray(out_bn), np.asarray(count_b)
    tokens = [out_bn[row, : count_b[row]].tolist() for row in range(len(prompts))]
    return Generation(tokens, int(lengths_b.sum()), int(count_b.sum()), compile_seconds, prefill_seconds,
                      decode_seconds, len(_EXECUTABLES) - compiled_before)


def cache_shardings(cfg: LlamaConfig, batch: int, max_len: int, mesh: Mesh) -> KVCache:
    """Where each field of a KV cache lives on `mesh`, from its logical axis names (`KVCache.logical_axes`) and the
    rules of `parallel/mesh.py`, as the parameters' are; an axis its mesh axes do not divide stays whole."""
    shapes = KVCache(*(2 * [(cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)]), (batch,), ())
    return jax.tree.map(functools.partial(_sharding, mesh), KVCache.logical_axes(), shapes,
                        is_leaf=lambda x: isinstance(x, tuple))


def _sharding(mesh: Mesh, names: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    spec = logical_to_spec(names)
    sizes = [math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())) for axes in spec]
    return NamedSharding(mesh, PartitionSpec(*(axes if dim % size == 0 else None
                                               for dim, axes, size in zip(shape, spec, sizes))))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _check_context(prompt_tokens: int, max_new_tokens: int, max_seq_len: int) -> None:
    """Positions past the model's context were never trained (transformers only warns; the output degrades)."""
    if prompt_tokens + max_new_tokens > max_seq_len:
        fix = (f"lower max_new_tokens to at most {max_seq_len - prompt_tokens}" if prompt_tokens < max_seq_len
               else "shorten the prompt")
        raise ConfigError(f"the longest prompt ({prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                          f"the model's context (model.max_seq_len {max_seq_len}): {fix}")


def _check_arguments(prompts: list[list[int]], max_new_tokens: int, temperature: float, top_k: int, top_p: float,
                     seed: int) -> None:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token: give a non-empty prompt")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ConfigError(
            "need max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
            f"{max_new_tokens}, {temperature}, {top_k}, {top_p}"
        )
    if not 0 <= seed < 2**32:  # jax.random.key keeps 32 bits (seed 2**32 drew what 0 did; past 2**63 an OverflowError)
        raise ConfigError(f"seed {seed} is out of range: give a seed from 0 to {2**32 - 1}")


def _check_token_ids(prompts: list[list[int]], vocab_size: int) -> None:
    """An id past the embedding gathered NaN (and a negative one the last row): the model then generated zeros."""
    outside = sorted({int(t) for p in prompts for t in p if not 0 <= t < vocab_size})
    if outside:
        raise ConfigError(f"prompt token ids {outside[:5]} are outside the model's vocabulary [0, {vocab_size}): "
                          "encode the prompt with the checkpoint's own tokenizer")


def _executable(fn: Callable, static: dict, *args) -> Callable:
    """`fn` with its `static` keyword arguments bound, compiled for these arguments' shapes, dtypes and shardings
    on first use and reused after: compilation is timed apart from running, and happens once per bucket."""
    leaves, treedef = jax.tree.flatten(args)
    signature = tuple((x.shape, x.dtype, getattr(x, "sharding", None)) for x in leaves)
    key = (fn, tuple(sorted(static.items(), key=lambda item: item[0])), treedef, signature)
    if key not in _EXECUTABLES:
        _EXECUTABLES[key] = jax.jit(functools.partial(fn, **static)).lower(*args).compile()
    return _EXECUTABLES[key]


def _prefill(state, tokens_bt, start_b, key, temperature, top_k, top_p, stop_s, *, graphdef, greedy, shardings,
             max_len):
    """The prompts (left-padded, the first real token of row b at `start_b[b]`) into a new cache of `max_len`
    slots, and the first new token of each row."""
    model = nnx.merge(graphdef, state)
    cache = _constrain(KVCache.create(model.cfg, start_b, max_len), shardings)
    h_btd, cache = model.extend(tokens_bt, cache)
    logits_bv = model.logits(h_btd[:, -1:])[:, 0]
    return _constrain(cache, shardings), _choose(logits_bv, jax.random.fold_in(key, 0), greedy, temperature, top_k, top_p)


def _decode(state, cache, first_b, max_new, key, temperature, top_k, top_p, stop_s, *, graphdef, greedy, shardings):
    """Tokens 1 .. max_new - 1 of every row, one step per token in a `lax.while_loop` that ends early once every
    row has emitted a stop id. Returns the tokens [b, max_len] (token i in column i) and the count kept per row.

    `greedy` and the shapes are static; sampling settings, stop ids and `max_new` are traced, so changing them does
    not recompile. The parameters ride in the loop's carry, unchanged: NNX builds modules only from values of the trace it runs in."""
    b = first_b.shape[0]
    out_bn = jnp.zeros((b, cache.max_len), jnp.int32).at[:, 0].set(first_b)
    done_b = jnp.isin(first_b, stop_s)

    def unfinished(carry) -> jax.Array:
        i, _, _, _, _, done_b, _ = carry
        return (i < max_new) & ~jnp.all(done_b)

    def step(carry):
        i, cache, last_b, out_bn, count_b, done_b, state = carry
        model = nnx.merge(graphdef, state)
        h_btd, cache = model.extend(last_b[:, None], cache)
        next_b = _choose(model.logits(h_btd)[:, 0], jax.random.fold_in(key, i), greedy, temperature, top_k, top_p)
        out_bn = jax.lax.dynamic_update_slice(out_bn, next_b[:, None], (0, i))
        count_b = jnp.where(done_b, count_b, count_b + 1)
        done_b = done_b | jnp.isin(next_b, stop_s)
        return i + 1, _constrain(cache, shardings), next_b, out_bn, count_b, done_b, state

    carry = (jnp.int32(1), cache, first_b, out_bn, jnp.ones(b, jnp.int32), done_b, state)
    _, _, _, out_bn, count_b, _, _ = jax.lax.while_loop(unfinished, step, carry)
    return out_bn, count_b


def _choose(logits_bv, key, greedy: bool, temperature, top_k, top_p) -> jax.Array:
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    return sample_top_p(key, keep_top_k(logits_bv / temperature, top_k), top_p).astype(jnp.int32)


def _constrain(cache: KVCache, shardings: KVCache | None) -> KVCache:
    return cache if shardings is None else jax.lax.with_sharding_constraint(cache, shardings)


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


def inference_mesh(spec: str | None) -> Mesh | None:
    """`--mesh` as the mesh `generate`, `evaluate` and rejection sampling shard a model over (None: one device). A
    mesh smaller than the host's devices takes the first of them, as a tensor-parallel size does in inference
    servers: only training needs every device in its mesh. Its axis of -1, if it names one, takes the rest."""
    if not spec:
        return None
    sizes = parse_mesh(spec)
    devices, wanted = jax.devices(), math.prod(sizes.values())
    if -1 not in sizes.values() and 0 < wanted < len(devices):
        devices = devices[:wanted]
    return make_mesh(sizes, devices)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file: records {"prompt": TEXT} in JSON Lines (.jsonl, also gzip or Zstandard compressed) or
    Parquet, as `data.documents.read_records` reads them, else one prompt per line (blank lines skipped; a prompt
    with line breaks needs records). The file may be a URL."""
    path = as_path(path)
    if not path.is_file():
        raise DataError(f"prompts file {path} {not_a_file(path)}: pass a text file with one prompt per line, or .jsonl")
    if path.name.lower().endswith(RECORD_SUFFIXES):
        prompts = [_prompt(where, record) for where, record in read_records(path)]
    else:
        text = read_utf8(path, "pass a text file with one prompt per line, or .jsonl")
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise DataError(f"prompts file {path} holds no prompt: write one per line (or one JSON object per line, .jsonl)")
    return prompts


def _prompt(where: str, record: bytes | dict) -> str:
    """The "prompt" string of one record (a JSON line or a Parquet row)."""
    if isinstance(record, bytes):
        try:
            record = json_line(record)
        except NotUtf8 as e:
            raise DataError(f"{where} is not UTF-8 text ({e}): write UTF-8 JSON Lines") from None
        except ValueError as e:
            raise DataError(f'{where} is not valid JSON ({e}): write one object {{"prompt": ...}} per line') from None
    if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
        raise DataError(f'{where} has no "prompt" string: write one object {{"prompt": TEXT}} per line, or Parquet '
                        'rows with a "prompt" column')
    return record["prompt"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llama_jax.generate", description=__doc__.split("\n")[0],
        epilog="Unset flags take the checkpoint's own settings: generation_config.json, then config.json, then the "
               "tokenizer and transformers' defaults (greedy; when sampling temperature 1.0, top-k 50, top-p 1.0). "
               "The line printed to stderr before the output says which value came from where.",
    )
    parser.add_argument("--checkpoint", required=True, help="Hugging Face model directory, or a llama_jax workdir/checkpoint")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    parser.add_argument("--prompts_file", default=None,
                        help="more prompts: one per line, or records {\"prompt\": ...} in JSON Lines (.jsonl, "
                             ".jsonl.gz, .jsonl.zst) or Parquet")
    parser.add_argument("--chat", action="store_true",
                        help="treat each prompt as a user message, rendered with the checkpoint's chat template "
                             "(its tokenizer_config.json or chat_template.jinja; else the Llama 3 format)")
    parser.add_argument("--system", default=None, help="with --chat: a system message before each prompt")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy; > 0 samples")
    parser.add_argument("--top_k", type=int, default=None, help="sample from the k most likely tokens (0 = all)")
    parser.add_argument("--top_p", type=float, default=None, help="nucleus: the most likely tokens up to this mass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mesh", default=None,
                        help="shard the model over a device mesh, e.g. tensor=2,fsdp=4 (axes data, stage, fsdp, context, "
                             "tensor; unnamed axes are 1, one may be -1 for the rest; a mesh of fewer devices than the "
                             "host has takes the first ones); default: one device")
    parser.add_argument("--fp8", action="store_true",
                        help="store the attention and MLP weights as FP8 e4m3 with a scale per output channel (about "
                             "half of bfloat16's memory); prints the memory saved and the logit error on the first prompt")
    args = parser.parse_args(argv)
    try:
        if args.system is not None and not args.chat:
            raise ConfigError("--system is a message of the chat template, which only --chat renders: add --chat")
        texts = args.prompt + (read_prompts(args.prompts_file) if args.prompts_file else [])
        if not texts:
            raise ConfigError("no prompt given: pass --prompt TEXT (repeatable) or --prompts_file FILE")
        mesh = inference_mesh(args.mesh)
        opened = open_checkpoint(args.checkpoint, mesh=mesh)
        tokenizer = opened.tokenizer
        settings = opened.generation.override(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        if args.chat:
            chat = ChatFormat.from_directory(opened.files, tokenizer)
            system = [{"role": "system", "content": args.system}] if args.system is not None else []
            prompts = [chat.render_ids([*system, {"role": "user", "content": text}], add_generation_prompt=True)
                       for text in texts]
        else:
            prompts = [tokenizer.encode(text, allow_special=True) for text in texts]  # as transformers' tokenizer(text)
        model = opened.model
        if args.fp8:
            model = _quantized(model, prompts[0])
        print(settings.describe(), file=sys.stderr)
        result = generate_timed(model, prompts, args.max_new_tokens, seed=args.seed, stop_ids=settings.stop_ids,
                                mesh=mesh, **settings.sampling)
        print(result.describe(), file=sys.stderr)
        completions = [tokenizer.decode([i for i in new_ids if i not in settings.stop_ids]) for new_ids in result.tokens]
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        return report_out_of_memory(e, "give fewer prompts at once or fewer --max_new_tokens, or shard the model "
                                       "over more devices (--mesh)")
    if len(texts) == 1:
        print(completions[0])
    else:
        for text, completion in zip(texts, completions, strict=True):
            print(json.dumps({"prompt": text, "completion": completion}, ensure_ascii=False))
    return 0


def _quantized(model: Llama, prompt_ids: list[int]) -> Llama:
    """`model` with FP8 linear weights; prints what that saved and how far its logits on `prompt_ids` moved."""
    quantized, report = quantize_fp8(model)
    error = logit_error(model, quantized, np.asarray([prompt_ids], np.int32))
    print(f"{report.describe()}; logits on the first prompt: max |error| / max |logit| = {error:.4f}", file=sys.stderr)
    return quantized


if __name__ == "__main__":
    sys.exit(main())
