"""IsoFLOP scaling-law sweeps, as in the Llama 3 paper (section 3.2.1): plan, run, fit, predict.

For each compute budget C a grid of model sizes from one family is trained on D = C / (training FLOPs per token)
tokens each; a parabola of the final validation loss against log10 D gives each budget's compute-optimal token count
and loss, and power laws through those optima give D*(C) and N*(C) = A * C^alpha, extrapolated to larger budgets. A
second stage maps the normalised NLL of a downstream task's correct answers to its accuracy with a sigmoid. The
largest budget can be held out: the smaller budgets predict its compute-optimal model and loss, and training that
model measures the prediction's error.

    python -m llama_jax.scaling plan --out runs/sweep --budgets 1.25e11,2.5e11,5e11 --holdout 1e12 --sizes 1,2,3,4 \
        --aspect_ratio 16 --head_dim 16 --vocab_size 1024   # a family small enough for a CPU
    python -m llama_jax.scaling run --sweep runs/sweep [--tasks stdlib_mc]   # trains every grid point, in turn
    python -m llama_jax.scaling fit --sweep runs/sweep [--plot fit.png]     # fits; plans the held-out prediction
    python -m llama_jax.scaling run --sweep runs/sweep                      # trains the predicted model
    python -m llama_jax.scaling fit --sweep runs/sweep                      # ... and reports the prediction's error

`plan` writes one Python config file per run (`SWEEP/configs/NAME.py`), `SWEEP/plan.json`, and `SWEEP/launch.sh`, the
same runs as shell commands for a cluster. Each run has its own workdir `SWEEP/runs/NAME`; `run` skips finished ones.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import ml_collections
import numpy as np

from llama_jax.config import default_config, validate
from llama_jax.errors import ConfigError, DataError, LlamaJaxError
from llama_jax.model.config import RUNTIME_FIELDS, LlamaConfig, flops_per_token, param_count
from llama_jax.model.presets import preset
from llama_jax.workdir import check_writable, is_remote, not_a_file, read_jsonl

CHINCHILLA_TOKENS_PER_PARAM = 20.0  # where the planner centres each budget's sizes, before anything is fitted


# ------------------------------------------------------------------------------------------------------ planning


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    """Model shapes indexed by one integer n: n layers of width aspect_ratio * n, heads of head_dim, so that depth,
    width and head count grow together at a fixed aspect ratio (Llama 3 8B: 4096 / 32 = 128 per layer; the default
    64 gives the CPU-sized `tiny` preset at n = 4). Every other field comes from `base` (a preset's name)."""

    aspect_ratio: int = 64
    head_dim: int = 32
    ffn_ratio: float = 3.0  # SwiGLU width / dim (Llama 3: 3.5), rounded up to a multiple of 32
    kv_ratio: int = 2  # query heads per KV head, where the head count allows
    base: str = "tiny"
    vocab_size: int = 8192

    def shape(self, n: int) -> dict:
        """The LlamaConfig fields that change with n."""
        if n < 1:
            raise ConfigError(f"model family size n={n} must be at least 1")
        dim = self.aspect_ratio * n
        if dim % self.head_dim:
            raise ConfigError(f"family width {dim} (aspect_ratio {self.aspect_ratio} x n {n}) is not a multiple of "
                              f"head_dim {self.head_dim}: choose an aspect ratio divisible by the head dimension")
        n_heads = dim // self.head_dim
        n_kv_heads = n_heads // self.kv_ratio if n_heads % self.kv_ratio == 0 else n_heads
        ffn_dim = 32 * math.ceil(self.ffn_ratio * dim / 32)
        return dict(dim=dim, n_layers=n, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=0, ffn_dim=ffn_dim)

    def config(self, n: int, **changes) -> LlamaConfig:
        return preset(self.base, vocab_size=self.vocab_size, **self.shape(n), **changes)


@dataclasses.dataclass(frozen=True)
class GridPoint:
    """One training run of a sweep: a family size at a compute budget."""

    budget: float  # the nominal compute budget C (FLOPs) this run belongs to
    size: int  # n of the family
    model: dict  # the family's LlamaConfig fields at n, but those of RUNTIME_FIELDS (they come from the base config)
    params: int  # all parameters
    non_embedding_params: int  # without the input embedding table (llama_jax.model.param_count)
    flops_per_token: float  # training FLOPs per token (llama_jax.model.flops_per_token), attention included
    batch_size: int
    seq_len: int
    steps: int

    @property
    def tokens(self) -> int:
        return self.steps * self.batch_size * self.seq_len

    @property
    def compute(self) -> float:
        """The FLOPs this run actually trains for (steps are whole, so within 1 / (2 steps) of the budget)."""
        return self.flops_per_token * self.tokens

    @property
    def name(self) -> str:
        return f"C{self.budget:.3g}_n{self.size}".replace("+", "")


def grid_point(budget: float, n: int, family: ModelFamily, batch_size: int, seq_len: int) -> GridPoint:
    cfg = family.config(n)
    fpt = flops_per_token(cfg, seq_len)
    steps = round(budget / fpt / (batch_size * seq_len))
    architecture = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
    return GridPoint(budget, n, architecture, param_count(cfg), param_count(cfg, include_embedding=False), fpt,
                     batch_size, seq_len, steps)


def plan_isoflop(budgets: Iterable[float], family: ModelFamily, sizes: Iterable[int], *, batch_size: int,
                 seq_len: int, points_per_budget: int = 0, min_steps: int = 50) -> list[GridPoint]:
    """The IsoFLOP grid: at each budget, the family sizes that get at least `min_steps` steps (fewer would round the
    token count by more than 1%, and leave no schedule to speak of). With `points_per_budget`, only that many sizes per
    budget, those closest (in log) to Chinchilla's 20 tokens per parameter, where the optimum is expected."""
    budgets = sorted(budgets)
    _check_grid(budgets, batch_size=batch_size, seq_len=seq_len, points_per_budget=points_per_budget,
                min_steps=min_steps)
    points = []
    for budget in budgets:
        candidates = [p for p in (grid_point(budget, n, family, batch_size, seq_len) for n in sorted(set(sizes)))
                      if p.steps >= min_steps]
        if points_per_budget:
            closest = sorted(candidates, key=_distance_from_chinchilla)[:points_per_budget]
            candidates = sorted(closest, key=lambda p: p.size)
        if len(candidates) < 3:
            raise ConfigError(
                f"budget {budget:.3g} FLOPs leaves {len(candidates)} family sizes with at least {min_steps} steps of "
                f"{batch_size} x {seq_len} tokens; a parabola needs 3: raise the budget, add smaller sizes or shrink "
                f"the batch")
        points.extend(candidates)
    return points


def _check_grid(budgets: list[float], **counts: int) -> None:
    """Counts below their least value divided by zero deep in the grid's arithmetic, or were said as a budget leaving
    too few sizes."""
    least = {"batch_size": 1, "seq_len": 1, "points_per_budget": 0, "min_steps": 1}
    flag = {"points_per_budget": "points"}  # the CLI's name, where it differs
    wrong = [f"--{flag.get(name, name)} {value} (at least {least[name]})" for name, value in counts.items()
             if value < least[name]]
    if wrong:
        raise ConfigError(f"{', '.join(wrong)}: give {'these' if len(wrong) > 1 else 'it'} a value in range")
    if not budgets or budgets[0] <= 0:
        raise ConfigError(f"the budgets {budgets} must be one or more positive FLOP counts, e.g. 2e11,6e11,2e12")


def _distance_from_chinchilla(point: GridPoint) -> float:
    return abs(math.log(point.tokens / point.params / CHINCHILLA_TOKENS_PER_PARAM))


def point_config(point: GridPoint, base: ml_collections.ConfigDict, overrides: dict | None = None, *,
                 warmup_fraction: float = 0.1) -> ml_collections.ConfigDict:
    """The training config of one run: `base` with the family shape, batch, steps and a schedule scaled to the run's
    length (warmup a fraction of it, cosine decay to its end, one evaluation and one checkpoint at the end), then
    `overrides` ({"optim.lr": 1e-3, ...}). Validated."""
    cfg = ml_collections.ConfigDict(base.to_dict())
    cfg.model.update(point.model)
    cfg.data.batch_size, cfg.data.seq_len = point.batch_size, point.seq_len
    cfg.data.ramp = ()
    cfg.train.steps = point.steps
    cfg.train.eval_every = 0  # only at the end: the final eval_loss is what the fit reads
    cfg.train.log_every = min(cfg.train.log_every, point.steps)
    cfg.checkpoint.every_steps = point.steps
    cfg.optim.warmup_steps = max(1, round(warmup_fraction * point.steps))
    cfg.optim.decay_steps = 0
    for key, value in (overrides or {}).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def _set(cfg: ml_collections.ConfigDict, key: str, value) -> None:
    *sections, leaf = key.split(".")
    node = cfg
    for section in sections:
        if section not in node:
            raise ConfigError(f"override {key}: there is no config section {section!r}")
        node = node[section]
    if leaf not in node:
        raise ConfigError(f"override {key}: unknown key; see llama_jax/config.py for the keys")
    try:
        node[leaf] = value
    except TypeError:  # ConfigDict keeps each key's type
        raise ConfigError(f"override {key}={value!r}: {key} takes a {type(node[leaf]).__name__}, e.g. "
                          f"{key}={node[leaf]!r}") from None


def config_source(cfg: ml_collections.ConfigDict, doc: str) -> str:
    """A config file (Python) that rebuilds `cfg`: `default_config()` and the keys that differ from it."""
    lines = [f'"""{doc}"""', "", "from llama_jax.config import default_config, mixture_source", "", "",
             "def get_config():", "    cfg = default_config()"]
    defaults = _flatten(default_config().to_dict())
    for key, value in _flatten(cfg.to_dict()).items():
        if key.startswith("data.mixture."):
            continue
        if defaults.get(key, object()) != value:
            if _literal(value) is None:
                raise ConfigError(f"config key {key}={value!r} cannot be written into a config file: set it in the "
                                  "base config file the sweep starts from")
            lines.append(f"    cfg.{key} = {_literal(value)}")
    for name, entry in cfg.data.mixture.items():
        lines.append(f"    cfg.data.mixture.{name} = mixture_source({entry.source!r}, weight={entry.weight!r}, "
                     f"text_field={entry.text_field!r})")
    return "\n".join(lines + ["    return cfg", ""])


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and not (prefix + key).startswith("data.mixture"):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _literal(value) -> str | None:
    text = repr(value)
    try:
        return text if ast.literal_eval(text) == value else None
    except (ValueError, SyntaxError):
        return None


def _local_sweep(directory: str | os.PathLike) -> Path:
    """A sweep directory holds the config files its runs import, so it lives on a file system."""
    if is_remote(directory):
        raise ConfigError(f"the sweep directory {os.fspath(directory)} is a URL, but it holds the Python config files "
                          "that each run imports and the runs' workdirs: give a local path, or a bucket mounted with "
                          "gcsfuse (gcsfuse --implicit-dirs BUCKET /mnt/BUCKET)")
    return Path(directory).expanduser()


def load_config_file(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """`get_config()` of a Python config file (configs/*.py style)."""
    import importlib.util

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"config file {path} {not_a_file(path)}: pass a Python file with get_config(), e.g. "
                          "configs/tiny.py")
    spec = importlib.util.spec_from_file_location(f"_sweep_base_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


# ------------------------------------------------------------------------------------------------- the sweep dir


@dataclasses.dataclass
class Sweep:
    """A sweep on disk: `plan.json`, the config files, and each run's workdir."""

    directory: Path
    points: list[GridPoint]
    base: dict  # the base config, as a dict
    overrides: dict
    family: ModelFamily
    holdout: float | None = None  # the budget held out of the fit and predicted
    prediction: GridPoint | None = None  # the model the fit predicts to be compute-optimal at `holdout`
    predicted: dict | None = None  # what the fit predicted for it: {"loss", "params", "tokens"}

    @classmethod
    def create(cls, directory: str | os.PathLike, points: list[GridPoint], family: ModelFamily,
               base: ml_collections.ConfigDict | None = None, overrides: dict | None = None,
               holdout: float | None = None) -> Sweep:
        """A new sweep, written to `directory`. Planning again into a sweep's directory opens it as it is when the plan
        is the same (its finished runs and recorded prediction stand), and is refused when it differs: its finished
        runs would be taken for the new plan's runs of the same names."""
        largest = max(p.budget for p in points)
        if holdout is not None and not (math.isfinite(holdout) and holdout > largest):
            raise ConfigError(f"--holdout {holdout:g} must be a budget larger than the grid's ({largest:.3g}): the "
                              "fit predicts it from the smaller ones")
        directory = _local_sweep(directory)
        check_writable(directory, "the sweep directory", directory=True)
        sweep = cls(directory, points, (base or default_config()).to_dict(), dict(overrides or {}), family, holdout)
        if (directory / "plan.json").is_file():
            existing = cls.open(directory)
            if _json(existing._plan()) != _json(sweep._plan()):
                raise ConfigError(f"{directory} holds another sweep's plan and runs: plan into a new --out, or delete "
                                  f"{directory} to start over")
            return existing
        sweep.save()
        return sweep

    @classmethod
    def open(cls, directory: str | os.PathLike) -> Sweep:
        directory = _local_sweep(directory)
        plan = directory / "plan.json"
        if not plan.is_file():
            raise ConfigError(f"{plan} does not exist: create the sweep with `python -m llama_jax.scaling plan --out "
                              f"{directory} ...` first")
        data = json.loads(plan.read_text())
        prediction = GridPoint(**data["prediction"]) if data.get("prediction") else None
        return cls(directory, [GridPoint(**p) for p in data["points"]], _tuples(data["base"]), _tuples(data["overrides"]),
                   ModelFamily(**data["family"]), data.get("holdout"), prediction, data.get("predicted"))

    def config(self, point: GridPoint) -> ml_collections.ConfigDict:
        """The run's config: the base config, the point's shape and schedule, then the overrides."""
        return point_config(point, ml_collections.ConfigDict(self.base), self.overrides)

    def workdir(self, point: GridPoint) -> Path:
        return self.directory / "runs" / point.name

    def config_file(self, point: GridPoint) -> Path:
        return self.directory / "configs" / f"{point.name}.py"

    def all_points(self) -> list[GridPoint]:
        return self.points + ([self.prediction] if self.prediction else [])

    def command(self, point: GridPoint, python: str = sys.executable) -> list[str]:
        return [python, "-m", "llama_jax.train", "--config", str(self.config_file(point)),
                "--workdir", str(self.workdir(point))]

    def save(self) -> None:
        """plan.json, every run's config file, and launch.sh (the runs as shell commands)."""
        (self.directory / "configs").mkdir(parents=True, exist_ok=True)
        for point in self.all_points():
            doc = (f"IsoFLOP run {point.name}: family size {point.size}, {point.params:,} parameters, {point.steps} "
                   f"steps, {point.compute:.3g} FLOPs. Written by llama_jax.scaling.")
            self.config_file(point).write_text(config_source(self.config(point), doc))
        data = {**self._plan(), "prediction": dataclasses.asdict(self.prediction) if self.prediction else None,
                "predicted": self.predicted}
        (self.directory / "plan.json").write_text(json.dumps(data, indent=1) + "\n")
        commands = [shlex.join(self.command(p, "python")) for p in self.all_points()]
        (self.directory / "launch.sh").write_text(
            "#!/bin/sh\n# The sweep's runs, one per line: independent, so a cluster can run them in parallel.\nset -e\n"
            + "\n".join(commands) + "\n")

    def _plan(self) -> dict:
        """What was planned, as plan.json holds it (without what the fit later adds)."""
        return {"family": dataclasses.asdict(self.family), "base": self.base, "overrides": self.overrides,
                "holdout": self.holdout, "points": [dataclasses.asdict(p) for p in self.points]}


def _json(tree) -> str:
    return json.dumps(tree, sort_keys=True)


def _tuples(tree):
    """JSON's lists back into the tuples the config schema holds (data.ramp, phases)."""
    if isinstance(tree, dict):
        return {key: _tuples(value) for key, value in tree.items()}
    return tuple(_tuples(v) for v in tree) if isinstance(tree, list) else tree


def run_sweep(sweep: Sweep, *, tasks: Sequence[str] = (), env: dict | None = None,
              log: Callable[[str], None] = print, in_process: bool = False) -> None:
    """Trains every run of the sweep (the prediction too, once planned) that has not finished, one after another,
    each in its own `python -m llama_jax.train` process (environment `env`); then, with `tasks`, evaluates the runs
    on them (`evaluate_runs`). A failed run stops the sweep with its log's tail. `in_process` trains in this process
    instead (`llama_jax.trainer.train`, on its devices, output in WORKDIR/train.log all the same): a run of a few
    seconds' compute spends most of a new process's time starting Python and importing JAX."""
    for point in sweep.all_points():
        workdir = sweep.workdir(point)
        if final_eval_loss(workdir, point.steps) is None:
            workdir.mkdir(parents=True, exist_ok=True)
            log(f"training {point.name}: {point.params:,} parameters, {point.steps} steps, {point.compute:.3g} FLOPs")
            if in_process:
                _train_here(sweep.config(point), workdir)
            else:
                _run(sweep.command(point), workdir / "train.log", env)
    if tasks:
        evaluate_runs(sweep, tasks, log=log)


def evaluate_runs(sweep: Sweep, tasks: Sequence[str], *, batch_size: int = 32,
                  log: Callable[[str], None] = print) -> None:
    """Scores each finished run without results yet on multiple-choice `tasks` (files or built-in names, see
    llama_jax.evaluate), in this process, into WORKDIR/eval.json: what the accuracy stage of the fit reads."""
    from llama_jax.convert import open_checkpoint  # the checkpoint readers are needed here only
    from llama_jax.evaluate import ChoiceTask, evaluate_tasks

    for point in sweep.all_points():
        workdir = sweep.workdir(point)
        if final_eval_loss(workdir, point.steps) is None or (workdir / "eval.json").is_file():
            continue
        log(f"evaluating {point.name} on {', '.join(tasks)}")
        opened = open_checkpoint(workdir)
        max_len = min(opened.model.cfg.max_seq_len, 2048)
        metrics = evaluate_tasks(opened.model, [ChoiceTask.load(t, opened.tokenizer, max_len) for t in tasks], batch_size)
        (workdir / "eval.json").write_text(json.dumps(metrics) + "\n")


def _run(command: list[str], log_file: Path, env: dict | None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    log_file.write_text(result.stdout + result.stderr)
    if result.returncode:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise DataError(f"`{shlex.join(command)}` exited with {result.returncode}; see {log_file}:\n{tail}")


def _train_here(cfg: ml_collections.ConfigDict, workdir: Path) -> None:
    """`llama_jax.trainer.train` with its output (progress bars, metrics lines) in WORKDIR/train.log, as `_run` keeps it."""
    from llama_jax import trainer  # imported here so that planning and fitting need no training stack

    with open(workdir / "train.log", "w") as log_file, contextlib.redirect_stdout(log_file), \
            contextlib.redirect_stderr(log_file):
        trainer.train(cfg, workdir)


def final_eval_loss(workdir: Path, steps: int) -> float | None:
    """The `eval_loss` of the run's last step in WORKDIR/metrics.jsonl; None while the run has not finished."""
    final = None
    for record in read_jsonl(Path(workdir) / "metrics.jsonl"):
        if "eval_loss" in record and record["step"] == steps:
            final = float(record["eval_loss"])
    return final


@dataclasses.dataclass(frozen=True)
class RunResult:
    point: GridPoint
    loss: float  # final eval_loss, nats per token
    evaluation: dict  # `python -m llama_jax.evaluate`'s metrics, {} when not evaluated


def collect_results(sweep: Sweep, points: Sequence[GridPoint] | None = None) -> list[RunResult]:
    """The finished runs among `points` (default: the grid) with their final eval loss and evaluation results."""
    results = []
    for point in sweep.points if points is None else points:
        loss = final_eval_loss(sweep.workdir(point), point.steps)
        if loss is not None:
            evaluation = sweep.workdir(point) / "eval.json"
            results.append(RunResult(point, loss, json.loads(evaluation.read_text()) if evaluation.is_file() else {}))
    return results


def finished_grid(sweep: Sweep) -> list[RunResult]:
    """The grid's finished runs, refused while a budget has fewer than its parabola needs: a budget none of whose runs
    had finished was left out of the fit without a word (and with none finished at all, the error was that "a power
    law needs at least two points")."""
    results = collect_results(sweep)
    for budget in sorted({p.budget for p in sweep.points}):
        planned = sum(p.budget == budget for p in sweep.points)
        finished = sum(r.point.budget == budget for r in results)
        if finished < 3:
            raise DataError(f"budget {budget:.3g}: {finished} of its {planned} runs have finished, and its parabola "
                            f"needs 3: run `python -m llama_jax.scaling run --sweep {sweep.directory}` first")
    return results


# ------------------------------------------------------------------------------------------------------ fitting


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """y = coefficient * x ** exponent, fitted by least squares in log-log space."""

    coefficient: float
    exponent: float

    def __call__(self, x):
        return self.coefficient * np.asarray(x, float) ** self.exponent


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    if len(x) < 2:
        raise DataError(f"a power law needs at least two points, got {len(x)}: add budgets to the sweep")
    slope, intercept = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return PowerLaw(float(np.exp(intercept)), float(slope))


@dataclasses.dataclass(frozen=True)
class BudgetFit:
    """One IsoFLOP curve: loss = a * log10(D)^2 + b * log10(D) + c, and the same against log10(N)."""

    budget: float
    tokens_parabola: tuple[float, float, float]
    params_parabola: tuple[float, float, float]
    optimal_tokens: float
    optimal_params: float
    optimal_loss: float
    inside: bool  # the optimum lies within the sizes trained (otherwise it is an extrapolation)


def fit_budget(budget: float, params: Sequence[float], tokens: Sequence[float], losses: Sequence[float]) -> BudgetFit:
    if len(losses) < 3:
        raise DataError(f"budget {budget:.3g}: {len(losses)} finished runs, a parabola needs 3: finish the sweep's runs")
    log_d, log_n = np.log10(np.asarray(tokens, float)), np.log10(np.asarray(params, float))
    by_tokens = np.polyfit(log_d, losses, 2)
    by_params = np.polyfit(log_n, losses, 2)
    if by_tokens[0] <= 0 or by_params[0] <= 0:
        raise DataError(f"budget {budget:.3g}: the losses {np.round(losses, 4).tolist()} have no minimum over the sizes "
                        "trained (the parabola opens downward): add sizes on the side where the loss falls, or check "
                        "that the runs trained (learning rate, steps)")
    best_log_d = -by_tokens[1] / (2 * by_tokens[0])
    best_log_n = -by_params[1] / (2 * by_params[0])
    return BudgetFit(budget, tuple(by_tokens), tuple(by_params), float(10 ** best_log_d), float(10 ** best_log_n),
                     float(np.polyval(by_tokens, best_log_d)), bool(log_d.min() <= best_log_d <= log_d.max()))


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    budgets: tuple[BudgetFit, ...]
    params_law: PowerLaw  # N*(C)
    tokens_law: PowerLaw  # D*(C)
    loss_law: PowerLaw  # L*(C): the optimal loss, a power law in C (no irreducible term: fine over a few decades)

    def summary(self) -> dict:
        return {"alpha": self.params_law.exponent, "A": self.params_law.coefficient,
                "beta": self.tokens_law.exponent, "B": self.tokens_law.coefficient,
                "loss_exponent": self.loss_law.exponent, "loss_coefficient": self.loss_law.coefficient,
                "budgets": [dataclasses.asdict(b) for b in self.budgets]}


def fit_scaling(params: Sequence[float], tokens: Sequence[float], losses: Sequence[float],
                budgets: Sequence[float]) -> ScalingFit:
    """Per budget a parabola in log D (and in log N), then power laws through the optima. Each run is given by its
    parameter count, tokens, final loss and the nominal budget it belongs to."""
    groups: dict[float, list[int]] = {}
    for index, budget in enumerate(budgets):
        groups.setdefault(float(budget), []).append(index)
    fits = tuple(fit_budget(b, [params[i] for i in ix], [tokens[i] for i in ix], [losses[i] for i in ix])
                 for b, ix in sorted(groups.items()))
    cs = [f.budget for f in fits]
    return ScalingFit(fits, fit_power_law(cs, [f.optimal_params for f in fits]),
                      fit_power_law(cs, [f.optimal_tokens for f in fits]),
                      fit_power_law(cs, [f.optimal_loss for f in fits]))


def fit_results(results: Sequence[RunResult]) -> ScalingFit:
    return fit_scaling([r.point.params for r in results], [r.point.tokens for r in results],
                       [r.loss for r in results], [r.point.budget for r in results])


@dataclasses.dataclass(frozen=True)
class Sigmoid:
    """Accuracy from normalised NLL: chance + (1 - chance) / (1 + exp(slope * (nll - midpoint)))."""

    chance: float
    slope: float
    midpoint: float

    def __call__(self, nll):
        return self.chance + (1 - self.chance) / (1 + np.exp(self.slope * (np.asarray(nll, float) - self.midpoint)))


def fit_accuracy(nll: Sequence[float], accuracy: Sequence[float], chance: float) -> Sigmoid:
    """The Llama 3 paper's second stage: a sigmoid from a task's normalised NLL of the correct answer to its accuracy,
    between chance (a bad model) and 1 (a perfect one)."""
    from scipy.optimize import curve_fit

    nll, accuracy = np.asarray(nll, float), np.asarray(accuracy, float)
    if len(nll) < 3:
        raise DataError(f"the accuracy sigmoid needs at least 3 evaluated runs, got {len(nll)}: run the sweep with tasks")
    def curve(x, slope, midpoint):
        return Sigmoid(chance, slope, midpoint)(x)

    (slope, midpoint), _ = curve_fit(curve, nll, accuracy, p0=(1.0, float(np.median(nll))), maxfev=20000)
    return Sigmoid(chance, float(slope), float(midpoint))


# ----------------------------------------------------------------------------------------------- the prediction


def predict_point(fit: ScalingFit, budget: float, family: ModelFamily, sizes: Iterable[int], *, batch_size: int,
                  seq_len: int) -> tuple[GridPoint, dict]:
    """The family size closest (in log parameters) to N*(budget), trained on budget / FLOPs-per-token tokens; and
    what the fit predicts: {"params": N*, "tokens": D*, "loss": L*} at that budget."""
    target = float(fit.params_law(budget))
    candidates = [grid_point(budget, n, family, batch_size, seq_len) for n in sizes]
    point = min(candidates, key=lambda p: abs(math.log(p.params / target)))
    return point, {"params": target, "tokens": float(fit.tokens_law(budget)), "loss": float(fit.loss_law(budget))}


def plan_prediction(sweep: Sweep, sizes: Iterable[int]) -> ScalingFit:
    """Fits the sweep's finished grid runs and records in plan.json the model predicted for its held-out budget."""
    fit = fit_results(finished_grid(sweep))
    any_point = sweep.points[0]
    sweep.prediction, sweep.predicted = predict_point(fit, sweep.holdout, sweep.family, sizes,
                                                      batch_size=any_point.batch_size, seq_len=any_point.seq_len)
    sweep.save()
    return fit


def prediction_error(sweep: Sweep) -> dict | None:
    """Predicted against measured loss of the held-out budget's run; None until it has finished."""
    if sweep.prediction is None:
        return None
    loss = final_eval_loss(sweep.workdir(sweep.prediction), sweep.prediction.steps)
    if loss is None:
        return None
    predicted = sweep.predicted["loss"]
    return {"budget": sweep.holdout, "run": sweep.prediction.name, "predicted_params": sweep.predicted["params"],
            "run_params": sweep.prediction.params, "predicted_loss": predicted, "measured_loss": loss,
            "error": predicted - loss, "relative_error": (predicted - loss) / loss}


# -------------------------------------------------------------------------------------------------------- plots


def plot_sweep(results: Sequence[RunResult], fit: ScalingFit, prediction: dict | None = None, path: str | None = None):
    """IsoFLOP curves (loss against tokens, parabolas, optima) and the optima's power laws in C, with the held-out
    prediction when there is one. Returns the matplotlib figure."""
    import matplotlib

    if path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_iso, ax_law) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(fit.budgets)))
    for color, budget_fit in zip(colors, fit.budgets):
        runs = [r for r in results if r.point.budget == budget_fit.budget]
        tokens = np.array([r.point.tokens for r in runs], float)
        ax_iso.scatter(tokens, [r.loss for r in runs], color=color, label=f"C = {budget_fit.budget:.2g}")
        grid = np.linspace(np.log10(tokens.min()) - 0.1, np.log10(tokens.max()) + 0.1, 100)
        ax_iso.plot(10 ** grid, np.polyval(budget_fit.tokens_parabola, grid), color=color)
        ax_iso.scatter([budget_fit.optimal_tokens], [budget_fit.optimal_loss], color=color, marker="*", s=200,
                       edgecolor="black")
    ax_iso.set(xscale="log", xlabel="training tokens D", ylabel="final eval loss (nats/token)", title="IsoFLOP curves")
    ax_iso.legend()
    budgets = np.array([f.budget for f in fit.budgets])
    span = np.geomspace(budgets.min() / 2, (prediction or {}).get("budget", budgets.max()) * 2, 50)
    ax_law.scatter(budgets, [f.optimal_params for f in fit.budgets], color="C0", label="N* per budget")
    ax_law.plot(span, fit.params_law(span), color="C0",
                label=f"N* = {fit.params_law.coefficient:.3g} C^{fit.params_law.exponent:.3f}")
    ax_law.scatter(budgets, [f.optimal_tokens for f in fit.budgets], color="C1", label="D* per budget")
    ax_law.plot(span, fit.tokens_law(span), color="C1",
                label=f"D* = {fit.tokens_law.coefficient:.3g} C^{fit.tokens_law.exponent:.3f}")
    if prediction:
        ax_law.scatter([prediction["budget"]], [prediction["predicted_params"]], color="C0", marker="*", s=200,
                       edgecolor="black", label="held-out budget: predicted N*")
    ax_law.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", title="compute-optimal size and tokens")
    ax_law.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=100)
    return fig


# ---------------------------------------------------------------------------------------------------------- CLI


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{text!r} is not a comma-separated list of numbers (e.g. 2e11,6e11,2e12)") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{text!r} is not a comma-separated list of integers (e.g. 1,2,3,4)") from None


# What each run's budget is made of: its model's shape, its batches and its length. --set may not change them.
_PLANNED_KEYS = ("data.batch_size", "data.seq_len", "data.ramp", "train.steps", "train.tokens", "phases")


def _overrides(items: Sequence[str], base: ml_collections.ConfigDict) -> dict:
    """--set's KEY=VALUE items, each checked against `base` (its key exists, its value has the key's type) and
    refused where it would change what a run spends, which plan.json records and the fit reads."""
    overrides = {}
    checked = ml_collections.ConfigDict(base.to_dict())
    for item in items:
        key, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE (e.g. --set optim.lr=1e-3)")
        section, _, field = key.strip().partition(".")
        if key.strip() in _PLANNED_KEYS or (section == "model" and field not in RUNTIME_FIELDS):
            raise ConfigError(f"--set {key.strip()} is the grid's own (each run's model, batch and steps spend its "
                              "budget): give --batch_size, --seq_len or the family's --aspect_ratio, --head_dim and "
                              "--vocab_size instead")
        try:
            overrides[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            overrides[key.strip()] = value.strip()  # a bare string
        _set(checked, key.strip(), overrides[key.strip()])
    return overrides


def format_plan(points: Sequence[GridPoint]) -> str:
    """The grid as a table: parameters (all, non-embedding), tokens, steps, FLOPs and tokens per parameter."""
    lines = [f"{'run':<16} {'params':>11} {'non-emb':>11} {'tokens':>11} {'steps':>6} {'FLOPs':>9} {'D/N':>6}"]
    for p in points:
        lines.append(f"{p.name:<16} {p.params:>11,} {p.non_embedding_params:>11,} {p.tokens:>11,} {p.steps:>6} "
                     f"{p.compute:>9.3g} {p.tokens / p.params:>6.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.scaling", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="plan an IsoFLOP grid: config files, plan.json, launch.sh")
    plan.add_argument("--out", required=True, help="the sweep directory")
    plan.add_argument("--budgets", required=True, help="compute budgets in FLOPs, e.g. 2e11,6e11,2e12")
    plan.add_argument("--holdout", type=float, default=None, help="a larger budget to predict and then check")
    plan.add_argument("--sizes", default="1,2,3,4,5,6", help="family sizes n to choose from")
    plan.add_argument("--points", type=int, default=4, help="sizes per budget (0 = every size with enough steps)")
    plan.add_argument("--min_steps", type=int, default=50)
    plan.add_argument("--batch_size", type=int, default=8)
    plan.add_argument("--seq_len", type=int, default=128)
    plan.add_argument("--aspect_ratio", type=int, default=64)
    plan.add_argument("--head_dim", type=int, default=32)
    plan.add_argument("--vocab_size", type=int, default=8192)
    plan.add_argument("--config", default=None, help="base config file (default: llama_jax.config.default_config())")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    run = commands.add_parser("run", help="train (and evaluate) the sweep's unfinished runs, one after another")
    run.add_argument("--sweep", required=True)
    run.add_argument("--tasks", default="", help="multiple-choice tasks to evaluate each run on (llama_jax.evaluate)")
    fit = commands.add_parser("fit", help="fit the finished runs; plan or check the held-out prediction")
    fit.add_argument("--sweep", required=True)
    fit.add_argument("--sizes", default="1,2,3,4,5,6,7,8", help="family sizes the prediction may choose from")
    fit.add_argument("--plot", default=None, help="write the IsoFLOP and power-law plots to this image file")
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            base = load_config_file(args.config) if args.config else None
            overrides = _overrides(args.set, base or default_config())  # said first, whatever the grid
            family = ModelFamily(aspect_ratio=args.aspect_ratio, head_dim=args.head_dim, vocab_size=args.vocab_size)
            points = plan_isoflop(_floats(args.budgets), family, _ints(args.sizes), batch_size=args.batch_size,
                                  seq_len=args.seq_len, points_per_budget=args.points, min_steps=args.min_steps)
            sweep = Sweep.create(args.out, points, family, base, overrides, args.holdout)
            print(format_plan(points))
            print(f"wrote {len(points)} configs to {sweep.directory / 'configs'}, plan.json and launch.sh")
        elif args.command == "run":
            run_sweep(Sweep.open(args.sweep), tasks=[t for t in args.tasks.split(",") if t])
        else:
            sweep = Sweep.open(args.sweep)
            if sweep.holdout is not None and sweep.prediction is None:
                fitted = plan_prediction(sweep, _ints(args.sizes))
                print(f"held-out budget {sweep.holdout:.3g}: the fit predicts N* = {sweep.predicted['params']:,.0f}, "
                      f"loss {sweep.predicted['loss']:.4f}; planned {sweep.prediction.name}: run `python -m "
                      f"llama_jax.scaling run --sweep {sweep.directory}` to measure it")
            else:
                fitted = fit_results(finished_grid(sweep))
            for b in fitted.budgets:
                print(f"C {b.budget:9.3g}: D* {b.optimal_tokens:12,.0f}  N* {b.optimal_params:12,.0f}  "
                      f"loss* {b.optimal_loss:.4f}{'' if b.inside else '  (outside the sizes trained)'}")
            error = prediction_error(sweep)
            summary = {**fitted.summary(), "prediction": error}
            print(f"N*(C) = {fitted.params_law.coefficient:.3g} C^{fitted.params_law.exponent:.3f}; "
                  f"D*(C) = {fitted.tokens_law.coefficient:.3g} C^{fitted.tokens_law.exponent:.3f}")
            if error:
                print(f"held-out budget {error['budget']:.3g}: predicted loss {error['predicted_loss']:.4f}, measured "
                      f"{error['measured_loss']:.4f} ({100 * error['relative_error']:+.1f}%)")
            if args.plot:
                plot_sweep(finished_grid(sweep), fitted, error, args.plot)
            print(json.dumps(summary))
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
