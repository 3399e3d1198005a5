"""Scaling-law sweeps: fits recover known exponents, the planner's budgets, config files, metrics collection, the CLI
flow on synthetic runs, and one real two-run mini sweep."""

import json
import math
import os
import sys

import numpy as np
import pytest

from cli_run import CLI_ENV

from llama_jax import scaling
from llama_jax.config import default_config, validate
from llama_jax.errors import ConfigError, DataError
from llama_jax.model import flops_per_token, param_count

# Chinchilla's fitted law (Hoffmann et al. 2022, approach 3): L(N, D) = E + A / N^a + B / D^b
E, A, B, a, b = 1.69, 406.4, 410.7, 0.34, 0.28


def chinchilla_loss(n, d):
    return E + A / np.asarray(n, float) ** a + B / np.asarray(d, float) ** b


def true_optimum(c: float) -> float:
    """argmin_N L(N, C / 6N): N* = G (C/6)^(b/(a+b)), G = (aA / bB)^(1/(a+b))."""
    return (a * A / (b * B)) ** (1 / (a + b)) * (c / 6) ** (b / (a + b))


def synthetic_sweep(budgets, off_centre=1.7, points=9, span=8.0):
    """Runs on a log grid of N that is not centred on the optimum, with D = C / 6N."""
    params, tokens, losses, groups = [], [], [], []
    for c in budgets:
        for n in np.geomspace(true_optimum(c) * off_centre / span, true_optimum(c) * off_centre * span, points):
            params.append(n), tokens.append(c / (6 * n)), losses.append(float(chinchilla_loss(n, c / (6 * n))))
            groups.append(c)
    return params, tokens, losses, groups


def test_fit_recovers_chinchilla_exponents():
    budgets = np.geomspace(1e18, 1e22, 5)
    fit = scaling.fit_scaling(*synthetic_sweep(budgets))
    assert fit.params_law.exponent == pytest.approx(b / (a + b), abs=0.01)  # 0.4516
    assert fit.tokens_law.exponent == pytest.approx(a / (a + b), abs=0.01)  # 0.5484
    for budget_fit in fit.budgets:
        n_star = true_optimum(budget_fit.budget)
        assert budget_fit.optimal_params == pytest.approx(n_star, rel=0.1)
        assert budget_fit.optimal_tokens == pytest.approx(budget_fit.budget / (6 * n_star), rel=0.1)
        assert budget_fit.optimal_loss == pytest.approx(chinchilla_loss(n_star, budget_fit.budget / 6 / n_star), rel=2e-3)
        assert budget_fit.inside
    # extrapolating two decades past the largest budget stays close
    assert float(fit.params_law(1e24)) == pytest.approx(true_optimum(1e24), rel=0.15)


def test_a_curve_without_a_minimum_is_refused():
    with pytest.raises(DataError, match=r"budget 1e\+12: the losses .* have no minimum"):
        scaling.fit_budget(1e12, [1e5, 2e5, 4e5], [1e6, 5e5, 2.5e5], [3.0, 2.9, 2.7])
    with pytest.raises(DataError, match="a parabola needs 3"):
        scaling.fit_budget(1e12, [1e5, 2e5], [1e6, 5e5], [3.0, 2.9])


def test_sigmoid_recovers_its_parameters():
    nll = np.linspace(0.5, 3.5, 12)
    truth = scaling.Sigmoid(chance=0.25, slope=3.0, midpoint=2.0)
    fit = scaling.fit_accuracy(nll, truth(nll), chance=0.25)
    assert fit.slope == pytest.approx(3.0, rel=1e-3) and fit.midpoint == pytest.approx(2.0, rel=1e-3)
    assert float(fit(10.0)) == pytest.approx(0.25, abs=1e-6) and float(fit(-10.0)) == pytest.approx(1.0, abs=1e-6)


FAMILY = scaling.ModelFamily(vocab_size=1024)


def test_family_grows_depth_width_and_heads_together():
    for n in range(1, 7):
        cfg = FAMILY.config(n)
        assert cfg.dim == 64 * n and cfg.n_layers == n and cfg.n_heads * cfg.resolved_head_dim == cfg.dim
        assert cfg.resolved_head_dim == 32 and cfg.n_heads % cfg.n_kv_heads == 0 and cfg.ffn_dim >= 3 * cfg.dim
    with pytest.raises(ConfigError, match="not a multiple of head_dim"):
        scaling.ModelFamily(aspect_ratio=48).shape(1)


def test_planner_token_counts_match_the_budgets():
    points = scaling.plan_isoflop([1e12, 3e12], FAMILY, range(1, 8), batch_size=8, seq_len=128, min_steps=50)
    assert {p.budget for p in points} == {1e12, 3e12}
    for p in points:
        cfg = FAMILY.config(p.size)
        assert p.flops_per_token == flops_per_token(cfg, 128)
        assert p.params == param_count(cfg) and p.non_embedding_params == param_count(cfg, include_embedding=False)
        assert p.tokens == p.steps * 8 * 128 and p.steps >= 50
        assert abs(p.flops_per_token * p.tokens - p.budget) / p.budget <= 0.01
    assert len([p for p in points if p.budget == 1e12]) >= 3
    three = scaling.plan_isoflop([1e12, 3e12], FAMILY, range(1, 8), batch_size=8, seq_len=128, points_per_budget=3)
    assert [len([p for p in three if p.budget == c]) for c in (1e12, 3e12)] == [3, 3]
    with pytest.raises(ConfigError, match=r"budget 1e\+09 FLOPs leaves 0 family sizes with at least 50 steps"):
        scaling.plan_isoflop([1e9], FAMILY, range(1, 8), batch_size=8, seq_len=128)


@pytest.mark.parametrize("flags, message", [
    (["--batch_size", "0"], "--batch_size 0 (at least 1): give it a value in range"),  # a ZeroDivisionError
    (["--seq_len", "0", "--min_steps", "0"], "--seq_len 0 (at least 1), --min_steps 0 (at least 1): give these a "
                                             "value in range"),
    (["--points", "-1"], "--points -1 (at least 0): give it a value in range"),  # "leaves 0 family sizes"
    (["--budgets", "0,1e12"], "the budgets [0.0, 1000000000000.0] must be one or more positive FLOP counts"),
    # said before the grid's own mistake, the first budget's too few sizes
    (["--budgets", "1e9", "--set", "optim.nonsense=1"], "override optim.nonsense: unknown key"),
    # what a run spends: the configs trained 13x the budget plan.json records (and the fit reads)
    (["--set", "data.batch_size=32"], "--set data.batch_size is the grid's own (each run's model, batch and steps"),
    (["--set", "model.dim=512"], "--set model.dim is the grid's own"),
    # an in-sample "held-out" check, or a traceback after the whole grid had trained
    (["--holdout", "4e12"], "--holdout 4e+12 must be a budget larger than the grid's (4e+12)"),
    (["--holdout", "0"], "--holdout 0 must be a budget larger than the grid's"),
    (["--holdout", "nan"], "--holdout nan must be a budget larger than the grid's"),
])
def test_cli_plan_bad_input_is_one_line(tmp_path, capsys, flags, message):
    given = dict(zip(flags[::2], flags[1::2]))
    argv = ["plan", "--out", str(tmp_path / "sweep"), "--budgets", given.pop("--budgets", "1e12,2e12,4e12"),
            "--vocab_size", "1024", *[part for item in given.items() for part in item]]
    assert scaling.main(argv) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert not (tmp_path / "sweep").exists()


def test_config_files_are_valid_and_rebuild_the_run_config(tmp_path):
    points = scaling.plan_isoflop([1e12], FAMILY, range(1, 8), batch_size=8, seq_len=128, points_per_budget=3)
    base = default_config()
    base.data.cache_dir = "/somewhere/else"
    sweep = scaling.Sweep.create(tmp_path, points, FAMILY, base, {"optim.lr": 1e-3, "seed": 3})
    for point in points:
        cfg = scaling.load_config_file(sweep.config_file(point))
        validate(cfg)
        assert cfg.to_dict() == sweep.config(point).to_dict()
        assert (cfg.model.dim, cfg.model.vocab_size, cfg.train.steps) == (64 * point.size, 1024, point.steps)
        assert (cfg.optim.lr, cfg.seed, cfg.data.cache_dir, cfg.train.eval_every) == (1e-3, 3, "/somewhere/else", 0)
        assert cfg.optim.warmup_steps == round(0.1 * point.steps)
    launch = (tmp_path / "launch.sh").read_text().splitlines()
    assert len([line for line in launch if "llama_jax.train" in line]) == 3
    reopened = scaling.Sweep.open(tmp_path)
    assert reopened.points == points and reopened.overrides == {"optim.lr": 1e-3, "seed": 3}
    with pytest.raises(ConfigError, match="override optim.learning_rate: unknown key"):
        sweep.overrides = {"optim.learning_rate": 1.0}
        sweep.save()
    with pytest.raises(ConfigError, match=r"override optim.lr='abc': optim.lr takes a float, e.g. optim.lr="):
        sweep.overrides = {"optim.lr": "abc"}  # was ConfigDict's TypeError, a traceback from the CLI
        sweep.save()


def write_metrics(workdir, steps: int, final_loss: float | None, evaluation: dict | None = None):
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 1, "loss": 9.0}, {"step": steps // 2, "loss": 7.0, "eval_loss": 8.0}]
    if final_loss is not None:
        lines.append({"step": steps, "loss": 6.0, "eval_loss": final_loss})
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if evaluation is not None:
        (workdir / "eval.json").write_text(json.dumps(evaluation))


def test_collect_results_reads_the_final_eval_loss(tmp_path):
    points = scaling.plan_isoflop([1e12], FAMILY, range(1, 8), batch_size=8, seq_len=128, points_per_budget=3)
    sweep = scaling.Sweep.create(tmp_path, points, FAMILY)
    write_metrics(sweep.workdir(points[0]), points[0].steps, 5.5, {"stdlib_mc/acc": 0.5})
    write_metrics(sweep.workdir(points[1]), points[1].steps, None)  # unfinished: only the mid-run evaluation
    write_metrics(sweep.workdir(points[2]), points[2].steps, 5.25)
    results = scaling.collect_results(sweep)
    assert [(r.point, r.loss, r.evaluation) for r in results] == [
        (points[0], 5.5, {"stdlib_mc/acc": 0.5}), (points[2], 5.25, {})]


def test_cli_plan_fit_predict_and_check(tmp_path, capsys):
    """The CLI's steps on synthetic runs: plan, fit (which plans the held-out model), then the check."""
    out = tmp_path / "sweep"
    assert scaling.main(["plan", "--out", str(out), "--budgets", "1e12,2e12,4e12", "--holdout", "8e12", "--sizes",
                         "1,2,3,4,5,6,7", "--points", "4", "--vocab_size", "1024", "--set", "optim.lr=2e-3"]) == 0
    sweep = scaling.Sweep.open(out)
    assert [len([p for p in sweep.points if p.budget == c]) for c in (1e12, 2e12, 4e12)] == [3, 4, 4]
    assert sweep.overrides == {"optim.lr": 2e-3} and sweep.holdout == 8e12
    scale = 2e3  # puts these tiny models' optimum inside the grid
    for p in sweep.points:
        write_metrics(sweep.workdir(p), p.steps, float(chinchilla_loss(p.params * scale, p.tokens * scale)))
    assert scaling.main(["fit", "--sweep", str(out), "--sizes", "1,2,3,4,5,6,7,8"]) == 0
    printed = capsys.readouterr().out
    assert "held-out budget 8e+12: the fit predicts" in printed
    sweep = scaling.Sweep.open(out)
    assert sweep.prediction is not None and sweep.prediction.budget == 8e12
    assert sweep.config_file(sweep.prediction).is_file()
    assert math.isclose(sweep.prediction.compute, 8e12, rel_tol=0.01)
    measured = float(chinchilla_loss(sweep.prediction.params * scale, sweep.prediction.tokens * scale))
    write_metrics(sweep.workdir(sweep.prediction), sweep.prediction.steps, measured)
    assert scaling.main(["fit", "--sweep", str(out), "--plot", str(tmp_path / "fit.png")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prediction"]["measured_loss"] == pytest.approx(measured)
    assert abs(summary["prediction"]["relative_error"]) < 0.02
    assert (tmp_path / "fit.png").stat().st_size > 10_000
    assert scaling.main(["fit", "--sweep", str(tmp_path / "nothing")]) == 2
    assert "plan.json does not exist" in capsys.readouterr().err


def test_fitting_before_every_budget_has_its_runs_is_refused_naming_the_budget(tmp_path, capsys):
    """A budget none of whose runs had finished was left out of the fit without a word; with none finished at all,
    the error was that "a power law needs at least two points"."""
    out = tmp_path / "sweep"
    assert scaling.main(["plan", "--out", str(out), "--budgets", "1e12,2e12,4e12", "--sizes", "1,2,3,4,5,6,7",
                         "--points", "3", "--vocab_size", "1024"]) == 0
    sweep = scaling.Sweep.open(out)
    assert scaling.main(["fit", "--sweep", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: budget 1e+12: 0 of its 3 runs have finished, and its parabola needs "
                                       f"3: run `python -m llama_jax.scaling run --sweep {out}` first\n")
    for p in sweep.points:
        if p.budget != 2e12:
            write_metrics(sweep.workdir(p), p.steps, float(chinchilla_loss(p.params * 2e3, p.tokens * 2e3)))
    assert scaling.main(["fit", "--sweep", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: budget 2e+12: 0 of its 3 runs have finished")


def test_planning_again_into_a_sweep_keeps_it_or_is_refused(tmp_path, capsys):
    """Before, a second plan rewrote plan.json over the finished runs (and dropped the recorded prediction); a changed
    plan's runs of the same names were then taken as finished."""
    out = tmp_path / "sweep"
    plan = ["plan", "--out", str(out), "--budgets", "1e12,2e12", "--holdout", "4e12", "--sizes", "1,2,3,4,5,6,7",
            "--points", "3", "--vocab_size", "1024"]
    assert scaling.main(plan) == 0
    sweep = scaling.Sweep.open(out)
    sweep.prediction, sweep.predicted = sweep.points[0], {"loss": 5.0, "params": 1.0, "tokens": 2.0}
    sweep.save()
    recorded = (out / "plan.json").read_text()
    assert scaling.main(plan) == 0
    assert (out / "plan.json").read_text() == recorded
    capsys.readouterr()
    assert scaling.main(plan[:-1] + ["2048"]) == 2
    assert capsys.readouterr().err == (f"error: {out} holds another sweep's plan and runs: plan into a new --out, or "
                                       f"delete {out} to start over\n")
    assert (out / "plan.json").read_text() == recorded
    (tmp_path / "file").write_text("")
    assert scaling.main(["plan", "--out", str(tmp_path / "file" / "sweep")] + plan[3:]) == 2
    assert capsys.readouterr().err.startswith(f"error: the sweep directory {tmp_path / 'file' / 'sweep'} cannot be "
                                              f"written ({tmp_path / 'file'} is a file)")


def test_a_sweep_in_a_bucket_is_refused_with_the_mount_that_works(tmp_path, monkeypatch, capsys):
    """Before, `--out gs://b/sweep` wrote a local directory named 'gs:'."""
    monkeypatch.chdir(tmp_path)
    assert scaling.main(["plan", "--out", "gs://b/sweep", "--budgets", "1e12,2e12", "--sizes", "1,2,3,4,5,6,7",
                         "--points", "3", "--vocab_size", "1024"]) == 2
    assert capsys.readouterr().err.startswith("error: the sweep directory gs://b/sweep is a URL")
    assert scaling.main(["fit", "--sweep", "gs://b/sweep"]) == 2
    assert "gcsfuse" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def text_corpus(tmp_path_factory):
    """A small corpus (the docstrings of a few modules) so the mini sweep builds its tokenizer in a second."""
    import inspect
    import json as json_module
    import textwrap

    root = tmp_path_factory.mktemp("corpus")
    for module in (json_module, textwrap, inspect, os, np):
        docs = [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module)]
        (root / f"{module.__name__}.txt").write_text("\n\n".join(d for d in docs if d) * 3)
    return root


def test_a_real_two_run_sweep_end_to_end(tmp_path, text_corpus):
    family = scaling.ModelFamily(vocab_size=1024)
    points = [scaling.grid_point(1e10, n, family, batch_size=4, seq_len=64) for n in (1, 2)]
    base = default_config()
    base.data.source = str(text_corpus / "*.txt")
    base.data.cache_dir = str(tmp_path / "cache")
    base.data.eval_batches = 1
    base.data.shuffle_window = 64
    sweep = scaling.Sweep.create(tmp_path / "sweep", points, family, base, {"train.log_every": 5})
    scaling.run_sweep(sweep, tasks=["stdlib_mc"], env=CLI_ENV, log=lambda line: None)
    results = scaling.collect_results(sweep)
    assert [r.point.size for r in results] == [1, 2]
    for r in results:
        assert 0 < r.loss < math.log(1024) + 1 and r.evaluation["stdlib_mc/n"] == 48
    log = (sweep.workdir(points[0]) / "train.log").read_text()
    assert f"step {points[0].steps}" in log
    mtime = (sweep.workdir(points[0]) / "metrics.jsonl").stat().st_mtime
    scaling.run_sweep(sweep, env=CLI_ENV, log=lambda line: None)  # finished runs are not trained again
    assert (sweep.workdir(points[0]) / "metrics.jsonl").stat().st_mtime == mtime
    assert sys.executable in " ".join(sweep.command(points[0]))
