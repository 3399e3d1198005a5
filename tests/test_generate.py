"""Generation: KV-cache decoding against the uncached full-buffer decoder it replaced and against transformers (greedy,
batched, left-padded), top-k / nucleus sampling with explicit keys, stop ids, one compilation per shape bucket, the
cache sharded by logical axes on a mesh, and the CLI (batched prompts, FP8) on Hugging Face directories whose tokenizer
framing and generation_config.json it must honour."""

import gzip
import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers
import torch
import transformers

from flax import nnx
from jax.sharding import PartitionSpec as P

from llama_jax.convert import load_hf
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import ConfigError
from llama_jax.generate import (_prefill, cache_shardings, generate, generate_timed, inference_mesh, keep_top_k, main,
                                parse_mesh, sample_top_p)
from llama_jax.model.kv_cache import KVCache
from llama_jax.parallel.mesh import make_mesh
from llama_jax.quantize import logit_error, quantize_fp8

PROMPTS = [[3, 17, 42, 9, 100], [250, 1, 77]]  # different lengths: each row keeps its own position
NEW_TOKENS = 20
# lengths 1 to 23: across the 16-token prompt bucket, so rows carry 0 to 22 slots of left padding
RAGGED = [[5], [3, 17, 42, 9, 100], [250, 1, 77], list(range(30, 53)), [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]]


def uncached_generate(model, prompts, max_new_tokens, *, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    """The decoder the KV cache replaced, kept as the reference: every token re-runs the model over the whole
    right-padded buffer and reads the logits at each row's last position; token i is drawn with fold_in(key, i)."""
    graphdef, state = nnx.split(model)
    hidden = jax.jit(lambda state, tokens_bt: nnx.merge(graphdef, state).hidden(tokens_bt))
    lengths_b = np.array([len(p) for p in prompts])
    tokens_bt = np.zeros((len(prompts), lengths_b.max() + max_new_tokens), np.int32)
    for row, prompt in enumerate(prompts):
        tokens_bt[row, : len(prompt)] = prompt
    rows_b, key = np.arange(len(prompts)), jax.random.key(seed)
    for step in range(max_new_tokens):
        cur_b = lengths_b + step
        logits_bv = model.logits(hidden(state, tokens_bt)[rows_b, cur_b - 1][:, None])[:, 0]
        if temperature == 0:
            next_b = jnp.argmax(logits_bv, axis=-1)
        else:
            next_b = sample_top_p(jax.random.fold_in(key, step), keep_top_k(logits_bv / temperature, top_k), top_p)
        tokens_bt[rows_b, cur_b] = np.asarray(next_b)
    return [tokens_bt[row, n: n + max_new_tokens].tolist() for row, n in enumerate(lengths_b)]


def _train_tokenizer(path: Path) -> int:
    """A byte-level BPE tokenizer.json trained on a few standard-library files; returns its vocabulary size."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "shlex.py")]
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<s>", "</s>"], initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.save(str(path / "tokenizer.json"))
    return bpe.get_vocab_size()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random tiny transformers Llama saved with a tokenizer whose vocabulary is exactly the model's."""
    path = tmp_path_factory.mktemp("hf_generate")
    cfg = transformers.LlamaConfig(
        vocab_size=_train_tokenizer(path), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,  # so transformers never stops early
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(hf_dir):
    return load_hf(hf_dir)


@pytest.fixture(scope="module")
def greedy(model) -> list[list[int]]:
    return generate(model, PROMPTS, NEW_TOKENS)


def test_greedy_matches_transformers(hf_dir, greedy):
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    for prompt, ours in zip(PROMPTS, greedy, strict=True):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        assert ours == expected[0, len(prompt):].tolist()
    assert len(set(greedy[0])) > 3  # a real continuation, not one token repeated


def test_single_prompt_is_a_batch_of_one(model, greedy):
    assert generate(model, PROMPTS[1], NEW_TOKENS) == [greedy[1]]


def test_no_new_tokens(model):
    assert generate(model, PROMPTS, 0) == [[], []]
    prompt_tokens = sum(map(len, PROMPTS))  # its console line had a decode of -2 tokens at -2e9 tokens/s
    assert generate_timed(model, PROMPTS, 0).describe() == (
        f"nothing generated (max_new_tokens 0): the {prompt_tokens} prompt tokens were not run")


def test_generating_past_the_models_context_is_refused_with_the_most_it_allows(model):
    longest, context = max(map(len, PROMPTS)), model.cfg.max_seq_len
    assert len(generate(model, PROMPTS, context - longest, stop_ids=())[0]) == context - longest
    with pytest.raises(ConfigError, match=rf"the longest prompt \({longest} tokens\) \+ max_new_tokens "
                                         rf"\({context - longest + 1}\) exceeds the model's context \(model.max_seq_len "
                                         rf"{context}\): lower max_new_tokens to at most {context - longest}"):
        generate(model, PROMPTS, context - longest + 1)


def test_a_seed_past_32_bits_is_refused_in_one_line(model):
    for seed in (2**32, 2**64, -1):  # 2**32 drew the tokens 0 does, 2**64 was an OverflowError from jax.random.key
        with pytest.raises(ConfigError, match=rf"^seed {seed} is out of range: give a seed from 0 to 4294967295$"):
            generate(model, [[1, 2]], 2, temperature=1.0, seed=seed)


def test_prompt_ids_outside_the_vocabulary_are_refused(model):
    """An id past the embedding gathered NaN and the model generated zeros; a negative one read the last row."""
    vocab = model.cfg.vocab_size
    for bad in (vocab, -1):
        with pytest.raises(ConfigError, match=rf"prompt token ids \[{bad}\] are outside the model's vocabulary \[0, "
                                              rf"{vocab}\): encode the prompt with the checkpoint's own tokenizer"):
            generate(model, [[1, bad, 2], [3]], 2)


def test_eos_stops_only_its_row(model, greedy):
    # the first token of row 0 that appears neither earlier in row 0 nor anywhere in row 1
    k = next(k for k, t in enumerate(greedy[0]) if k > 0 and t not in greedy[0][:k] and t not in greedy[1])
    eos = greedy[0][k]
    assert generate(model, PROMPTS, NEW_TOKENS, stop_ids=[eos]) == [greedy[0][: k + 1], greedy[1]]


def test_sample_top_p_draws_only_from_the_nucleus():
    probs_v = np.array([0.5, 0.3, 0.15, 0.05], np.float32)  # top_p 0.75: {0, 1} (0.5 < 0.75 <= 0.8)
    logits_bv = jnp.broadcast_to(jnp.log(probs_v), (4000, 4))
    draws_b = np.asarray(sample_top_p(jax.random.key(0), logits_bv, 0.75))
    counts = np.bincount(draws_b, minlength=4)
    assert counts[2:].sum() == 0
    assert abs(counts[0] / len(draws_b) - 0.5 / 0.8) < 0.03  # renormalised inside the nucleus
    everything_b = np.asarray(sample_top_p(jax.random.key(0), logits_bv, 1.0))
    assert set(everything_b) == {0, 1, 2, 3}


def test_top_p_generation_is_seeded_and_stays_in_the_nucleus(hf_dir, model):
    prompt, temperature = PROMPTS[0], 0.5
    with torch.no_grad():  # transformers' logits equal ours to ~1e-6, far inside the margin chosen below
        reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
        logits_v = reference(torch.tensor([prompt])).logits[0, -1].double().numpy() / temperature
    probs_v = np.exp(logits_v - logits_v.max())
    probs_v /= probs_v.sum()
    order_v = np.argsort(-probs_v)
    mass_v = np.cumsum(probs_v[order_v])
    top_p = (mass_v[2] + mass_v[3]) / 2  # strictly between the mass of the top 3 and the top 4 tokens
    nucleus = set(order_v[:4].tolist())

    run = generate(model, [prompt] * 64, 8, temperature=temperature, top_p=top_p, seed=0)
    first_tokens = {tokens[0] for tokens in run}
    assert first_tokens <= nucleus
    assert len(first_tokens) > 1  # it samples, not argmax
    assert run == generate(model, [prompt] * 64, 8, temperature=temperature, top_p=top_p, seed=0)
    assert run != generate(model, [prompt] * 64, 8, temperature=temperature, top_p=top_p, seed=1)


def test_cli_prints_the_continuation_of_a_hf_checkpoint(hf_dir, model, capsys):
    prompt = "def wrap(text):"
    tokenizer = Tokenizer.from_file(hf_dir / "tokenizer.json")
    new_ids = generate(model, tokenizer.encode(prompt), 12, stop_ids=[tokenizer.eos_id])[0]
    expected = tokenizer.decode([i for i in new_ids if i != tokenizer.eos_id])
    code = main(["--checkpoint", str(hf_dir), "--prompt", prompt, "--max_new_tokens", "12"])
    assert code == 0
    assert expected.strip() and capsys.readouterr().out == expected + "\n"


def test_cli_running_out_of_device_memory_is_one_line(hf_dir, monkeypatch, capsys):
    status = "RESOURCE_EXHAUSTED: Out of memory allocating 68719476736 bytes."

    def fails(*args, **kwargs):
        raise jax.errors.JaxRuntimeError(status)

    monkeypatch.setattr(sys.modules["llama_jax.generate"], "generate_timed", fails)
    assert main(["--checkpoint", str(hf_dir), "--prompt", "hi", "--max_new_tokens", "4"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: the devices ran out of memory ({status}): give fewer prompts at once or fewer --max_new_tokens, or "
        "shard the model over more devices (--mesh)")


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llama_jax.generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "hi",
         "--max_new_tokens", "4"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: checkpoint ") and "does not exist" in result.stderr
    assert result.stderr.count("\n") == 1 and not result.stdout  # one line, no traceback


def test_the_commands_reading_a_checkpoint_with_damaged_metadata_say_so_in_one_line(tmp_path, capsys):
    """Before, convert and average ended with a JSONDecodeError traceback, generate with a line that named no file."""
    from llama_jax import average, convert

    meta = tmp_path / "run" / "checkpoints" / "3" / "meta" / "metadata"
    meta.parent.mkdir(parents=True)
    meta.write_text("{cut off")
    run = str(tmp_path / "run")
    for command, argv in ((main, ["--checkpoint", run, "--prompt", "hi"]),
                          (convert.main, ["--from", "ours", "--to", "hf", run, str(tmp_path / "hf")]),
                          (average.main, ["--out", str(tmp_path / "avg"), run, run])):
        assert command(argv) == 2
        assert capsys.readouterr().err == (f"error: {meta} is not JSON (Expecting property name enclosed in double "
                                           "quotes: line 1 column 2 (char 1)): the checkpoint is damaged; use another "
                                           "step\n")


@pytest.mark.parametrize("bos_framing", [True, False], ids=["bos-adding", "no-bos"])
@pytest.mark.parametrize("stop_index", [0, 1])
def test_cli_frames_and_stops_as_transformers(hf_dir, model, greedy, tmp_path, capsys, bos_framing, stop_index):
    """Framing from the tokenizer.json post-processor and stop ids from a generation_config.json eos_token_id list:
    the CLI's prompt ids and continuation equal transformers' tokenizer(prompt) and generate() token for token."""
    prompt = "def wrap(text):"
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    tok_json = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    if bos_framing:
        tok_json.post_processor = tokenizers.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok_json.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    reference_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    prompt_ids = reference_tok(prompt).input_ids
    assert (prompt_ids[0] == 0) == bos_framing and Tokenizer.from_file(tmp_path).encode(prompt) == prompt_ids

    free_run = generate(model, prompt_ids, NEW_TOKENS)[0]
    k = next(k for k, t in enumerate(free_run) if k > 2 and t not in free_run[:k])  # its first occurrence
    stop_ids = [9999, 9999]
    stop_ids[stop_index] = free_run[k]
    stop_ids[1 - stop_index] = next(t for t in range(2, 300) if t not in free_run)  # never produced
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": stop_ids, "do_sample": False}))

    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    expected = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS, pad_token_id=1)[0, len(prompt_ids):]
    assert expected.tolist() == free_run[: k + 1]  # transformers stopped there too
    assert main(["--checkpoint", str(tmp_path), "--prompt", prompt, "--max_new_tokens", str(NEW_TOKENS)]) == 0
    out, err = capsys.readouterr()
    assert out == reference_tok.decode(expected[:-1]) + "\n"
    assert f"stop on ids {stop_ids} (generation_config.json)" in err and "greedy (generation_config.json)" in err


def test_top_k_keeps_the_k_most_likely(model):
    logits_bv = jnp.array([[0.1, 3.0, 2.0, -1.0, 2.5]])
    kept = keep_top_k(logits_bv, jnp.int32(2))
    assert np.isfinite(np.asarray(kept)).tolist() == [[False, True, False, False, True]]
    assert np.array_equal(np.asarray(keep_top_k(logits_bv, jnp.int32(0))), np.asarray(logits_bv))
    assert np.array_equal(np.asarray(keep_top_k(logits_bv, jnp.int32(99))), np.asarray(logits_bv))
    draws = generate(model, [PROMPTS[0]] * 32, 1, temperature=5.0, top_k=1, seed=3)
    assert {d[0] for d in draws} == {generate(model, PROMPTS[0], 1)[0][0]}  # top-1 sampling is greedy


def test_cli_chat_mode_renders_the_checkpoints_template(hf_dir, model, tmp_path, capsys):
    """--chat: the prompt becomes a user message (after --system) rendered with the directory's chat template; the
    prompt ids are transformers' apply_chat_template(..., add_generation_prompt=True) and the output its generate."""
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                "{% if add_generation_prompt %}<s>assistant:{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "chat_template": template}))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def wrap(text):"}]
    prompt_ids = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        messages, add_generation_prompt=True)["input_ids"]
    assert prompt_ids.count(0) == 3  # three <s>: the template was used
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([prompt_ids])  # the prompt holds </s>: an explicit mask keeps transformers from taking it as pad
    expected = reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False,
                                  eos_token_id=1, pad_token_id=1)[0, len(prompt_ids):].tolist()
    assert expected == generate(model, prompt_ids, 10, stop_ids=[1])[0]
    code = main(["--checkpoint", str(tmp_path), "--chat", "--system", "Be brief.", "--prompt", "def wrap(text):",
                 "--max_new_tokens", "10"])
    assert code == 0
    assert capsys.readouterr().out == Tokenizer.from_file(tmp_path).decode([t for t in expected if t != 1]) + "\n"

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "chat_template": "{{ oops("}))
    assert main(["--checkpoint", str(tmp_path), "--chat", "--prompt", "hi"]) == 2
    assert "syntax error" in capsys.readouterr().err


def test_cli_on_a_mesh_prints_what_one_device_prints(hf_dir, capsys):
    args = ["--checkpoint", str(hf_dir), "--prompt", "def wrap(text):", "--max_new_tokens", "12"]
    assert main(args) == 0
    one_device = capsys.readouterr().out
    assert main([*args, "--mesh", "tensor=2, fsdp=-1"]) == 0
    assert capsys.readouterr().out == one_device
    assert main([*args, "--mesh", "tensor=2"]) == 0  # two of the eight devices (it was refused: "needs 2 devices")
    assert capsys.readouterr().out == one_device
    mesh = inference_mesh("tensor=2")
    assert mesh.shape["tensor"] == 2 and list(mesh.devices.flat) == jax.devices()[:2]


@pytest.mark.parametrize("spec,problem", [
    ("tensr=2", "unknown axis 'tensr'"),
    ("tensor:2", "'tensor:2' is not AXIS=SIZE"),
    ("tensor=2,tensor=4", "axis 'tensor' is given twice"),
    ("fsdp=two", "size 'two' of axis 'fsdp' is not an integer"),
    ("tensor=16", "needs 16 devices but 8 are available"),
])
def test_cli_names_the_problem_of_a_bad_mesh(hf_dir, capsys, spec, problem):
    assert main(["--checkpoint", str(hf_dir), "--prompt", "hi", "--mesh", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and problem in err


# ------------------------------------------------------------------------------------------ the KV cache


def test_cached_greedy_equals_the_uncached_decoder_on_ragged_prompts(model):
    assert generate(model, RAGGED, NEW_TOKENS) == uncached_generate(model, RAGGED, NEW_TOKENS)


def test_each_greedy_token_is_the_argmax_of_a_full_forward_pass(model):
    """Re-running the whole sequences (prompt + continuation, right-padded: causal attention ignores what follows)
    without a cache picks every generated token again."""
    generated = generate(model, RAGGED, NEW_TOKENS)
    tokens_bt = np.zeros((len(RAGGED), max(map(len, RAGGED)) + NEW_TOKENS), np.int32)
    for row, (prompt, new) in enumerate(zip(RAGGED, generated, strict=True)):
        tokens_bt[row, : len(prompt) + NEW_TOKENS] = prompt + new
    graphdef, state = nnx.split(model)
    argmax_bt = np.asarray(jax.jit(lambda state, t: jnp.argmax(nnx.merge(graphdef, state)(t), axis=-1))(state, tokens_bt))
    for row, (prompt, new) in enumerate(zip(RAGGED, generated, strict=True)):
        assert argmax_bt[row, len(prompt) - 1: len(prompt) + NEW_TOKENS - 1].tolist() == new


def test_batched_left_padded_greedy_matches_transformers(hf_dir, model):
    """transformers' own batched generation: left padding, an attention mask, positions from the mask."""
    reference = transformers.LlamaForCausalLM.from_pretrained(hf_dir).eval()
    width = max(len(p) for p in RAGGED)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in RAGGED])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in RAGGED])
    expected = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert generate(model, RAGGED, NEW_TOKENS) == expected[:, width:].tolist()


def test_sampling_with_the_cache_draws_what_the_uncached_decoder_draws(model):
    """Same keys (token i: fold_in(key(seed), i)) and the same logits up to rounding: the same samples."""
    settings = dict(temperature=0.8, top_k=40, top_p=0.9, seed=5)
    ours = generate(model, RAGGED, 12, **settings)
    assert ours == uncached_generate(model, RAGGED, 12, **settings)
    assert ours != generate(model, RAGGED, 12, temperature=0.0)


def test_the_cache_holds_kv_heads_only_in_the_compute_dtype(hf_dir):
    """bf16: a [layers, batch, slots, kv_heads, head_dim] bf16 cache; prefill + one decode step give the logits of a
    full forward pass, and padding slots before a row's prompt change nothing."""
    model = load_hf(hf_dir, "bfloat16")
    cfg = model.cfg
    cache = KVCache.create(cfg, jnp.array([0, 3]), 32)
    assert cache.k_lbskh.shape == (cfg.n_layers, 2, 32, cfg.n_kv_heads, cfg.resolved_head_dim) == (2, 2, 32, 2, 16)
    assert cache.k_lbskh.dtype == cache.v_lbskh.dtype == jnp.bfloat16
    prompt = [3, 17, 42, 9, 100, 8, 1]
    tokens_bt = jnp.array([prompt + [11], [0, 0, 0] + prompt[3:] + [11]])  # row 1: padding, then a shorter prompt

    @jax.jit
    def prefill_and_step(state, cache):
        model = nnx.merge(graphdef, state)
        h_btd, cache = model.extend(tokens_bt[:, :-1], cache)
        step_btd, cache = model.extend(tokens_bt[:, -1:], cache)
        return model.logits(jnp.concatenate([h_btd, step_btd], axis=1)), cache

    graphdef, state = nnx.split(model)
    logits_btv, cache = prefill_and_step(state, cache)
    assert int(cache.end) == 8 and cache.k_lbskh.dtype == jnp.bfloat16
    full = jax.jit(lambda state, tokens_bt: nnx.merge(graphdef, state)(tokens_bt))
    for row, start in enumerate([0, 3]):
        full_tv = np.asarray(full(state, tokens_bt[row:row + 1, start:])[0])
        cached_tv = np.asarray(logits_btv[row, start:])
        assert np.abs(cached_tv - full_tv).max() < 0.05 * np.abs(full_tv).max()  # bf16: matmul shapes differ


def test_tokens_past_a_full_cache_give_nan_states_not_an_overwritten_last_slot(model):
    """`dynamic_update_slice` clamps a write past the cache's end onto its last slots: a call of `extend` on a full
    cache returned finite states computed against a cache it had corrupted. Tokens that fit are untouched."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def extend(state, cache, tokens_bt):
        return nnx.merge(graphdef, state).extend(tokens_bt, cache)

    cache = KVCache.create(model.cfg, jnp.array([0]), 8)
    h_btd, cache = extend(state, cache, jnp.array([[3, 17, 42, 9, 100, 8, 1]]))
    last_btd, full = extend(state, cache, jnp.array([[11]]))
    assert np.isfinite(np.asarray(h_btd)).all() and np.isfinite(np.asarray(last_btd)).all()
    past_btd, _ = extend(state, full, jnp.array([[12]]))
    assert np.isnan(np.asarray(past_btd)).all()
    with pytest.raises(ValueError, match="9 tokens do not fit a KV cache of 8 slots"):
        model.extend(jnp.zeros((1, 9), jnp.int32), KVCache.create(model.cfg, jnp.array([0]), 8))


def test_compiles_once_per_bucket(model):
    """A batch of 6 (no other test uses one): prefill and decode compile once for the (6, 16, 64) bucket, again once
    for sampling (a static switch), and never for other lengths, budgets or sampling settings in the bucket."""
    prompts = [[1, 2, 3], [4, 5]] * 3
    first = generate_timed(model, prompts, 10)
    assert first.compiled == 2 and first.compile_seconds > 0
    again = [
        generate_timed(model, [[9, 8, 7, 6, 5, 4, 3], [2]] * 3, 30),  # other lengths and budget, same bucket
        generate_timed(model, prompts, 10, temperature=0.7, top_k=5, top_p=0.5, seed=1),  # sampling
        generate_timed(model, prompts, 10, temperature=0.9, top_p=0.8, seed=2),  # other sampling settings
        generate_timed(model, [list(range(1, 17))] * 6, 48),  # the bucket's largest prompt and budget
    ]
    assert [g.compiled for g in again] == [0, 2, 0, 0]
    longer = generate_timed(model, [list(range(1, 18))] * 6, 10)  # 17 tokens: the next prompt bucket, same cache
    assert longer.compiled == 1  # a new prefill; the decode loop depends on batch and cache length only
    assert first.prompt_tokens == 15 and first.new_tokens == 60 and first.prefill_seconds > 0 < first.decode_seconds


def test_on_a_mesh_the_cache_is_sharded_by_logical_axes_and_tokens_match(hf_dir, model):
    """Cache shardings come from the logical names (batch over data and fsdp where it divides, kv heads over tensor);
    generation on the mesh, full precision and FP8, gives the single device's tokens."""
    mesh = make_mesh(parse_mesh("data=2,fsdp=2,tensor=2"))
    sharded = load_hf(hf_dir, mesh=mesh)
    shardings = cache_shardings(sharded.cfg, 4, 64, mesh)
    assert shardings.k_lbskh.spec == P("stage", ("data", "fsdp"), "context", "tensor", None)
    assert shardings.start_b.spec == P(("data", "fsdp"))
    assert cache_shardings(sharded.cfg, 2, 64, mesh).k_lbskh.spec == P("stage", None, "context", "tensor", None)
    graphdef, state = nnx.split(sharded)
    prefill = jax.jit(lambda state, tokens_bt, start_b: _prefill(
        state, tokens_bt, start_b, jax.random.key(0), 1.0, 0, 1.0, jnp.array([-1]), graphdef=graphdef, greedy=True,
        shardings=shardings, max_len=64))
    with jax.set_mesh(mesh):
        cache, _ = prefill(state, jnp.ones((4, 16), jnp.int32), jnp.zeros(4, jnp.int32))
    assert cache.k_lbskh.sharding.is_equivalent_to(shardings.k_lbskh, 5)
    assert cache.k_lbskh.addressable_shards[0].data.shape == (2, 1, 64, 1, 16)  # batch / 4, kv heads / 2

    prompts = RAGGED[:4]
    assert generate(sharded, prompts, NEW_TOKENS, mesh=mesh) == generate(model, prompts, NEW_TOKENS)
    fp8_sharded, _ = quantize_fp8(sharded)
    wq = fp8_sharded.layers.attn.wq[...]
    assert wq.value.sharding.is_equivalent_to(sharded.layers.attn.wq[...].sharding, 4)  # FP8 stays where it was
    assert generate(fp8_sharded, prompts, 8, mesh=mesh) == generate(quantize_fp8(model)[0], prompts, 8)


# --------------------------------------------------------------------------------------------- the CLI


def _cli_expected(hf_dir, model, texts, max_new_tokens):
    tokenizer = Tokenizer.from_file(hf_dir / "tokenizer.json")
    new = generate(model, [tokenizer.encode(t) for t in texts], max_new_tokens, stop_ids=[tokenizer.eos_id])
    return [tokenizer.decode([i for i in ids if i != tokenizer.eos_id]) for ids in new]


def test_cli_prints_json_lines_for_several_prompts(hf_dir, model, tmp_path, capsys):
    texts = ["def wrap(text):", "import", "class TextWrapper:\n"]
    expected = [{"prompt": t, "completion": c} for t, c in zip(texts, _cli_expected(hf_dir, model, texts, 12))]
    assert main(["--checkpoint", str(hf_dir), "--prompt", texts[0], "--prompt", texts[1], "--prompt", texts[2],
                 "--max_new_tokens", "12"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == expected
    assert "prefill: 12 tokens" not in err and "prefill: " in err and "tokens/s); decode: " in err

    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts[1:]))
    assert main(["--checkpoint", str(hf_dir), "--prompt", texts[0], "--prompts_file", str(tmp_path / "prompts.jsonl"),
                 "--max_new_tokens", "12"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == expected

    with gzip.open(tmp_path / "prompts.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps({"prompt": t}) + "\n" for t in texts[1:]))
    pq.write_table(pa.table({"prompt": texts[1:], "source": ["a", "b"]}), tmp_path / "prompts.parquet")
    for name in ("prompts.jsonl.gz", "prompts.parquet"):
        assert main(["--checkpoint", str(hf_dir), "--prompt", texts[0], "--prompts_file", str(tmp_path / name),
                     "--max_new_tokens", "12"]) == 0
        assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == expected, name

    (tmp_path / "prompts.txt").write_text("def wrap(text):\n\nimport\n")  # one per line, blank lines skipped
    assert main(["--checkpoint", str(hf_dir), "--prompts_file", str(tmp_path / "prompts.txt"),
                 "--max_new_tokens", "12"]) == 0
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == expected[:2]


@pytest.mark.parametrize("content,problem", [
    (None, "does not exist"),
    (..., "prompts.jsonl is a directory"),
    ('{"prompt": "a"}\n{"text": "b"}\n', 'prompts.jsonl:2 has no "prompt" string'),
    ('{"prompt": "a"\n', "prompts.jsonl:1 is not valid JSON"),
    ("\n\n", "holds no prompt"),
    (b"\x1f\x8b\x08binary", "prompts.jsonl:1 is not UTF-8 text (invalid start byte at byte 1)"),
    (b'{"prompt": "a \\ud800"}', "prompts.jsonl:1 is not UTF-8 text (a \\u escape spells half a surrogate pair)"),
])
def test_cli_names_the_problem_of_a_bad_prompts_file(hf_dir, tmp_path, capsys, content, problem):
    path = tmp_path / "prompts.jsonl"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is ...:
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    assert main(["--checkpoint", str(hf_dir), "--prompts_file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and problem in err and err.count("\n") == 1


def test_cli_names_the_problem_of_a_bad_prompts_record_file(hf_dir, tmp_path, capsys):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "prompts.parquet")
    (tmp_path / "prompts.jsonl.gz").write_bytes(gzip.compress(b'{"prompt": "a"}\n' * 100)[:-20])
    for name, problem in (("prompts.parquet", 'prompts.parquet:1 has no "prompt" string'),
                          ("prompts.jsonl.gz", "prompts.jsonl.gz cannot be read to its end")):
        assert main(["--checkpoint", str(hf_dir), "--prompts_file", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and problem in err and err.count("\n") == 1, err


def test_cli_needs_a_prompt(hf_dir, capsys):
    assert main(["--checkpoint", str(hf_dir)]) == 2
    assert "no prompt given" in capsys.readouterr().err


def test_cli_refuses_a_system_message_without_chat(hf_dir, capsys):
    """Only the chat template renders a system message: without --chat it was ignored, and the output the same."""
    assert main(["--checkpoint", str(hf_dir), "--prompt", "def f(", "--system", "You are a pirate"]) == 2
    assert capsys.readouterr().err == ("error: --system is a message of the chat template, which only --chat renders: "
                                       "add --chat\n")


def test_cli_fp8_reports_memory_and_logit_error(hf_dir, model, capsys):
    """The error printed is the quantised model's on the prompt (about 0.08 here: this model's init std of 0.1 gives
    its matrices a high gain that amplifies every rounding); its continuation is the FP8 model's."""
    prompt = "def wrap(text):"
    assert main(["--checkpoint", str(hf_dir), "--prompt", prompt, "--max_new_tokens", "8", "--fp8"]) == 0
    out, err = capsys.readouterr()
    report = next(line for line in err.splitlines() if line.startswith("fp8: "))
    assert "7 weight matrices" in report and "x smaller" in report
    prompt_ids = Tokenizer.from_file(hf_dir / "tokenizer.json").encode(prompt)
    fp8_model, _ = quantize_fp8(model)
    assert float(report.rsplit("= ", 1)[1]) == pytest.approx(logit_error(model, fp8_model, [prompt_ids]), abs=1e-4)
    assert 0 < logit_error(model, fp8_model, [prompt_ids]) < 0.15
    assert out == _cli_expected(hf_dir, fp8_model, [prompt], 8)[0] + "\n"
