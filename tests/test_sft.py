"""SFT (objective "sft"): the loss counts the assistant's tokens only, and the tiny SFT recipe learns them."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from config_files import load_config_file
from posttrain_fixtures import tiny_base

from llama_jax import checkpoint, trainer
from llama_jax.config import eval_source, mixture_source, validate
from llama_jax.data.chat import ChatFormat
from llama_jax.data import stdlib_chat
from llama_jax.data.conversations import sft_example
from llama_jax.data.shards import ShardedCorpus
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import ConfigError
from llama_jax.model import ModelDef
from llama_jax.workdir import read_jsonl
from llama_jax.objectives import lm_loss_sum


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


def chat_row(base):
    tokenizer = Tokenizer.from_file(base)
    fmt = ChatFormat.from_directory(base, tokenizer)
    example = sft_example(fmt, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"},
                                {"role": "assistant", "content": "Because."}])
    tokens = example.tokens.astype(np.int32)
    return tokens[None, :-1], tokens[None, 1:], example.loss_mask[None, 1:].astype(np.float32)


def test_prompt_tokens_neither_change_the_loss_nor_get_gradient(base):
    cfg = load_config_file("sft_tiny.py", str(base))
    model_def = ModelDef(trainer.model_config(cfg))
    with nnx.use_eager_sharding(False):
        params = model_def.init(0)
    tokens, targets, mask = chat_row(base)
    assert 0 < mask.sum() < mask.size, "both prompt and assistant tokens in the row"

    def loss_of_logits(logits_btv, targets_bt):
        return lm_loss_sum(lambda x: x, logits_btv, targets_bt, mask)[0]

    logits = model_def.merge(params)(jnp.asarray(tokens)).astype(jnp.float32)
    base_loss = loss_of_logits(logits, targets)
    prompt, answer = np.flatnonzero(mask[0] == 0), np.flatnonzero(mask[0] == 1)
    changed_prompt = targets.copy()
    changed_prompt[0, prompt] = (targets[0, prompt] + 1) % 1000
    assert float(loss_of_logits(logits, changed_prompt)) == float(base_loss)
    changed_answer = targets.copy()
    changed_answer[0, answer[0]] = (targets[0, answer[0]] + 1) % 1000
    assert float(loss_of_logits(logits, changed_answer)) != float(base_loss)
    grads = np.asarray(jax.grad(loss_of_logits)(logits, targets))
    assert np.all(grads[0, prompt] == 0) and np.all(np.abs(grads[0, answer]).sum(-1) > 0)


def test_the_built_in_chat_data_holds_out_conversations_it_does_not_train_on(base, tmp_path):
    """Every third conversation of `stdlib_chat` had a second turn about the next function, whose own conversation
    the split could hold out: 8 of the 27 held-out conversations were trained on, word for word."""
    tokenizer = Tokenizer.from_file(base)
    prepared = Path(stdlib_chat.prepared("stdlib_chat", base, tmp_path))
    train, held_out = (ShardedCorpus.open(prepared / split) for split in ("train", "eval"))
    trained = "".join(tokenizer.decode(train.read(i)) for i in range(len(train)))
    bos = tokenizer.decode(tokenizer.prefix_ids)
    conversations = [tokenizer.decode(held_out.read(i)).removeprefix(bos) for i in range(len(held_out))]
    assert len(conversations) > 20 and sum("Which module is it in?" in c for c in conversations) > 2
    assert [c for c in conversations if c in trained] == []


def test_the_tiny_sft_recipe_lowers_the_assistant_loss(base, tmp_path):
    cfg = load_config_file("sft_tiny.py", str(base))
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.seq_len, cfg.train.steps, cfg.train.eval_every, cfg.train.log_every = 128, 24, 8, 8
    cfg.optim.lr, cfg.optim.warmup_steps, cfg.checkpoint.every_steps = 1e-3, 2, 24
    cfg.checkpoint.maintenance_url = ""
    trainer.train(cfg, tmp_path / "run")
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [line["eval_loss"] for line in lines if "eval_loss" in line]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.3, evals
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5


def test_sft_refuses_plain_text_and_a_missing_starting_checkpoint(base, tmp_path):
    cfg = load_config_file("sft_tiny.py", str(base))
    cfg.checkpoint.init_from = ""
    with pytest.raises(ConfigError, match="checkpoint.init_from"):
        validate(cfg)
    cfg = load_config_file("sft_tiny.py", str(base))
    (tmp_path / "docs").mkdir()
    for i in range(3):
        (tmp_path / "docs" / f"{i}.txt").write_text(f"plain text document number {i} " * 20)
    cfg.data.source, cfg.data.cache_dir = str(tmp_path / "docs" / "*.txt"), str(tmp_path / "cache")
    cfg.data.seq_len, cfg.checkpoint.maintenance_url = 64, ""
    with pytest.raises(ConfigError, match=r"objective.name='sft' trains on prepared conversations, but source 'data' "
                                          r"\(.*\*.txt\) is not prepared: prepare its conversations with python -m "
                                          r"llama_jax.data.prepare --chat --source .* \(plain text has no assistant "):
        trainer.train(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()  # refused before tokenizing it as text
    cfg.data.mixture = {"docs": mixture_source(cfg.data.source, 1.0)}
    with pytest.raises(ConfigError, match=r"source 'docs' .* and set data.mixture.docs.source=DIR \(plain text"):
        trainer.train(cfg, tmp_path / "run")


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_pairs_not_yet_prepared_are_refused_before_any_tokenizing(base, tmp_path, objective):
    """A file of pairs (or, for SFT, of conversations) as data.source was tokenized as text and failed for want of a
    "text" field, saying to set data.text_field."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Question?", "chosen": "Right.", "rejected": "Wrong."}) + "\n")
    cfg = load_config_file("sft_tiny.py", str(base))
    cfg.objective.name, cfg.data.source, cfg.checkpoint.maintenance_url = objective, str(pairs), ""
    cfg.data.cache_dir = str(tmp_path / "cache")
    with pytest.raises(ConfigError, match=rf"objective.name='{objective}' trains on prepared preference pairs, but "
                                          rf"source 'data' \({pairs}\) is not prepared: prepare its preference pairs "
                                          rf"with python -m llama_jax.data.preferences --source {pairs} --tokenizer T "
                                          r"--out DIR and set data.source=DIR$"):
        trainer.train(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("objective", ["sft", "lm"])
def test_a_preference_corpus_is_refused_as_chat_or_text(base, tmp_path, objective, capsys):
    """Its pairs are two documents each, chosen and rejected: SFT trained on both (the rejected responses too), and
    as an evaluation set (of a run, or of `evaluate --data`) both were scored."""
    from llama_jax import evaluate
    from llama_jax.data.preferences import prepare_preferences

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Question {i}?", "chosen": f"Right {i}.", "rejected": f"Wrong {i}."})
                             + "\n" for i in range(40)))
    prepare_preferences(pairs, base, tmp_path / "prepared")
    cfg = load_config_file("sft_tiny.py", str(base))
    cfg.objective.name, cfg.data.source, cfg.checkpoint.maintenance_url = objective, str(tmp_path / "prepared"), ""
    with pytest.raises(ConfigError, match=rf"objective.name='{objective}' would learn the rejected responses of the "
                                          r"preference pairs in source\(s\) \['data'\] as much as the chosen ones"):
        trainer.train(cfg, tmp_path / "run")
    cfg = load_config_file("sft_tiny.py", str(base))
    cfg.objective.name, cfg.checkpoint.maintenance_url, cfg.data.cache_dir = objective, "", str(tmp_path / "cache")
    cfg.data.eval_sources.pairs = eval_source(str(tmp_path / "prepared"))
    with pytest.raises(ConfigError, match=r"data.eval_sources \['pairs'\] hold preference pairs, whose rejected "):
        trainer.train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert evaluate.main(["--checkpoint", str(base), "--data", str(tmp_path / "prepared")]) == 2
    assert "holds preference pairs, whose rejected responses would be scored" in capsys.readouterr().err


def test_evaluation_only_sets_score_chat_by_its_masks_and_text_by_every_token(base, tmp_path):
    """A chat set is scored as the training source's held-out split is (that same split gives the same figure,
    bitwise); a text set, which shows what fine-tuning forgets, scores every token."""
    text = "def add(a, b):\n    return a + b\n"
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "add.txt").write_text(text)
    cfg = load_config_file("sft_tiny.py", str(base))
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.eval_sources.again = eval_source(cfg.data.source)
    cfg.data.eval_sources.text = eval_source(str(tmp_path / "text"))
    cfg.data.seq_len, cfg.train.steps, cfg.train.eval_every, cfg.train.log_every = 128, 4, 2, 2
    cfg.checkpoint.every_steps, cfg.checkpoint.maintenance_url = 4, ""
    trainer.train(cfg, tmp_path / "run")
    evals = [line for line in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "eval_loss" in line]
    assert len(evals) == 2 and all(line["eval_loss/again"] == line["eval_loss"] for line in evals), evals

    model, tokenizer_path = checkpoint.load_model(tmp_path / "run")
    tokens = jnp.asarray(Tokenizer.from_file(tokenizer_path).encode_documents([text])[0])
    logits = model(tokens[None, :-1])[0].astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], axis=-1).mean()
    assert evals[-1]["eval_loss/text"] == pytest.approx(float(nll), rel=1e-4)
