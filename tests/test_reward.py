"""Reward model (objective "reward"): a scalar head on the last hidden state, the Bradley-Terry loss, training that
separates the pairs, and the held-out evaluation."""

from __future__ import annotations

import math
import re

import jax
import numpy as np
import pytest
from flax import nnx

from posttrain_fixtures import tiny_base
from test_dpo import data_of, dpo_config, jitted_step

from llama_jax import trainer
from llama_jax import train_step
from llama_jax.config import model_config, validate
from llama_jax.errors import ConfigError
from llama_jax.model import ModelDef
from llama_jax.objectives import reward


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


def reward_config(base, **changes):
    return dpo_config(base, objective__name="reward", **changes)


def test_multiple_choice_tasks_are_refused_for_a_reward_model(base):
    """They scored the choices through a language model built from the reward model's parameters, head included:
    a Flax traceback at the first evaluation, before any checkpoint."""
    cfg = reward_config(base, train__eval_tasks="stdlib_mc")
    with pytest.raises(ConfigError, match=r"^train.eval_tasks scores the choices of a language model, and a reward "
                                          r"model's output is its score head: leave train.eval_tasks empty"):
        validate(cfg)
    validate(reward_config(base))
    validate(dpo_config(base, train__eval_tasks="stdlib_mc"))


def test_the_loss_equals_the_formula(base, tmp_path):
    cfg = reward_config(base)
    batch = data_of(cfg, tmp_path).batches.local_batch(0)
    model_def = ModelDef(model_config(cfg))
    with nnx.use_eager_sharding(False):
        model = model_def.merge(model_def.init(1))
    head = np.random.default_rng(0).normal(size=cfg.model.dim).astype(np.float32)
    loss, metrics = reward.reward_loss(model, head, batch, reward.counts(batch))

    def score(prefix):
        h = np.asarray(model.hidden(batch[prefix + "tokens"], segment_ids=batch[prefix + "segment_ids"],
                                    positions=batch[prefix + "positions"]), np.float64)
        last = (batch[prefix + "segment_ids"] > 0).sum(1) - 1  # one sequence per row, then padding
        return h[np.arange(len(h)), last] @ head

    margin = score("") - score("rejected_")
    np.testing.assert_allclose(float(loss), np.mean(np.log1p(np.exp(-margin))), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["pairwise_accuracy"]), np.mean(margin > 0))


def test_training_separates_the_pairs_and_the_head_is_its_own_parameter(base, tmp_path):
    cfg = reward_config(base, optim__lr=3e-3, optim__warmup_steps=0)
    run = trainer.setup(cfg, tmp_path)
    data = data_of(cfg, tmp_path)
    assert run.abstract_state.params[reward.HEAD].shape == (cfg.model.dim,)
    held = run.to_global(data.batches.local_batch(0))
    with jax.set_mesh(run.mesh):
        step = jitted_step(run, cfg)
        eval_fn = jax.jit(train_step.make_eval_step(run.model_def, run.layers_fn, objective=cfg.objective))
        state = run.init()
        assert not np.any(np.asarray(state.params[reward.HEAD]))
        state, first = step(state, held)
        for i in range(1, 12):
            state, _ = step(state, held if i % 2 == 0 else run.to_global(data.batches.local_batch(i)))
        state, last = step(state, held)
        loss_sum, pairs, held_out = eval_fn(state.params, run.to_global(data.eval_sets["data"][0]))
        in_parts = jax.jit(train_step.make_eval_step(run.model_def, run.layers_fn, objective=cfg.objective,
                                                  microbatches=2))
        in_parts = in_parts(state.params, run.to_global(data.eval_sets["data"][0]))
    np.testing.assert_allclose(float(first["loss"]), math.log(2), rtol=1e-6)  # a zero head ties every pair
    assert float(last["pairwise_accuracy"]) > 0.9 and float(last["loss"]) < math.log(2) - 0.1, last
    assert float(pairs) > 0 and np.isfinite(float(loss_sum))
    assert 0 <= float(held_out["pairwise_accuracy"]) <= float(pairs)  # correctly ordered pairs, summed
    np.testing.assert_allclose(float(in_parts[0]), float(loss_sum), rtol=1e-5)  # evaluated in two microbatches
    assert (float(in_parts[1]), float(in_parts[2]["pairwise_accuracy"])) == (
        float(pairs), float(held_out["pairwise_accuracy"]))


@pytest.fixture(scope="module")
def reward_run(base, tmp_path_factory):
    from test_rejection_sample import save_reward_run

    path = tmp_path_factory.mktemp("reward")
    save_reward_run(reward_config(base, optim__lr=3e-3, optim__warmup_steps=0), base, path)
    return path


def test_a_reward_model_exports_as_a_sequence_classifier_with_the_same_scores(reward_run, tmp_path, capsys):
    import torch
    import transformers

    from llama_jax import convert

    assert convert.main(["--from", "ours", "--to", "hf", str(reward_run), str(tmp_path / "hf")]) == 0
    assert convert.main(["--from", "ours", "--to", "meta", str(reward_run), str(tmp_path / "meta")]) == 2
    assert "reward model, whose score head has no place in a Meta checkpoint" in capsys.readouterr().err
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.num_labels == 1

    run = reward.load_reward_model(reward_run)
    rows, padded = scored_rows(hf.config.pad_token_id)
    ours = float32_scores(run.model, run.head, rows)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(padded)).logits[:, 0].numpy()
    assert np.abs(ours).max() > 1e-3, "the head trained"
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)

    # and back: read as it is, or converted to our format, it is the run's reward model, scoring where the run does
    # (both were refused as an unsupported architecture)
    assert convert.main(["--from", "hf", "--to", "ours", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 0
    for path in (tmp_path / "hf", tmp_path / "ours"):
        back = reward.load_reward_model(path)
        assert not back.scores_end_token
        np.testing.assert_array_equal(np.asarray(back.head), np.asarray(run.head))
        np.testing.assert_allclose(float32_scores(back.model, back.head, rows), ours, rtol=1e-5, atol=1e-6)


def foreign_reward_model(base, path):
    """A reward model as Hugging Face's tools make one: transformers' LlamaForSequenceClassification (one label,
    untied, so without an output projection) on the base's config, randomly initialised, with the base's tokenizer
    and chat template."""
    import json
    import shutil

    import torch
    import transformers

    config = json.loads((base / "config.json").read_text())
    config.update(architectures=["LlamaForSequenceClassification"], num_labels=1, tie_word_embeddings=False,
                  pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**config))
    model.save_pretrained(path)
    for file in base.iterdir():
        if not (path / file.name).exists():
            shutil.copy(file, path / file.name)
    return path


def test_a_hugging_face_reward_model_scores_its_chat_templated_text_as_transformers_does(base, tmp_path, capsys):
    """Rejection sampling and conversion refused any LlamaForSequenceClassification as an unsupported architecture.
    One from elsewhere is read as it is, and scores the conversation as transformers does on its chat template's
    tokens (apply_chat_template, as TRL trains them): through the end token, where ours score the token before."""
    import torch
    import transformers

    from llama_jax import average, convert, generate
    from llama_jax.data.chat import ChatFormat
    from llama_jax.data.tokenizer import Tokenizer
    from llama_jax.rejection_sample import reward_scorer

    path = foreign_reward_model(base, tmp_path / "rm")
    loaded = reward.load_reward_model(path)
    assert loaded.scores_end_token and not np.any(np.asarray(loaded.model.lm_head[...]))
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
    rows, padded = scored_rows(hf.config.pad_token_id)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(padded)).logits[:, 0].numpy()
    np.testing.assert_allclose(float32_scores(loaded.model, loaded.head, rows), theirs, rtol=1e-4, atol=1e-5)

    conversations = [[{"role": "user", "content": "What does shlex.split do?"},
                      {"role": "assistant", "content": "It splits a string as a shell would."}],
                     [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]]
    fmt = ChatFormat.from_directory(loaded.tokenizer, Tokenizer.from_file(loaded.tokenizer))
    scored = reward_scorer(loaded.model, loaded.head, fmt, scores_end_token=True)(conversations)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with torch.no_grad():
        templated = [hf(input_ids=torch.tensor([tokenizer.apply_chat_template(c, tokenize=True, return_dict=False)])
                        ).logits[0, 0].item() for c in conversations]
    np.testing.assert_allclose(scored, templated, rtol=1e-4, atol=1e-5)

    assert convert.main(["--from", "hf", "--to", "hf", str(path), str(tmp_path / "copy")]) == 0
    assert reward.load_reward_model(tmp_path / "copy").scores_end_token  # a copy keeps where it scores
    assert convert.main(["--from", "hf", "--to", "ours", str(path), str(tmp_path / "ours")]) == 2
    assert average.main([str(path), str(tmp_path / "copy"), "--out", str(tmp_path / "mean")]) == 2
    err = capsys.readouterr().err
    assert err.count("is a reward model that scores the end token, where llama_jax's score the token before it") == 2
    assert convert.main(["--from", "hf", "--to", "meta", str(path), str(tmp_path / "meta")]) == 2
    assert capsys.readouterr().err.endswith("convert it with --to hf (a LlamaForSequenceClassification)\n")
    assert generate.main(["--checkpoint", str(path), "--prompt", "def", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a reward model (LlamaForSequenceClassification): it scores responses" in err


def scored_rows(pad: int) -> tuple[dict, np.ndarray]:
    """Three rows of 9, 17 and 5 random tokens as our reward model reads them (segment ids and positions), and as
    transformers' sequence classifier does: padded with `pad`, so that it scores the last token that is not padding."""
    rng = np.random.default_rng(0)
    rows = {key: np.zeros((3, 17), np.int32) for key in ("tokens", "segment_ids", "positions")}
    padded = np.full((3, 17), pad, np.int64)
    for i, n in enumerate((9, 17, 5)):
        rows["tokens"][i, :n] = padded[i, :n] = rng.integers(0, 1000, n)
        rows["segment_ids"][i, :n], rows["positions"][i, :n] = 1, np.arange(n)
    return rows, padded


def float32_scores(model, head, rows: dict) -> np.ndarray:
    """`reward.scores` with the model computing in float32, as the exports do."""
    f32 = ModelDef(model.cfg.replace(dtype="float32")).merge(nnx.to_pure_dict(nnx.state(model)))
    return np.asarray(reward.scores(f32, head, rows))


def test_a_reward_model_is_not_read_as_a_language_model(base, reward_run, capsys):
    """Its checkpoint holds the head beside the model's parameters: generating from it or fine-tuning from it said
    the checkpoint was damaged, in Orbax's words, where it is whole."""
    from llama_jax import generate
    from llama_jax.checkpoint import load_pretrained
    from llama_jax.errors import CheckpointError

    expected = (rf"checkpoints/4 is a reward model \(objective.name='reward'\): it scores responses, .* not read as a "
                rf"language model. Generate from or fine-tune the run it started from \({base}\)")
    assert generate.main(["--checkpoint", str(reward_run), "--prompt", "def", "--max_new_tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(expected, err), err
    with pytest.raises(CheckpointError, match=expected):
        load_pretrained(reward_run, model_config(reward_config(base)), shardings={})


def test_converted_and_averaged_reward_models_keep_their_head(base, reward_run, tmp_path, capsys):
    """Our format's writer dropped the head: `convert --to ours` was refused, and `average` wrote a language model."""
    from llama_jax import average, convert

    head = reward.load_reward_model(reward_run).head
    assert np.abs(np.asarray(head)).max() > 1e-3, "the head trained"
    assert convert.main(["--from", "ours", "--to", "ours", str(reward_run), str(tmp_path / "copy")]) == 0
    assert average.main([str(reward_run), str(tmp_path / "copy"), "--out", str(tmp_path / "avg")]) == 0
    for written in ("copy", "avg"):
        np.testing.assert_array_equal(np.asarray(reward.load_reward_model(tmp_path / written).head), np.asarray(head))
    assert average.main([str(reward_run), str(base), "--out", str(tmp_path / "mixed")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"base\S* is a language model and \S*reward\S* a reward model: average checkpoints of one run",
                     err), err


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_an_annealing_phase_averages_reward_models_heads_included(base, tmp_path, lora_rank):
    """The phase's average is evaluated with its head and is a reward model that rejection sampling reads (it was
    written without the head, and reading it back for the evaluation failed with a pytree error). With LoRA the
    checkpoints hold adapters and head (that the average is of the merged models, test_lora checks)."""
    import orbax.checkpoint as ocp

    from llama_jax.phases import phase

    cfg = reward_config(base, optim__lr=3e-3, optim__warmup_steps=0, lora__rank=lora_rank)
    cfg.phases = (phase("anneal", steps=2, lr="anneal", average=True),)
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.data.eval_batches = 2, 1, 0, 1
    cfg.checkpoint.every_steps, cfg.checkpoint.max_to_keep = 1, 10
    logged = trainer.train(cfg, tmp_path)
    assert 0 <= logged["averaged/eval_pairwise_accuracy"] <= 1 and math.isfinite(logged["averaged/eval_loss"])
    restore = ocp.StandardCheckpointer().restore
    heads = [np.asarray(restore(tmp_path / "checkpoints" / str(step) / "params")[reward.HEAD]) for step in (3, 4)]
    assert np.abs(heads[0] - heads[1]).max() > 0
    averaged = reward.load_reward_model(tmp_path / "averaged").head
    np.testing.assert_allclose(np.asarray(averaged), np.mean(np.asarray(heads, np.float64), axis=0), rtol=1e-6)
