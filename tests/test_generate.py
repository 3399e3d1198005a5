"""Generation: greedy decoding against transformers, top-k / nucleus sampling, stop ids, and the CLI on Hugging Face
directories whose tokenizer framing and generation_config.json it must honour."""

import json
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

from llama_jax.convert import load_hf
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.generate import generate, keep_top_k, main, sample_top_p

PROMPTS = [[3, 17, 42, 9, 100], [250, 1, 77]]  # different lengths: each row keeps its own position
NEW_TOKENS = 20


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


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "llama_jax.generate", "--checkpoint", str(tmp_path / "missing"), "--prompt", "hi",
         "--max_new_tokens", "4"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("error: checkpoint ") and "does not exist" in result.stderr
    assert result.stderr.count("\n") == 1 and not result.stdout  # one line, no traceback


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


@pytest.mark.parametrize("spec,problem", [
    ("tensr=2", "unknown axis 'tensr'"),
    ("tensor:2", "'tensor:2' is not AXIS=SIZE"),
    ("tensor=2,tensor=4", "axis 'tensor' is given twice"),
    ("fsdp=two", "size 'two' of axis 'fsdp' is not an integer"),
    ("tensor=3", "needs 3 devices but 8 are available"),
])
def test_cli_names_the_problem_of_a_bad_mesh(hf_dir, capsys, spec, problem):
    assert main(["--checkpoint", str(hf_dir), "--prompt", "hi", "--mesh", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and problem in err
