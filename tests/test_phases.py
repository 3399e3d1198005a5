"""Phases, the Llama 3 recipe as config data, token-based schedules, and what a bad step does."""

import ast
import json
import math
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from cli_run import CLI_ENV, REPO, cache_dir, read_metrics  # noqa: F401 (a fixture)
from cli_run import without_timing
from config_files import load_config_file

from llama_jax import checkpoint, phase_data, trainer
from llama_jax.config import default_config, eval_source, plain, validate
from llama_jax.data.corpus import Corpus, Source
from llama_jax.data.pipeline import TrainBatches
from llama_jax.data.schedule import BatchSchedule
from llama_jax.data.sources import TokenizedCorpus
from llama_jax.errors import ConfigError
from llama_jax.optim import lr_schedule, run_lr_schedule
from llama_jax.phases import RunPlan, phase
from llama_jax.stability import Diverged, LossGuard

RECIPE = "llama3_recipe_tiny.py"


def test_phases_split_the_run_by_budget_and_count_tokens_across_them():
    cfg = load_config_file(RECIPE, "scale=0.08")
    plan = RunPlan(cfg)
    assert [p.name for p in plan.phases] == ["pretrain", "pretrain_2x", "pretrain_4x", "long_context_256",
                                            "long_context_512", "anneal"]
    for before, after in zip(plan.phases, plan.phases[1:]):
        assert before.stop_step == after.start_step
        assert after.start_tokens == before.tokens_before(before.stop_step)
    # A budget in tokens ends at the first step that reaches it.
    first = plan.phases[0]
    assert first.tokens_before(first.stop_step) >= 8000 > first.tokens_before(first.stop_step - 1)
    tokens_fn = jax.jit(plan.tokens_fn())
    for step in range(plan.total_steps + 1):
        assert float(tokens_fn(step)) == plan.tokens_before(step)
        if step < plan.total_steps:
            p = plan.phase_at(step)
            assert p.start_step <= step < p.stop_step
    assert plan.phase_of_checkpoint(plan.phases[1].start_step) is plan.phases[0]
    anneal = plan.phases[-1]
    assert anneal.average and plan.keep_steps() == anneal.save_steps() and anneal.save_steps()[-1] == plan.total_steps
    long_context = plan.phases[3].cfg
    assert long_context.model.rope_type == "llama3" and plan.phases[0].cfg.model.rope_type == "default"
    assert load_config_file(RECIPE, "devices=2").phases[2].overrides.mesh.context == 2


def test_a_phase_may_evaluate_on_its_own_sets():
    cfg = default_config()
    cfg.phases = (phase("long", steps=5, data=dict(eval_sources=dict(books=eval_source("pydoc_topics")))),)
    validate(cfg)
    first, long = RunPlan(cfg).phases
    assert not first.cfg.data.eval_sources and long.cfg.data.eval_sources.books.source == "pydoc_topics"


def test_a_token_budget_in_scientific_notation_is_a_whole_number_of_steps():
    cfg = default_config()
    cfg.phases = (phase("anneal", tokens=1.6e4, lr="anneal", average=True),)
    validate(cfg)
    anneal = RunPlan(cfg).phases[1]
    assert isinstance(anneal.stop_step, int) and anneal.num_steps == 4  # 16 x 256 tokens a step


def test_a_phase_continuing_the_schedule_after_an_annealing_is_refused():
    cfg = default_config()
    cfg.phases = (phase("anneal", steps=5, lr="anneal"), phase("more", steps=5))
    with pytest.raises(ConfigError, match=r"phases\[1\]: lr='continue' after an annealing phase would jump back up"):
        validate(cfg)
    cfg.phases = (phase("more", steps=5), phase("anneal", steps=5, lr="anneal"), phase("again", steps=5, lr="anneal"))
    validate(cfg)


@pytest.mark.parametrize("entry, message", [
    (phase("x", steps=5, train=dict(steps=3)), "section 'train' cannot change in a phase"),
    (phase("x", steps=5, optim=dict(lr=1.0)), "optim.lr belongs to the whole run"),
    (phase("x", steps=5, model=dict(dim=128)), "changes the architecture (model.dim=128 (first phase: 256))"),
    (phase("x", steps=5, data=dict(seq_lenn=8)), "unknown key data.seq_lenn"),
    (phase("x", steps=5, data=dict(seq_len=100_000)), "exceeds model.max_seq_len"),
    (phase("x"), "give a budget in steps or in tokens"),
    (phase("x", steps=5, tokens=5), "give a budget in steps or in tokens"),
    (phase("pretrain", steps=5), "phase name 'pretrain' is used twice"),
    (phase("x", steps=5, lr="cosine"), "lr='cosine' is not one of"),
    (phase("x", steps=5, data=dict(eval_sources=dict(data=eval_source("pydoc_topics")))),
     "data.eval_sources ['data'] has the name of a training source"),
    (phase("x", steps=5, checkpoint=dict(max_to_keep=10)), "checkpoint.max_to_keep belongs to the whole run"),
    (phase("x", steps=5, objective=dict(name="dpo")),
     "trains another state than the run (DPO reference (objective.name='dpo'): False -> True)"),
    (phase("x", steps=5, objective=dict(name="reward")), "(reward head (objective.name='reward'): False -> True): lm and sft may follow"),
    # a float budget trained on float step numbers and never saved its last; a negative one ended the run before it
    (phase("x", steps=2.5), "phases[0]: steps=2.5 (must be a whole number, 0 or more)"),
    (phase("x", steps=-5, tokens=1000), "phases[0]: steps=-5 (must be a whole number, 0 or more)"),
    (phase("x", steps=5, tokens=-1000), "phases[0]: tokens=-1000 (must be a whole number, 0 or more)"),
    (phase("x", steps=5, average="yes"), "phases[0]: average='yes' (must be True or False)"),
    (phase(7, steps=5), "phases[0]: name=7 (must be a string)"),
    (phase("x", steps=5, data=dict(batch_size=16.0)),
     "phases[0] ('x'): data.batch_size=16.0 is a float, and data.batch_size takes a whole number"),
    (phase("x", steps=5, data=dict(ramp=(8192, 32, 256))), "data.ramp[0] = 8192 is not an entry"),
])
def test_bad_phases_are_refused_with_the_fix(entry, message):
    cfg = default_config()
    cfg.checkpoint.init_from = cfg.data.tokenizer = "base"  # what DPO and reward models start from
    cfg.phases = (entry,)
    with pytest.raises(ConfigError, match="phases") as err:
        validate(cfg)
    assert message in str(err.value)


def test_a_recipe_scaled_below_its_fixed_annealing_is_refused_naming_the_budget():
    """The tiny recipe's scale=0.05 left its main stage -5,960 tokens: an error naming a phase the user never wrote."""
    with pytest.raises(ConfigError, match=r"^the recipe's 75,000 tokens leave its main stage none: the batch ramp takes "
                                          r"20,000, the long-context stages 20,000 and the annealing 40,960; raise"):
        load_config_file("llama3_recipe_tiny.py", "scale=0.05")
    load_config_file("llama3_recipe_tiny.py", "scale=0.08")


def test_405b_recipe_gives_the_published_schedule_and_batch_ramp():
    cfg = load_config_file("llama3_405b.py")
    plan = RunPlan(cfg)
    schedule = run_lr_schedule(cfg.optim, plan)
    assert float(schedule(8000)) == pytest.approx(8e-5, rel=1e-6)  # peak after 8,000 warmup steps
    assert float(schedule(4000)) == pytest.approx(4e-5, rel=1e-6)
    # Cosine to 8e-7 at step 1.2M (the base schedule: annealing takes over before the run gets there).
    assert float(lr_schedule(cfg.optim, plan.total_steps)(1_200_000)) == pytest.approx(8e-7, rel=1e-4)
    names = [p.name for p in plan.phases]
    by_name = dict(zip(names, plan.phases))
    tokens_per_step = {name: p.cfg.data.batch_size * p.cfg.data.seq_len for name, p in by_name.items()}
    assert tokens_per_step["pretrain"] == 4_194_304 and by_name["pretrain"].cfg.data.seq_len == 4096
    assert tokens_per_step["pretrain_2x"] == 8_388_608 and by_name["pretrain_2x"].cfg.data.seq_len == 8192
    assert tokens_per_step["pretrain_4x"] == 16_777_216
    # Each batch doubling happens at the first step past the published token count.
    assert 0 <= by_name["pretrain_2x"].start_tokens - 252_000_000 < 4_194_304
    assert 0 <= by_name["pretrain_4x"].start_tokens - 2_870_000_000_000 < 8_388_608
    long_stages = [p for p in plan.phases if p.name.startswith("long_context")]
    assert [p.cfg.data.seq_len for p in long_stages] == [16384, 32768, 65536, 131072]
    assert sum(p.tokens_before(p.stop_step) - p.start_tokens for p in long_stages) == pytest.approx(800e9, rel=1e-3)
    anneal = by_name["anneal"]
    assert anneal.cfg.data.seq_len == 131072 and anneal.lr == "anneal" and anneal.average
    assert 40_000_000 <= anneal.tokens_before(anneal.stop_step) - anneal.start_tokens < 40_000_000 + 16_777_216
    assert float(schedule(anneal.stop_step)) == 0.0
    assert plan.tokens_before(plan.total_steps) == pytest.approx(15.6e12, rel=1e-3)
    final = plan.phases[-1].cfg.model
    assert (final.rope_type, final.rope_factor, final.rope_original_max_len) == ("llama3", 8.0, 8192)


def test_a_token_schedule_gives_the_same_learning_rate_at_the_same_token_count_whatever_the_ramp():
    def plan_and_schedule(ramp):
        cfg = default_config()
        cfg.data.batch_size, cfg.data.seq_len, cfg.data.ramp = 8, 64, ramp
        cfg.optim.schedule_unit, cfg.optim.warmup_tokens, cfg.optim.decay_tokens = "tokens", 5_120, 40_960
        cfg.train.tokens = 51_200
        validate(cfg)
        plan = RunPlan(cfg)
        return plan, run_lr_schedule(cfg.optim, plan)

    flat, flat_lr = plan_and_schedule(())
    ramped, ramped_lr = plan_and_schedule(((10_240, 16, 64), (20_480, 32, 64)))
    assert ramped.total_steps < flat.total_steps
    for step in range(ramped.total_steps):
        tokens = ramped.tokens_before(step)
        flat_step = tokens // 512
        assert flat.tokens_before(flat_step) == tokens
        assert float(ramped_lr(step)) == pytest.approx(float(flat_lr(flat_step)), rel=1e-5, abs=1e-9)


def test_an_annealing_phase_decays_linearly_from_where_the_schedule_stands():
    cfg = default_config()
    cfg.train.steps, cfg.optim.warmup_steps = 40, 10
    cfg.phases = (phase("more", steps=20), phase("anneal", steps=10, lr="anneal", lr_end=0.0))
    validate(cfg)
    plan = RunPlan(cfg)
    schedule = run_lr_schedule(cfg.optim, plan)
    base = lr_schedule(cfg.optim, 60)  # the decay spans the run up to the annealing phase
    for step in range(61):
        expected = float(base(step)) if step <= 60 else None
        if step >= 60:
            expected = float(base(60)) * (1 - (step - 60) / 10)
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-10)
    assert float(schedule(70)) == 0.0


def _run_cfg(batch_size=16, seq_len=256, ramp=(), phases=()):
    cfg = default_config()
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.ramp = batch_size, seq_len, ramp
    cfg.train.steps, cfg.phases = 30, phases
    return cfg


def _suggested_ramp(err: ConfigError) -> tuple:
    return ast.literal_eval(re.search(r"ramp=(\(.*?\),\)) \(a stage", str(err)).group(1))


def test_a_resume_that_batches_the_trained_steps_otherwise_is_refused_with_the_ramp_that_does_it():
    saved = plain(RunPlan(_run_cfg()).phases[0].cfg)
    RunPlan(_run_cfg()).phases[0].check_resume(saved, 20)
    RunPlan(_run_cfg(ramp=((20 * 16 * 256, 32, 256),))).phases[0].check_resume(saved, 20)  # from step 20 on: fine
    for changed in (_run_cfg(batch_size=32), _run_cfg(seq_len=128), _run_cfg(ramp=((10 * 16 * 256, 32, 256),))):
        with pytest.raises(ConfigError) as err:
            RunPlan(changed).phases[0].check_resume(saved, 20)
        assert str(err.value).startswith("the checkpoint of step 20 was trained with batches 16 x 256 from step 0, ")
        assert "keep data.batch_size=16 and seq_len=256 and set data.ramp=" in str(err.value)
        ramp = _suggested_ramp(err.value)
        fixed = RunPlan(_run_cfg(ramp=ramp)).phases[0]
        fixed.check_resume(saved, 20)  # the suggested ramp trains steps 0-19 as the checkpoint did ...
        new_stage = RunPlan(changed).phases[0].batches.stage(20)
        assert fixed.batches.stage(20).batch_size == new_stage.batch_size, "... and steps from 20 on as asked"
        assert fixed.batches.stage(20).seq_len == new_stage.seq_len and fixed.batches.stage(20).start_step == 20
    assert _suggested_ramp(err.value) == ((20 * 16 * 256, 32, 256),)
    assert RunPlan(_run_cfg(ramp=((20 * 16 * 256, 32, 256),))).phases[0].describe_batches(0) == \
        "16 x 256, 32 x 256 from step 20"
    assert RunPlan(_run_cfg(ramp=((20 * 16 * 256, 32, 256),))).phases[0].describe_batches(25) == "32 x 256"
    # A stage whose start the one before already passed has no steps, and is neither named nor compared.
    skipped = RunPlan(_run_cfg(ramp=((100, 32, 256), (200, 64, 256)))).phases[0]
    assert skipped.describe_batches(0) == "16 x 256, 64 x 256 from step 1"
    assert skipped.batches.placement(5) == [(0, 16, 256), (1, 64, 256)]

    # A later phase's steps count from its own start, and the fix names the phase.
    long = (phase("long", steps=10, data=dict(seq_len=512, batch_size=8)),)
    later = RunPlan(_run_cfg(phases=long)).phases[1]
    later.check_resume(plain(later.cfg), 35)
    with pytest.raises(ConfigError, match=r"step 35 was trained with batches 8 x 512 from step 0, .* 4 x 512 from "
                                          r"step 0: .* keep phases\[0\] \('long'\) data.batch_size=8 and seq_len=512 "
                                          r"and set phases\[0\] \('long'\) data.ramp=\(\(20480, 4, 512\),\)"):
        RunPlan(_run_cfg(phases=(phase("long", steps=10, data=dict(seq_len=512, batch_size=4)),))).phases[1] \
            .check_resume(plain(later.cfg), 35)


def test_a_resume_after_an_earlier_phase_changed_is_refused_naming_where_the_runs_part():
    """The checkpoint's own phase batches as before, so only the placement the checkpoint stores shows the change:
    an earlier phase's batch, or its budget (a moved boundary, even with the same shapes and tokens)."""
    long = (phase("long", steps=10, data=dict(seq_len=512, batch_size=8)),)
    plan = RunPlan(_run_cfg(phases=long))
    assert plan.placement(35) == [(0, 16, 256), (30, 8, 512)] and plan.placement(30) == [(0, 16, 256)]
    meta = {"config": plain(plan.phases[1].cfg), "tokens_seen": plan.tokens_before(35),
            "batches": json.loads(json.dumps(plan.placement(35)))}
    plan.check_resume(meta, 35)
    RunPlan(_run_cfg(phases=(phase("long", steps=20, data=dict(seq_len=512, batch_size=8)),))).check_resume(meta, 35)
    changed = RunPlan(_run_cfg(batch_size=32, phases=long))
    assert changed.phases[1].start_step == 30, "step budgets: the phases start where they did"
    changed.check_resume({"config": meta["config"]}, 35)  # a checkpoint from before either was saved
    with pytest.raises(ConfigError, match=r"step 35 was trained with batches 16 x 256 from step 0, 8 x 512 from step "
                                          r"30, and this config batches those steps as 32 x 256 from step 0, 8 x 512 "
                                          r"from step 30: they part at step 0 \(in the 'pretrain' phase, "
                                          r"train.steps / data\)"):
        changed.check_resume(meta, 35)
    with pytest.raises(ConfigError, match=f"the checkpoint of step 35 had trained on {30 * 16 * 256 + 5 * 8 * 512:,} "
                                          f"tokens, and this config counts {30 * 32 * 256 + 5 * 8 * 512:,} .* an "
                                          "earlier phase changed"):
        changed.check_resume({k: v for k, v in meta.items() if k != "batches"}, 35)  # stored tokens_seen only

    same_shape = (phase("more", steps=10, data=dict(seq_len=256, batch_size=16)),)
    plan = RunPlan(_run_cfg(phases=same_shape))
    meta = {"config": plain(plan.phases[1].cfg), "batches": plan.placement(35), "tokens_seen": plan.tokens_before(35)}
    moved = _run_cfg(phases=same_shape)
    moved.train.steps = 28
    assert RunPlan(moved).tokens_before(35) == meta["tokens_seen"], "the same tokens: only the placement tells"
    with pytest.raises(ConfigError, match=r"as 16 x 256 from step 0, 16 x 256 from step 28: they part at step 28 "
                                          r"\(in the 'more' phase, phases\[0\]\)"):
        RunPlan(moved).check_resume(meta, 35)


def test_each_ramp_stage_compiles_unbounded_by_the_watchdog_after_its_memory_check(tmp_path, cache_dir, monkeypatch):
    """A stage's new batch shape compiles the step again: that ran as a training step, under the watchdog's step
    limit (a large model's compile there was taken for a hang, exit 76), and without the memory check."""
    cfg = load_config_file("tiny.py")
    cfg.data.cache_dir = str(cache_dir)
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches, cfg.data.ramp = 8, 64, 1, ((1024, 16, 64),)
    cfg.train.steps, cfg.train.eval_every = 4, 0
    checked, phases = [], []
    check, phase_of = trainer._Loop._check_step_memory, trainer.Watchdog.phase

    def checking(self, run, step_fn, args):
        checked.append(args[1]["tokens"].shape)
        return check(self, run, step_fn, args)

    def entering(self, name, **kwargs):
        phases.append((name, kwargs.get("bounded", True)))
        return phase_of(self, name, **kwargs)

    monkeypatch.setattr(trainer._Loop, "_check_step_memory", checking)
    monkeypatch.setattr(trainer.Watchdog, "phase", entering)
    trainer.train(cfg, tmp_path)
    assert checked == [(8, 64), (16, 64)]
    assert phases.count(("compilation", False)) == 2


def test_a_resume_with_another_batch_size_stops_before_reading_and_resumes_with_the_suggested_ramp(
        tmp_path, cache_dir, capsys):
    cfg = load_config_file("tiny.py")
    cfg.data.cache_dir = str(cache_dir)
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = 8, 64, 1
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.checkpoint.every_steps = 4, 1, 0, 4
    trainer.train(cfg, tmp_path)
    cfg.train.steps, cfg.data.batch_size = 6, 16
    with pytest.raises(ConfigError, match="the checkpoint of step 4 was trained with batches 8 x 64") as err:
        trainer.train(cfg, tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"], "nothing set aside as damaged"
    cfg.data.batch_size, cfg.data.ramp = 8, _suggested_ramp(err.value)
    trainer.train(cfg, tmp_path)
    said = capsys.readouterr().out
    assert "Training: steps 4 to 6, batch 16 x 64 tokens" in said
    assert "with settings changed since it was saved: data.ramp: [] -> [[2048, 16, 64]]; train.steps: 4 -> 6\n" in said
    assert [m["tokens"] for m in read_metrics(tmp_path)] == [512, 1024, 1536, 2048, 3072, 4096]
    meta = json.loads((tmp_path / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta["tokens_seen"] == 4096 and meta["batches"] == [[0, 8, 64], [4, 16, 64]]


def test_the_loss_guard_knows_non_finite_steps_and_spikes():
    guard = LossGuard(spike_factor=2.0, window=3)
    assert guard.problem(float("nan"), 1.0).startswith("non-finite")
    assert guard.problem(1.0, float("inf")).startswith("non-finite")
    assert guard.threshold() == math.inf
    for loss in (3.0, 2.0, 2.5):
        assert guard.problem(loss, 1.0) is None
    assert guard.threshold() == 5.0
    assert "loss spike" in guard.problem(5.5, 1.0)
    assert guard.problem(4.9, 1.0) is None
    assert guard.recent == [2.0, 2.5, 4.9]
    guard.restore([])
    assert guard.threshold() == math.inf
    guard.restore([1.0, 2.0, 3.0])
    assert guard.threshold() == 4.0
    assert LossGuard(0.0, 3).threshold() == math.inf


def _poisoned_run(tmp_path, cache_dir, monkeypatch, policy: str, bad_steps: set[int], log_every: int = 1):
    """A short in-process run whose batches at `bad_steps` (counted in batches drawn) give a NaN loss."""
    cfg = load_config_file("tiny.py")
    cfg.data.cache_dir = str(cache_dir)
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = 8, 64, 1
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every = 10, log_every, 0
    cfg.checkpoint.every_steps, cfg.optim.warmup_steps = 4, 2
    cfg.stability.policy = policy
    drawn = []
    to_global = trainer.Run.to_global

    def poisoning(self, local_batch):
        drawn.append(len(drawn) + 1)
        if len(drawn) in bad_steps:
            local_batch = dict(local_batch, loss_mask=np.full_like(local_batch["loss_mask"], np.nan))
        return to_global(self, local_batch)

    monkeypatch.setattr(trainer.Run, "to_global", poisoning)
    workdir = tmp_path / f"{policy}-{log_every}"
    return workdir, lambda: trainer.train(cfg, workdir)


def test_a_nan_step_is_rolled_back_and_its_batches_skipped(tmp_path, cache_dir, monkeypatch, capsys):
    eval_batches = 1  # the held-out batches are drawn through to_global too, once per phase, before training
    workdir, run = _poisoned_run(tmp_path, cache_dir, monkeypatch, "rollback", {eval_batches + 6})
    logged = run()
    err = capsys.readouterr().err
    assert "step 6: non-finite loss nan" in err and "Rolled back to step 4" in err
    lines = read_metrics(workdir)
    assert [m["step"] for m in lines] == list(range(1, 11)), "every step logged once, the rolled-back ones redone"
    assert all(math.isfinite(m["loss"]) for m in lines) and logged["bad_steps"] == 1.0
    assert logged["goodput/lost_seconds/redone"] > 0, "the rolled-back steps' time is lost"
    model, _ = checkpoint.load_model(workdir)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.state(model)))


def test_a_nan_step_is_skipped_inside_the_step(tmp_path, cache_dir, monkeypatch, capsys):
    workdir, run = _poisoned_run(tmp_path, cache_dir, monkeypatch, "skip", {1 + 6})
    run()
    assert "step 6: loss nan" in capsys.readouterr().err
    lines = read_metrics(workdir)
    assert [m["step"] for m in lines] == list(range(1, 11))
    assert lines[5]["param_norm"] == lines[4]["param_norm"], "the skipped step left the parameters as they were"
    assert lines[-1]["bad_steps"] == 1.0 and math.isfinite(lines[-1]["loss"])
    # Logged every 5 steps, a line is the mean of its steps, the first (which compiles) and none skipped included:
    # before, the first line left out step 1, and the second was NaN for the skipped step 6.
    monkeypatch.undo()
    workdir, run = _poisoned_run(tmp_path, cache_dir, monkeypatch, "skip", {1 + 6}, log_every=5)
    run()
    windows = read_metrics(workdir)
    assert [m["step"] for m in windows] == [5, 10]
    for logged, steps in zip(windows, ([1, 2, 3, 4, 5], [7, 8, 9, 10])):
        for key in ("loss", "grad_norm"):
            assert logged[key] == pytest.approx(np.mean([lines[step - 1][key] for step in steps]), rel=1e-6), key


def test_a_nan_step_stops_the_run_before_it_is_saved(tmp_path, cache_dir, monkeypatch):
    workdir, run = _poisoned_run(tmp_path, cache_dir, monkeypatch, "stop", {1 + 6})
    with pytest.raises(Diverged, match="step 6: non-finite loss nan.*newest checkpoint is step 4"):
        run()
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == [4]


def test_too_many_bad_steps_stop_a_rolling_back_run(tmp_path, cache_dir, monkeypatch):
    workdir, run = _poisoned_run(tmp_path, cache_dir, monkeypatch, "rollback", set(range(2, 40)))
    with pytest.raises(Diverged, match="more than stability.max_events=5 bad steps"):
        run()


def test_an_average_without_its_record_or_of_other_checkpoints_is_made_again(tmp_path, cache_dir):
    """A kill between the average's write and its evaluated record left a run that refused every rerun (the
    average's directory already held a checkpoint); a phase trained on past its average kept the stale one."""
    cfg = load_config_file("tiny.py")
    cfg.data.cache_dir = str(cache_dir)
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = 8, 64, 1
    cfg.train.steps, cfg.train.eval_every, cfg.checkpoint.every_steps, cfg.optim.warmup_steps = 2, 0, 2, 1
    cfg.phases = (phase("anneal", steps=4, lr="anneal", average=True),)
    trainer.train(cfg, tmp_path)
    record = tmp_path / "averaged" / "eval.json"
    first = json.loads(record.read_text())
    assert first["steps"] == [4, 6]
    record.unlink()  # as a kill after the average was written, before it was evaluated
    trainer.train(cfg, tmp_path)
    assert json.loads(record.read_text()) == first
    cfg.phases = (phase("anneal", steps=6, lr="anneal", average=True),)  # the phase trains on to step 8
    trainer.train(cfg, tmp_path)
    assert json.loads(record.read_text())["steps"] == [4, 6, 8]
    cfg.phases += (phase("again", steps=2, average=True),)
    with pytest.raises(ConfigError, match=r"phases\[1\]: a second phase with average=True"):
        validate(cfg)


def _recipe_command(workdir, cache_dir, keep_every):
    return [sys.executable, "-m", "llama_jax.train", "--config", str(REPO / "configs" / RECIPE) + ":devices=2,scale=0.08",
            "--workdir", str(workdir), f"--config.data.cache_dir={cache_dir}", "--config.checkpoint.every_steps=2",
            f"--config.checkpoint.keep_every={keep_every}", "--config.train.log_every=1", "--config.data.eval_batches=1"]


def _workdir_as_of(source, step, dest):
    """A copy of the finished run `source` as it was when it had saved `step` (a checkpoint it kept), and no later."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("averaged"))
    for saved in (dest / "checkpoints").iterdir():
        if saved.name != str(step):
            shutil.rmtree(saved)
    lines = (dest / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dest / "metrics.jsonl").write_text("".join(line for line in lines if json.loads(line)["step"] <= step))


@pytest.mark.long
def test_the_tiny_recipe_runs_every_phase_and_a_kill_in_long_context_resumes_there(tmp_path, cache_dir):
    env = dict(CLI_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    plan = RunPlan(load_config_file(RECIPE, "devices=2,scale=0.08"))
    long_context = plan.phases[3]
    straight = tmp_path / "straight"
    done = subprocess.run(_recipe_command(straight, cache_dir, long_context.start_step), capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    for p in plan.phases:
        assert f"Phase {p.index + 1}/6 {p.name!r}" in done.stdout + done.stderr
    averaged = (straight / "averaged" / "eval.json")
    assert averaged.exists() and (straight / "averaged" / "checkpoints").is_dir()
    lines = read_metrics(straight)
    assert [m["step"] for m in lines] == list(range(1, plan.total_steps + 1))
    anneal = plan.phases[-1]  # a step's logged lr is the one it trained with: linear from the phase's first to 0
    assert lines[-1]["lr"] == pytest.approx(lines[anneal.start_step]["lr"] / anneal.num_steps, rel=1e-4)
    # The average is the element-wise mean of the annealing checkpoints, all of which the keep policy kept.
    averaged_model, _ = checkpoint.load_model(straight / "averaged")
    annealed = [checkpoint.load_model(straight / "checkpoints" / str(step))[0] for step in anneal.save_steps()]
    assert len(annealed) >= 3
    for mean, *parts in zip(*(jax.tree.leaves(nnx.state(m)) for m in [averaged_model, *annealed])):
        expected = np.mean([np.asarray(x, np.float64) for x in parts], axis=0)
        np.testing.assert_allclose(np.asarray(mean), expected, rtol=1e-6, atol=1e-7)
    assert math.isfinite(json.loads(averaged.read_text())["averaged/eval_loss"])

    # The interrupted run starts from the straight run's checkpoint at the start of long context (kept by keep_every),
    # so that only the phases from there on run twice; its first process is killed a few steps into long context.
    killed = tmp_path / "killed"
    _workdir_as_of(straight, long_context.start_step, killed)
    proc = subprocess.Popen(_recipe_command(killed, cache_dir, long_context.start_step), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env, cwd=REPO)
    deadline = time.monotonic() + 900
    while not ((logged := read_metrics(killed)) and logged[-1]["step"] > long_context.start_step + 1):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before long context"
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    resumed = subprocess.run(_recipe_command(killed, cache_dir, long_context.start_step), capture_output=True,
                             text=True, env=env, cwd=REPO, timeout=1200)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"({long_context.name} phase)\n" in resumed.stdout, "the same command: no setting changed"
    assert without_timing(read_metrics(killed)) == without_timing(lines), "the same run as never interrupted"
    model_a, _ = checkpoint.load_model(straight)
    model_b, _ = checkpoint.load_model(killed)
    for a, b in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_phase_mesh_over_other_devices_is_refused():
    cfg = default_config()
    cfg.mesh.data, cfg.mesh.fsdp = 1, 8
    cfg.phases = (phase("long", steps=5, mesh=dict(fsdp=2, context=2)),)
    with pytest.raises(ConfigError, match=r"phases\[0\] \('long'\) has a mesh of 4 devices, the run 8"):
        validate(cfg)
    cfg.phases = (phase("long", steps=5, data=dict(seq_len=512), mesh=dict(fsdp=4, context=2)),)
    validate(cfg)


def test_phases_over_one_source_read_on_where_the_phase_before_stopped(monkeypatch):
    """The recipe's batch doublings are phases over one mixture: each phase went back to the start of every source,
    so the run trained again on documents it had seen and never reached others. Phases now read what one ramp over
    the same steps reads: each stage of it, the pairs of the phase at that place."""
    lengths = [33] * 200  # 6,400 pairs an epoch, every token once
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    store = TokenizedCorpus(np.arange(1, offsets[-1] + 1, dtype=np.uint32), offsets)
    corpus = Corpus(REPO / "unused", [Source("data", 1.0, store, store, ("somewhere", "text"))])
    monkeypatch.setattr(phase_data, "load_corpus", lambda *args, **kwargs: corpus)
    cfg = default_config()
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.shuffle_window, cfg.train.steps = 8, 32, 4, 10
    cfg.phases = (phase("pretrain_2x", steps=5, data=dict(seq_len=64)),
                  phase("long", steps=5, data=dict(batch_size=4, seq_len=128)))  # into the second epoch
    plan = RunPlan(cfg)
    data = phase_data.run_data(plan, corpus, pad_id=0)
    ramp = TrainBatches([store], [1.0], BatchSchedule(8, 32, [(2560, 8, 64), (5120, 4, 128)]), seed=cfg.seed,
                        shuffle_window=4)
    for p in plan.phases:
        iterator = data[p.index].iterator()
        read = [next(iterator)["tokens"] for _ in range(p.num_steps)]
        ramp_read = [ramp.local_batch(step)["tokens"] for step in range(p.start_step, p.stop_step)]
        np.testing.assert_array_equal(np.sort(np.concatenate(read), axis=None),
                                      np.sort(np.concatenate(ramp_read), axis=None))
        if p is not plan.phases[-1]:  # its batches end with the phase
            assert next(iterator, None) is None
