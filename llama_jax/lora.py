"""LoRA: low-rank adapters on the attention and MLP projections of a frozen base model.

Each target weight W (stacked over layers, [L, *in, *out]) gains A [L, *in, r] (normal init) and B [L, r, *out]
(zero init); the model runs on W + (alpha / r) · A·B, computed inside the jitted step from the frozen base and the
adapters, so the model code knows nothing of LoRA. With `lora.dropout` > 0 the adapters' input is dropped out, which
no merged matrix can express: each target's weight is then an `AdapterWeight`, whose product with the input is
x·W + (alpha / r) · dropout(x)·A·B (the model asks a weight for `linear` where it has one), in training steps only;
evaluation and export use the merged weights. Training keeps only the adapters in the train state: the
optimizer state and the checkpoints are adapter-sized, and the base is an argument of the step, never donated. A
reward model (objective "reward") trains its head whole beside the adapters: it is new, so there is no base to adapt.

Export writes the merged model, one tensor at a time, as our checkpoint or a Hugging Face directory (a reward model
with its head: in ours as a reward model, in Hugging Face's as a sequence classifier):

    python -m llama_jax.lora merge RUN --out DIR [--to hf] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import math
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.errors import CheckpointError, ConfigError, LlamaJaxError
from llama_jax.model import Llama, LlamaConfig, ModelDef
from llama_jax.model.matmul import project
from llama_jax.parallel.mesh import logical_to_spec
from llama_jax.workdir import check_writable

# target name -> (its path in the params, how many of its axes after the layer axis are inputs)
TARGETS: dict[str, tuple[tuple[str, ...], int]] = {
    "wq": (("layers", "attn", "wq"), 1),
    "wk": (("layers", "attn", "wk"), 1),
    "wv": (("layers", "attn", "wv"), 1),
    "wo": (("layers", "attn", "wo"), 2),
    "w_gate": (("layers", "mlp", "w_gate"), 1),
    "w_up": (("layers", "mlp", "w_up"), 1),
    "w_down": (("layers", "mlp", "w_down"), 1),
}
BASE_DTYPES = ("float32", "bfloat16")


def target_names(lora_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    names = tuple(name.strip() for name in lora_cfg.targets.split(",") if name.strip())
    unknown = [name for name in names if name not in TARGETS]
    if unknown or not names:
        raise ConfigError(f"lora.targets={lora_cfg.targets!r}: {unknown or 'empty'}; give a comma-separated subset of "
                          f"{', '.join(TARGETS)}")
    return names


def check(cfg: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for a LoRA setting this version cannot train."""
    lora_cfg = cfg.lora
    if lora_cfg.rank < 0:
        raise ConfigError(f"lora.rank must be zero (off) or positive, got {lora_cfg.rank}")
    if lora_cfg.rank == 0:
        return
    target_names(lora_cfg)
    if lora_cfg.alpha <= 0:
        raise ConfigError(f"lora.alpha must be positive, got {lora_cfg.alpha} (a common choice: 2 x lora.rank)")
    if not 0 <= lora_cfg.dropout < 1:
        raise ConfigError(f"lora.dropout={lora_cfg.dropout}: the adapters' dropout rate must be in [0, 1)")
    if lora_cfg.dropout and cfg.objective.name == "dpo":
        raise ConfigError(f"lora.dropout={lora_cfg.dropout} with objective.name='dpo': DPO compares the policy's "
                          "log-probabilities with the reference's, and dropout would add noise to that ratio (TRL "
                          "turns dropout off for DPO too); set lora.dropout=0")
    if lora_cfg.base_dtype not in BASE_DTYPES:
        raise ConfigError(f"lora.base_dtype={lora_cfg.base_dtype!r} is not one of {BASE_DTYPES}")
    if not cfg.checkpoint.init_from:
        raise ConfigError("lora.rank > 0 trains adapters on a trained model: set checkpoint.init_from to a Hugging "
                          "Face directory or a llama_jax run")
    if cfg.mesh.stage > 1 and cfg.pipeline.schedule in ("1f1b", "zb-h1"):
        raise ConfigError("lora.rank > 0 needs the layer stack run by autodiff: use pipeline.schedule='gpipe' or "
                          "'circular' with mesh.stage > 1")
    for index, entry in enumerate(cfg.phases):
        where = f"phases[{index}] ({entry.name!r})"
        if "init_from" in entry.overrides.get("checkpoint", {}):
            raise ConfigError(f"{where} sets checkpoint.init_from: with lora.rank > 0 every phase trains adapters on "
                              "the run's one base; set it in the run's config only")


def scale(lora_cfg: ml_collections.ConfigDict) -> float:
    return lora_cfg.alpha / lora_cfg.rank


@dataclasses.dataclass(frozen=True)
class LoraStep:
    """What a training step needs of `cfg.lora` (and the run's seed, from which each step's dropout masks come)."""

    scale: float
    dropout: float
    seed: int

    @classmethod
    def of(cls, cfg: ml_collections.ConfigDict) -> "LoraStep":
        return cls(scale(cfg.lora), float(cfg.lora.dropout), int(cfg.seed))


@functools.partial(jax.tree_util.register_dataclass, data_fields=["w", "a", "b", "key"],
                   meta_fields=["scale", "rate"])
@dataclasses.dataclass(frozen=True)
class AdapterWeight:
    """A target's base weight W with its adapters A, B kept apart, for a training step with adapter dropout: the
    model reads it as `param[...]` and calls `linear`. Its arrays carry the leading layers axis like W, and `key` is
    one dropout key per layer, so the layer scan (and a pipeline's reshaping) slices it as any other parameter."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    key: jax.Array
    scale: float
    rate: float

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("an AdapterWeight is read whole (weight[...])")
        return self

    def linear(self, equation: str, x: jax.Array) -> jax.Array:
        """x·W + scale · dropout(x)·A·B for an einsum `equation` "x,w->out" whose output ends with W's output
        axes; in x's dtype. The dropout is inverted (kept entries scaled by 1 / (1 - rate)), as torch's."""
        dtype = x.dtype
        inputs, out = equation.split("->")
        x_sub, w_sub = inputs.split(",")
        n_in = self.a.ndim - 1
        in_sub, out_sub = w_sub[:n_in], w_sub[n_in:]
        rows, r = out[:len(out) - len(out_sub)], next(c for c in "rzyxqp" if c not in equation)
        keep = jax.random.bernoulli(self.key, 1.0 - self.rate, x.shape)
        dropped = jnp.where(keep, x / (1.0 - self.rate), 0).astype(dtype)
        down = project(f"{x_sub},{in_sub}{r}->{rows}{r}", dropped, self.a)
        up = project(f"{rows}{r},{r}{out_sub}->{out}", down, self.b)
        return project(equation, x, self.w) + (self.scale * up).astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.w.shape

    @property
    def ndim(self) -> int:
        return self.w.ndim


def training_model(model_def: ModelDef, base: dict, adapters: dict, lora: LoraStep, step: jax.Array,
                   microbatch: jax.Array | int = 0) -> Llama:
    """The model a training step differentiates: the merged weights, or with dropout each target an
    `AdapterWeight` whose masks depend only on (seed, step, microbatch, target, layer), so a resumed run draws the
    same masks as an uninterrupted one."""
    if not lora.dropout:
        return model_def.merge(merged(base, adapters, lora.scale))
    dtype = jnp.result_type(*(part.dtype for pair in adapters.values() for part in pair.values()))
    graphdef, state = nnx.split(model_def.merge(jax.tree.map(lambda w: w.astype(dtype), base)))
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(lora.seed), step), microbatch)
    for name, pair in adapters.items():
        path = TARGETS[name][0]
        w = functools.reduce(lambda node, k: node[k], path, base)
        keys = jax.random.split(jax.random.fold_in(key, list(TARGETS).index(name)), w.shape[0])
        functools.reduce(lambda node, k: node[k], path, state).set_value(
            AdapterWeight(w, pair["a"], pair["b"], keys, lora.scale, lora.dropout))
    return nnx.merge(graphdef, state)


def _variable(model_def: ModelDef, path: tuple[str, ...]):
    node = model_def.abstract_state
    for key in path:
        node = node[key]
    return node


def _layouts(model_def: ModelDef, lora_cfg: ml_collections.ConfigDict) -> dict:
    """{target: {"a": (shape, logical names), "b": (shape, logical names)}} from each target's own shape and names."""
    layouts = {}
    for name in target_names(lora_cfg):
        path, n_in = TARGETS[name]
        variable = _variable(model_def, path)
        shape, names = variable.shape, tuple(variable.get_metadata().get("out_sharding") or (None,) * variable.ndim)
        split = 1 + n_in
        layouts[name] = {
            "a": ((*shape[:split], lora_cfg.rank), (*names[:split], None)),
            "b": ((shape[0], lora_cfg.rank, *shape[split:]), (names[0], None, *names[split:])),
        }
    return layouts


def init(model_def: ModelDef, lora_cfg: ml_collections.ConfigDict, seed: int) -> dict:
    """Adapters for a fresh run: A ~ N(0, 1/fan_in), B = 0, so the model starts as the base exactly."""
    key = jax.random.key(seed)
    adapters = {}
    for index, (name, layout) in enumerate(_layouts(model_def, lora_cfg).items()):
        (a_shape, _), (b_shape, _) = layout["a"], layout["b"]
        fan_in = math.prod(a_shape[1:-1])
        a = jax.random.normal(jax.random.fold_in(key, index), a_shape, jnp.float32) / math.sqrt(fan_in)
        adapters[name] = {"a": a, "b": jnp.zeros(b_shape, jnp.float32)}
    return adapters


def shardings(model_def: ModelDef, lora_cfg: ml_collections.ConfigDict, mesh: Mesh) -> dict:
    """The adapters' NamedShardings, from their targets' logical names (the rank axis whole); a dimension its mesh
    axes do not divide is kept whole, as for the model's parameters."""
    def sharding(shape, names) -> NamedSharding:
        spec = logical_to_spec(names)
        sizes = [math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ())) for axes in spec]
        return NamedSharding(mesh, PartitionSpec(*(axes if dim % size == 0 else None
                                                   for dim, axes, size in zip(shape, spec, sizes))))

    return {name: {part: sharding(*layout[part]) for part in ("a", "b")}
            for name, layout in _layouts(model_def, lora_cfg).items()}


def merged_weight(w: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """W + scale · A·B in A's dtype, layer by layer."""
    layers, rank = a.shape[0], a.shape[-1]
    delta = jnp.einsum("lir,lro->lio", a.reshape(layers, -1, rank), b.reshape(layers, rank, -1))
    return w.astype(a.dtype) + scale * delta.reshape(w.shape)


def merged(base: dict, adapters: dict, scale: float) -> dict:
    """The model's parameters: the base (all of it in the adapters' dtype) with each target's adapters merged in."""
    dtype = jnp.result_type(*(part.dtype for pair in adapters.values() for part in pair.values()))
    params = jax.tree.map(lambda w: w.astype(dtype), base)
    for name, pair in adapters.items():
        *parents, leaf = TARGETS[name][0]
        node = params
        for key in parents:
            node[key] = dict(node[key])
            node = node[key]
        node[leaf] = merged_weight(node[leaf], pair["a"], pair["b"], scale)
    return params


def _lora_section(meta: dict, where) -> ml_collections.ConfigDict:
    section = meta.get("config", {}).get("lora")
    if not section or not section.get("rank"):
        raise CheckpointError(f"{where} is not a LoRA run (its config has lora.rank = 0): convert it with "
                              "python -m llama_jax.convert --from ours")
    return ml_collections.ConfigDict(section)


def _restore_saved(saved) -> dict:
    """What a LoRA run's checkpoint holds as params: the adapters (and the reward head), as host arrays."""
    from llama_jax.checkpoint import read_params, restoring

    with restoring(f"adapters in {saved.step_dir}", ": the checkpoint is damaged or incomplete; use another step"):
        return jax.tree.map(np.asarray, read_params(saved.step_dir))


def fingerprint(base: dict) -> str:
    """A digest of a base model's values, the same on any mesh: each array's bits summed as unsigned integers, which
    no order of summation changes. A run records its base's (`base_source`) and checks it wherever it reads the base
    again, so that its adapters are never merged into another model, such as a newer step of the same workdir."""
    named = jax.tree_util.tree_flatten_with_path(base)[0]
    sums = _bit_sums([w for _, w in named])
    return _digest({tuple(k.key for k in path): (w.shape, w.dtype, int(total))
                    for (path, w), total in zip(named, sums)})


def source_fingerprint(source, param_dtype: str) -> str:
    """`fingerprint` of a conversion source's parameters (`convert.ParamSource`), read one at a time, as loading them
    in `param_dtype` gives them."""
    from llama_jax.convert import param_shapes

    dtype = np.dtype(jnp.dtype(param_dtype))
    entries = {}
    for path in param_shapes(source.cfg):
        w = source.read(path).astype(dtype)
        entries[path] = (w.shape, w.dtype, int(np.sum(w.astype(np.float32).view(np.uint32), dtype=np.uint32)))
    return _digest(entries)


def _digest(entries: dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype, int]]) -> str:
    digest = hashlib.sha256()
    for path in sorted(entries):
        shape, dtype, total = entries[path]
        digest.update(f"{'/'.join(path)}|{tuple(shape)}|{np.dtype(dtype).name}|{total}|".encode())
    return digest.hexdigest()[:16]


@jax.jit
def _bit_sums(arrays: list[jax.Array]) -> list[jax.Array]:
    return [jnp.sum(jax.lax.bitcast_convert_type(w.astype(jnp.float32), jnp.uint32), dtype=jnp.uint32)
            for w in arrays]


def base_source(path: str, base: dict) -> dict:
    """What a LoRA run records of its base: the exact files it read and their `fingerprint`."""
    return {"path": path, "fingerprint": fingerprint(base)}


_PUT_BACK = "put that base back, or use a merged copy written while it was there (python -m llama_jax.lora merge)"


def check_base(recorded: dict | None, loaded: dict, where: str, fix: str = _PUT_BACK) -> None:
    """Raises CheckpointError when `loaded` (a `base_source`) is not the base `recorded` says the adapters in `where`
    trained on. Checkpoints from before bases were recorded (None) are taken as they are."""
    if recorded is not None and recorded["fingerprint"] != loaded["fingerprint"]:
        raise CheckpointError(f"{where} holds LoRA adapters trained on the base {recorded['path']}, but "
                              f"{loaded['path']} holds another model now (fingerprint {loaded['fingerprint']}, the "
                              f"run's {recorded['fingerprint']}). Fix: {fix}")


def _base_of(saved) -> str:
    """The base a LoRA run's step trained on (as recorded in it: the step it pinned, else `checkpoint.init_from`),
    checked to be there."""
    from llama_jax.workdir import resolve

    base = saved.meta.get("lora_base", {}).get("path") or saved.meta["config"]["checkpoint"]["init_from"]
    if not resolve(base).exists():
        raise CheckpointError(f"{saved.step_dir} holds LoRA adapters on the base {base}, which is gone: put the base "
                              "back there, or use a merged copy written while it was there (python -m llama_jax.lora "
                              "merge)")
    return base


def restore_merged(saved, shardings: dict) -> dict:
    """A LoRA run's step (`checkpoint.SavedRun`) as a whole model's parameters, placed as `shardings` says: the base
    it trained on with the adapters merged in, and what its objective trains beside them (the reward head) where
    `shardings` has a place for it."""
    from llama_jax.checkpoint import load_pretrained
    from llama_jax.convert import open_source

    lora_cfg = _lora_section(saved.meta, saved.step_dir)
    stored = _restore_saved(saved)
    adapters = {name: stored[name] for name in target_names(lora_cfg)}
    own = {key: value for key, value in stored.items() if key not in adapters}
    model_sh = {key: where for key, where in shardings.items() if key not in own}
    base_path = _base_of(saved)
    base = load_pretrained(base_path, _with_rope_of(saved.model_config, open_source(base_path).cfg), model_sh)
    check_base(saved.meta.get("lora_base"), base_source(base_path, base), str(saved.step_dir))
    params = jax.jit(merged, static_argnums=2, out_shardings=model_sh)(base, adapters, scale(lora_cfg))
    return {**params, **{key: jax.device_put(value, shardings[key]) for key, value in own.items() if key in shardings}}


def _with_rope_of(cfg: LlamaConfig, other: LlamaConfig) -> LlamaConfig:
    """`cfg` with the RoPE settings of `other`: a LoRA run's later phase may change them (a long-context stage), and
    its base is still the same weights."""
    return cfg.replace(**{f.name: getattr(other, f.name) for f in dataclasses.fields(cfg) if f.name.startswith("rope_")})


def merged_source(run: str):
    """A LoRA run's newest checkpoint (or the step given) as a conversion source of the merged model: the base it
    was trained on (`checkpoint.init_from`, as recorded in the checkpoint) with the adapters merged in; a reward
    model's with its head (the `score` that Hugging Face's sequence classifier reads)."""
    from llama_jax.checkpoint import SavedRun
    from llama_jax.convert import ParamSource, open_source
    from llama_jax.objectives import reward

    saved = SavedRun.open(run)
    lora_cfg = _lora_section(saved.meta, saved.step_dir)
    base_path = _base_of(saved)
    base = open_source(base_path)
    recorded = saved.meta.get("lora_base")
    if recorded is not None:  # a second read of the base, so that nothing is written from another one
        read = {"path": base_path, "fingerprint": source_fingerprint(base, saved.model_config.param_dtype)}
        check_base(recorded, read, str(saved.step_dir))
    stored = _restore_saved(saved)
    paths = {TARGETS[name][0]: stored[name] for name in target_names(lora_cfg)}
    merge = jax.jit(merged_weight, static_argnums=3)

    class Merged(ParamSource):
        # the base's, with the RoPE and context length the run ended with (a later phase may change them)
        cfg = _with_rope_of(base.cfg, saved.model_config).replace(param_dtype="float32",
                                                                  max_seq_len=saved.model_config.max_seq_len)
        directory, tokenizer = base.directory, base.tokenizer
        reward_model = saved.objective == "reward"

        def read(self, path: tuple[str, ...]) -> np.ndarray:
            if self.reward_model and path == ("score",):
                return np.asarray(stored[reward.HEAD], np.float32)[None, :]
            w = base.read(path)
            if path not in paths:
                return w.astype(np.float32)
            pair = paths[path]
            return np.asarray(merge(jnp.asarray(w), jnp.asarray(pair["a"]), jnp.asarray(pair["b"]), scale(lora_cfg)))

    return Merged()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.lora", description="LoRA runs' tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="writes a LoRA run's base with its adapters merged in")
    merge.add_argument("run", help="the LoRA run's workdir, its checkpoints/ directory, or one step")
    merge.add_argument("--out", required=True, help="directory to write")
    merge.add_argument("--to", choices=("ours", "hf"), default="ours", help="our checkpoint (default) or Hugging Face")
    merge.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="default: float32")
    args = parser.parse_args(argv)
    from llama_jax.convert import convert

    try:
        check_writable(args.out, "--out", directory=True)
        convert(merged_source(args.run), args.out, args.to, dtype=args.dtype)
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (the merged model, {args.to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
