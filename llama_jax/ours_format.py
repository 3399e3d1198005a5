"""Our own checkpoints' parameters, read and written one array at a time, for conversion and averaging.

Reading restores one parameter of WORKDIR/checkpoints/<step>/params with Orbax's partial restore (a restore target
naming just that leaf), never the rest. Writing produces what `checkpoint.load_model`, `python -m llama_jax.generate`
and a run's `checkpoint.init_from` read: DST/checkpoints/0/{params, meta} plus the tokenizer files in DST. An Orbax
save takes its whole tree at once, so the parameters go through Orbax's partial saving instead
(`orbax.checkpoint.experimental.v1.partial`: each call adds leaves to a pending checkpoint, `finalize` merges them
into one), one parameter per call. Orbax 0.12.8 marks that API experimental; the result is an ordinary params item.

A checkpoint in a bucket (gs://...) is read in place, as Orbax reads any path. Written to a bucket, the step is
built in a local temporary directory (partial saves and the final renames need a filesystem) and uploaded with
meta/metadata last, so until it lands the step reads as incomplete; disk holds the checkpoint meanwhile.

Memory, measured on a model of nine 64 MiB parameters (tests/test_convert_memory.py), whatever the model's size: a
read peaks about 2.5 parameters above where it started (tensorstore decodes chunks beside the array it fills), a
write about 3 to 4 (it copies the array into its chunks and compresses them).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import operator
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import orbax.checkpoint.experimental.v1 as ocp_v1

from llama_jax.checkpoint import SavedRun, restoring
from llama_jax.convert import ParamSource, copy_tokenizer_files, param_shapes
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.model import LlamaConfig
from llama_jax.objectives import reward
from llama_jax.workdir import local_output, resolve

_CHUNK_BYTES = 64 * 2**20  # Orbax's chunks; smaller ones cut a write's peak but raise a read's (measured)


class OursSource(ParamSource):
    """A llama_jax workdir, its checkpoints/ directory, or one step (the latest step of a workdir)."""

    def __init__(self, path: str | os.PathLike):
        saved = SavedRun.open(path)
        saved.require_whole_model()
        try:
            self.cfg = saved.model_config
        except (KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(f"{saved.step_dir}/meta/metadata holds no usable model config ({err}): the "
                                  "checkpoint is not from this version of llama_jax; use another step") from None
        self.directory = saved.run_dir  # with the tokenizer files
        tokenizer = self.directory / saved.meta.get("tokenizer_file", "")
        self.tokenizer = tokenizer if tokenizer.is_file() else None
        self._params = saved.step_dir / "params"
        self._handler = ocp.PyTreeCheckpointHandler()
        try:
            self._stored = self._handler.metadata(self._params).tree
        except (FileNotFoundError, ValueError) as err:
            raise CheckpointError(f"{self._params} is missing or unreadable ({err}): use another step") from None
        wrong = [f"{'.'.join(path)} {shape}" for path, shape in param_shapes(self.cfg).items()
                 if _stored_shape(self._stored, path) != shape]
        if wrong:
            raise CheckpointError(f"{self._params} does not hold the parameters its meta/metadata's model has "
                                  f"({', '.join(wrong)}): the checkpoint is damaged; use another step")
        self.cfg = self.cfg.replace(param_dtype=jnp.dtype(self._stored["embed"].dtype).name)
        self.reward_model = saved.objective == "reward"

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        if self.reward_model and path == ("score",):
            return self.read((reward.HEAD,))[None, :]
        leaf = functools.reduce(operator.getitem, path, self._stored)
        item = _nested(path, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
        restore_args = _nested(path, ocp.RestoreArgs(restore_type=np.ndarray))
        args = ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        with restoring(f"{'.'.join(path)} in {self._params}", ": the checkpoint is damaged; use another step"):
            return functools.reduce(operator.getitem, path, self._handler.restore(self._params, args=args))


def _stored_shape(tree: dict, path: tuple[str, ...]) -> tuple[int, ...] | None:
    """The shape of the leaf at `path` in Orbax's metadata tree; None when there is none."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tuple(tree.shape)


def _nested(path: tuple[str, ...], value) -> dict:
    """{path[0]: {path[1]: ... value}}: a tree holding one leaf."""
    return functools.reduce(lambda tree, key: {key: tree}, reversed(path), value)


def write_ours(source: ParamSource, out: str | os.PathLike, dtype: str | None = None) -> None:
    """`source` as step 0 of a llama_jax run in `out` (a local path or a URL), parameters in `dtype` (default: as
    stored).

    Refuses a directory that already holds checkpoints (a run's, or an earlier conversion's), or is one step of a
    run, rather than mixing steps, and a source without a tokenizer, since every reader of our checkpoints needs one.
    The step appears only when complete: it is built under checkpoints/.0-converting and renamed (in a bucket, its
    meta/metadata lands last).
    """
    out = resolve(out)
    if source.scores_end_token:
        raise CheckpointError(f"{source.directory} is a reward model that scores the end token, where llama_jax's "
                              "score the token before it, so as a llama_jax checkpoint it would be read at the wrong "
                              f"position: use it as it is (rejection_sample --reward {source.directory})")
    if source.tokenizer is None:
        raise CheckpointError(f"{source.directory} has no tokenizer (tokenizer.model or tokenizer.json), which a "
                              "llama_jax checkpoint needs: copy the model's tokenizer into it, or convert to hf")
    if (out / "meta" / "metadata").exists() or (out / "_CHECKPOINT_METADATA").exists():
        raise CheckpointError(f"{out} is a checkpoint step of a run (writing there would mix a new step into it): "
                              "write to a new directory")
    checkpoints = out / "checkpoints"
    steps = sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []
    if steps:
        raise CheckpointError(f"{out} already holds checkpoints (steps {', '.join(steps)}): write to a new directory, "
                              "or delete them")
    cfg = source.cfg.replace(param_dtype=jnp.dtype(dtype or source.cfg.param_dtype).name)
    with local_output(out, last=("checkpoints/0/meta/metadata",)) as local:
        _write_step(source, cfg, local)


def _write_step(source: ParamSource, cfg: LlamaConfig, out: Path) -> None:
    """Step 0 of `cfg`'s parameters from `source`, and the tokenizer files, in the local directory `out`."""
    checkpoints = out / "checkpoints"
    staging = checkpoints / ".0-converting"
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted conversion left
    pending = staging / "params-pending"
    context = ocp_v1.Context()
    context.memory.deepcopy_host_arrays = False  # the array is ours alone until the save returns
    context.array.saving.storage_options.chunk_byte_size = _CHUNK_BYTES
    with context:
        for path in param_shapes(cfg):
            ocp_v1.partial.save(pending, _nested(path, source.read(path).astype(jnp.dtype(cfg.param_dtype), copy=False)))
        if source.reward_model:  # its head, in float32 as training keeps it
            ocp_v1.partial.save(pending, {reward.HEAD: source.read(("score",))[0].astype(np.float32)})
        ocp_v1.partial.finalize(pending)
    (pending / "state").rename(staging / "params")  # the pytree of a finalized partial save
    shutil.rmtree(pending)
    (staging / "meta").mkdir()
    tokenizer_file = copy_tokenizer_files(source, out)[0]
    meta = {"config": {"model": dataclasses.asdict(cfg)}, "tokenizer_file": tokenizer_file}
    if source.reward_model:
        meta["config"]["objective"] = {"name": "reward"}  # what `SavedRun.objective` and its readers look for
    (staging / "meta" / "metadata").write_text(json.dumps(meta, indent=2) + "\n")
    staging.rename(checkpoints / "0")
