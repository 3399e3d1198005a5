"""Orbax checkpoints of the whole run: parameters, optimizer state, data-iterator position and config.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, data, meta}. Parameters are an item of their own so
that generation and conversion restore them without the (twice as large) optimizer state. Saves are
asynchronous and atomic: a process killed mid-save leaves a temporary directory that is ignored and removed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from llama_jax.errors import CheckpointError
from llama_jax.model import Llama, LlamaConfig, ModelDef

class Checkpointer:
    """Saves and restores training state in `directory`; one instance per run."""

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 2, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, data_iter: grain.DatasetIterator, meta: dict) -> None:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            meta=ocp.args.JsonSave(meta),
        )
        self.manager.save(step, args=args, force=True)

    def check_model(self, step: int, model: dict) -> None:
        """Refuses, before reading any array, a checkpoint written for another model config."""
        meta_file = self.directory / str(step) / "meta" / "metadata"
        if not meta_file.exists():
            raise CheckpointError(
                f"checkpoint {meta_file.parent.parent} has no meta/metadata: it is incomplete; delete it to resume "
                f"from an earlier step, or use a fresh --workdir"
            )
        saved = json.loads(meta_file.read_text())["config"]["model"]
        changed = [f"model.{k}: {saved.get(k)!r} -> {v!r}" for k, v in model.items() if saved.get(k) != v]
        if changed:
            raise CheckpointError(
                f"checkpoint {meta_file.parent.parent} was written for a different model ({'; '.join(changed)}): "
                f"use a fresh --workdir, or the model config the run started with"
            )

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any, data_iter: grain.DatasetIterator):
        """(params, opt_state) placed as the abstract targets say; `data_iter` is moved to the saved position."""
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params),
            opt_state=ocp.args.StandardRestore(abstract_opt_state),
            data=grain.checkpoint.CheckpointRestore(data_iter),
        )
        try:
            restored = self.manager.restore(step, args=args)
        except (FileNotFoundError, ValueError, KeyError) as err:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} could not be restored ({err}). It is incomplete or was "
                f"written for a different model/config: delete that step's directory to resume from an earlier "
                f"one, or use a fresh --workdir"
            ) from err
        return restored.params, restored.opt_state

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _find_step_dir(path: Path) -> Path:
    """Accepts a workdir, its checkpoints/ directory, or one step directory; returns the (latest) step dir."""
    for candidate in (path, path / "checkpoints"):
        steps = sorted((p for p in candidate.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)) \
            if candidate.is_dir() else []
        if steps:
            return steps[-1]
    if (path / "params").is_dir():
        return path
    raise CheckpointError(
        f"no checkpoint found at {path}: pass a training workdir, its checkpoints/ directory, or a step "
        f"directory such as WORKDIR/checkpoints/600"
    )


def load_model(path: str | os.PathLike) -> tuple[Llama, str]:
    """(model, tokenizer path) from a training checkpoint, restoring parameters only, on the default device."""
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"checkpoint path {path} does not exist")
    step_dir = _find_step_dir(path)
    meta_file = step_dir / "meta" / "metadata"
    if not meta_file.exists():
        raise CheckpointError(f"{step_dir} has no meta/metadata: the checkpoint is incomplete or not from llama_jax")
    meta = json.loads(meta_file.read_text())
    model_def = ModelDef(LlamaConfig(**meta["config"]["model"]))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), nnx.to_pure_dict(model_def.abstract_state)
    )
    try:
        params = ocp.StandardCheckpointer().restore(step_dir / "params", target)
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise CheckpointError(f"parameters in {step_dir} could not be restored: {err}") from err
    tokenizer = step_dir.parent.parent / meta["tokenizer_file"]  # the trainer copies it into the workdir
    return model_def.merge(params), str(tokenizer)
