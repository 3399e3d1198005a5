"""Hugging Face Llama checkpoints in and out: `load_hf(path) -> Llama`, `save_hf(model, path, tokenizer=...)`, and
`open_checkpoint(path)`, which opens a Hugging Face directory or a llama_jax run with the files around the weights;
and the conversion CLI between Hugging Face, Meta's original layout (meta_format.py) and our runs (ours_format.py):

    python -m llama_jax.convert --from ours --to hf runs/tiny exported/
    python -m llama_jax.convert --from meta --to ours Llama-3.1-8B/original llama-8b/ --dtype bfloat16
    python -m llama_jax.convert --from hf --to meta HF_DIR meta/ --shards 8

Hugging Face stores one 2-D matrix per layer in torch's [out, in] layout; we store each kind of weight stacked
over a leading layers axis with named head axes ([L, d, n, h] for q). One table (`_weights`) describes every
tensor once, as a reshape and a transpose that saving, whole loading and sharded loading all apply, so they
cannot drift apart. RoPE is the half-split layout on both sides, so q and k need no row permutation. A reward model
is a one-label LlamaForSequenceClassification on the Hugging Face side (`score.weight` where the output projection
was), read by `load_hf_reward_model` and converted like the rest.

Loading streams. Without a mesh each stacked parameter is assembled in one host buffer from per-layer tensors
read one at a time, handed to JAX and released before the next, so host memory peaks at one stacked weight
(plus the model, on the default device). With a mesh (`load_hf(path, mesh=mesh)`) no device or host buffer
holds more than one shard of a parameter: each shard is built from the slices of the per-layer tensors it covers,
sent to its devices and released, so host memory peaks at about two shards (see `_read_sharded`), and each host
of a multi-host run reads only its own devices' shards. The model itself is built abstractly (`nnx.eval_shape`),
so no random initialisation is ever computed.

Conversion streams too, and never builds a model: a `ParamSource` gives one of our parameters at a time (whole,
stacked over layers) and each writer sends it on before asking for the next. Peak memory above the imports, in
units of the largest stacked parameter P, measured on a model of 9 P (tests/test_convert_memory.py): reading
Hugging Face files costs P plus one layer's tensor (read with one read call each, nothing mapped), Meta's the same,
ours about 2.5 P (tensorstore decodes beside the array); writing Hugging Face or Meta files costs one layer's tensor
beyond the parameter being written (a whole copy for lm_head, whose layout transposes), ours 3 to 4 P (tensorstore
copies and compresses, with a peak that varies with its threads' timing). Measured totals: hf -> ours 3.0 to 5.0 P,
ours -> meta 2.7 P, meta -> hf 1.7 P; averaging two (average.py, with its float64 sum) 4 to 5 P, once 7.9 P.

Every path may be a URL (gs://bucket/...; see workdir.py), so a run trained into a bucket is exported, averaged and
sampled from where it lies, in the same bounded memory. Tensors are read with one ranged read each (a sharded load
reads whole rows, at most one layer's tensor per read), Hugging Face files are written as a stream, our checkpoints
are read by Orbax in place, and only what needs a filesystem (Meta's files written at offsets, Orbax's partial saves,
readers of tokenizer and generation files that take local paths) goes through a local temporary directory.
"""

from __future__ import annotations

import abc
import argparse
import collections
import contextlib
import dataclasses
import functools
import json
import math
import operator
import os
import sys
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import Mesh, Sharding
from safetensors import SafetensorError, safe_open

from llama_jax import generation_config
from llama_jax.data.chat import ChatFormat
from llama_jax.data.tokenizer import HF_TOKENIZER_FILES, Tokenizer, tokenizer_files
from llama_jax.errors import CheckpointError, ConfigError, DataError, LlamaJaxError
from llama_jax.generation_config import GenerationSettings
from llama_jax.memory import check_model_fits
from llama_jax.model import Llama, LlamaConfig
from llama_jax.parallel.mesh import param_shardings
from llama_jax.workdir import check_writable, is_remote, local_copy, local_output, read_array, resolve, write_array

_ARCHITECTURE = "LlamaForCausalLM"
_CLASSIFIER = "LlamaForSequenceClassification"  # a reward model: the body and a one-label score layer
# Set in the config.json of our exported reward models, which score the last token before the end token (the one
# that reads the response's last content token), as they were trained to. The reward models of Hugging Face's tools
# (TRL, and those built with them) score the last token of the chat-templated text, the end token itself.
SCORES_BEFORE_END = "llama_jax_scores_before_end_token"
_INDEX_FILE = "model.safetensors.index.json"
# the files beside the weights that decide how text goes in and out (tokenizer framing, chat template, stop ids)
_SIDE_FILES = ("config.json", generation_config.FILE_NAME, "tokenizer_config.json", "chat_template.jinja")
_RENAMES = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "ffn_dim": "intermediate_size", "vocab_size": "vocab_size"}  # required keys, ours -> config.json


@dataclasses.dataclass(frozen=True)
class _Weight:
    """One parameter of `Llama` and the Hugging Face tensor it corresponds to (one per layer when stacked).

    The correspondence is a reshape and a transpose, kept as data rather than code so that it maps any block of
    our parameter to the HF rows and columns holding it (`read_block`), not only whole tensors: the HF tensor's
    dimensions are unflattened into `hf_axes` (q's rows are heads x head_dim), which `perm` puts in our order.
    """

    path: tuple[str, ...]  # attribute path inside Llama
    hf_name: str  # "{i}" stands for the layer index of a stacked parameter
    hf_axes: tuple[tuple[int, ...], ...]  # per HF dimension, the sizes of the axes flattened into it
    perm: tuple[int, ...]  # ours = hf.reshape(unflattened axes).transpose(perm) for one layer

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf_name

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return tuple(math.prod(sizes) for sizes in self.hf_axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """Our parameter's shape for one layer."""
        sizes = [size for sizes in self.hf_axes for size in sizes]
        return tuple(sizes[axis] for axis in self.perm)

    def to_ours(self, w: np.ndarray) -> np.ndarray:
        return w.reshape([size for sizes in self.hf_axes for size in sizes]).transpose(self.perm)

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        return w.transpose(np.argsort(self.perm)).reshape(self.hf_shape)

    def read_block(self, tensor, block: Sequence[range]) -> np.ndarray:
        """Our (one-layer) parameter's `block` (a range per axis) from `tensor`, a safetensors slice, reading only
        the HF rows and columns it needs. A flattened HF dimension is read from the block's first to its last row,
        which are exactly its rows unless a minor axis such as head_dim is split."""
        unflattened = [block[axis] for axis in np.argsort(self.perm)]
        rows, first = [], 0
        for sizes in self.hf_axes:  # the HF indices, in order, of the block along each HF dimension
            ranges = unflattened[first:first + len(sizes)]
            rows.append(np.ravel_multi_index(np.ix_(*ranges), sizes).ravel())
            first += len(sizes)
        hf_block = tensor[tuple(slice(int(r[0]), int(r[-1]) + 1) for r in rows)]
        if any(len(r) < r[-1] - r[0] + 1 for r in rows):
            hf_block = hf_block[np.ix_(*(r - r[0] for r in rows))]
        return hf_block.reshape([len(r) for r in unflattened]).transpose(self.perm)


def _weights(cfg: LlamaConfig, *, score: bool = False) -> list[_Weight]:
    """The whole correspondence between our parameters and a Hugging Face LlamaForCausalLM state dict; with `score`,
    a LlamaForSequenceClassification's (a reward model: `score.weight` [1, dim] in place of the output projection,
    read from our path ("score",), which a reward source gives as [1, dim])."""
    d, n, k, h, f, v = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.ffn_dim, cfg.vocab_size
    layer = "model.layers.{i}."

    def head_proj(path: tuple[str, ...], name: str, heads: int) -> _Weight:
        """q/k/v: HF [heads * h, d] <-> ours [d, heads, h]."""
        return _Weight(path, name, ((heads, h), (d,)), (2, 0, 1))

    def matrix(path: tuple[str, ...], name: str, out_dim: int, in_dim: int) -> _Weight:
        """A plain linear layer: HF [out, in] is the transpose of ours [in, out]."""
        return _Weight(path, name, ((out_dim,), (in_dim,)), (1, 0))

    def same(path: tuple[str, ...], name: str, *shape: int) -> _Weight:
        return _Weight(path, name, tuple((size,) for size in shape), tuple(range(len(shape))))

    weights = [
        same(("embed",), "model.embed_tokens.weight", v, d),
        head_proj(("layers", "attn", "wq"), layer + "self_attn.q_proj.weight", n),
        head_proj(("layers", "attn", "wk"), layer + "self_attn.k_proj.weight", k),
        head_proj(("layers", "attn", "wv"), layer + "self_attn.v_proj.weight", k),
        # o: HF [d, n * h] <-> ours [n, h, d]
        _Weight(("layers", "attn", "wo"), layer + "self_attn.o_proj.weight", ((d,), (n, h)), (1, 2, 0)),
        matrix(("layers", "mlp", "w_gate"), layer + "mlp.gate_proj.weight", f, d),
        matrix(("layers", "mlp", "w_up"), layer + "mlp.up_proj.weight", f, d),
        matrix(("layers", "mlp", "w_down"), layer + "mlp.down_proj.weight", d, f),
        same(("layers", "attn_norm", "scale"), layer + "input_layernorm.weight", d),
        same(("layers", "mlp_norm", "scale"), layer + "post_attention_layernorm.weight", d),
        same(("norm", "scale"), "model.norm.weight", d),
    ]
    if score:
        weights.append(same(("score",), "score.weight", 1, d))
    elif not cfg.tie_embeddings:  # a tied model reads its output projection from embed_tokens
        weights.append(matrix(("lm_head",), "lm_head.weight", v, d))
    return weights


def _param(model: Llama, path: tuple[str, ...]) -> nnx.Param:
    node = model
    for name in path:
        node = getattr(node, name)
    return node


# ---------------------------------------------------------------------------------------------- config.json


def config_from_hf(hf: dict, **overrides) -> LlamaConfig:
    """Our `LlamaConfig` from a Hugging Face config.json dict (transformers 4.x or 5.x style)."""
    _check_architecture(hf)
    quantization = hf.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method", "unnamed") if isinstance(quantization, dict) else "unnamed"
        raise CheckpointError(f"config.json has a quantization_config ({method}): its weights are stored quantized, "
                              "which llama_jax does not read; use the model's unquantized release (float32, bfloat16 "
                              "or float16 weights)")
    missing = [key for key in _RENAMES.values() if key not in hf]
    if missing:
        raise CheckpointError(f"config.json lacks {missing}: it is not a complete Llama config; re-download it")
    unsupported = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False}
    for key, supported in unsupported.items():
        if hf.get(key, supported) != supported:
            raise CheckpointError(f"config.json sets {key}={hf[key]!r}; load_hf supports only {supported!r}")
    fields = {ours: hf[theirs] for ours, theirs in _RENAMES.items()}
    fields.update(
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim") or 0,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **_rope_from_hf(hf),
    )
    try:
        cfg = LlamaConfig(**fields)
    except ConfigError as e:
        raise CheckpointError(f"config.json describes a model llama_jax cannot build: {e}") from None
    known = {field.name for field in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(f"unknown model overrides {unknown}: use fields of LlamaConfig ({sorted(known)})")
    return cfg.replace(**overrides)


def _check_architecture(hf: dict) -> None:
    architectures = hf.get("architectures") or [_ARCHITECTURE]
    model_type = hf.get("model_type", "llama")
    known = {_ARCHITECTURE, _CLASSIFIER} & set(architectures)
    if not known or model_type != "llama":
        found = architectures[0] if not known else f"model_type {model_type!r}"
        raise CheckpointError(f"unsupported architecture {found}: llama_jax reads {_ARCHITECTURE} checkpoints and "
                              f"{_CLASSIFIER} reward models")


def is_reward_classifier(hf: dict) -> bool:
    """Whether a config.json dict is a reward model (a one-label LlamaForSequenceClassification)."""
    if _CLASSIFIER not in (hf.get("architectures") or []):
        return False
    labels = len(hf.get("id2label") or {}) or hf.get("num_labels", 2)  # transformers' default: two labels
    if labels != 1:
        raise CheckpointError(f"this {_CLASSIFIER} has {labels} labels: llama_jax reads one-label classifiers, "
                              "reward models, whose one logit is the score")
    return True


def _rope_from_hf(hf: dict) -> dict:
    """RoPE settings from 5.x `rope_parameters`, or 4.x `rope_theta` + `rope_scaling` (legacy key "type")."""
    rope = {"rope_theta": hf.get("rope_theta", 10000.0), **(hf.get("rope_parameters") or hf.get("rope_scaling") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        return {"rope_type": "default", "rope_theta": float(rope["rope_theta"])}
    if rope_type != "llama3":
        raise CheckpointError(f"unsupported rope_type {rope_type!r} in config.json: llama_jax implements default and llama3")
    try:
        return {
            "rope_type": "llama3",
            "rope_theta": float(rope["rope_theta"]),
            "rope_factor": float(rope["factor"]),
            "rope_low_freq_factor": float(rope["low_freq_factor"]),
            "rope_high_freq_factor": float(rope["high_freq_factor"]),
            "rope_original_max_len": int(rope["original_max_position_embeddings"]),
        }
    except KeyError as e:
        raise CheckpointError(f"config.json's llama3 RoPE settings lack {e}: add it (see the model's published config)") from None


def config_to_hf(cfg: LlamaConfig, dtype: str) -> dict:
    """A transformers 5.x config.json dict, which 4.x also reads (it takes rope_theta / rope_scaling)."""
    rope = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "llama3":
        rope.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                    high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_len)
    scaling = {key: value for key, value in rope.items() if key != "rope_theta"}
    return {
        "architectures": [_ARCHITECTURE],
        "model_type": "llama",
        **{theirs: getattr(cfg, ours) for ours, theirs in _RENAMES.items()},
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": cfg.norm_eps,
        "max_position_embeddings": cfg.max_seq_len,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_parameters": rope,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling if cfg.rope_type != "default" else None,
        "dtype": dtype,
    }


# -------------------------------------------------------------------------------------------------- loading


def load_hf(path: str | os.PathLike, dtype: str = "float32", *, mesh: Mesh | None = None, **model_overrides) -> Llama:
    """Loads a Hugging Face LlamaForCausalLM directory (config.json + safetensors, single file or sharded).

    `dtype` is the parameter dtype and, unless `model_overrides` sets `dtype`, the compute dtype too, so
    `load_hf(p, "bfloat16")` runs in bf16 end to end. Other overrides (e.g. `attention="reference"`) replace
    fields of the LlamaConfig read from config.json. Without `mesh` the parameters land on the default device;
    with one, each is read straight into its shards as `parallel.mesh.param_shardings` places it, so a model
    larger than one device (or than host memory) loads.
    """
    path = resolve(path)
    cfg = read_hf_config(path, **{"dtype": dtype, "param_dtype": dtype, **model_overrides})
    check_model_fits(cfg, mesh)
    model = _abstract_model(cfg)
    _fill(model, path, param_shardings(nnx.state(model), mesh) if mesh is not None else None)
    return model


def read_hf_config(path: str | os.PathLike, **overrides) -> LlamaConfig:
    """The `LlamaConfig` of a Hugging Face language model's config.json, with fields overridden. A reward model is
    refused: what reads this generates or trains from the output projection, which a classifier has none of."""
    path = resolve(path)
    hf = _read_hf_json(path)
    if is_reward_classifier(hf):
        raise CheckpointError(f"{path} is a reward model ({_CLASSIFIER}): it scores responses and has no "
                              f"language-model head; score with it (rejection_sample --reward {path}), or use the "
                              "language model it was trained from")
    return config_from_hf(hf, **overrides)


def _read_hf_json(path: epath.Path) -> dict:
    """A Hugging Face directory's config.json."""
    if not path.is_dir():
        raise CheckpointError(f"Hugging Face checkpoint directory {path} does not exist: pass the directory holding config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json: pass a Hugging Face model directory (save_pretrained output)")
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_file} is not valid JSON ({e}): re-download or re-save the checkpoint") from None
    return hf


def load_hf_reward_model(path: str | os.PathLike, *, mesh: Mesh | None = None
                         ) -> tuple[Llama, np.ndarray, bool]:
    """(model, head [dim] float32, whether it scores the end token) of a Hugging Face reward model, float32. The
    model's output projection, which a classifier lacks and a reward model never uses, is zeros when untied. The
    third value is False for our own exports (`SCORES_BEFORE_END`), True for any other."""
    path = resolve(path)
    hf = _read_hf_json(path)
    if not is_reward_classifier(hf):
        raise CheckpointError(f"{path} is a language model, not a reward model ({_CLASSIFIER} with one label): "
                              "train one with objective.name='reward' (configs/reward_tiny.py)")
    cfg = config_from_hf(hf, dtype="float32", param_dtype="float32")  # as load_hf's default
    check_model_fits(cfg, mesh)
    model = _abstract_model(cfg)
    head = _fill(model, path, param_shardings(nnx.state(model), mesh) if mesh is not None else None, score=True)
    return model, head, not hf.get(SCORES_BEFORE_END, False)


def load_hf_params(path: str | os.PathLike, cfg: LlamaConfig, *, shardings: dict | None = None) -> dict:
    """The parameters (a plain dict, as the trainer keeps them) of a Hugging Face checkpoint, as model config `cfg`
    (whose architecture `checkpoint.load_pretrained` has checked against it) holds them. With `shardings` (a dict of
    `jax.sharding.Sharding` matching the parameters, e.g. the train state's) each parameter is read straight into
    its shards; without, all land on the default device."""
    model = _abstract_model(cfg)
    _fill(model, resolve(path), shardings)
    return nnx.to_pure_dict(nnx.state(model))


def _abstract_model(cfg: LlamaConfig) -> Llama:
    with jax.set_mesh(None):  # shapes only: where the tensors go is `_fill`'s decision, not an ambient mesh's
        return nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))


def _fill(model: Llama, path: epath.Path, shardings: dict | None, *, score: bool = False) -> np.ndarray | None:
    """Sets every parameter of the abstract `model` from the safetensors in `path`, placed as `shardings` (a dict
    matching the parameters) says, or whole on the default device when it is None. With `score` (a reward
    classifier) an untied output projection is zeros, and the score layer's row is returned, float32."""
    dtype = jnp.dtype(model.cfg.param_dtype)
    head = None
    with _open_safetensors(path) as tensors:
        shapes = {name: tuple(handle.get_slice(name).get_shape()) for name, handle in tensors.items()}
        for weight in _weights(model.cfg, score=score):
            names = _tensor_names(shapes, weight, model.cfg.n_layers, path)
            _check_stored_dtype(tensors, names, path)
            read = functools.partial(_read_block, tensors, weight, names, dtype)
            if weight.path == ("score",):
                head = read((range(1), range(model.cfg.dim)))[0].astype(np.float32)
                continue
            param = _param(model, weight.path)
            if shardings is None:
                param.set_value(jnp.asarray(read(tuple(range(size) for size in param.shape))))
            else:
                sharding = functools.reduce(operator.getitem, weight.path, shardings)
                param.set_value(_read_sharded(read, param.shape, sharding))
    if score and not model.cfg.tie_embeddings:
        param = _param(model, ("lm_head",))
        zeros = functools.partial(jnp.zeros, param.shape, dtype)
        param.set_value(zeros() if shardings is None else jax.jit(zeros, out_shardings=shardings["lm_head"])())
    return head


@contextlib.contextmanager
def _open_safetensors(path: epath.Path) -> Iterator[dict[str, object]]:
    """{tensor name: open safetensors file} over every *.safetensors file in `path`; reads only the headers. The files
    of a bucket are read by ranges of rows instead (`_SafetensorsFiles.get_slice`), as safetensors maps local files."""
    if is_remote(path):
        files = _SafetensorsFiles(path)
        yield dict.fromkeys(files.shapes, files)
        return
    with contextlib.ExitStack() as stack:
        handles = []
        for file in _safetensors_files(path):
            try:
                handles.append(stack.enter_context(safe_open(file, framework="numpy")))
            except SafetensorError as e:  # a download cut short: its header names bytes the file lacks
                raise CheckpointError(f"{file} is damaged or incomplete ({e}): re-download it") from None
        yield {name: handle for handle in handles for name in handle.keys()}


def _safetensors_files(path: epath.Path) -> list[epath.Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} holds no *.safetensors files: save the model with safe_serialization (the default)")
    return files


def _tensor_names(shapes: dict[str, tuple[int, ...]], weight: _Weight, n_layers: int, path: epath.Path) -> list[str]:
    """The HF tensors of `weight` (one per layer when stacked), checked to exist in `shapes` (name: shape) with the
    shape config.json implies."""
    names = [weight.hf_name.format(i=i) for i in range(n_layers)] if weight.stacked else [weight.hf_name]
    for name in names:
        if name not in shapes:
            raise CheckpointError(f"{path} has no tensor {name!r}: the checkpoint is incomplete or does not match config.json")
        got = shapes[name]
        if got != weight.hf_shape:
            raise CheckpointError(
                f"tensor {name!r} in {path} has shape {got}, but config.json implies {weight.hf_shape}: "
                "the weights and config.json come from different models"
            )
    return names


def _check_stored_dtype(tensors: dict, names: list[str], path: epath.Path) -> None:
    """Integer or 8-bit float tensors are quantized weights, which would be cast to floats as they are, unscaled."""
    for name in names:
        code = tensors[name].get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES.values():
            raise CheckpointError(f"{path} stores {name} as {code}, quantized: llama_jax reads float32, bfloat16 and "
                                  "float16 weights; use the model's unquantized release")


def _read_block(tensors: dict, weight: _Weight, names: list[str], dtype: np.dtype,
                block: tuple[range, ...]) -> np.ndarray:
    """The `block` (a range per axis) of our parameter `weight`, in a host buffer of that size filled one layer at
    a time from the part of each per-layer HF tensor that it covers."""
    out = np.empty([len(r) for r in block], dtype)
    if not weight.stacked:
        out[...] = weight.read_block(tensors[names[0]].get_slice(names[0]), block)
        return out
    for k, layer in enumerate(block[0]):
        out[k] = weight.read_block(tensors[names[layer]].get_slice(names[layer]), block[1:])
    return out


def _read_sharded(read: Callable[[tuple[range, ...]], np.ndarray], shape: tuple[int, ...],
                  sharding: Sharding) -> jax.Array:
    """A parameter placed as `sharding` says, built one distinct shard at a time: `read(block)` reads a shard,
    which is copied to every local device holding it and released before the next one is read.

    Peak host memory is one shard in the parameter dtype plus the part of one HF tensor that it covers, as stored
    in the file (one layer's slice for a stacked weight, the whole shard for embed / lm_head): about two shards.
    Each host reads only the shards of its own devices. (`jax.make_array_from_callback` would do this bookkeeping,
    but it keeps every shard it has read in host memory until all are read: the whole tensor, or more when shards
    are replicated.)
    """
    index_map = sharding.addressable_devices_indices_map(shape)
    holders = collections.defaultdict(list)
    for device, index in index_map.items():
        holders[tuple(range(size)[s] for size, s in zip(shape, index))].append(device)
    on_device = {}
    for block, devices in holders.items():
        host = read(block)
        copies = jax.block_until_ready([jax.device_put(host, device) for device in devices])  # then `host` may go
        on_device.update(zip(devices, copies))
    return jax.make_array_from_single_device_arrays(shape, sharding, [on_device[device] for device in index_map])


# --------------------------------------------------------------------------------------------------- saving


def save_hf(
    model: Llama,
    path: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    generation: GenerationSettings | None = None,
    chat_template: str | None = None,
    dtype: str | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> None:
    """Writes `model` as a Hugging Face directory that `transformers` opens and serves as it stands.

    With `tokenizer` the directory is complete: config.json, generation_config.json (`generation`, by default the
    tokenizer's stop ids and greedy decoding), the safetensors, and the tokenizer files with `chat_template` (by
    default the tokenizer's built-in chat format, when it has one). Without it only config.json and the weights are
    written, and a warning says so. Tensors are stored in `dtype` (default: the model's parameter dtype), split
    into shards of at most `max_shard_bytes` with a `model.safetensors.index.json` when they do not fit in one.
    Tensors are written one at a time, so host memory stays near one stacked parameter. Earlier model*.safetensors
    files in `path` are removed, since transformers would read a stale single file in preference to a new index.
    """
    path = resolve(path)
    generation = None if tokenizer is None else generation or GenerationSettings.for_tokenizer(tokenizer)
    _save_weights(model.cfg, lambda param_path: np.asarray(_param(model, param_path)[...]), path, dtype, max_shard_bytes,
                  token_ids={} if generation is None else generation.token_ids())
    if generation is None:
        warnings.warn(f"save_hf wrote no tokenizer files to {path}: pass tokenizer= for a directory that "
                      "AutoTokenizer can open", stacklevel=2)
        return
    if chat_template is None:
        chat_template = ChatFormat.builtin_template(tokenizer)
    _save_tokenizer(path, tokenizer, generation, chat_template)


def _save_tokenizer(path: epath.Path, tokenizer: Tokenizer, generation: GenerationSettings,
                    chat_template: str | None) -> None:
    (path / generation_config.FILE_NAME).write_text(json.dumps(generation.to_hf(), indent=2) + "\n")
    if not is_remote(path):
        tokenizer.save_hf(path, chat_template=chat_template)
        return
    for stale in HF_TOKENIZER_FILES:  # what save_hf removes from a local directory before writing
        (path / stale).unlink(missing_ok=True)
    with local_output(path) as local:
        tokenizer.save_hf(local, chat_template=chat_template)


def hf_tensors(cfg: LlamaConfig, read: Callable[[tuple[str, ...]], np.ndarray], *, score: bool = False
               ) -> Iterator[tuple[_Weight, int | None, np.ndarray]]:
    """(weight, layer or None, tensor in Hugging Face's layout) for every HF tensor of the model, weight by weight,
    from `read(path)`, which gives one of our parameters whole. Only one parameter is held at a time."""
    for weight in _weights(cfg, score=score):
        value = read(weight.path)
        for i in range(cfg.n_layers) if weight.stacked else [None]:
            yield weight, i, weight.to_hf(value if i is None else value[i])
        del value  # before the next read, or two parameters would be held at once


def _save_weights(cfg: LlamaConfig, read: Callable[[tuple[str, ...]], np.ndarray], path: epath.Path,
                  dtype: str | None, max_shard_bytes: int, *, token_ids: dict, classifier: dict | None = None) -> None:
    """The safetensors and config.json, which states `token_ids` (`GenerationSettings.token_ids`); `classifier`
    (config.json entries of a LlamaForSequenceClassification) writes a reward model's score layer instead of the
    output projection."""
    np_dtype = jnp.dtype(dtype or cfg.param_dtype)
    path.mkdir(parents=True, exist_ok=True)
    for stale in [*path.glob("model*.safetensors"), path / _INDEX_FILE]:
        stale.unlink(missing_ok=True)

    score = classifier is not None
    entries = [(weight, i) for weight in _weights(cfg, score=score)
               for i in (range(cfg.n_layers) if weight.stacked else [None])]
    shards = _plan_shards(entries, np_dtype.itemsize, max_shard_bytes)
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))
    ]
    tensors = hf_tensors(cfg, read, score=score)
    weight_map = {}
    for name, shard in zip(names, shards):
        specs = [(weight.hf_name.format(i=i), weight.hf_shape) for weight, i in shard]
        _write_safetensors(path / name, specs, np_dtype, (next(tensors)[2] for _ in shard))
        weight_map.update(dict.fromkeys((tensor_name for tensor_name, _ in specs), name))
    if len(shards) > 1:
        total = sum(np.prod(weight.hf_shape) * np_dtype.itemsize for weight, _ in entries)
        index = {"metadata": {"total_size": int(total)}, "weight_map": weight_map}
        (path / _INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    config = {**config_to_hf(cfg, np_dtype.name), **token_ids, **(classifier or {})}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")


_SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _write_safetensors(file: epath.Path, specs: list[tuple[str, tuple[int, ...]]], dtype: np.dtype,
                       values: Iterator[np.ndarray]) -> None:
    """A safetensors file of the tensors `specs` names, written as `values` yields them, one at a time.

    The format is an 8-byte header length, a JSON header of names, dtypes, shapes and byte ranges, and the raw
    tensors in order; knowing every shape up front, the header goes first and no tensor waits for another (the
    safetensors library's `save_file` needs all of a file's tensors in memory at once). Being written in order, the
    file streams to a bucket as well as to a disk.
    """
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype.name], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as the format asks
    with file.open("wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for value in values:
            write_array(f, np.ascontiguousarray(value, dtype))
            del value  # it may be a view of a whole parameter, which must go before the next one is read


def _plan_shards(entries: list, itemsize: int, max_shard_bytes: int) -> list[list]:
    """Greedy split of (weight, layer) entries, in order, into shards of at most `max_shard_bytes` each.

    A single tensor larger than the limit gets a shard of its own (as transformers does).
    """
    shards, size = [[]], 0
    for weight, i in entries:
        nbytes = int(np.prod(weight.hf_shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((weight, i))
        size += nbytes
    return shards


# -------------------------------------------------------------------------------------- opening and the CLI


@dataclasses.dataclass
class OpenedCheckpoint:
    """A model with what decides how text goes in and out of it."""

    model: Llama
    tokenizer: Tokenizer
    generation: GenerationSettings
    files: Path  # a local directory holding its tokenizer and chat-template files (a copy, for a remote checkpoint)

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template these files define (or the tokenizer's built-in one), None if there is none."""
        return ChatFormat.template_in(self.files, self.tokenizer)


def open_checkpoint(checkpoint: str | os.PathLike, *, mesh: Mesh | None = None) -> OpenedCheckpoint:
    """A Hugging Face directory (it has config.json) or, for any other path, a llama_jax workdir or checkpoint;
    with `mesh`, its parameters are read straight into their shards on that mesh. Either may be a URL (gs://...):
    the weights are read from it directly, and its small side files are copied to a local directory that lives as
    long as the returned object."""
    path = resolve(checkpoint)
    if (path / "config.json").is_file():
        tokenizer = Tokenizer.from_file(path)
        model, directory = load_hf(path, mesh=mesh), path
    elif not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist: pass a Hugging Face directory or a llama_jax workdir"
                              + (" (for a bucket, check the path with gsutil ls)" if is_remote(path) else ""))
    else:
        from llama_jax.checkpoint import load_model  # imported here: it pulls in Orbax, which HF loading never needs

        model, tokenizer_path = load_model(path, mesh=mesh)
        tokenizer, directory = Tokenizer.from_file(tokenizer_path), epath.Path(tokenizer_path).parent
    copy = contextlib.ExitStack()
    files = copy.enter_context(local_copy(directory, _side_files(directory)))
    opened = OpenedCheckpoint(model, tokenizer, GenerationSettings.from_directory(files, tokenizer), files)
    weakref.finalize(opened, copy.close)  # a remote checkpoint's local copy goes with the object
    return opened


# ------------------------------------------------------------------------------- conversion, one tensor at a time


class ParamSource(abc.ABC):
    """A checkpoint opened for conversion: its model config, its parameters one at a time, and the files beside them.

    Converting through whole models would hold every parameter at once; a source gives one of our parameters at a
    time (whole, stacked over layers, as training keeps it), so a conversion holds at most one plus what the two
    formats' own I/O needs. `cfg.param_dtype` is the dtype the parameters are stored in.
    """

    cfg: LlamaConfig
    directory: epath.Path  # holds the tokenizer, generation_config.json and chat-template files
    tokenizer: epath.Path | None  # the tokenizer file; None when the checkpoint has none
    reward_model: bool = False  # a reward model: read(("score",)) gives its head as [1, dim]
    scores_end_token: bool = False  # a reward model trained to score the end token (a Hugging Face one, not ours)

    @abc.abstractmethod
    def read(self, path: tuple[str, ...]) -> np.ndarray:
        """Our parameter at attribute `path` (e.g. ("layers", "attn", "wq")), whole, in its stored dtype."""


def param_shapes(cfg: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{attribute path: shape} of every parameter of a model with config `cfg`."""
    return {weight.path: (cfg.n_layers, *weight.shape) if weight.stacked else weight.shape for weight in _weights(cfg)}


class _SafetensorsFiles:
    """Where each tensor of a directory's *.safetensors files lies, from their headers (8 bytes of length, then
    JSON), so that a tensor is read with one read call (one ranged read from a bucket). Nothing is mapped:
    safetensors' own reader maps whole files, and the pages a read touches stay resident while the file is open, so
    a conversion would come to hold the model."""

    def __init__(self, path: epath.Path):
        self._where = {}  # name: (file, dtype code, shape, byte offset)
        for file in _safetensors_files(path):
            try:
                with file.open("rb") as f:
                    length = f.seek(0, os.SEEK_END)
                    f.seek(0)
                    size = int.from_bytes(f.read(8), "little")
                    if 8 + size > length:
                        raise CheckpointError(
                            f"{file} is not a safetensors file: its first 8 bytes give a header of {size:,} bytes, "
                            f"the file has {length:,} (a git-lfs pointer, or a web page saved in its place): "
                            "re-download it")
                    header = json.loads(f.read(size))
            except ValueError as e:
                raise CheckpointError(f"{file} has no readable safetensors header ({e}): re-download it") from None
            needed = 8 + size + max((info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"),
                                    default=0)
            if length < needed:  # a download cut short
                raise CheckpointError(f"{file} is incomplete: its header describes {needed:,} bytes, the file has "
                                      f"{length:,}: re-download it")
            for name, info in header.items():
                if name != "__metadata__":
                    self._where[name] = (file, info["dtype"], tuple(info["shape"]), 8 + size + info["data_offsets"][0])
        self.shapes = {name: where[2] for name, where in self._where.items()}

    def dtype_code(self, name: str) -> str:
        """The safetensors code of the tensor's stored dtype ("BF16", "I8", ...)."""
        return self._where[name][1]

    def dtype(self, name: str) -> np.dtype:
        file, code = self._where[name][:2]
        dtypes = {code: name for name, code in _SAFETENSORS_DTYPES.items()}
        if code not in dtypes:
            raise CheckpointError(f"{file} stores {name} as {code}: conversion reads float32, bfloat16 and float16")
        return jnp.dtype(dtypes[code])

    def read(self, name: str) -> np.ndarray:
        file, _, shape, offset = self._where[name]
        return read_array(file, self.dtype(name), math.prod(shape), offset).reshape(shape)

    def get_slice(self, name: str) -> _TensorRows:
        """What `safe_open(...).get_slice(name)` gives, for `_fill` to read the files of a bucket."""
        return _TensorRows(self, name)


@dataclasses.dataclass(frozen=True)
class _TensorRows:
    """One tensor of `_SafetensorsFiles`, indexed as safetensors' slices are (a slice per dimension) and read by
    whole rows: the rows a block covers are contiguous in the file, so a block costs one ranged read of at most the
    whole tensor (when it splits the columns), never more."""

    files: _SafetensorsFiles
    name: str

    def get_shape(self) -> list[int]:
        return list(self.files.shapes[self.name])

    def get_dtype(self) -> str:
        return self.files.dtype_code(self.name)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        file, _, shape, offset = self.files._where[self.name]
        rows, rest = range(shape[0])[index[0]], index[1:]
        dtype, row_items = self.files.dtype(self.name), math.prod(shape[1:])
        block = read_array(file, dtype, len(rows) * row_items, offset + rows.start * row_items * dtype.itemsize)
        return block.reshape(len(rows), *shape[1:])[(slice(None), *rest)]


class _HFSource(ParamSource):
    def __init__(self, path: epath.Path):
        hf = _read_hf_json(path)
        cfg = config_from_hf(hf)
        self.reward_model = is_reward_classifier(hf)
        self.scores_end_token = self.reward_model and not hf.get(SCORES_BEFORE_END, False)
        self._files = _SafetensorsFiles(path)
        embed = _tensor_names(self._files.shapes, _weights(cfg)[0], cfg.n_layers, path)[0]  # model.embed_tokens.weight
        dtype = self._files.dtype(embed).name
        self.cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
        self.directory, self.tokenizer = path, _tokenizer_in(path)
        self._weights = {weight.path: weight for weight in _weights(self.cfg, score=self.reward_model)}

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        dtype = jnp.dtype(self.cfg.param_dtype)
        if self.reward_model and path == ("lm_head",):  # an untied classifier has no output projection
            return np.zeros(param_shapes(self.cfg)[path], dtype)
        weight = self._weights[path]
        names = _tensor_names(self._files.shapes, weight, self.cfg.n_layers, self.directory)
        if not weight.stacked:
            return weight.to_ours(self._files.read(names[0])).astype(dtype, copy=False)
        out = np.empty(param_shapes(self.cfg)[path], dtype)
        for i, name in enumerate(names):
            out[i] = weight.to_ours(self._files.read(name))
        return out


def _tokenizer_in(directory: epath.Path) -> epath.Path | None:
    try:
        return tokenizer_files(directory)[0]
    except DataError:
        return None


def _side_files(directory: epath.Path) -> list[str]:
    """The names (relative to `directory`) of the files beside a checkpoint's weights that its readers of tokenizer,
    chat template and generation settings look at, for `local_copy` to bring down from a bucket."""
    tokenizer = _tokenizer_in(directory)
    relative = [os.path.relpath(os.fspath(tokenizer), os.fspath(directory))] if tokenizer else []
    return [*relative, *_SIDE_FILES]


FORMATS = {"hf": "a Hugging Face directory (config.json)", "meta": "a Meta checkpoint (params.json, consolidated.NN.pth)",
           "ours": "a llama_jax workdir or checkpoint step"}


def detect_format(path: epath.Path) -> str | None:
    """Which of FORMATS the checkpoint at `path` is, judged by its files alone; None when it is none of them."""
    if not path.exists():
        where = " (for a bucket, check the path with gsutil ls)" if is_remote(path) else ""
        raise CheckpointError(f"checkpoint {path} does not exist{where}: pass {' or '.join(FORMATS.values())}")
    if (path / "config.json").is_file():
        return "hf"
    if (path / "params.json").is_file() or any(path.glob("consolidated.*.pth")):
        return "meta"
    from llama_jax.checkpoint import find_step_dir  # imported here: it pulls in Orbax, which HF files never need

    try:
        find_step_dir(path)
    except CheckpointError:
        return None
    return "ours"


def open_source(path: str | os.PathLike, kind: str | None = None) -> ParamSource:
    """The checkpoint at `path` as a `ParamSource`; `kind` (one of FORMATS) is checked against its files, and
    found from them when None."""
    path = resolve(path)
    found = detect_format(path)
    if kind is not None and found not in (None, kind):
        raise CheckpointError(f"{path} is {FORMATS[found]}, not {FORMATS[kind]}: pass --from {found}")
    kind = kind or found
    if kind == "hf":
        return _HFSource(path)
    if kind == "meta":
        from llama_jax.meta_format import MetaSource

        return MetaSource(path)
    if kind == "ours":
        from llama_jax import lora
        from llama_jax.checkpoint import SavedRun
        from llama_jax.ours_format import OursSource

        return lora.merged_source(path) if SavedRun.open(path).is_lora else OursSource(path)
    raise CheckpointError(f"{path} holds no checkpoint: pass {' or '.join(FORMATS.values())}")


def write_hf(source: ParamSource, out: str | os.PathLike, dtype: str | None = None,
             max_shard_bytes: int = 5 * 2**30) -> None:
    """`source` as a complete Hugging Face directory (as `save_hf` writes one), one tensor at a time; `out` may be a
    URL, to which the weights stream without a local copy. A reward model is written as a
    LlamaForSequenceClassification with one label, its pad token set so that transformers scores the last token that
    is not padding: the position our reward model reads."""
    out = resolve(out)
    tokenizer = None if source.tokenizer is None else Tokenizer.from_file(source.tokenizer)
    classifier = None
    if source.reward_model:
        classifier = {"architectures": [_CLASSIFIER], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                      "pad_token_id": None if tokenizer is None else tokenizer.pad_id,
                      **({} if source.scores_end_token else {SCORES_BEFORE_END: True})}
    settings = template = None
    if tokenizer is not None:
        with local_copy(source.directory, _SIDE_FILES) as files:  # the readers below take local directories
            settings = GenerationSettings.from_directory(files, tokenizer)
            template = ChatFormat.template_in(files, tokenizer)
    _save_weights(source.cfg, source.read, out, dtype, max_shard_bytes,
                  token_ids={} if settings is None else settings.token_ids(), classifier=classifier)
    if settings is None:
        warnings.warn(f"{source.directory} has no tokenizer, so {out} has none: copy tokenizer.json or "
                      "tokenizer.model into it for a directory that AutoTokenizer can open", stacklevel=2)
        return
    _save_tokenizer(out, tokenizer, settings, template)


def copy_tokenizer_files(source: ParamSource, out: Path | epath.Path) -> list[str]:
    """Copies the source's tokenizer files and its generation settings (`generation_config.file_for_copy`) into
    `out`; returns their names. Either side may be remote: the files are small, and read and written whole."""
    if source.tokenizer is None:
        return []
    files = tokenizer_files(source.tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    for file in files:
        (out / file.name).write_bytes(file.read_bytes())
    generation = generation_config.file_for_copy(source.directory)
    if generation is not None:
        (out / generation_config.FILE_NAME).write_bytes(generation)
    return [file.name for file in files] + ([generation_config.FILE_NAME] if generation is not None else [])


def _check_side_files(source: ParamSource) -> None:
    """Reads the source's tokenizer, generation settings and chat template as their users will, before the weights
    are converted: a damaged one was copied as it was (or, to Hugging Face, failed after the weights were written)
    and failed only where the converted checkpoint was used."""
    if source.tokenizer is None:
        return
    tokenizer = Tokenizer.from_file(source.tokenizer)
    with local_copy(source.directory, _SIDE_FILES) as files:
        GenerationSettings.from_directory(files, tokenizer)
        ChatFormat.template_in(files, tokenizer)


def convert(source: ParamSource, out: str | os.PathLike, to: str, *, dtype: str | None = None,
            shards: int = 1) -> None:
    """Writes `source` to `out` (a local path or a URL) in format `to` (one of FORMATS), tensors in `dtype` (default:
    as stored); `shards` is the number of model-parallel ranks of a Meta checkpoint."""
    if shards != 1 and to != "meta":
        raise ConfigError(f"--shards {shards} applies only to --to meta: drop it")
    if resolve(out) == resolve(source.directory):  # a LoRA run's source reads its base: writing there deleted it
        raise CheckpointError(f"{out} holds the checkpoint being read ({source.directory}): choose another output "
                              "directory")
    if source.reward_model and to == "meta":
        raise ConfigError(f"{source.directory} is a reward model, whose score head has no place in {FORMATS[to]}: "
                          "convert it with --to hf (a LlamaForSequenceClassification)"
                          + ("" if source.scores_end_token else " or --to ours"))
    _check_side_files(source)
    if to == "hf":
        write_hf(source, out, dtype)
    elif to == "meta":
        from llama_jax.meta_format import write_meta

        write_meta(source, out, dtype, shards)
    else:
        from llama_jax.ours_format import write_ours

        write_ours(source, out, dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.convert", description="Converts a Llama checkpoint "
                                     "between Hugging Face, Meta's original layout and llama_jax, one tensor at a time.")
    parser.add_argument("--from", dest="source_format", choices=FORMATS, required=True,
                        help="; ".join(f"{name}: {what}" for name, what in FORMATS.items()))
    parser.add_argument("--to", dest="target_format", choices=FORMATS, required=True)
    parser.add_argument("src", help="the checkpoint to read (a local path or a URL such as gs://bucket/run)")
    parser.add_argument("dst", help="directory to write, local or a URL (created; earlier weights in it are replaced)")
    parser.add_argument("--dtype", choices=tuple(_SAFETENSORS_DTYPES), default=None,
                        help="tensor dtype in the output (default: as stored)")
    parser.add_argument("--shards", type=int, default=1,
                        help="--to meta: model-parallel ranks, one consolidated.NN.pth each (default 1)")
    args = parser.parse_args(argv)
    src, dst = resolve(args.src), resolve(args.dst)
    try:
        if dst == src:
            raise CheckpointError(f"{dst} holds the checkpoint being read: choose another output directory")
        check_writable(dst, "the output directory", directory=True)
        convert(open_source(src, args.source_format), dst, args.target_format, dtype=args.dtype, shards=args.shards)
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst} ({FORMATS[args.target_format]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
