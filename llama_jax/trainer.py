"""The training loop, top to bottom: mesh → data → state (init or restore) → jitted steps → logs and saves.

The state is plain pytrees, `TrainState(step, params, opt_state)`, with params as a nested dict of arrays.
The Flax module is rebuilt from them inside the jitted step (`ModelDef.merge`), which keeps per-step
overhead at plain `jax.jit` cost. The step is pure, compiled once with explicit shardings, and donates the
old state.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from etils import epath
from jax.sharding import Mesh, NamedSharding

from llama_jax import checkpoint as ckpt
from llama_jax import generation_config
from llama_jax import workdir as workdir_lib
from llama_jax import maintenance, supervise
from llama_jax.config import (SCHEDULED_PIPELINES, batch_schedule, model_config, pipeline_microbatches,
                              pipeline_repeats, validate)
from llama_jax.data.corpus import load_corpus
from llama_jax.data.pipeline import TrainBatches, eval_batches
from llama_jax.data.schedule import BatchSchedule
from llama_jax.data.tokenizer import Tokenizer, tokenizer_files
from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.goodput import CHECKPOINT, COMPILE, EVAL, Goodput
from llama_jax.metrics import MetricsLogger, peak_flops_per_second
from llama_jax.model import ModelDef, flops_per_token
from llama_jax.model.llama import LayersFn, Llama
from llama_jax.objectives import lm_loss_sum
from llama_jax.optim import lr_schedule, make_optimizer
from llama_jax.parallel import distributed
from llama_jax.parallel import mesh as mesh_lib
from llama_jax.parallel.context import to_zigzag
from llama_jax.parallel.layers import ScheduledGrads, make_layers_fn, make_scheduled_grads
from llama_jax.parallel.pipeline import bubble_fraction, peak_microbatches
from llama_jax.watchdog import Watchdog

Batch = dict[str, jax.Array]
# Reader threads build the next batches while the step runs; grain keeps their order, so batches stay deterministic.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


class Preempted(LlamaJaxError):
    """Raised after a SIGTERM (or a TPU maintenance notice) once the current step is checkpointed."""

    def __init__(self, step: int, directory: epath.Path):
        super().__init__(f"preempted: checkpoint saved at step {step} in {directory}; rerun the same command to resume")
        self.step = step


class _PreemptionFlag:
    """Turns SIGTERM, or a GCE host-maintenance notice (`checkpoint.maintenance_url`), into a flag the loop checks
    between steps, so the step in flight finishes and is saved.

    With several processes the handler is left to JAX's preemption service: it catches SIGTERM on any host and
    makes every host agree on the step to save at (`reached_preemption`), where flags of their own would let the
    hosts stop at different steps and wait for each other forever. A maintenance notice there becomes a SIGTERM to
    this process, so that the service spreads it the same way and no step pays for a collective of its own."""

    def __init__(self, maintenance_url: str):
        self.raised = False
        self._installed = jax.process_count() == 1
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        url = maintenance.maintenance_url(maintenance_url)
        self._watch = maintenance.MaintenanceWatch(url, self._notice) if url else None

    def _handle(self, signum, frame):
        self.raised = True

    def _notice(self, event: str) -> None:
        print(f"host maintenance notice ({event}): saving at the end of the current step, then exiting",
              file=sys.stderr, flush=True)
        if self._installed:
            self.raised = True
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    def restore(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)


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


class TrainState(NamedTuple):
    step: jax.Array
    params: dict
    opt_state: optax.OptState


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
    layers_fn: LayersFn  # the layer stack on this mesh: pipelined, context-parallel, activations pinned
    scheduled_grads: ScheduledGrads | None  # the gradient by a 1F1B / ZB-H1 pipeline schedule; None: autodiff

    def init(self) -> TrainState:
        """Step 0: random parameters, or those of `checkpoint.init_from` (fine-tuning); a fresh optimizer state."""
        if not self.cfg.checkpoint.init_from:
            fn = functools.partial(init_state, self.model_def, self.tx, self.cfg.seed)
            return jax.jit(fn, out_shardings=self.state_shardings)()
        params = ckpt.load_pretrained(self.cfg.checkpoint.init_from, self.model_def.cfg, self.state_shardings.params)

        def from_params(params: dict) -> TrainState:
            return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params))

        return jax.jit(from_params, out_shardings=self.state_shardings)(params)

    def to_global(self, local_batch: dict[str, np.ndarray]) -> Batch:
        """This process's rows, laid out along the sequence as context parallelism wants, as global arrays."""
        local_batch = to_zigzag(local_batch, self.mesh.shape["context"])
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v) for k, v in local_batch.items()
        }


def init_state(model_def: ModelDef, tx: optax.GradientTransformation, seed: int) -> TrainState:
    params = model_def.init(seed)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def make_train_step(model_def: ModelDef, tx, schedule: optax.Schedule, grad_accum: int,
                    layers_fn: LayersFn | None = None, scheduled_grads: ScheduledGrads | None = None, *,
                    loss_chunk_len: int = 0, z_loss: float = 0.0) -> Callable:
    """(state, batch) -> (state, metrics). With grad_accum > 1 the batch is split into microbatches whose
    gradients are summed; every loss is divided by the whole batch's token count, so the result equals the
    full-batch gradient. `layers_fn` runs the layer stack on the mesh (`Run.layers_fn`); None: in order.
    `scheduled_grads` (`Run.scheduled_grads`) replaces autodiff by a pipeline schedule's own backward.
    `loss_chunk_len`: positions whose logits exist at a time (`objectives.lm_loss_sum`); 0: all. `z_loss`: the
    coefficient of log(Z)^2 added to each token's loss (the logged `loss` includes it)."""

    def step_fn(state: TrainState, batch: Batch):
        n_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)

        def token_loss(model: Llama, h_btd, rows: Batch):
            nll_sum, _ = lm_loss_sum(model.logits, h_btd, rows["targets"], rows["loss_mask"], chunk_len=loss_chunk_len,
                                     z_loss=z_loss)
            return nll_sum / n_tokens

        def loss_fn(params, mb: Batch):
            model = model_def.merge(params)
            h_btd = model.hidden(mb["tokens"], segment_ids=mb["segment_ids"], positions=mb["positions"],
                                 layers_fn=layers_fn)
            return token_loss(model, h_btd, mb)

        def grad_fn(params, mb: Batch):
            if scheduled_grads is None:
                return jax.value_and_grad(loss_fn)(params, mb)
            return scheduled_grads(params, mb, token_loss)

        if grad_accum == 1:
            loss, grads = grad_fn(state.params, batch)
        else:
            # Microbatch j takes rows j, j + A, j + 2A, ...: each device keeps its own rows in every microbatch.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1), batch
            )

            def accumulate(carry, mb):
                loss, grads = grad_fn(state.params, mb)
                return jax.tree.map(jnp.add, carry, (loss, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step_fn


def make_eval_step(model_def: ModelDef, layers_fn: LayersFn | None = None, *, loss_chunk_len: int = 0) -> Callable:
    def eval_fn(params, batch: Batch):
        model = model_def.merge(params)
        h_btd = model.hidden(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                             layers_fn=layers_fn)
        return lm_loss_sum(model.logits, h_btd, batch["targets"], batch["loss_mask"], chunk_len=loss_chunk_len)

    return eval_fn


def setup(cfg: ml_collections.ConfigDict, workdir: epath.Path, devices: list | None = None) -> Run:
    """Everything the loop needs, on a mesh over all devices (or `devices`)."""
    validate(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    for batch_size, seq_len in batch_schedule(cfg).shapes:
        _check_batch_fits_mesh(cfg, mesh, batch_size, seq_len)
    model_def = ModelDef(model_config(cfg))
    layers_fn = make_layers_fn(model_def.cfg, mesh, microbatches=pipeline_microbatches(cfg), repeats=pipeline_repeats(cfg))
    scheduled_grads = None
    if mesh.shape["stage"] > 1 and cfg.pipeline.schedule in SCHEDULED_PIPELINES:
        scheduled_grads = make_scheduled_grads(model_def, mesh, microbatches=pipeline_microbatches(cfg),
                                               schedule=cfg.pipeline.schedule)
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    params_sh = mesh_lib.param_shardings(model_def.abstract_state, mesh)
    shapes = jax.eval_shape(functools.partial(init_state, model_def, tx, cfg.seed))
    opt_sh = optax.tree_map_params(
        tx, lambda _, sharding: sharding, shapes.opt_state, params_sh,
        transform_non_params=lambda _: mesh_lib.replicated(mesh),
    )
    state_sh = TrainState(mesh_lib.replicated(mesh), params_sh, opt_sh)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
    return Run(cfg, workdir, mesh, model_def, tx, state_sh, abstract, mesh_lib.batch_sharding(mesh), layers_fn,
               scheduled_grads)


def _check_batch_fits_mesh(cfg: ml_collections.ConfigDict, mesh: Mesh, batch_size: int, seq_len: int) -> None:
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    micro_batch = batch_size // cfg.optim.grad_accum // pipeline_microbatches(cfg)
    if micro_batch % batch_shards:
        raise ConfigError(
            f"a batch of {batch_size} sequences / optim.grad_accum / pipeline microbatches = {micro_batch} cannot be "
            f"split over the {batch_shards} data-parallel shards (mesh.data x mesh.fsdp): make data.batch_size (and "
            f"every data.ramp batch size) / optim.grad_accum / pipeline.microbatches a multiple of {batch_shards}"
        )
    if seq_len % mesh.shape["context"]:
        raise ConfigError(f"seq_len {seq_len} must be a multiple of mesh.context ({mesh.shape['context']}): fix "
                          "data.seq_len or data.ramp")
    if batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size and every data.ramp batch size must be a multiple of the "
                          f"{jax.process_count()} processes")


def train(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, float]:
    """Trains (or resumes) the run in `workdir` (a local path or a URL such as gs://bucket/run); returns the last
    logged metrics."""
    workdir = workdir_lib.resolve(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    lock = workdir_lib.lock(workdir) if jax.process_index() == 0 else None
    try:
        return _train(cfg, workdir)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: ml_collections.ConfigDict, workdir: epath.Path) -> dict[str, float]:
    run = setup(cfg, workdir)
    model_cfg = run.model_def.cfg
    if run.mesh.shape["stage"] > 1 and jax.process_index() == 0:
        stages, microbatches, repeats = run.mesh.shape["stage"], pipeline_microbatches(cfg), pipeline_repeats(cfg)
        schedule = cfg.pipeline.schedule
        print(f"Pipeline: {stages} stages, {microbatches} microbatches, {schedule} schedule ({repeats} layer chunk(s) "
              f"per stage): bubble {bubble_fraction(stages, microbatches, repeats, schedule):.1%} of each step; "
              f"{peak_microbatches(stages, microbatches, schedule)} microbatches' activations held per stage",
              flush=True)
    corpus = distributed.process_zero_first(lambda: load_corpus(cfg.data, model_cfg.vocab_size), "corpus cache")
    tokenizer = Tokenizer.from_file(corpus.tokenizer_path)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is {model_cfg.vocab_size}: "
            f"set model.vocab_size >= {tokenizer.vocab_size}"
        )
    tokenizer_file = _keep_run_files(cfg, corpus.tokenizer_path, workdir)

    plan = TrainBatches([s.train for s in corpus.sources], [s.weight for s in corpus.sources], batch_schedule(cfg),
                        seed=cfg.seed, shuffle_window=cfg.data.shuffle_window, names=[s.name for s in corpus.sources],
                        pad_id=tokenizer.pad_id)
    processes = dict(process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = iter(plan.dataset(**processes).to_iter_dataset(_READ_OPTIONS))
    eval_sets = {
        source.name: [run.to_global(b) for b in eval_batches(
            source.eval, seq_len=cfg.data.seq_len, batch_size=cfg.data.batch_size,
            max_batches=cfg.data.eval_batches, pad_id=tokenizer.pad_id, **processes)]
        for source in corpus.sources
    }

    checkpointer = ckpt.Checkpointer(workdir / "checkpoints", max_to_keep=cfg.checkpoint.max_to_keep,
                                     keep_every=cfg.checkpoint.keep_every, async_save=cfg.checkpoint.async_save)
    preemption = _PreemptionFlag(cfg.checkpoint.maintenance_url)
    watchdog = Watchdog(cfg.watchdog.multiple, cfg.watchdog.min_seconds, workdir)
    try:
        with jax.set_mesh(run.mesh):
            abstract = run.abstract_state
            restored = checkpointer.restore_newest_valid(cfg.model.to_dict(), abstract.params, abstract.opt_state,
                                                         train_iter)
            if restored is None:
                start, state = 0, run.init()
            else:
                start, params, opt_state = restored
                state = TrainState(jnp.asarray(start, jnp.int32), params, opt_state)
                if jax.process_index() == 0:
                    print(f"Resumed from {checkpointer.directory / str(start)}", flush=True)
            if start >= cfg.train.steps and jax.process_index() == 0:
                print(f"{workdir} is already at step {start} (train.steps={cfg.train.steps}): nothing to do; "
                      f"raise --config.train.steps to train further", flush=True)
            return _loop(run, state, start, train_iter, plan, eval_sets, checkpointer, preemption, watchdog,
                         meta={"config": cfg.to_dict(), "tokenizer_file": tokenizer_file})
    finally:
        watchdog.stop()
        preemption.restore()
        checkpointer.close()  # waits for an in-flight async save, so no finished step is lost


def _keep_run_files(cfg: ml_collections.ConfigDict, tokenizer_path: str, workdir: epath.Path) -> str:
    """Copies into the workdir what its checkpoints need to be used on their own: the tokenizer's files and, for a
    run fine-tuned from a Hugging Face checkpoint, that checkpoint's generation settings. Returns the tokenizer
    file's name. Process 0 alone writes them, as it does the logs: the hosts share the workdir."""
    files = tokenizer_files(tokenizer_path)
    generation = Path(cfg.checkpoint.init_from).expanduser() / generation_config.FILE_NAME
    if jax.process_index() == 0:
        for file in files + ([generation] if cfg.checkpoint.init_from and generation.is_file() else []):
            epath.Path(file).copy(workdir / file.name, overwrite=True)
    return files[0].name


def _loop(run: Run, state: TrainState, start: int, train_iter, plan: TrainBatches, eval_sets: dict[str, list[Batch]],
          checkpointer, preemption, watchdog: Watchdog, meta: dict) -> dict:
    cfg = run.cfg
    total = cfg.train.steps
    schedule = lr_schedule(cfg.optim, total)
    step_fn = jax.jit(
        make_train_step(run.model_def, run.tx, schedule, cfg.optim.grad_accum, run.layers_fn, run.scheduled_grads,
                        loss_chunk_len=cfg.objective.loss_chunk_len, z_loss=cfg.objective.z_loss),
        in_shardings=(run.state_shardings, run.batch_sharding),
        out_shardings=(run.state_shardings, mesh_lib.replicated(run.mesh)),
        donate_argnums=0,
    )
    eval_fn = jax.jit(make_eval_step(run.model_def, run.layers_fn, loss_chunk_len=cfg.objective.loss_chunk_len))
    peak = peak_flops_per_second() * jax.process_count()
    logger = MetricsLogger(run.workdir, start_step=start, total_steps=total, enabled=jax.process_index() == 0)
    save_clock = _SaveClock(60 * cfg.checkpoint.every_minutes)
    goodput = Goodput(run.workdir, committed=_saved_goodput(checkpointer, start), dropped=logger.dropped,
                      writer=jax.process_index() == 0)
    window: list[dict] = []
    window_start, window_first_step = None, start
    logged: dict[str, float] = {}
    for step in range(start, total):
        watchdog.stall_if_asked(step + 1)
        state, step_metrics = step_fn(state, run.to_global(next(train_iter)))
        done = step + 1
        logger.advance()
        if window_start is None:  # the first step compiles: time from its end
            jax.block_until_ready(step_metrics)
            goodput.charge(COMPILE)
            watchdog.start()
            supervise.report_first_step(done)
            window_start, window_first_step = time.perf_counter(), done
        else:
            window.append(step_metrics)
            watchdog.dispatched(step_metrics["loss"])
        is_eval = (cfg.train.eval_every and done % cfg.train.eval_every == 0) or done == total
        if done % cfg.train.log_every == 0 or is_eval:
            logged = _summarise(window or [step_metrics], plan.schedule.tokens_before(done))
            if window:
                seconds = time.perf_counter() - window_start
                tokens, flops = _work(run.model_def.cfg, plan.schedule, window_first_step, done)
                logged["tokens_per_s"] = tokens / seconds
                logged["mfu"] = flops / seconds / peak
            if len(plan.names) > 1:
                logged.update(_realised_mixture(plan, done))
            if is_eval:
                with goodput.lost(EVAL), watchdog.phase("evaluation"):
                    logged.update(_evaluate(eval_fn, state.params, eval_sets, plan))
            logged.update(goodput.summary())
            logger.log(done, logged)
            window, window_start, window_first_step = [], time.perf_counter(), done
        preempted = preemption.raised or checkpointer.manager.reached_preemption(done)
        if done % cfg.checkpoint.every_steps == 0 or done == total or preempted or save_clock.due():
            jax.block_until_ready(state)  # the steps in flight are productive time; the save is not
            saved_meta = {**meta, "goodput": goodput.ledger()}
            with goodput.lost(CHECKPOINT), watchdog.phase("checkpoint save"):
                logger.flush()  # every line up to this step exists before the step can be restored
                checkpointer.save(done, state.params, state.opt_state, train_iter, saved_meta)
            save_clock.reset()
        if preempted and done < total:
            logger.close()
            raise Preempted(done, checkpointer.directory)
    logger.close()
    return logged


def _saved_goodput(checkpointer: ckpt.Checkpointer, step: int) -> dict | None:
    """The goodput counters stored with checkpoint `step` (None: a fresh start, or a checkpoint older than them)."""
    meta_file = checkpointer.directory / str(step) / "meta" / "metadata"
    return json.loads(meta_file.read_text()).get("goodput") if step and meta_file.exists() else None


def _summarise(window: list[dict], tokens_seen: int) -> dict[str, float]:
    host = jax.device_get(window)
    return {
        "loss": float(np.mean([m["loss"] for m in host])),
        "grad_norm": float(np.mean([m["grad_norm"] for m in host])),
        "lr": float(host[-1]["lr"]),
        "tokens": float(tokens_seen),
    }


def _work(model_cfg, schedule: BatchSchedule, first_step: int, stop_step: int) -> tuple[int, float]:
    """Tokens and training FLOPs of steps [first_step, stop_step), stage by stage (attention cost grows with seq_len)."""
    tokens, flops = 0, 0.0
    for stage in schedule.stages:
        end = stop_step if stage.stop_step is None else min(stop_step, stage.stop_step)
        steps = max(0, end - max(first_step, stage.start_step))
        tokens += steps * stage.tokens_per_step
        flops += steps * stage.tokens_per_step * flops_per_token(model_cfg, stage.seq_len)
    return tokens, flops


def _realised_mixture(plan: TrainBatches, step: int) -> dict[str, float]:
    """Each source's share of all rows trained on so far (the weights, up to rounding within a block)."""
    rows = plan.rows_per_source(step)
    return {f"mixture/{name}": float(n / rows.sum()) for name, n in zip(plan.names, rows)}


def _evaluate(eval_fn, params, eval_sets: dict[str, list[Batch]], plan: TrainBatches) -> dict[str, float]:
    """`eval_loss` (per token) of each source's held-out set; over several sources, their mixture-weighted mean."""
    losses = {}
    for name, batches in eval_sets.items():
        sums = jax.device_get([eval_fn(params, batch) for batch in batches])
        losses[name] = sum(float(s) for s, _ in sums) / max(sum(float(c) for _, c in sums), 1.0)
    if len(losses) == 1:
        return {"eval_loss": next(iter(losses.values()))}
    weights = plan.mixtures[0].weights
    mean = float(sum(w * losses[name] for w, name in zip(weights, plan.names)))
    return {"eval_loss": mean, **{f"eval_loss/{name}": loss for name, loss in losses.items()}}
