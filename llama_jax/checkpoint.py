"""Orbax checkpoints of the whole run: parameters, optimizer state, data-iterator position and config.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, data, meta}. Parameters are an item of their own so
that generation and conversion restore them without the (twice as large) optimizer state. Saves are
asynchronous and atomic: a process killed mid-save leaves a temporary directory that is ignored and removed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import sys
import time
import traceback
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from flax import nnx

from llama_jax.convert import load_hf_params, read_hf_config
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.memory import check_model_fits
from llama_jax.model import Llama, LlamaConfig, ModelDef
from llama_jax.model.config import RUNTIME_FIELDS
from llama_jax.objectives import reward
from llama_jax.parallel import distributed
from llama_jax.parallel.mesh import param_shardings
from llama_jax.phases import state_layout
from llama_jax.workdir import resolve


class RestoreTarget(NamedTuple):
    """What a checkpoint is restored into: the model config it must have been written for, abstract arrays with the
    shardings wanted, and the data iterator to move to its saved position."""

    model: dict
    abstract_params: Any
    abstract_opt_state: Any
    data_iter: grain.DatasetIterator
    config: dict  # the run's whole config, whose `state_layout` the checkpoint must share


# Model fields a resumed run may set differently from its checkpoint: they change how the step computes, not the
# stored state's shapes or dtypes (model.RUNTIME_FIELDS but param_dtype, which is the state's dtype).
RESUMABLE_CHANGES = tuple(f for f in RUNTIME_FIELDS if f != "param_dtype")


def config_changes(saved: dict, config: dict) -> list[str]:
    """"KEY: saved -> now" for each setting of both configs (plain JSON, as checkpoints store them) whose value
    differs, by dotted key (a list of sections, like `phases`, by index): what a resumed run does otherwise than the
    run that saved its checkpoint."""
    def changes(before, now, key: str):
        if isinstance(before, dict) and isinstance(now, dict):
            for name in sorted(before.keys() & now.keys()):
                yield from changes(before[name], now[name], f"{key}.{name}" if key else name)
        elif isinstance(before, list) and isinstance(now, list) and all(isinstance(v, dict) for v in before + now):
            if len(before) != len(now):
                yield f"{key}: {len(before)} entries -> {len(now)}"
            for index, (was, is_now) in enumerate(zip(before, now)):
                yield from changes(was, is_now, f"{key}[{index}]")
        elif before != now:
            yield f"{key}: {before!r} -> {now!r}"

    return list(changes(saved, json.loads(json.dumps(config)), ""))


class ModelMismatch(CheckpointError):
    """The checkpoint is intact but belongs to another model config."""


class Checkpointer:
    """Saves and restores training state in `directory`; one instance per run.

    Keeps the newest `max_to_keep` checkpoints plus every step divisible by `keep_every` (0: none), so a long run
    keeps a sparse history for averaging or rollback without keeping everything.
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, keep_every: int = 0,
                 keep_steps: Sequence[int] = (), async_save: bool = True):
        """`keep_steps`: steps kept whatever the policy (those a phase averages)."""
        self.directory = resolve(directory)
        keep = [ocp.checkpoint_managers.LatestN(max_to_keep)]
        keep += [ocp.checkpoint_managers.EveryNSteps(keep_every)] if keep_every else []
        keep += [ocp.checkpoint_managers.CustomSteps(list(keep_steps))] if keep_steps else []
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore_newest_valid(self, targets: Callable[[int], RestoreTarget]) -> tuple[int, Any, Any] | None:
        """(step, params, opt_state) of the newest checkpoint that restores, or None when there is none.
        `targets(step)` says what a checkpoint of that step holds (a run's phases differ in model and data).

        A newest checkpoint that is incomplete or corrupt (a crash mid-save on a filesystem without atomic
        renames, a truncated file) is reported by name and the one before it is used: losing a few steps beats
        losing the run. A checkpoint of another model is not damage but a mistake, and stops the run.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        for index, step in enumerate(steps):
            try:
                target = targets(step)
                self.check_model(step, target.model, target.config)
                params, opt_state = self.restore(step, target.abstract_params, target.abstract_opt_state,
                                                 target.data_iter)
            except CheckpointError as err:
                if isinstance(err, ModelMismatch) or index + 1 == len(steps):
                    raise
                aside = self._set_aside(step)
                if jax.process_index() == 0:
                    print(f"warning: {err}. Moved it to {aside} and fell back to checkpoint {steps[index + 1]}.",
                          file=sys.stderr, flush=True)
                continue
            return step, params, opt_state
        return None

    def _set_aside(self, step: int) -> epath.Path:
        """Renames a damaged step out of the manager's sight (kept for inspection), so the run can save that step
        again when it gets there."""
        aside = self.directory / f"damaged-{step}-{int(time.time())}"
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()
        return aside

    def save(self, step: int, params: Any, opt_state: Any, data_iter: grain.DatasetIterator, meta: dict) -> None:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        with self._writing():
            self.manager.save(step, args=args, force=True)

    def saved_config(self, step: int) -> dict:
        """The config checkpoint `step` was written with (its phase's, as plain JSON), read without its arrays."""
        return self.saved_meta(step)["config"]

    def saved_meta(self, step: int) -> dict:
        """Checkpoint `step`'s meta item (its config, the run's, what it had trained on), read without its arrays."""
        meta_file = self.directory / str(step) / "meta" / "metadata"
        if not meta_file.exists():
            raise CheckpointError(
                f"checkpoint {meta_file.parent.parent} has no meta/metadata: it is incomplete; delete it to resume "
                f"from an earlier step, or use a fresh --workdir"
            )
        try:
            meta = json.loads(meta_file.read_text())
            if not isinstance(meta["config"].get("model"), dict):
                raise KeyError("model")
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"checkpoint {meta_file.parent.parent} has an unreadable meta/metadata ({err})") from err
        return meta

    def check_model(self, step: int, model: dict, config: dict) -> None:
        """Refuses, before reading any array, a checkpoint written for another model config or train state (LoRA,
        the objective's own state: `state_layout`), whose read failed in Orbax's words and was taken for damage. How
        the model runs may change on resume (a remat policy that saves memory, another attention kernel), not what it
        stores."""
        saved_config = self.saved_config(step)
        saved = saved_config["model"]
        where = self.directory / str(step)
        layout, saved_layout = state_layout(config), state_layout(saved_config)
        other_state = [f"{key}: {saved_layout[key]!r} -> {value!r}" for key, value in layout.items()
                       if saved_layout[key] != value]
        if other_state:
            raise ModelMismatch(
                f"checkpoint {where} holds another training state than this config trains "
                f"({'; '.join(other_state)}): resume with the objective and LoRA settings it was trained with, or "
                f"start a fresh --workdir, with --config.checkpoint.init_from={self.directory.parent} to begin from "
                "its parameters"
            )
        changed = [f"model.{k}: {saved.get(k)!r} -> {v!r}" for k, v in model.items()
                   if saved.get(k) != v and k not in RESUMABLE_CHANGES]
        if changed:
            raise ModelMismatch(
                f"checkpoint {where} was written for a different model ({'; '.join(changed)}): "
                f"use a fresh --workdir, or the model config the run started with"
            )

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any,
                data_iter: grain.DatasetIterator | None):
        """(params, opt_state) placed as the abstract targets say; `data_iter` (when given) is moved to the saved
        position.

        Each process reads only its own shards, so a damaged file may fail the read on some processes only. They
        agree on the outcome and all raise, to fall back together. Orbax's manager would leave those that read well
        waiting in its closing barrier for the others, which the agreement replaces: the read goes to its handler."""
        items = dict(params=ocp.args.StandardRestore(abstract_params),
                     opt_state=ocp.args.StandardRestore(abstract_opt_state))
        what = f"checkpoint {self.directory / str(step)}"

        def read():
            with contextlib.closing(ocp.CompositeCheckpointHandler()) as reader, restoring(
                    what, ". It is incomplete or was written for a different model/config: delete that step's "
                    "directory to resume from an earlier one, or use a fresh --workdir"):
                restored = reader.restore(self.directory / str(step), args=ocp.args.Composite(**items))
                if data_iter is not None:
                    _restore_position(self.directory / str(step) / "data", data_iter)
                return restored

        restored = distributed.on_every_process(read, f"reading {what}", elsewhere=CheckpointError)
        return restored.params, restored.opt_state

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            with self._writing():
                self.manager.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """A save that fails (a full disk, a lost permission, a bucket's quota) ends the run with what is left to
        resume from. Orbax raises the failure from the save itself or, when the save ran in the background, from the
        next save or wait, as whatever its storage layer raised."""
        try:
            yield
        except CheckpointError:
            raise
        except Exception as err:  # noqa: BLE001 (anything a save raises means the checkpoint was not written)
            steps = saved_steps(self.directory) if self.directory.exists() else []
            left = f"the newest complete checkpoint is step {steps[-1]}" if steps else "no checkpoint is complete yet"
            text = str(err).strip() or type(err).__name__
            first = text.splitlines()[0]
            cause = first if len(first) <= 300 else f"{first[:150]} ... {first[-150:]}"
            reason = re.search(r"([A-Za-z][A-Za-z ]*[a-z]) \[os_error_code='?\d+'?\]", text)  # TensorStore's OS error
            cause = f"{reason.group(1)}: {cause}" if reason else cause
            raise CheckpointError(f"a checkpoint could not be written to {self.directory} ({cause}); {left}. Fix the "
                                  "cause (free space, permissions, quota) and rerun to resume from there") from err


def quiet_background_failures() -> None:
    """For the command line: a failed background save reaches the run as one `CheckpointError` line
    (`Checkpointer._writing`), but Orbax also logs a traceback per failed writer thread, and TensorStore's callbacks
    into Orbax's closed event loop print a few dozen 'Event loop is closed' tracebacks; measured on a full 12 MB
    disk, 630 lines in all. Orbax's records keep their one-line message; the loop's noise goes. Sometimes asyncio
    also reports Orbax's failed writer tasks as 'Task exception was never retrieved': those go too. A failed
    read (`restoring`) leaves the same noise, and the other reads' coroutines report their errors as they are
    collected. Installed once, however often it is called."""
    global _quiet
    if _quiet:
        return
    _quiet = True
    logging.getLogger("absl").addFilter(_without_orbax_tracebacks)
    logging.getLogger("asyncio").addFilter(_without_orbax_tracebacks)
    previous = sys.unraisablehook

    def unraisable(error) -> None:
        loop_closed = isinstance(error.exc_value, RuntimeError) and str(error.exc_value) == "Event loop is closed"
        if not (loop_closed or _raised_in_orbax((error.exc_type, error.exc_value, error.exc_traceback))):
            previous(error)

    sys.unraisablehook = unraisable


_quiet = False


def _raised_in_orbax(exc_info) -> bool:
    return bool(exc_info) and any("/orbax/" in frame.filename for frame in traceback.extract_tb(exc_info[2]))


def _without_orbax_tracebacks(record: logging.LogRecord) -> bool:
    """Orbax's own records keep their message. asyncio's about an Orbax task or future go: their error is the one the
    command reports (`restoring`, `Checkpointer._writing`), and their message is the task's repr with its exception's,
    which holds a whole TensorStore spec. A task names its Orbax coroutine; a gathering future only its traceback."""
    if record.name == "asyncio" and ("/orbax/" in record.getMessage() or _raised_in_orbax(record.exc_info)):
        return False
    if "/orbax/" in record.pathname:
        record.exc_info, record.exc_text = None, None
    return True


def saved_steps(directory: epath.Path) -> list[int]:
    """The steps of the finished checkpoints in a checkpoints/ directory, in order (an unfinished save's temporary
    directory, or a damaged step set aside, has another name)."""
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def find_step_dir(path: epath.Path) -> epath.Path:
    """Accepts a workdir, its checkpoints/ directory, or one step directory; returns the (latest) step dir."""
    for candidate in (path, path / "checkpoints"):
        steps = saved_steps(candidate) if candidate.is_dir() else []
        if steps:
            return candidate / str(steps[-1])
    if (path / "params").is_dir():
        return path
    raise CheckpointError(
        f"no checkpoint found at {path}: pass a training workdir, its checkpoints/ directory, or a step "
        f"directory such as WORKDIR/checkpoints/600"
    )


def _restore_position(directory: epath.Path, data_iter: grain.DatasetIterator) -> None:
    """Moves `data_iter` to the position saved in `directory`. grain's own restore reads only the file of the current
    process count (`process_{i}-of-{n}.json`), so a run resumed on another number of hosts found none and set its good
    checkpoints aside as damaged. Every process draws every step (of its share of the batch), so each file holds the
    same position and any one of them will do."""
    own = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    saved = [own] if own.exists() else sorted(directory.glob("process_*-of-*.json"))
    if not saved:
        raise FileNotFoundError(f"{directory} holds no data position (process_*-of-*.json)")
    data_iter.set_state(json.loads(saved[0].read_text()))


@contextlib.contextmanager
def restoring(what: str, fix: str) -> Iterator[None]:
    """Turns what Orbax raises for a checkpoint's missing or damaged files into one CheckpointError, f"{what} could not
    be restored ({the error}){fix}". Orbax wraps a failed read of an array's bytes (a truncated data file) in a bare
    Exception whose cause is TensorStore's ValueError: that cause tells damage from a bug, which keeps its traceback.
    The other reads still in flight then fail into Orbax's closed event loop from TensorStore's threads while the error
    propagates, so `quiet_background_failures` is installed before the read, not after it failed."""
    quiet_background_failures()
    try:
        yield
    except Exception as err:
        if isinstance(err, (FileNotFoundError, ValueError, KeyError)):
            damage = err
        elif type(err) is Exception and isinstance(err.__cause__, (OSError, ValueError)):
            damage = err.__cause__
        else:
            raise
        raise CheckpointError(f"{what} could not be restored ({damage}){fix}") from err


def check_resumed_tokenizer(workdir: epath.Path, tokenizer_files: Sequence[epath.Path | os.PathLike]) -> None:
    """Refuses to go on with a run's checkpoints under a tokenizer other than the one they were trained with, where the
    same token ids would mean other text. A new `data.source` without `data.tokenizer` trains a tokenizer of its own,
    so changing the data of a run on resume changed its vocabulary silently, and replaced the workdir's copy that its
    earlier checkpoints are used with. A workdir whose copy is gone (or whose newest checkpoint is damaged, which the
    restore sets aside) has nothing to compare with."""
    checkpoints = workdir / "checkpoints"
    if not (checkpoints.is_dir() and saved_steps(checkpoints)):
        return
    try:
        trained_with = SavedRun.open(workdir).tokenizer
    except (CheckpointError, KeyError, ValueError):
        return
    files = [epath.Path(f) for f in tokenizer_files]
    if not trained_with.is_file():
        return
    if trained_with.name == files[0].name and all(
        not (workdir / f.name).is_file() or (workdir / f.name).read_bytes() == f.read_bytes() for f in files
    ):
        return
    raise ConfigError(
        f"{workdir} was trained with the tokenizer {trained_with}, but the data now comes with another ({files[0]}): "
        "its token ids would mean other text. To train this run on new data, keep its tokenizer with "
        f"--config.data.tokenizer={trained_with}; or start a fresh --workdir"
    )


@dataclasses.dataclass(frozen=True)
class SavedRun:
    """One step of a llama_jax run as it describes itself in meta/metadata, read without touching an array."""

    step_dir: epath.Path
    meta: dict

    @classmethod
    def open(cls, path: str | os.PathLike) -> SavedRun:
        """A workdir (its newest step), its checkpoints/ directory, or one step directory."""
        path = resolve(path)
        if not path.exists():
            raise CheckpointError(f"checkpoint path {path} does not exist")
        step_dir = find_step_dir(path)
        meta_file = step_dir / "meta" / "metadata"
        if not meta_file.exists():
            raise CheckpointError(f"{step_dir} has no meta/metadata: the checkpoint is incomplete or not from llama_jax")
        try:
            meta = json.loads(meta_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(f"{meta_file} is not JSON ({err}): the checkpoint is damaged; use another step") from None
        return cls(step_dir, meta)

    @property
    def model_config(self) -> LlamaConfig:
        return LlamaConfig(**self.meta["config"]["model"])

    @property
    def run_dir(self) -> epath.Path:
        """The run's workdir, which holds its tokenizer: above checkpoints/<step>, or above rewound/<time>/<step>,
        where `python -m llama_jax.rewind` moves the steps it sets aside (their tokenizer was not found)."""
        above = self.step_dir.parent
        return above.parent.parent if above.name != "checkpoints" and above.parent.name == "rewound" else above.parent

    @property
    def is_lora(self) -> bool:
        """Whether the run trained LoRA adapters (its checkpoints hold them, not a model)."""
        return bool(self.meta.get("config", {}).get("lora", {}).get("rank"))

    @property
    def objective(self) -> str | None:
        """The `objective.name` the run trained with (None where the checkpoint does not say)."""
        return self.meta.get("config", {}).get("objective", {}).get("name")

    def require_whole_model(self) -> None:
        """Raises CheckpointError for a LoRA run, whose checkpoints hold adapters, not a model."""
        if self.is_lora:
            raise CheckpointError(f"{self.step_dir} is from a LoRA run: it holds the adapters only, not a model. Merge "
                                  f"them into their base first, python -m llama_jax.lora merge {self.step_dir} --out "
                                  "DIR (add --to hf for a Hugging Face directory), and use DIR")

    @property
    def tokenizer(self) -> epath.Path:
        """The tokenizer file the trainer copied into the workdir beside checkpoints/."""
        return self.run_dir / self.meta["tokenizer_file"]

    def restore_params(self, model_cfg: LlamaConfig, shardings: dict) -> dict:
        """The parameters alone (never the optimizer state), as `model_cfg`'s dtypes and `shardings` say: Orbax reads
        for each device only the stored chunks its shard covers, whatever mesh the run was saved from. A LoRA run's
        are its base with the adapters merged in (`lora.restore_merged`). A reward model's head comes with them where
        `shardings` has a place for it (`reward.HEAD`); elsewhere the reward model is refused, since its body was
        trained to score, not to be read as a language model."""
        with jax.set_mesh(None):  # shapes only: `shardings` alone decides where the arrays go
            abstract = nnx.to_pure_dict(ModelDef(model_cfg).abstract_state)
        if self.objective == "reward":
            if reward.HEAD not in shardings:
                started = self.meta["config"].get("checkpoint", {}).get("init_from")
                raise CheckpointError(
                    f"{self.step_dir} is a reward model (objective.name='reward'): it scores responses, for "
                    "`rejection_sample --reward` or `convert --to hf` (a sequence classifier), and is not read as a "
                    "language model. Generate from or fine-tune the run it started from"
                    + (f" ({started})" if started else "") + "; to train the reward model further, rerun it in its "
                    "own workdir"
                )
            abstract[reward.HEAD] = jax.ShapeDtypeStruct((model_cfg.dim,), jnp.float32)
        if self.is_lora:
            from llama_jax import lora

            merged = lora.restore_merged(self, shardings)
            return jax.tree.map(lambda x, like: x.astype(like.dtype), merged, abstract)
        target = jax.tree.map(lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), abstract, shardings)
        with restoring(f"parameters in {self.step_dir}", ": the checkpoint is damaged or incomplete; use another step"):
            return read_params(self.step_dir, target)


def read_params(step_dir: epath.Path, target: Any = None) -> Any:
    """A step's `params` item, read by Orbax's handler alone: as `target` says, or with the shapes and dtypes it was
    saved with, on this process's first device. Orbax reads an array "as saved" only on the devices it was saved
    from, and refuses ("Topology mismatch") in a process with fewer. Orbax's checkpointers end a read with a barrier,
    where the hosts whose read succeeded would wait for one whose read failed: the callers agree on the outcome
    instead (`distributed.on_every_process`)."""
    with contextlib.closing(ocp.StandardCheckpointHandler()) as handler:
        if target is None:
            device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # each host its own
            target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                                  handler.metadata(step_dir / "params"))
        return handler.restore(step_dir / "params", args=ocp.args.StandardRestore(target))


def load_model(path: str | os.PathLike, *, mesh: Mesh | None = None) -> tuple[Llama, str]:
    """(model, tokenizer path) from a training checkpoint, restoring parameters only: on the default device, or
    with `mesh` sharded as `parallel.mesh.param_shardings` says (no device ever holds the whole model)."""
    saved = SavedRun.open(path)
    model_def = ModelDef(saved.model_config)
    check_model_fits(model_def.cfg, mesh)
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, nnx.to_pure_dict(model_def.abstract_state))
    else:
        shardings = param_shardings(model_def.abstract_state, mesh)
    return model_def.merge(saved.restore_params(model_def.cfg, shardings)), str(saved.tokenizer)


def pinned_path(path: str | os.PathLike) -> str:
    """`path` (a `checkpoint.init_from`) as the files it reads now: a llama_jax workdir or checkpoints/ directory as
    its newest step, which stays when the workdir saves newer ones; a step or a Hugging Face directory as it is."""
    if (resolve(path) / "config.json").is_file():
        return str(path)
    return str(SavedRun.open(path).step_dir)


def load_pretrained(path: str | os.PathLike, model_cfg: LlamaConfig, shardings: dict) -> dict:
    """The parameters that start a new run (`checkpoint.init_from`): from a Hugging Face directory or from a llama_jax
    workdir or step, placed as `shardings` says; the optimizer, step and data position start afresh. A checkpoint
    of another architecture is refused before any tensor is read."""
    hugging_face = (resolve(path) / "config.json").is_file()
    saved = None if hugging_face else SavedRun.open(path)
    changed = model_cfg.architecture_changes(read_hf_config(path) if hugging_face else saved.model_config)
    if changed:
        raise ConfigError(
            f"checkpoint.init_from={str(path)!r} is a different model: {'; '.join(changed)}. Fix: take the model "
            "section from the checkpoint, cfg.model = llama_jax.config.pretrained_model_section(path) (as "
            "configs/finetune.py does)"
        )
    if hugging_face:
        return load_hf_params(path, model_cfg, shardings=shardings)
    return saved.restore_params(model_cfg, shardings)
