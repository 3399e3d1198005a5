"""The training loop, top to bottom: mesh → data → state (init or restore) → jitted steps → logs and saves.

The state is plain pytrees, `TrainState(step, params, opt_state)`, with params as a nested dict of arrays.
The Flax module is rebuilt from them inside the jitted step (`ModelDef.merge`), which keeps per-step
overhead at plain `jax.jit` cost. The step (`train_step.py`) is pure; the loop compiles it once with explicit
shardings and donates the old state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time
from typing import Callable, TypeVar

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from llama_jax import checkpoint as ckpt
from llama_jax import generation_config
from llama_jax import goodput as goodput_lib
from llama_jax import lora as lora_lib
from llama_jax import workdir as workdir_lib
from llama_jax import memory, rewind, supervise
from llama_jax.config import (SCHEDULED_PIPELINES, batch_schedule, model_config, pipeline_microbatches,
                              pipeline_repeats, plain, validate)
from llama_jax.data.corpus import load_corpus
from llama_jax.data.pipeline import TrainBatches
from llama_jax.data.tokenizer import Tokenizer, tokenizer_files
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.evaluate import ChoiceTask, check_task_names, evaluate_tasks
from llama_jax.goodput import CHECKPOINT, COMPILE, EVAL, Goodput
from llama_jax.metrics import MetricsLogger, peak_memory_gib, run_peak_flops
from llama_jax.model import ModelDef, param_count
from llama_jax.model.llama import LayersFn
from llama_jax.objectives import flops_per_row_token
from llama_jax.objectives import dpo as dpo_objective
from llama_jax.objectives import reward as reward_objective
from llama_jax.average import average as average_checkpoints
from llama_jax.optim import lr_schedule, make_optimizer, run_lr_schedule
from llama_jax.phase_data import PhaseData, check_sources_prepared, run_data
from llama_jax.phases import Phase, RunPlan
from llama_jax.preemption import Preempted, PreemptionFlag
from llama_jax.profiling import StepProfiler
from llama_jax.stability import Diverged, LossGuard
from llama_jax.train_step import Batch, TrainState, init_state, make_eval_step, make_train_step
from llama_jax.parallel import distributed
from llama_jax.parallel import mesh as mesh_lib
from llama_jax.parallel.context import to_zigzag
from llama_jax.parallel.layers import ScheduledGrads, make_layers_fn, make_scheduled_grads
from llama_jax.parallel.pipeline import bubble_fraction, peak_microbatches
from llama_jax.watchdog import Watchdog

T = TypeVar("T")


class _SaveClock:
    """Wall-clock checkpointing: due once `seconds` passed since the last save (never, when 0). On several hosts
    process 0's clock decides for all, so that every host takes part in the same save."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.reset()

    def reset(self) -> None:
        self._last = time.monotonic()

    def due(self) -> bool:
        if not self.seconds:
            return False
        due = time.monotonic() - self._last >= self.seconds
        if jax.process_count() > 1:
            due = bool(multihost_utils.broadcast_one_to_all(np.asarray(due)))
        return due


@dataclasses.dataclass
class Run:
    """What the loop needs, set up once."""

    cfg: ml_collections.ConfigDict
    workdir: epath.Path
    mesh: Mesh
    model_def: ModelDef
    tx: optax.GradientTransformation
    state_shardings: TrainState
    abstract_state: TrainState  # shapes, dtypes and shardings: the restore target
    batch_sharding: NamedSharding
    batch_share: tuple[int, int]  # (index, count): the block of every batch's rows this process reads (mesh_lib)
    layers_fn: LayersFn  # the layer stack on this mesh: pipelined, context-parallel, activations pinned
    scheduled_grads: ScheduledGrads | None  # the gradient by a 1F1B / ZB-H1 pipeline schedule; None: autodiff
    schedule: optax.Schedule  # the learning rate by step (the optimizer's)
    base: dict | None = None  # LoRA (lora.rank > 0): the frozen model, an argument of the step; params are adapters
    base_shardings: dict | None = None
    base_source: dict | None = None  # LoRA: where the base was read and its fingerprint (lora.base_source)

    def init(self) -> TrainState:
        """Step 0: random parameters, or those of `checkpoint.init_from` (fine-tuning); a fresh optimizer state.
        With LoRA: fresh adapters (the base is `self.base`)."""
        if self.base is not None:
            def fresh() -> TrainState:
                params = _with_objective_params(self.cfg, lora_lib.init(self.model_def, self.cfg.lora, self.cfg.seed))
                return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

            return jax.jit(fresh, out_shardings=self.state_shardings)()
        if not self.cfg.checkpoint.init_from:
            fn = functools.partial(init_state, self.model_def, self.tx, self.cfg.seed)
            return jax.jit(fn, out_shardings=self.state_shardings)()
        base_shardings, _ = _split_objective_params(self.cfg, self.state_shardings.params)
        params = _pretrained(lambda: ckpt.load_pretrained(self.cfg.checkpoint.init_from, self.model_def.cfg,
                                                          base_shardings))

        def from_params(params: dict) -> TrainState:
            params = _with_objective_params(self.cfg, params)
            return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

        return jax.jit(from_params, out_shardings=self.state_shardings)(params)

    def model_params(self, params: dict) -> dict:
        """The model's parameters of a train state's `params` (and the objective's own, the reward head): with LoRA,
        the base with the adapters merged in."""
        if self.base is None:
            return params
        adapters, own = _split_objective_params(self.cfg, params)
        return {**_merge_adapters(self.base, adapters, lora_lib.scale(self.cfg.lora)), **own}

    def to_global(self, local_batch: dict[str, np.ndarray]) -> Batch:
        """This process's rows (its `batch_share` of the batch), laid out along the sequence as context
        parallelism wants, as global arrays. Each device takes its shard from them: where a mesh axis other than the
        batch's spans processes, several hold the same rows, which `make_array_from_process_local_data` took for
        other rows and made a smaller batch of, or a longer sequence."""
        local_batch = to_zigzag(local_batch, self.mesh.shape["context"])
        index, count = self.batch_share
        rows, length = next(iter(local_batch.values())).shape
        first = index * rows

        def global_array(local: np.ndarray) -> jax.Array:
            def shard(where: tuple[slice, ...]) -> np.ndarray:  # global rows of this process's: from its first
                start = first if where[0].start is None else where[0].start
                stop = first + rows if where[0].stop is None else where[0].stop
                return local[start - first:stop - first, where[1]]

            return jax.make_array_from_callback((rows * count, length), self.batch_sharding, shard)

        return {key: global_array(value) for key, value in local_batch.items()}


@functools.partial(jax.jit, static_argnums=2)
def _merge_adapters(base: dict, adapters: dict, scale: float) -> dict:
    return lora_lib.merged(base, adapters, scale)


def _eval_step(run: Run) -> Callable:
    """The run's jitted held-out evaluation, over microbatches as its training step."""
    objective = run.cfg.objective
    return jax.jit(make_eval_step(run.model_def, run.layers_fn, loss_chunk_len=objective.loss_chunk_len,
                                  objective=objective, microbatches=run.cfg.optim.grad_accum))


def setup(cfg: ml_collections.ConfigDict, workdir: epath.Path, devices: list | None = None, *,
          schedule: optax.Schedule | None = None, base_of: Run | None = None) -> Run:
    """Everything the loop needs, on a mesh over all devices (or `devices`). `schedule`: the learning rate by step
    (default: `lr_schedule` over `train.steps`; a run with phases passes the whole run's). `base_of` (LoRA): an
    earlier phase's Run, whose frozen model is placed on this mesh rather than read from `checkpoint.init_from` again.
    A base read from a llama_jax workdir is read from its newest step, and that step is what the run records: the
    workdir may train on and save newer ones."""
    validate(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    _check_mesh_runs(cfg, mesh)
    model_def = ModelDef(model_config(cfg))
    layers_fn = make_layers_fn(model_def.cfg, mesh, microbatches=pipeline_microbatches(cfg), repeats=pipeline_repeats(cfg))
    scheduled_grads = None
    if mesh.shape["stage"] > 1 and cfg.pipeline.schedule in SCHEDULED_PIPELINES:
        scheduled_grads = make_scheduled_grads(model_def, mesh, microbatches=pipeline_microbatches(cfg),
                                               schedule=cfg.pipeline.schedule)
    schedule = schedule or lr_schedule(cfg.optim, cfg.train.steps)
    tx = _optimizer(cfg, schedule)
    abstract, state_sh, base_sh = _abstract_state(cfg, model_def, tx, mesh)
    base = base_source = None
    if cfg.lora.rank:
        if base_of is None:
            base_path, loaded = _pretrained(lambda: _read_base(cfg.checkpoint.init_from, model_def, base_sh))
            base_source = lora_lib.base_source(base_path, loaded)
            base = jax.jit(lambda p: jax.tree.map(lambda w: w.astype(cfg.lora.base_dtype), p),
                           out_shardings=base_sh)(loaded)
        else:
            base, base_source = jax.device_put(base_of.base, base_sh), base_of.base_source
    return Run(cfg, workdir, mesh, model_def, tx, state_sh, abstract, mesh_lib.batch_sharding(mesh),
               mesh_lib.batch_share(mesh), layers_fn, scheduled_grads, schedule, base, base_sh, base_source)


def _optimizer(cfg: ml_collections.ConfigDict, schedule: optax.Schedule) -> optax.GradientTransformation:
    tx = make_optimizer(cfg.optim, cfg.train.steps, schedule)
    if cfg.objective.name == "dpo" and not cfg.lora.rank:  # with LoRA the reference is the frozen base itself
        tx = dpo_objective.keep_reference(tx)
    return tx


def _abstract_state(cfg: ml_collections.ConfigDict, model_def: ModelDef, tx: optax.GradientTransformation,
                    mesh: Mesh) -> tuple[TrainState, TrainState, dict | None]:
    """(the train state's shapes and dtypes with their shardings, those shardings, the frozen base's shardings
    with LoRA): the state is adapters only then, and the base an argument of each step."""
    params_sh = mesh_lib.param_shardings(model_def.abstract_state, mesh)
    base_sh = None
    if cfg.lora.rank:
        base_sh, params_sh = params_sh, lora_lib.shardings(model_def, cfg.lora, mesh)
    if cfg.objective.name == "reward":  # the head trains whole, with LoRA too
        params_sh = {**params_sh, reward_objective.HEAD: mesh_lib.replicated(mesh)}

    def initial_state() -> TrainState:
        trained = lora_lib.init(model_def, cfg.lora, cfg.seed) if cfg.lora.rank else model_def.init(cfg.seed)
        params = _with_objective_params(cfg, trained)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))

    shapes = jax.eval_shape(initial_state)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sharding: sharding, shapes.opt_state, params_sh,
        transform_non_params=lambda _: mesh_lib.replicated(mesh),
    )
    state_sh = TrainState(mesh_lib.replicated(mesh), params_sh, opt_sh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
    return abstract, state_sh, base_sh


def check_devices(cfg: ml_collections.ConfigDict, devices: list | None = None) -> None:
    """Refuses, before any data is prepared or anything allocated, a config its devices cannot run: a mesh that does
    not cover them, batches that do not split over it, a train state that does not fit their memory (memory.py)."""
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    _check_mesh_runs(cfg, mesh)
    memory.check_train_state_fits(train_state_bytes(cfg, mesh), memory.local_devices(mesh))


def train_state_bytes(cfg: ml_collections.ConfigDict, mesh: Mesh | jax.sharding.AbstractMesh) -> dict[str, int]:
    """Bytes per device of `cfg`'s train state on `mesh` (an abstract one too, for the fit plan), by part: what
    LoRA, DPO's reference and the reward head make of it included."""
    model_def = ModelDef(model_config(cfg))
    tx = _optimizer(cfg, lr_schedule(cfg.optim, cfg.train.steps))
    abstract, _, base_sh = _abstract_state(cfg, model_def, tx, mesh)
    return _state_bytes(cfg, model_def, abstract, base_sh)


def _state_bytes(cfg: ml_collections.ConfigDict, model_def: ModelDef, abstract: TrainState,
                 base_shardings: dict | None) -> dict[str, int]:
    """Bytes per device of what every step holds at once: the trained parameters, their gradients, the optimizer
    state and, with LoRA, the frozen base."""
    trained = memory.shard_bytes(abstract.params)
    parts = {"parameters": trained, "gradients": trained, "optimizer": memory.shard_bytes(abstract.opt_state)}
    if base_shardings is not None:
        base = jax.tree.map(lambda p, sharding: jax.ShapeDtypeStruct(p.shape, cfg.lora.base_dtype, sharding=sharding),
                            nnx.to_pure_dict(model_def.abstract_state), base_shardings)
        parts["frozen base"] = memory.shard_bytes(base)
    return parts


def _with_objective_params(cfg: ml_collections.ConfigDict, params: dict) -> dict:
    """The model's parameters plus the objective's own: the reward model's head."""
    if cfg.objective.name == "reward":
        return {**params, reward_objective.HEAD: reward_objective.init_head(cfg.model.dim)}
    return params


def _split_objective_params(cfg: ml_collections.ConfigDict, tree: dict) -> tuple[dict, dict]:
    """(the model's entries, the objective's own entries) of a params-shaped tree."""
    own = (reward_objective.HEAD,) if cfg.objective.name == "reward" else ()
    return {k: v for k, v in tree.items() if k not in own}, {k: v for k, v in tree.items() if k in own}


def _check_mesh_runs(cfg: ml_collections.ConfigDict, mesh: Mesh) -> None:
    _check_compute_dtype_runs_on(mesh, cfg.model.dtype)
    for batch_size, seq_len in batch_schedule(cfg).shapes:
        _check_batch_fits_mesh(cfg, mesh, batch_size, seq_len)


def _check_compute_dtype_runs_on(mesh: Mesh, dtype: str) -> None:
    """XLA's CPU backend has no float16 product with a float32 result, which the model's products ask for: the
    step failed to compile, in XLA's words."""
    if dtype == "float16" and mesh.devices.flat[0].platform == "cpu":
        raise ConfigError("model.dtype='float16' does not run on CPUs (XLA's CPU backend has no float16 matrix product "
                          "with a float32 result): use model.dtype='bfloat16' or 'float32'")


def _check_batch_fits_mesh(cfg: ml_collections.ConfigDict, mesh: Mesh, batch_size: int, seq_len: int) -> None:
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    cuts = {"optim.grad_accum": cfg.optim.grad_accum, "pipeline.microbatches": pipeline_microbatches(cfg)}
    cuts = {name: count for name, count in cuts.items() if count > 1}
    multiple = math.prod(cuts.values()) * batch_shards
    if batch_size % multiple:
        cut = "".join(f" / {count} ({name})" for name, count in cuts.items())
        lower = f", or lower {' or '.join(cuts)}" if cuts else ""
        raise ConfigError(
            f"a batch of {batch_size} sequences{cut} cannot be split over the {batch_shards} data-parallel shards "
            f"(mesh.data x mesh.fsdp): make data.batch_size (and every data.ramp batch size) a multiple of "
            f"{multiple}{lower}"
        )
    if seq_len % mesh.shape["context"]:
        raise ConfigError(f"seq_len {seq_len} must be a multiple of mesh.context ({mesh.shape['context']}): fix "
                          "data.seq_len or data.ramp")
    _, readers = mesh_lib.batch_share(mesh)
    if batch_size % readers:
        raise ConfigError(f"data.batch_size and every data.ramp batch size must be a multiple of the {readers} "
                          "processes that read other rows of it")


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir` (a local path or a URL such as gs://bucket/run), phase after phase;
    returns the last logged metrics."""
    goodput_lib.begin_run()
    workdir = workdir_lib.resolve(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"the workdir {workdir} is a file: give a directory (a new one starts a run; a run's own "
                          "resumes it)")
    with contextlib.ExitStack() as held:
        distributed.on_every_process(lambda: _hold(workdir, held), "opening the workdir", elsewhere=CheckpointError)
        try:
            return _train(cfg, workdir)
        except jax.errors.JaxRuntimeError as err:
            error = memory.out_of_memory(err, memory.TRAIN_FIX)
            if error is None:
                raise
            raise error from err


def _hold(workdir: epath.Path, held: contextlib.ExitStack) -> None:
    """Makes the workdir and, on process 0, locks it until `held` closes. Every host agrees on the outcome: a workdir
    in use or read-only found by one host alone left the others waiting in their first collective."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            held.callback(workdir_lib.lock(workdir).release)
    except OSError as e:
        raise CheckpointError(f"the workdir {workdir} cannot be written ({workdir_lib.store_error(e)}): give a "
                              "--workdir where this user can write") from e


def _train(cfg: ml_collections.ConfigDict, workdir: epath.Path) -> dict[str, float]:
    validate(cfg)
    plan = RunPlan(cfg)
    for p in plan.phases:
        distributed.on_every_process(lambda: check_devices(p.cfg), "the memory check")
        check_sources_prepared(p.cfg)
    schedule = run_lr_schedule(cfg.optim, plan)
    model_cfg = model_config(cfg)
    corpus = distributed.process_zero_first(lambda: load_corpus(cfg.data, model_cfg.vocab_size),
                                           "preparing the data")
    tokenizer = Tokenizer.from_file(corpus.tokenizer_path)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {model_cfg.vocab_size}: "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )
    data = run_data(plan, corpus, tokenizer.pad_id)
    tokenizer_file = _keep_run_files(cfg, corpus.tokenizer_path, workdir)
    tasks = distributed.on_every_process(lambda: _eval_tasks(cfg, tokenizer), "loading the evaluation tasks")

    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", max_to_keep=cfg.checkpoint.max_to_keep,
                                     keep_every=cfg.checkpoint.keep_every, keep_steps=plan.keep_steps(),
                                     async_save=cfg.checkpoint.async_save)
    preemption = PreemptionFlag(cfg.checkpoint.maintenance_url)
    watchdog = Watchdog(cfg.watchdog.multiple, cfg.watchdog.min_seconds, workdir)
    runs: dict[int, Run] = {}
    restored_iterators: dict[int, grain.DatasetIterator] = {}

    def run_of(p: Phase) -> Run:
        if p.index not in runs:  # LoRA: the base comes from a phase already set up, read from disk once per run
            runs[p.index] = setup(p.cfg, workdir, schedule=schedule, base_of=next(iter(runs.values()), None))
        return runs[p.index]

    def target(step: int) -> ckpt.RestoreTarget:
        p = plan.phase_of_checkpoint(step)
        plan.check_resume(checkpointer.saved_meta(step), step)
        abstract = run_of(p).abstract_state
        restored_iterators[step] = data[p.index].iterator()
        return ckpt.RestoreTarget(p.cfg.model.to_dict(), abstract.params, abstract.opt_state, restored_iterators[step],
                                  p.cfg.to_dict())

    try:
        restored = checkpointer.restore_newest_valid(target)
        state, start = None, 0
        if restored is not None:
            start, params, opt_state = restored
            state = TrainState(jnp.asarray(start, jnp.int32), params, opt_state)
            _check_lora_base(run_of(plan.phase_of_checkpoint(start)), checkpointer.directory / str(start))
            if jax.process_index() == 0:
                print(_resumed(checkpointer, cfg, plan, start), flush=True)
        skip = rewind.batches_to_skip(workdir, start) if restored is not None else 0
        if start >= plan.total_steps and jax.process_index() == 0:
            print(f"{workdir} is already at step {start} (the run ends at step {plan.total_steps}): nothing to do; "
                  f"raise --config.train.steps (or a phase's budget) to train further", flush=True)
        loop = _Loop(cfg, plan, workdir, checkpointer, preemption, watchdog, start,
                     meta={"run_config": plain(cfg), "tokenizer_file": tokenizer_file}, tasks=tasks)
        logged: dict[str, float] = {}
        try:
            for p in plan.phases:
                trains = start < p.stop_step
                if not trains and not (p.average and p.stop_step == start):
                    continue
                run = run_of(p)
                with jax.set_mesh(run.mesh):
                    # A new phase's mesh may split the state differently (e.g. a larger context axis).
                    state = run.init() if state is None else jax.device_put(state, run.state_shardings)
                    if trains:
                        resumed_here = start in restored_iterators and plan.phase_of_checkpoint(start) is p
                        train_iter = restored_iterators[start] if resumed_here else data[p.index].iterator()
                        if skip:
                            _skip_batches(train_iter, skip, start, workdir)
                            skip = 0
                        state, logged = loop.run_phase(run, p, data[p.index], state, train_iter)
                    if p.average:
                        logged.update(loop.average(run, p, data[p.index]))
                start = p.stop_step
                if p.index + 1 < len(plan.phases):  # the next phase's Run takes over (and LoRA's base, resharded)
                    run_of(plan.phases[p.index + 1])
                    runs.pop(p.index)
        finally:
            loop.close()
        return logged
    finally:
        watchdog.stop()
        preemption.restore()
        checkpointer.close()  # waits for an in-flight async save, so no finished step is lost


def _resumed(checkpointer: ckpt.Checkpointer, cfg: ml_collections.ConfigDict, plan: RunPlan, step: int) -> str:
    """"Resumed from CHECKPOINT", with the phase it resumes in (a run of several) and every setting that differs
    from the run's config the checkpoint stores (its phases' overrides included): a longer train.steps stretches the
    schedule, a new seed another data order, a later phase's new budget moves where it ends."""
    phase = f" ({plan.phase_at(step).name} phase)" if len(plan.phases) > 1 else ""
    saved = checkpointer.saved_meta(step)
    changes = ckpt.config_changes(saved.get("run_config", saved["config"]), plain(cfg))
    changed = f", with settings changed since it was saved: {'; '.join(changes)}" if changes else ""
    return f"Resumed from {checkpointer.directory / str(step)}{phase}{changed}"


def _skip_batches(train_iter: grain.DatasetIterator, count: int, step: int, workdir: epath.Path) -> None:
    """Draws and discards the `count` batches after checkpoint `step`, as a rewind asked (llama_jax/rewind.py)."""
    if jax.process_index() == 0:
        print(f"Skipping the {count} batches after step {step} ({workdir / rewind.SKIPS_FILE}, written by python -m "
              "llama_jax.rewind)", flush=True)
    for _ in range(count):
        next(train_iter)


def _check_lora_base(run: Run, step_dir: epath.Path) -> None:
    """A resumed LoRA run must go on with the base its adapters trained on, which `checkpoint.init_from` may no longer
    give: a workdir given there has saved newer steps since, say."""
    recorded = ckpt.SavedRun.open(step_dir).meta.get("lora_base")
    if run.base_source is not None and recorded is not None:
        lora_lib.check_base(recorded, run.base_source, str(step_dir),
                            f"resume with --config.checkpoint.init_from={recorded['path']}")


def _pretrained(read: Callable[[], T]) -> T:
    """`read()` of `checkpoint.init_from`, on every host, which all stop if it fails on any: a path missing from one
    host's disk stopped that host alone, and the others waited in their next collective."""
    return distributed.on_every_process(read, "reading checkpoint.init_from", elsewhere=CheckpointError)


def _read_base(init_from: str, model_def: ModelDef, shardings: dict) -> tuple[str, dict]:
    """(the step `init_from` stands for now, its parameters): the step is what the run records as its base, so a
    base workdir that saves newer steps later does not change what a resumed run reads."""
    path = ckpt.pinned_path(init_from)
    return path, ckpt.load_pretrained(path, model_def.cfg, shardings)


def _eval_tasks(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer) -> list[ChoiceTask]:
    """`train.eval_tasks`, loaded before any checkpoint is read: a missing task file, or two of one name, stops the
    run at once rather than at its first evaluation."""
    tasks = [ChoiceTask.load(task.strip(), tokenizer, max_len=cfg.data.seq_len)
             for task in cfg.train.eval_tasks.split(",") if task.strip()]
    check_task_names(tasks)
    return tasks


def _keep_run_files(cfg: ml_collections.ConfigDict, tokenizer_path: str, workdir: epath.Path) -> str:
    """Copies into the workdir what its checkpoints need to be used on their own: the tokenizer's files and, for a
    run fine-tuned from a Hugging Face checkpoint, that checkpoint's generation settings. Returns the tokenizer
    file's name. Process 0 alone writes them, as it does the logs: the hosts share the workdir. It writes once every
    host has compared the tokenizer with the workdir's copy: a host still reading that copy while process 0 rewrote
    it saw another tokenizer and stopped alone, and process 0 waited in its next collective."""
    files = tokenizer_files(tokenizer_path)
    distributed.on_every_process(lambda: ckpt.check_resumed_tokenizer(workdir, files), "checking the run's tokenizer")
    if jax.process_index() == 0:
        for file in files:  # replaced whole, if at all: a copy cut short by a kill made the run refuse to resume
            kept = workdir / file.name
            if workdir_lib.resolve(file) != kept:
                content = epath.Path(file).read_bytes()
                if not (kept.exists() and kept.read_bytes() == content):
                    workdir_lib.write_whole(kept, content)
        if cfg.checkpoint.init_from:
            generation = generation_config.file_for_copy(workdir_lib.as_path(cfg.checkpoint.init_from))
            if generation is not None:
                (workdir / generation_config.FILE_NAME).write_bytes(generation)
    return files[0].name


class _Loop:
    """The training loop's run-wide parts (logs, goodput, saves, stability), and the loop over one phase's steps."""

    def __init__(self, cfg: ml_collections.ConfigDict, plan: RunPlan, workdir: epath.Path, checkpointer, preemption,
                 watchdog: Watchdog, start: int, meta: dict, tasks: list[ChoiceTask]):
        self.cfg, self.plan, self.workdir, self.meta, self.tasks = cfg, plan, workdir, meta, tasks
        self.checkpointer, self.preemption, self.watchdog = checkpointer, preemption, watchdog
        self.peak = run_peak_flops(workdir, cfg.train.peak_flops)
        self.logger = distributed.on_every_process(  # process 0's W&B or log files may fail: every process stops
            lambda: MetricsLogger(workdir, start_step=start, total_steps=plan.total_steps,
                                  enabled=jax.process_index() == 0, wandb_project=cfg.train.wandb,
                                  config=meta["run_config"]), "opening the run's logs", elsewhere=CheckpointError)
        self.save_clock = _SaveClock(60 * cfg.checkpoint.every_minutes)
        saved = _saved_meta(checkpointer, start)
        self.goodput = Goodput(workdir, committed=saved.get("goodput"), dropped=self.logger.dropped,
                               writer=jax.process_index() == 0)
        self.guard = LossGuard(cfg.stability.spike_factor, cfg.stability.window)
        self.profiler: StepProfiler | None = None  # the current phase's
        self.bad_steps = 0  # seen by this process
        self.skipped_in_a_row = 0
        self.log_window = self._restore_carried(saved)  # the first phase run's first window starts with these steps
        self.compiled = False

    def run_phase(self, run: Run, p: Phase, data: PhaseData, state: TrainState,
                  train_iter: grain.DatasetIterator) -> tuple[TrainState, dict]:
        """Trains from `state` to the phase's last step; returns the state and the last logged metrics."""
        cfg, policy = run.cfg, self.cfg.stability.policy
        skip = policy == "skip"
        lora_args = () if run.base is None else (run.base,)  # LoRA: the frozen base, never donated
        step_fn = jax.jit(
            make_train_step(run.model_def, run.tx, run.schedule, cfg.optim.grad_accum, run.layers_fn,
                            run.scheduled_grads, loss_chunk_len=cfg.objective.loss_chunk_len,
                            z_loss=cfg.objective.z_loss, skip_bad=skip, objective=cfg.objective,
                            lora=lora_lib.LoraStep.of(cfg) if lora_args else None),
            in_shardings=(run.state_shardings, run.batch_sharding) + ((mesh_lib.replicated(run.mesh),) if skip else ())
            + ((run.base_shardings,) if lora_args else ()),
            out_shardings=(run.state_shardings, mesh_lib.replicated(run.mesh)),
            donate_argnums=0,
        )
        eval_fn = _eval_step(run)
        eval_sets = {name: [run.to_global(b) for b in batches] for name, batches in data.eval_sets.items()}
        self.meta.update(config=plain(cfg), phase=p.name, **({"lora_base": run.base_source} if run.base_source else {}))
        done = int(state.step)
        if run.mesh.shape["stage"] > 1:
            self.logger.write(_describe_pipeline(cfg, run.mesh))
        what = f"Phase {p.index + 1}/{len(self.plan.phases)} {p.name!r}" if len(self.plan.phases) > 1 else "Training"
        self.logger.write(f"{what}: steps {done} to {p.stop_step}, batch {p.describe_batches(done)} tokens, "
                          f"{param_count(run.model_def.cfg):,} parameters on {run.mesh.size} "
                          f"{run.mesh.devices.flat[0].platform} device(s), mesh {dict(run.mesh.shape)}")
        # each phase compiles its own step, so each skips its own first steps; several phases trace into subfolders
        profile_dir = self.workdir / "profile" / (p.name if len(self.plan.phases) > 1 else "")
        self.profiler = StepProfiler(profile_dir, self.cfg.train.profile_skip, self.cfg.train.profile_steps,
                                     say=self.logger.write)
        window, self.log_window = self.log_window, []  # step metrics not yet logged
        pending: list[tuple[int, dict]] = []  # steps whose loss the host has not judged yet
        window_start, window_first_step, compiled_here = None, done, False
        shapes_compiled: set[tuple[int, ...]] = set()
        saving = 0.0  # seconds of the window spent saving, left out of its rates (as evaluations are)
        logged: dict[str, float] = {}
        while done < p.stop_step:
            self.watchdog.stall_if_asked(done + 1)
            batch = run.to_global(next(train_iter))
            args = (state, batch, jnp.float32(self.guard.threshold())) if skip else (state, batch)
            shape = batch["tokens"].shape
            if shape not in shapes_compiled:  # a phase's first step compiles, as does a ramp stage's: unbounded
                shapes_compiled.add(shape)
                with self.watchdog.phase("compilation", bounded=False):
                    self._check_step_memory(run, step_fn, (*args, *lora_args))
                    state, step_metrics = self.profiler.step(done + 1, lambda: step_fn(*args, *lora_args))
                    jax.block_until_ready(step_metrics)
            else:
                state, step_metrics = self.profiler.step(done + 1, lambda: step_fn(*args, *lora_args))
            done += 1
            self.logger.advance()
            window.append(step_metrics)
            if not compiled_here:  # time from the end of the compiling step (its loss is the window's like any)
                self.goodput.charge(COMPILE)
                self.goodput.first_step_trained()
                compiled_here = True
                if not self.compiled:
                    self.watchdog.start()
                    supervise.report_first_step(done)
                    self.compiled = True
                window_start, window_first_step = time.perf_counter(), done
            else:
                self.watchdog.dispatched(step_metrics["loss"])
            pending.append((done, step_metrics))
            is_last = done == p.stop_step
            preempted = self.preemption.raised or self.checkpointer.manager.reached_preemption(done)
            wants_save = done % cfg.checkpoint.every_steps == 0 or is_last or preempted or self.save_clock.due()
            bad = self._judge(pending if wants_save else pending[:-1])
            pending = [] if wants_save else pending[-1:]
            if bad is not None:
                state, done, window = self._recover(run, bad, done)
                pending, window_start, window_first_step, saving = [], time.perf_counter(), done, 0.0
                continue
            is_eval = (cfg.train.eval_every and done % cfg.train.eval_every == 0) or is_last
            if done % cfg.train.log_every == 0 or is_eval:
                logged = _summarise(window, self.plan.tokens_before(done))
                if done > window_first_step:
                    seconds = time.perf_counter() - window_start - saving
                    tokens, flops = _work(run.model_def.cfg, p, window_first_step, done)
                    logged["tokens_per_s"] = tokens / seconds
                    logged["step_time"] = seconds / (done - window_first_step)
                    logged["mfu"] = flops / seconds / self.peak
                logged["peak_memory_gib"] = peak_memory_gib()
                if len(data.batches.names) > 1:
                    logged.update(_realised_mixture(data.batches, done - p.start_step))
                if self.bad_steps:
                    logged["bad_steps"] = float(self.bad_steps)
                if is_eval:
                    with self.goodput.lost(EVAL), self.watchdog.phase("evaluation"):
                        model_params = run.model_params(state.params)
                        logged.update(_evaluate(eval_fn, model_params, eval_sets, data.batches))
                        logged.update(evaluate_tasks((run.model_def, model_params), self.tasks,
                                                     batch_size=cfg.data.batch_size // cfg.optim.grad_accum,
                                                     mesh=run.mesh))
                logged.update(self.goodput.summary())
                self.logger.log(done, logged)
                window, window_start, window_first_step, saving = [], time.perf_counter(), done, 0.0
            if wants_save:
                saving += self._save(done, state, train_iter, window)
            if preempted and done < self.plan.total_steps:
                raise Preempted(done, self.checkpointer.directory)
        self._close_profile()
        return state, logged

    def _check_step_memory(self, run: Run, step_fn, args: tuple) -> None:
        """Compiles the phase's step ahead of its first call, which reuses the compile, to refuse on every host a step
        its devices cannot hold (memory.check_step_fits); logs the figures of one that fits."""
        compiled = step_fn.lower(*args).compile()
        fits = distributed.on_every_process(
            lambda: memory.check_step_fits(compiled, memory.local_devices(run.mesh)), "the memory check")
        if fits:
            self.logger.write(f"Memory: {fits}")

    def _judge(self, steps: list[tuple[int, dict]]) -> tuple[int, str] | None:
        """The first bad step among `steps` (fetching their losses waits for them), with what is wrong with it."""
        policy = self.cfg.stability.policy
        for step, metrics in steps:
            loss, grad_norm = (float(v) for v in jax.device_get((metrics["loss"], metrics["grad_norm"])))
            if policy == "skip":
                skipped = bool(jax.device_get(metrics["skipped"]))
                self.skipped_in_a_row = self.skipped_in_a_row + 1 if skipped else 0
                if skipped:
                    self.bad_steps += 1
                    self._warn(f"step {step}: loss {loss}, gradient norm {grad_norm}: its update was skipped "
                               f"(stability.policy='skip')")
                    if self.skipped_in_a_row > self.cfg.stability.max_events:
                        raise Diverged(f"{self.skipped_in_a_row} steps in a row up to step {step} were skipped (more "
                                       f"than stability.max_events={self.cfg.stability.max_events}): the run has "
                                       "diverged; lower optim.lr or resume from an earlier checkpoint")
                else:
                    self.guard.problem(loss, grad_norm)
                continue
            problem = self.guard.problem(loss, grad_norm)
            if problem is not None:
                return step, problem
        return None

    def _recover(self, run: Run, bad: tuple[int, str], done: int) -> tuple[TrainState, int, list[dict]]:
        """The rollback (or stop) for a bad step: returns the state and step to go on from, and the unlogged steps'
        metrics as of that step."""
        step, problem = bad
        self.bad_steps += 1
        self.checkpointer.wait()
        last = self.checkpointer.latest_step()
        if self.cfg.stability.policy == "stop" or self.bad_steps > self.cfg.stability.max_events:
            why = ("stability.policy='stop'" if self.cfg.stability.policy == "stop" else
                   f"more than stability.max_events={self.cfg.stability.max_events} bad steps")
            raise Diverged(f"step {step}: {problem}. Stopped ({why}) before saving it; the newest checkpoint is "
                           f"step {last}. Lower optim.lr, or set stability.policy='rollback', and rerun to resume")
        if last is None:
            state, back_to = run.init(), 0
        else:
            abstract = run.abstract_state
            with self.watchdog.phase("checkpoint restore"):
                params, opt_state = self.checkpointer.restore(last, abstract.params, abstract.opt_state, None)
            state, back_to = TrainState(jnp.asarray(last, jnp.int32), params, opt_state), last
        self._warn(f"step {step}: {problem}. Rolled back to step {back_to}; the {done - back_to} batches drawn since "
                   "are skipped (stability.policy='rollback')")
        self.logger.rewind(back_to)
        saved = _saved_meta(self.checkpointer, back_to)
        self.goodput.rolled_back(saved.get("goodput"))
        return state, back_to, self._restore_carried(saved)  # the steps after it no longer happened

    def _restore_carried(self, saved: dict) -> list[dict]:
        """What the loop carries from step to step, as a checkpoint's meta `saved` holds it (nothing at step 0): the
        loss guard's recent losses and the skips in a row, so that spikes are judged as in the uninterrupted run;
        returns the metrics of the steps since the last log line, so that the next line is the same mean. Restarting
        them empty made a resumed run apply updates the uninterrupted one skipped, and log other losses."""
        carried = saved.get("carried", {})
        self.guard.restore(carried.get("recent_losses", []))
        self.skipped_in_a_row = carried.get("skipped_in_a_row", 0)
        return carried.get("log_window", [])

    def _warn(self, message: str) -> None:
        if jax.process_index() == 0:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _save(self, done: int, state: TrainState, train_iter, window: list[dict]) -> float:
        """Saves the state, with the config of the phase that trained it (what loading the checkpoint needs), the
        whole run's, and what the loop carries (`_restore_carried`). Returns the seconds the save took, which the
        step rates leave out."""
        jax.block_until_ready(state)  # the steps in flight are productive time; the save is not
        started = time.perf_counter()
        carried = {"recent_losses": self.guard.recent, "skipped_in_a_row": self.skipped_in_a_row,
                   "log_window": [{key: float(value) for key, value in m.items()} for m in jax.device_get(window)]}
        saved_meta = {**self.meta, "goodput": self.goodput.ledger(), "tokens_seen": self.plan.tokens_before(done),
                      "batches": self.plan.placement(done), "carried": carried}
        with self.goodput.lost(CHECKPOINT), self.watchdog.phase("checkpoint save"):
            self.logger.flush()  # every line up to this step exists before the step can be restored
            self.checkpointer.save(done, state.params, state.opt_state, train_iter, saved_meta)
        self.save_clock.reset()
        return time.perf_counter() - started

    def average(self, run: Run, p: Phase, data: PhaseData) -> dict[str, float]:
        """Averages the phase's checkpoints into WORKDIR/averaged and evaluates the average there, once for a given
        set of checkpoints: its record (eval.json, written last) names them. An average without its record (a kill
        before it was evaluated) or of other checkpoints (the phase has trained on since) is made again."""
        out = self.workdir / "averaged"
        record = out / "eval.json"
        self.checkpointer.wait()
        saved = set(self.checkpointer.manager.all_steps())
        steps = [s for s in p.save_steps() if s in saved]
        recorded = _read_record(record)
        if recorded.get("steps") == steps:
            return {k: v for k, v in recorded.items() if k.startswith("averaged/")}

        def make_average() -> None:
            if out.exists():
                out.rmtree()
            if jax.process_count() == 1:
                average_checkpoints(paths, out)
            else:
                _average_alone(paths, out)

        with self.goodput.lost(CHECKPOINT), self.watchdog.phase("checkpoint averaging"):
            paths = [self.checkpointer.directory / str(s) for s in steps]
            if jax.process_count() == 1:
                make_average()
            else:  # every process waits here for process 0's average (or its error)
                distributed.on_every_process(lambda: make_average() if jax.process_index() == 0 else None,
                                             "averaging the checkpoints", elsewhere=CheckpointError)
            # a whole model, also from a LoRA run (whose checkpoints average as merged models: average.py), with the
            # objective's own parameters (a reward model's head)
            own = _split_objective_params(run.cfg, run.state_shardings.params)[1]
            shardings = {**run.base_shardings, **own} if run.base_shardings else run.state_shardings.params
            params = ckpt.SavedRun.open(out).restore_params(run.model_def.cfg, shardings)
        eval_fn = _eval_step(run)
        eval_sets = {name: [run.to_global(b) for b in batches] for name, batches in data.eval_sets.items()}
        with self.goodput.lost(EVAL), self.watchdog.phase("evaluation"):
            losses = _evaluate(eval_fn, params, eval_sets, data.batches)
        result = {f"averaged/{key}": value for key, value in losses.items()}
        result["averaged/checkpoints"] = float(len(steps))
        if jax.process_index() == 0:
            workdir_lib.write_whole(record, json.dumps({**result, "steps": steps}) + "\n")
            print(f"Averaged the {p.name!r} phase's checkpoints {steps} into {out}: eval_loss "
                  f"{result['averaged/eval_loss']:.4f}", flush=True)
        return result

    def _close_profile(self) -> None:
        if self.profiler is not None:
            self.profiler.close()
            self.profiler = None

    def close(self) -> None:
        self._close_profile()
        self.logger.close()


def _describe_pipeline(cfg: ml_collections.ConfigDict, mesh: Mesh) -> str:
    stages, microbatches, repeats = mesh.shape["stage"], pipeline_microbatches(cfg), pipeline_repeats(cfg)
    schedule = cfg.pipeline.schedule
    return (f"Pipeline: {stages} stages, {microbatches} microbatches, {schedule} schedule ({repeats} layer chunk(s) "
            f"per stage): bubble {bubble_fraction(stages, microbatches, repeats, schedule):.1%} of each step; "
            f"{peak_microbatches(stages, microbatches, schedule)} microbatches' activations held per stage")


def _saved_meta(checkpointer: ckpt.Checkpointer, step: int) -> dict:
    """The meta saved with checkpoint `step`, read once for the goodput counters and the carried state ({}: a fresh
    start; a checkpoint older than either lacks its key)."""
    meta_file = checkpointer.directory / str(step) / "meta" / "metadata"
    return json.loads(meta_file.read_text()) if step and meta_file.exists() else {}


def _read_record(record: epath.Path) -> dict:
    """An average's eval.json, or {} where there is none (or a torn one, which the average's redoing replaces)."""
    try:
        return json.loads(record.read_text()) if record.exists() else {}
    except ValueError:
        return {}


def _average_alone(paths: list[epath.Path], out: epath.Path) -> None:
    """`python -m llama_jax.average` in a child process of its own, on the host's CPU: Orbax's writes wait for every
    process of a multi-host job, which wait for this one's average (a hang until the watchdog ended it)."""
    done = subprocess.run([sys.executable, "-m", "llama_jax.average", *map(str, paths), "--out", str(out)],
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
    if done.returncode:
        reason = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise CheckpointError(f"averaging the checkpoints {[str(p) for p in paths]} into {out} failed ({reason})")


def _summarise(window: list[dict], tokens_seen: int) -> dict[str, float]:
    """Means over the window's steps, but those `stability.policy='skip'` skipped (a NaN one made the whole window's
    NaN), the learning rate and parameter norm of its last step, and what an objective adds (DPO's reward accuracy
    and margin, ...), averaged too."""
    last = jax.device_get(window[-1])
    host = [m for m in jax.device_get(window) if not m.get("skipped")] or [last]
    own = ("loss", "grad_norm", "lr", "param_norm", "skipped")

    def mean(key: str) -> float:  # in float64, whether the steps' values are the device's or a checkpoint's
        return float(np.mean(np.asarray([m[key] for m in host], np.float64)))

    return {
        "loss": mean("loss"),
        "grad_norm": mean("grad_norm"),
        "lr": float(last["lr"]),
        "param_norm": float(last["param_norm"]),
        "tokens": float(tokens_seen),
        **{key: mean(key) for key in last if key not in own},
    }


def _work(model_cfg, p: Phase, first_step: int, stop_step: int) -> tuple[int, float]:
    """Tokens and training FLOPs of the run's steps [first_step, stop_step) within phase `p`, stage by stage
    (attention cost grows with seq_len). A pair objective's tokens are its rows' (a pair's chosen side), its FLOPs
    those of both sequences (`objectives.flops_per_row_token`)."""
    first_step, stop_step = first_step - p.start_step, stop_step - p.start_step
    tokens, flops = 0, 0.0
    for stage in p.batches.stages:
        end = stop_step if stage.stop_step is None else min(stop_step, stage.stop_step)
        steps = max(0, end - max(first_step, stage.start_step))
        tokens += steps * stage.tokens_per_step
        flops += steps * stage.tokens_per_step * flops_per_row_token(p.cfg.objective, model_cfg, stage.seq_len)
    return tokens, flops


def _realised_mixture(plan: TrainBatches, step: int) -> dict[str, float]:
    """Each source's share of all rows trained on so far (the weights, up to rounding within a block)."""
    rows = plan.rows_per_source(step)
    return {f"mixture/{name}": float(n / rows.sum()) for name, n in zip(plan.names, rows)}


def _evaluate(eval_fn, params, eval_sets: dict[str, list[Batch]], plan: TrainBatches) -> dict[str, float]:
    """`eval_loss` (per token, or per pair) of each training source's held-out set; over several sources, their
    mixture-weighted mean. `eval_loss/<name>` for each evaluation-only set (`data.eval_sources`), and for each source
    of a mixture. Other figures an objective's evaluation returns (the reward model's pairwise accuracy) come as
    `eval_<figure>` over the training sources' held-out sets, and `eval_<figure>/<name>` for an evaluation-only set."""
    losses, sums, counts = {}, {}, {}
    for name, batches in eval_sets.items():
        results = jax.device_get([eval_fn(params, batch) for batch in batches])
        suffix = "" if name in plan.names else f"/{name}"
        count = sum(float(result[1]) for result in results)
        losses[name] = sum(float(result[0]) for result in results) / max(count, 1.0)
        counts[suffix] = counts.get(suffix, 0.0) + count
        for result in results:
            for key, value in (result[2] if len(result) > 2 else {}).items():
                sums[key, suffix] = sums.get((key, suffix), 0.0) + float(value)
    extras = {f"eval_{key}{suffix}": value / max(counts[suffix], 1.0) for (key, suffix), value in sums.items()}
    each = {f"eval_loss/{name}": loss for name, loss in losses.items() if len(plan.names) > 1 or name not in plan.names}
    if len(plan.names) == 1:
        mean = losses[plan.names[0]]
    else:
        mean = float(sum(w * losses[name] for w, name in zip(plan.mixtures[0].weights, plan.names)))
    return {"eval_loss": mean, **each, **extras}
