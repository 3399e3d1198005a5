"""Generation: greedy decoding against transformers, nucleus sampling, eos, and the CLI on a Hugging Face directory."""

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
from llama_jax.generate import generate, main, sample_top_p

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
    assert generate(model, PROMPTS, NEW_TOKENS, eos_id=eos) == [greedy[0][: k + 1], greedy[1]]


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
    new_ids = generate(model, tokenizer.encode(prompt, bos=True), 12, eos_id=tokenizer.eos_id)[0]
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
