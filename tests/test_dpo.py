"""DPO (objective "dpo"): the loss and its gradient are the Llama 3 formula, policy == reference gives log 2 and a
zero margin, the microbatched step equals the full batch, and training on separable pairs raises the reward
accuracy."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from config_files import load_config_file
from posttrain_fixtures import tiny_base

from llama_jax import checkpoint, phase_data, trainer
from llama_jax import train_step
from llama_jax.config import eval_source, model_config
from llama_jax.data.corpus import load_corpus
from llama_jax.data.pipeline import pair_row
from llama_jax.data.preferences import prepare_preferences
from llama_jax.data.shards import ShardedCorpus
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.errors import ConfigError
from llama_jax.model import ModelDef
from llama_jax.objectives import dpo
from llama_jax.objectives.pairs import PAIR_KEYS, pair_count, valid_pairs
from llama_jax.parallel import mesh as mesh_lib
from llama_jax.phases import RunPlan
from llama_jax.workdir import read_jsonl

SEQ = 128
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_base(tmp_path_factory.mktemp("base"))


def dpo_config(base, **changes):
    cfg = load_config_file("dpo_tiny.py", str(base))
    cfg.data.seq_len, cfg.data.batch_size, cfg.objective.loss_chunk_len = SEQ, 8, 32
    cfg.checkpoint.maintenance_url = ""
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 2, 2, 2  # 4 batch shards: 2 microbatches of 4 pairs fit
    for key, value in changes.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def data_of(cfg, tmp_path):
    corpus = load_corpus(cfg.data, cfg.model.vocab_size)
    return phase_data.phase_data(RunPlan(cfg).phases[0], corpus, Tokenizer.from_file(corpus.tokenizer_path).pad_id)


def jitted_step(run, cfg):
    fn = train_step.make_train_step(run.model_def, run.tx, run.schedule, cfg.optim.grad_accum, run.layers_fn,
                                 loss_chunk_len=cfg.objective.loss_chunk_len, objective=cfg.objective)
    return jax.jit(fn, in_shardings=(run.state_shardings, run.batch_sharding),
                   out_shardings=(run.state_shardings, mesh_lib.replicated(run.mesh))).lower(
        run.abstract_state, {k: jax.ShapeDtypeStruct((cfg.data.batch_size, SEQ), np.float32 if "mask" in k else np.int32,
                                                     sharding=run.batch_sharding) for k in PAIR_KEYS}
    ).compile(FAST_COMPILE)


def log_softmax64(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_the_pair_batches_mask_headers_and_end_tokens_out_of_the_dpo_logps(base, tmp_path):
    cfg = dpo_config(base)
    batch = data_of(cfg, tmp_path).batches.local_batch(0)
    assert set(batch) == set(PAIR_KEYS)
    tokenizer = Tokenizer.from_file(base)
    eot = tokenizer.special_tokens["<|eot_id|>"]
    for prefix in ("", "rejected_"):
        targets, mask = batch[prefix + "targets"], batch[prefix + "loss_mask"]
        assert np.all(mask.sum(1) > 0) and not np.any(targets[mask == 1] == eot)
    extra = (batch["nll_mask"] == 1) & (batch["loss_mask"] == 0)
    assert np.all(batch["targets"][extra] == eot) and np.all(extra.sum(1) == 1), "the NLL mask adds the end token"


def test_a_pair_whose_chosen_response_is_empty_counts_and_a_padding_row_does_not(base, tmp_path):
    """Preferring no answer to a harmful one is a pair: its chosen response masks no token (its end token is left
    out of the DPO log-probs), and it was taken for an evaluation padding row, out of every loss and count."""
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "How do I pick a lock?", "chosen": "", "rejected": "Insert a wrench"}) +
                     "\n" + json.dumps({"prompt": "hi", "chosen": "hello", "rejected": "go away"}) + "\n")
    assert prepare_preferences(pairs, base, tmp_path / "out", eval_fraction=0) == {"train": 2}
    store = ShardedCorpus.open(tmp_path / "out" / "train")
    rows = [pair_row(store, pair, SEQ, 0) for pair in range(2)]
    rows.append({key: np.zeros_like(value) for key, value in rows[0].items()})  # as evaluation pads its last batch
    batch = {key: np.stack([row[key] for row in rows]) for key in rows[0]}
    assert batch["loss_mask"][0].sum() == 0 < batch["loss_mask"][1].sum()
    np.testing.assert_array_equal(valid_pairs(batch), [1, 1, 0])
    assert float(pair_count(batch)) == 2


def test_the_loss_equals_the_formula_in_float64(base, tmp_path):
    cfg = dpo_config(base)
    batch = data_of(cfg, tmp_path).batches.local_batch(0)
    model_def = ModelDef(model_config(cfg))
    with nnx.use_eager_sharding(False):
        policy_params = model_def.init(1)
        reference_params = jax.tree.map(lambda x: x * 1.05, policy_params)
    policy, reference = model_def.merge(policy_params), model_def.merge(reference_params)
    beta, nll_coef = 0.1, 0.2
    totals = dpo.counts(batch)
    loss, metrics = dpo.dpo_loss(policy, reference, batch, totals, beta=beta, nll_coef=nll_coef, chunk_len=32)

    def sums(prefix):
        tokens = batch[prefix + "tokens"]
        kw = dict(segment_ids=batch[prefix + "segment_ids"], positions=batch[prefix + "positions"])
        lp_pol, lp_ref = (log_softmax64(m(tokens, **kw)) for m in (policy, reference))
        targets = batch[prefix + "targets"][..., None]
        tok_pol = np.take_along_axis(lp_pol, targets, -1)[..., 0]
        tok_ref = np.take_along_axis(lp_ref, targets, -1)[..., 0]
        kl = (np.exp(lp_pol) * (lp_pol - lp_ref)).sum(-1)
        mask = batch[prefix + "loss_mask"]
        return (tok_pol * mask).sum(1), (tok_ref * mask).sum(1), tok_pol, (kl * mask).sum()

    pol_c, ref_c, tok_c, kl_c = sums("")
    pol_r, ref_r, _, kl_r = sums("rejected_")
    margin = beta * ((pol_c - ref_c) - (pol_r - ref_r))
    nll = -(tok_c * batch["nll_mask"]).sum() / batch["nll_mask"].sum()
    expected = np.mean(np.log1p(np.exp(-margin))) + nll_coef * nll
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["reward_margin"]), margin.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(metrics["logps_chosen"]), pol_c.mean(), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["logps_rejected"]), pol_r.mean(), rtol=2e-5)
    np.testing.assert_allclose(float(metrics["reward_accuracy"]), (margin > 0).mean())
    kl_tokens = batch["loss_mask"].sum() + batch["rejected_loss_mask"].sum()
    np.testing.assert_allclose(float(metrics["kl"]), (kl_c + kl_r) / kl_tokens, rtol=1e-3)
    assert float(metrics["kl"]) > 1e-4, "a different reference gives a positive KL"


def test_step_zero_is_log_2_with_a_zero_margin_and_accumulation_equals_the_full_batch(base, tmp_path):
    results = []
    for grad_accum in (1, 2):
        # A first step that moves the parameters (no warmup), computed in float32: AdamW's first step moves an entry
        # by about lr whatever its gradient, so entries whose gradient is bfloat16 rounding noise would differ by ~lr
        cfg = dpo_config(base, optim__grad_accum=grad_accum, optim__warmup_steps=0, model__dtype="float32")
        run = trainer.setup(cfg, tmp_path)
        batch = run.to_global(data_of(cfg, tmp_path).batches.local_batch(0))
        with jax.set_mesh(run.mesh):
            state = run.init()
            reference = jax.tree.map(np.asarray, dpo.reference_of(state.opt_state))
            state, metrics = jitted_step(run, cfg)(state, batch)
        metrics = jax.device_get(metrics)
        assert abs(metrics["reward_margin"]) < 1e-6 and abs(metrics["kl"]) < 1e-6
        assert metrics["reward_accuracy"] == 0.0
        np.testing.assert_allclose(metrics["dpo_loss"], math.log(2), rtol=1e-6)
        np.testing.assert_allclose(metrics["loss"], math.log(2) + 0.2 * metrics["nll"], rtol=1e-6)
        after = jax.tree.map(np.asarray, dpo.reference_of(state.opt_state))
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(after))), \
            "the reference never moves"
        results.append((metrics, jax.tree.map(np.asarray, state.params)))
    (full, full_params), (accumulated, accumulated_params) = results
    for key in ("loss", "grad_norm", "logps_chosen", "logps_rejected", "nll"):
        np.testing.assert_allclose(accumulated[key], full[key], rtol=2e-5, err_msg=key)
    moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(reference))]
    assert min(moved) > 0.5 * cfg.optim.lr, moved
    for a, b in zip(jax.tree.leaves(full_params), jax.tree.leaves(accumulated_params)):
        np.testing.assert_allclose(a, b, atol=2e-6)


def test_a_few_steps_on_separable_pairs_raise_the_reward_accuracy(base, tmp_path):
    cfg = dpo_config(base, optim__lr=3e-3, optim__warmup_steps=0)
    run = trainer.setup(cfg, tmp_path)
    batches = data_of(cfg, tmp_path).batches
    held = run.to_global(batches.local_batch(0))
    accuracy = []
    with jax.set_mesh(run.mesh):
        step = jitted_step(run, cfg)
        state = run.init()
        for i in range(12):
            state, metrics = step(state, held if i % 2 == 0 else run.to_global(batches.local_batch(i)))
            accuracy.append(float(metrics["reward_accuracy"]))
        state, last = step(state, held)
    assert accuracy[0] == 0.0 and float(last["reward_accuracy"]) > 0.9, (accuracy, last)
    assert float(last["reward_margin"]) > 0 and float(last["kl"]) > 0


def test_dpo_refuses_data_that_is_not_preference_pairs(base, tmp_path):
    cfg = dpo_config(base)
    cfg.data.source = load_config_file("sft_tiny.py", str(base)).data.source
    with pytest.raises(ConfigError, match="python -m llama_jax.data.preferences"):
        data_of(cfg, tmp_path)
    cfg = dpo_config(base)
    cfg.checkpoint.init_from = ""
    with pytest.raises(ConfigError, match="checkpoint.init_from"):
        trainer.setup(cfg, tmp_path)


@pytest.mark.parametrize("objective, keys", [
    ("dpo", ("reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected", "kl")),
    ("reward", ("pairwise_accuracy", "score_margin")),
])
def test_the_trainer_runs_dpo_and_the_reward_model_end_to_end(base, tmp_path, objective, keys):
    """Through `trainer.train`, as the CLI runs it: the objective's metrics reach metrics.jsonl."""
    import json

    cfg = dpo_config(base, objective__name=objective, train__steps=4, train__log_every=2, train__eval_every=4,
                     checkpoint__every_steps=2)
    logged = trainer.train(cfg, tmp_path / objective)
    lines = [json.loads(line) for line in (tmp_path / objective / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [2, 4]
    for key in keys:
        assert all(math.isfinite(m[key]) for m in lines), key
    assert math.isfinite(logged["eval_loss"])
    if objective == "reward":  # held out: the share of pairs the model orders right
        assert 0.0 <= logged["eval_pairwise_accuracy"] <= 1.0


@pytest.mark.parametrize("objective", ["dpo", "reward"])
def test_evaluation_only_sets_score_pairs_as_the_run_does_and_dpo_also_text(base, tmp_path, objective):
    """The training pairs' own directory, as a set, gives the run's own figures; a text set (what DPO forgets) is
    scored on every token; a reward model, which scores pairs only, refuses text."""
    text = "def add(a, b):\n    return a + b\n"
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "add.txt").write_text(text)
    cfg = dpo_config(base, objective__name=objective, train__steps=2, train__log_every=2, train__eval_every=2,
                     checkpoint__every_steps=2)
    cfg.data.cache_dir = str(tmp_path / "cache")
    cfg.data.eval_sources.again = eval_source(cfg.data.source)
    cfg.data.eval_sources.text = eval_source(str(tmp_path / "text"))
    if objective == "reward":
        with pytest.raises(ConfigError, match="data.eval_sources.text is not a preference corpus, and a reward model "
                                              "scores pairs only"):
            trainer.train(cfg, tmp_path / "refused")
        del cfg.data.eval_sources.text
    trainer.train(cfg, tmp_path / "run")
    line = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert line["eval_loss/again"] == line["eval_loss"]
    if objective == "reward":
        assert line["eval_pairwise_accuracy/again"] == line["eval_pairwise_accuracy"]
        return
    model, tokenizer_path = checkpoint.load_model(tmp_path / "run")
    tokens = jnp.asarray(Tokenizer.from_file(tokenizer_path).encode_documents([text])[0])
    logits = model(tokens[None, :-1])[0].astype(jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[1:, None], axis=-1).mean()
    assert line["eval_loss/text"] == pytest.approx(float(nll), rel=1e-4)


class Bigram:
    """A stand-in model whose logits at a position are a table's row for the token there: its parameters are logits
    themselves, so float64 NumPy can differentiate the DPO loss by hand."""

    def __init__(self, table_vv):
        self.table_vv = table_vv

    def hidden(self, tokens_bt, **_):
        return self.table_vv[tokens_bt]

    def logits(self, h_btv):
        return h_btv


@pytest.mark.parametrize("chunk_len", [0, 2])
def test_the_gradient_equals_the_formula_in_float64(chunk_len):
    rng = np.random.default_rng(0)
    v, b, t, beta, nll_coef = 7, 3, 6, 0.1, 0.2
    response = np.zeros((b, t), np.float32)
    response[:2, 2:5] = 1  # the responses' content tokens; row 2 is padding (no pair)
    end = np.zeros((b, t), np.float32)
    end[:2, 5] = 1  # the end token: in the NLL term, not in the log-probabilities
    batch = {"nll_mask": response + end}
    segment_ids = np.ones((b, t), np.int32)
    segment_ids[2] = 0  # evaluation's padding rows are all zeros
    for prefix in ("", "rejected_"):
        batch.update({prefix + "tokens": rng.integers(0, v, (b, t)).astype(np.int32),
                      prefix + "targets": rng.integers(0, v, (b, t)).astype(np.int32),
                      prefix + "loss_mask": response, prefix + "segment_ids": segment_ids,
                      prefix + "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))})
    policy_vv, reference_vv = rng.normal(size=(v, v)), rng.normal(size=(v, v))

    def loss_of(table_vv):
        return dpo.dpo_loss(Bigram(table_vv), Bigram(jnp.asarray(reference_vv, jnp.float32)), batch, dpo.counts(batch),
                            beta=beta, nll_coef=nll_coef, chunk_len=chunk_len)[0]

    loss, grad_vv = jax.value_and_grad(loss_of)(jnp.asarray(policy_vv, jnp.float32))

    def token_logps(table_vv, prefix):
        logp_btv = log_softmax64(table_vv[batch[prefix + "tokens"]])
        return logp_btv, np.take_along_axis(logp_btv, batch[prefix + "targets"][..., None], -1)[..., 0]

    (lp_c, tok_c), (_, ref_tok_c) = token_logps(policy_vv, ""), token_logps(reference_vv, "")
    (lp_r, tok_r), (_, ref_tok_r) = token_logps(policy_vv, "rejected_"), token_logps(reference_vv, "rejected_")
    valid = segment_ids.any(1).astype(np.float64)
    margin = beta * (((tok_c - ref_tok_c) * response).sum(1) - ((tok_r - ref_tok_r) * response).sum(1))
    nll_tokens = batch["nll_mask"].sum()
    expected = np.sum(valid * np.log1p(np.exp(-margin))) / valid.sum() \
        - nll_coef * (tok_c * batch["nll_mask"]).sum() / nll_tokens
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)

    # d(-log sigmoid(m))/dm = -sigmoid(-m); d log p(target)/d logits = onehot(target) - softmax.
    d_margin = -valid / (1 + np.exp(margin)) / valid.sum()
    d_tok_c = beta * d_margin[:, None] * response - nll_coef * batch["nll_mask"] / nll_tokens
    d_tok_r = -beta * d_margin[:, None] * response
    expected_grad = np.zeros((v, v))
    for prefix, lp, d_tok in (("", lp_c, d_tok_c), ("rejected_", lp_r, d_tok_r)):
        d_logits = d_tok[..., None] * (np.eye(v)[batch[prefix + "targets"]] - np.exp(lp))
        np.add.at(expected_grad, batch[prefix + "tokens"], d_logits)
    assert np.abs(expected_grad).max() > 1e-3
    np.testing.assert_allclose(np.asarray(grad_vv), expected_grad, rtol=1e-4, atol=1e-6)
