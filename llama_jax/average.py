"""Checkpoint averaging: the element-wise mean of several checkpoints' parameters, as one of our checkpoints.

    python -m llama_jax.average runs/anneal/checkpoints/9000 runs/anneal/checkpoints/9500 runs/anneal --out runs/avg

Llama 3's final model is the average of the checkpoints saved while the learning rate anneals to zero (Polyak
averaging): the mean of nearby points of one run lands nearer the basin's centre than any of them. The inputs are our
workdirs or steps (a workdir means its latest step), or any checkpoint `convert` reads, of one model config. The mean
is taken parameter by parameter, summed in float64 and stored in the first input's dtype (or `--dtype`), so memory
holds one parameter's sum and one input's copy of it at a time, never a model. One input is allowed: a copy of it.
Inputs and output may be URLs (gs://bucket/run/checkpoints/9000), read and written as `convert` does. A LoRA run's
step counts as its merged model (`convert.open_source`): the mean of the models, base + scale · mean(A·B), which no
mean of the adapters themselves gives.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np
from etils import epath

from llama_jax.checkpoint import SavedRun
from llama_jax.convert import ParamSource, detect_format, open_source
from llama_jax.errors import CheckpointError, LlamaJaxError
from llama_jax.ours_format import write_ours
from llama_jax.workdir import check_writable, resolve


class _Mean(ParamSource):
    """The mean of `sources`' parameters in `dtype` (default: the first one's), with the first one's files."""

    def __init__(self, sources: list[ParamSource], dtype: str | None):
        self._sources = sources
        self.cfg = sources[0].cfg.replace(param_dtype=dtype or sources[0].cfg.param_dtype)
        self.directory, self.tokenizer = sources[0].directory, sources[0].tokenizer
        self.reward_model = sources[0].reward_model  # the heads are averaged too ("score")
        self.scores_end_token = any(source.scores_end_token for source in sources)  # which write_ours refuses

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        total = self._sources[0].read(path).astype(np.float64)  # exact for the sum of a few float32s
        for source in self._sources[1:]:
            total += source.read(path)
        total /= len(self._sources)
        return total.astype(np.float32 if path == ("score",) else jnp.dtype(self.cfg.param_dtype))  # a head: float32


def _check_same_model(paths: list[epath.Path], sources: list[ParamSource]) -> None:
    """Refuses checkpoints of different models (how they run, e.g. their compute dtype, may differ) or tokenizers."""
    for path, source in zip(paths[1:], sources[1:]):
        differing = sources[0].cfg.architecture_changes(source.cfg)
        if differing:
            raise CheckpointError(f"{path} is a different model from {paths[0]} ({'; '.join(differing)}): average "
                                  "checkpoints of one run")
        if source.reward_model != sources[0].reward_model:
            kinds = ["a reward model" if s.reward_model else "a language model" for s in (sources[0], source)]
            raise CheckpointError(f"{path} is {kinds[1]} and {paths[0]} {kinds[0]}: average checkpoints of one run")
        files = [s.tokenizer for s in (sources[0], source)]
        if None not in files and files[0].name != files[1].name:  # a run's tokenizer.model, its export's .json
            raise CheckpointError(
                f"{path} holds its tokenizer as {files[1].name} and {paths[0]} as {files[0].name}, which this "
                "command cannot compare: average checkpoints of one format (a run's own steps, or their Hugging "
                "Face exports: `python -m llama_jax.convert --from ours --to hf RUN OUT` makes one of a step)"
            )
        contents = [f.read_bytes() if f else None for f in files]
        if contents[0] != contents[1]:
            raise CheckpointError(f"{path} has another tokenizer than {paths[0]}: average checkpoints of one run")


def _check_distinct(paths: list[epath.Path]) -> None:
    """Refuses one checkpoint named twice (a step twice, or a workdir and its latest step): it would count twice in
    the mean."""
    named: dict[epath.Path, epath.Path] = {}
    for path in paths:
        step = SavedRun.open(path).step_dir if detect_format(path) == "ours" else path
        if step in named:
            raise CheckpointError(f"{path} and {named[step]} are the same checkpoint ({step}), which would count twice "
                                  "in the mean: name each checkpoint once")
        named[step] = path


def average(paths: list[str | os.PathLike], out: str | os.PathLike, dtype: str | None = None) -> None:
    """Writes the mean of the checkpoints at `paths` to `out` as one of our checkpoints (step 0); any of them may be
    a URL."""
    if not paths:
        raise CheckpointError("no checkpoints to average: pass one or more")
    paths = [resolve(path) for path in paths]
    sources = [open_source(path) for path in paths]
    _check_distinct(paths)
    _check_same_model(paths, sources)
    write_ours(_Mean(sources, dtype), resolve(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.average", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="our workdirs or steps, or Hugging Face directories (local "
                        "paths or URLs such as gs://bucket/run)")
    parser.add_argument("--out", required=True, help="directory to write the average to, as step 0 of a run (local "
                        "or a URL)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="parameter dtype of the average (default: the first checkpoint's)")
    args = parser.parse_args(argv)
    try:
        check_writable(args.out, "--out", directory=True)
        average(args.checkpoints, args.out, args.dtype)
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    count = len(args.checkpoints)
    print(f"wrote {args.out}: " + ("a copy of the one checkpoint given" if count == 1 else f"the mean of {count} checkpoints"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
