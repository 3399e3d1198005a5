"""Training phases: one run that changes its data, shapes, mesh and learning-rate segment as it goes.

Llama 3's pretraining is not one loop with one setting: after the main phase (with its batch ramp) comes a
long-context extension, in stages toward 128K with the llama3 RoPE scaling, then an annealing of the learning rate
to zero on a high-quality mixture, whose checkpoints are averaged into the final model. A config says all of it as
data: the top-level keys are the first phase ("pretrain", budget `train.steps` or `train.tokens`), and `cfg.phases`
lists the later ones, each made with `phase(...)`: a budget, a learning-rate mode and overrides of config sections.

Every step of the run belongs to exactly one phase, by a pure function of the config (phase budgets in tokens are
turned into steps through the phase's batch schedule), so a restarted run knows its phase from its checkpoint's step
alone. The step counter and the learning-rate schedule run across phases; each phase has its own data stream.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
from typing import Any

import jax.numpy as jnp
import ml_collections

from llama_jax.data.schedule import BatchSchedule
from llama_jax.errors import ConfigError
from llama_jax.parallel.mesh import MESH_AXES

# Sections a phase may override; `train`, `watchdog`, `stability`, `seed` and the optimizer belong to the whole run,
# except `optim.grad_accum`: a new batch shape on a new mesh may need its own accumulation.
PHASE_SECTIONS = ("data", "mesh", "model", "pipeline", "checkpoint", "objective", "optim")
# "continue": the run's schedule goes on; "anneal": linear from the learning rate the phase starts at to `lr_end`.
LR_MODES = ("continue", "anneal")
_PHASE_FIELDS = ("name", "steps", "tokens", "lr", "lr_end", "average")
_KINDS = {int: "a whole number", float: "a number", str: "a string", bool: "True or False"}


def phase(name: str, *, steps: int = 0, tokens: int = 0, lr: str = "continue", lr_end: float = 0.0,
          average: bool = False, **sections: dict) -> ml_collections.ConfigDict:
    """One entry of `cfg.phases`: trains `steps` steps, or until `tokens` more tokens (give one of them), with the
    run's config changed by `sections`, e.g. `data=dict(seq_len=8192, batch_size=64), mesh=dict(context=8)`.

    `lr="anneal"` decays the learning rate linearly from its value at the phase's start to `lr_end`; `average=True`
    averages the checkpoints saved during the phase (every `checkpoint.every_steps`, and its last step) into
    `WORKDIR/averaged` when it ends (Polyak averaging, as Llama 3's final model)."""
    entry = ml_collections.ConfigDict(
        {"name": name, "steps": steps, "tokens": tokens, "lr": lr, "lr_end": float(lr_end), "average": average})
    entry.overrides = ml_collections.ConfigDict({key: dict(values) for key, values in sections.items()})
    return entry


@dataclasses.dataclass(frozen=True)
class Phase:
    index: int
    name: str
    cfg: ml_collections.ConfigDict  # the whole config this phase trains with (no `phases` of its own)
    batches: BatchSchedule  # its batch sizes and sequence lengths, in steps counted from its start
    start_step: int
    stop_step: int
    start_tokens: int  # tokens trained on by all earlier phases
    lr: str
    lr_end: float
    average: bool

    @property
    def num_steps(self) -> int:
        return self.stop_step - self.start_step

    def tokens_before(self, step: int) -> int:
        """Tokens of the run's steps [0, step), for a step within this phase (or its stop)."""
        return self.start_tokens + self.batches.tokens_before(step - self.start_step)

    def describe_batches(self, step: int) -> str:
        """The batch shapes from `step` to the phase's end: "16 x 256", or with a ramp "16 x 256, 32 x 256 from step
        40"."""
        shapes = [(self.start_step + max(s.start_step, step - self.start_step), s.batch_size, s.seq_len)
                  for s in self.batches.stages
                  if self.start_step + s.start_step < self.stop_step and s.num_steps != 0
                  and (s.stop_step is None or self.start_step + s.stop_step > step)]
        return ", ".join(f"{b} x {t}" + (f" from step {start}" if i else "") for i, (start, b, t) in enumerate(shapes))

    def check_resume(self, saved_cfg: dict, step: int) -> None:
        """Refuses a config that batches the steps a checkpoint of `step` has trained otherwise than its own config
        (`saved_cfg`) did. Batches are placed by step (rows [step·B, (step+1)·B) of the stream), so a new
        data.batch_size, seq_len or past ramp entry would skip rows or read them twice, and miscount the tokens seen
        and a token-based schedule; the message gives the ramp that makes the change from `step` on instead."""
        data = saved_cfg.get("data")
        trained = step - self.start_step
        if not data or trained <= 0:
            return
        saved = BatchSchedule(data["batch_size"], data["seq_len"], data.get("ramp", ()))
        if saved.placement(trained) == self.batches.placement(trained):
            return
        seen = saved.tokens_before(trained)
        new = self.batches.stage(trained)
        was, now = _describe(saved.placement(trained)), _describe(self.batches.placement(trained))
        ramp = ([tuple(e) for e in data.get("ramp", ()) if e[0] < seen] + [(seen, new.batch_size, new.seq_len)]
                + [tuple(e) for e in self.cfg.data.ramp if e[0] > seen])
        where = "data" if self.index == 0 else f"phases[{self.index - 1}] ({self.name!r}) data"
        raise ConfigError(
            f"the checkpoint of step {step} was trained with batches {was}, and this config batches those steps as "
            f"{now}: batches are placed by step, so the rows after the checkpoint would not be those that follow it, "
            f"and the tokens seen would be miscounted. To change the batch from step {step} on, keep "
            f"{where}.batch_size={data['batch_size']} and seq_len={data['seq_len']} and set {where}.ramp="
            f"{tuple(ramp)!r} (a stage that starts at the {seen:,} tokens seen by then); to fit memory with the same "
            "batch, raise optim.grad_accum instead")

    def save_steps(self) -> list[int]:
        """The steps this phase checkpoints at, counted from the run's start: every `checkpoint.every_steps` of the
        run's step counter, and its last step."""
        every = self.cfg.checkpoint.every_steps
        first = (self.start_step // every + 1) * every
        return [*range(first, self.stop_step, every), self.stop_step]


class RunPlan:
    """The phases of a run, with the steps and tokens each one spans."""

    def __init__(self, cfg: ml_collections.ConfigDict):
        phases: list[Phase] = []
        step, tokens = 0, 0
        entries = [_first_entry(cfg), *cfg.phases]
        for index, entry in enumerate(entries):
            where = "train.steps / train.tokens" if index == 0 else f"phases[{index - 1}] ({entry.name!r})"
            phase_cfg = cfg if index == 0 else phase_config(cfg, entry, where)
            batches = BatchSchedule(phase_cfg.data.batch_size, phase_cfg.data.seq_len, phase_cfg.data.ramp)
            steps = _budget_steps(entry, batches, where)
            phases.append(Phase(index, entry.name, phase_cfg, batches, step, step + steps, tokens, entry.lr,
                                entry.lr_end, entry.average))
            step, tokens = step + steps, tokens + batches.tokens_before(steps)
        self.phases: tuple[Phase, ...] = tuple(phases)
        self.total_steps = step

    def phase_at(self, step: int) -> Phase:
        """The phase that trains step `step` + 1 (the one after `step` steps are done); the last one at the end."""
        starts = [p.start_step for p in self.phases if p.num_steps]
        candidates = [p for p in self.phases if p.num_steps]
        return candidates[max(bisect.bisect_right(starts, step) - 1, 0)] if step < self.total_steps else candidates[-1]

    def phase_of_checkpoint(self, step: int) -> Phase:
        """The phase whose data iterator a checkpoint of `step` holds: the one that trained its last step."""
        return self.phase_at(max(step - 1, 0))

    def tokens_before(self, step: int) -> int:
        return self.phase_at(min(step, self.total_steps - 1)).tokens_before(step) if step else 0

    def tokens_fn(self):
        """`tokens_before` as a traceable function of a step array, in float32: exact to ~1e-7 of the count, which
        is what a token-based learning-rate schedule needs."""
        starts, tokens, rates = [], [], []
        for p in self.phases:
            for stage in p.batches.stages:
                if stage.num_steps == 0 or p.start_step + stage.start_step >= p.stop_step:
                    continue
                starts.append(p.start_step + stage.start_step)
                tokens.append(p.start_tokens + stage.start_tokens)
                rates.append(stage.tokens_per_step)
        starts_s, tokens_s, rates_s = (jnp.asarray(v, jnp.float32) for v in (starts, tokens, rates))

        def tokens_before(step):
            step = jnp.asarray(step, jnp.float32)
            i = jnp.clip(jnp.searchsorted(starts_s, step, side="right") - 1, 0, len(starts) - 1)
            return tokens_s[i] + (step - starts_s[i]) * rates_s[i]

        return tokens_before

    def placement(self, steps: int) -> list[tuple[int, int, int]]:
        """(first step, batch_size, seq_len) of each phase's stages that the run's steps [0, steps) use, in the run's
        steps: two plans of the same placement put the same rows of each phase's stream into those steps."""
        return [(p.start_step + start, b, t) for p in self.phases if p.start_step < steps
                for start, b, t in p.batches.placement(min(steps, p.stop_step) - p.start_step)]

    def check_resume(self, saved_meta: dict, step: int) -> None:
        """Refuses a config that batches the steps before checkpoint `step` otherwise than the run that saved it:
        first within the checkpoint's phase (`Phase.check_resume`, which names the fix), then over the whole run by
        the placement the checkpoint stores (`batches`; before it stored one, by its `tokens_seen`): an earlier
        phase's batch shape or budget changed."""
        self.phase_of_checkpoint(step).check_resume(saved_meta["config"], step)
        if "batches" in saved_meta:
            saved, now = [tuple(stage) for stage in saved_meta["batches"]], self.placement(step)
            if saved == now:
                return
            differs = next(min(stage[0] for stage in pair if stage) for pair in itertools.zip_longest(saved, now)
                           if pair[0] != pair[1])  # the first step that either puts into another stage
            p = self.phase_at(differs)
            where = "train.steps / data" if p.index == 0 else f"phases[{p.index - 1}]"
            raise ConfigError(
                f"the checkpoint of step {step} was trained with batches {_describe(saved)}, and this config "
                f"batches those steps as {_describe(now)}: they part at step {differs} (in the {p.name!r} phase, "
                f"{where}), so an earlier phase's batch_size, seq_len, ramp or budget changed, and the data position "
                "and tokens seen of the phases after it would be wrong. Keep the phases before the checkpoint's as "
                "the run trained them")
        seen, counted = saved_meta.get("tokens_seen"), self.tokens_before(step)
        if seen is not None and seen != counted:
            raise ConfigError(
                f"the checkpoint of step {step} had trained on {seen:,} tokens, and this config counts {counted:,} for "
                "the steps before it: the batch size or sequence length of an earlier phase changed (its data, or "
                "train.steps / the budgets that end it), so its data position and token count would be wrong. Keep "
                "the earlier phases as the run trained them")

    def keep_steps(self) -> list[int]:
        """Checkpoints that must outlive the keep policy: those a phase averages."""
        return [s for p in self.phases if p.average for s in p.save_steps()]


def _describe(placement: list) -> str:
    """A placement's batch shapes, as "16 x 256 from step 0, 32 x 256 from step 40"."""
    return ", ".join(f"{b} x {t} from step {start}" for start, b, t in placement)


def phase_config(cfg: ml_collections.ConfigDict, entry: ml_collections.ConfigDict, where: str) -> ml_collections.ConfigDict:
    """The run's config with a phase's overrides applied. The batch ramp belongs to the phase that sets it (its
    tokens count from the phase's start), so a later phase without `data.ramp` has none."""
    from llama_jax.config import validate  # config imports this module to check phases

    phase_cfg = ml_collections.ConfigDict(cfg.to_dict())
    phase_cfg.phases = ()
    phase_cfg.data.ramp = ()
    for section, values in entry.overrides.items():
        if section not in PHASE_SECTIONS:
            raise ConfigError(f"{where}: section {section!r} cannot change in a phase; phases override "
                              f"{', '.join(PHASE_SECTIONS)}")
        for key, value in values.items():
            if section == "optim" and key != "grad_accum":
                raise ConfigError(f"{where}: optim.{key} belongs to the whole run (its schedule spans the phases); a "
                                  "phase may change optim.grad_accum only, and its learning rate with lr='anneal'")
            if section == "checkpoint" and key != "every_steps":
                raise ConfigError(f"{where}: checkpoint.{key} belongs to the whole run (one checkpointer keeps its "
                                  "checkpoints); a phase may change checkpoint.every_steps only")
            if key not in phase_cfg[section]:
                raise ConfigError(f"{where}: unknown key {section}.{key}; a phase overrides keys the config has")
            if section == "data" and key in ("mixture", "eval_sources"):
                value = ml_collections.ConfigDict(value)
            try:
                phase_cfg[section][key] = value
            except TypeError:
                kind = type(phase_cfg[section][key])
                raise ConfigError(f"{where}: {section}.{key}={value!r} is a {type(value).__name__}, and "
                                  f"{section}.{key} takes {_KINDS.get(kind, kind.__name__)}") from None
    try:
        validate(phase_cfg)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return phase_cfg


def state_layout(config: dict) -> dict[str, Any]:
    """What decides a train state's structure beside the model: LoRA's adapters, a reward model's head, and DPO's
    reference (kept in the optimizer's state, unless LoRA's frozen base is the reference). Objectives that share a
    layout (lm and sft) may follow each other in one workdir."""
    objective = config.get("objective", {}).get("name", "lm")
    lora = config.get("lora", {})
    rank = lora.get("rank", 0)
    return {"LoRA adapters": f"rank {rank} on {lora.get('targets')}" if rank else "none",
            "reward head (objective.name='reward')": objective == "reward",
            "DPO reference (objective.name='dpo')": objective == "dpo" and not rank}


def check_phases(cfg: ml_collections.ConfigDict) -> RunPlan:
    """Validates `cfg.phases` against the run (fields, budgets, overrides, an unchanged architecture)."""
    from llama_jax.config import model_config

    names = ["pretrain"]
    for index, entry in enumerate(cfg.phases):
        where = f"phases[{index}]"
        if not isinstance(entry, ml_collections.ConfigDict) or "overrides" not in entry:
            raise ConfigError(f"{where} must be made with llama_jax.phases.phase(NAME, steps=..., ...)")
        unknown = sorted(set(entry.keys()) - {*_PHASE_FIELDS, "overrides"})
        if unknown:
            raise ConfigError(f"{where}: unknown fields {unknown}; a phase has {', '.join(_PHASE_FIELDS)} and overrides")
        _check_field_types(entry, where)
        if entry.name in names:
            raise ConfigError(f"{where}: phase name {entry.name!r} is used twice; give each phase its own name")
        names.append(entry.name)
        if entry.lr not in LR_MODES:
            raise ConfigError(f"{where}: lr={entry.lr!r} is not one of {LR_MODES}")
        if entry.lr_end < 0:
            raise ConfigError(f"{where}: lr_end must be zero or positive, got {entry.lr_end}")
        if entry.average and any(earlier.average for earlier in cfg.phases[:index]):
            raise ConfigError(f"{where}: a second phase with average=True; WORKDIR/averaged holds one average (Llama 3 "
                              "averages its annealing): keep average=True on one phase")
        if entry.lr == "continue" and any(earlier.lr == "anneal" for earlier in cfg.phases[:index]):
            raise ConfigError(f"{where}: lr='continue' after an annealing phase would jump back up to the run's "
                              "schedule: anneal it too (lr='anneal'), or place it before the annealing")
    plan = RunPlan(cfg)
    base = model_config(cfg)
    devices = math.prod(cfg.mesh[axis] for axis in MESH_AXES)
    for p in plan.phases[1:]:
        phase_devices = math.prod(p.cfg.mesh[axis] for axis in MESH_AXES)
        if min(devices, phase_devices) > 0 and devices != phase_devices:
            raise ConfigError(f"phases[{p.index - 1}] ({p.name!r}) has a mesh of {phase_devices} devices, the run "
                              f"{devices}: a phase reshapes the mesh over the same devices (set one axis to -1 to "
                              "take the rest)")
        changed = [c.replace("(checkpoint:", "(first phase:") for c in model_config(p.cfg).architecture_changes(base)
                   if not c.startswith("model.rope_")]
        if changed:
            raise ConfigError(f"phases[{p.index - 1}] ({p.name!r}) changes the architecture ({'; '.join(changed)}): a "
                              "phase may change RoPE scaling, max_seq_len, remat and attention, not parameter shapes")
        layout, phase_layout = state_layout(cfg.to_dict()), state_layout(p.cfg.to_dict())
        other = [f"{key}: {layout[key]!r} -> {phase_layout[key]!r}" for key in layout if layout[key] != phase_layout[key]]
        if other:
            raise ConfigError(f"phases[{p.index - 1}] ({p.name!r}) trains another state than the run "
                              f"({'; '.join(other)}): lm and sft may follow each other in a run; start a DPO or reward "
                              "model run of its own, with --config.checkpoint.init_from=WORKDIR")
    return plan


def _check_field_types(entry: ml_collections.ConfigDict, where: str) -> None:
    """A float budget ran on float step numbers, whose last step matched no save (the phase never saved, and exited
    0); a negative one passed the steps-or-tokens check and ended the run before the phase. Whole floats (tokens=2e12)
    are budgets as written."""
    def whole(value: object) -> bool:
        return (isinstance(value, int) and not isinstance(value, bool)
                or isinstance(value, float) and value.is_integer()) and value >= 0

    wrong = [f"{field}={entry[field]!r} (must be {kind})" for field, fits, kind in (
        ("name", lambda v: isinstance(v, str), "a string"),
        ("steps", whole, "a whole number, 0 or more"),
        ("tokens", whole, "a whole number, 0 or more"),
        ("average", lambda v: isinstance(v, bool), "True or False"),
    ) if not fits(entry[field])]
    if wrong:
        raise ConfigError(f"{where}: {', '.join(wrong)}")


def _first_entry(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The top-level config as a phase: `train.tokens`, when set, is its budget instead of `train.steps`."""
    return phase("pretrain", steps=0 if cfg.train.tokens else cfg.train.steps, tokens=cfg.train.tokens)


def _budget_steps(entry: ml_collections.ConfigDict, batches: BatchSchedule, where: str) -> int:
    if (entry.steps > 0) == (entry.tokens > 0):
        raise ConfigError(f"{where}: give a budget in steps or in tokens (one of them, positive), got steps="
                          f"{entry.steps}, tokens={entry.tokens}")
    return int(entry.steps) if entry.steps else batches.steps_for_tokens(int(entry.tokens))
