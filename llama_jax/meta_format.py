"""Meta's original Llama 3 checkpoints (`params.json` plus `consolidated.NN.pth`, one torch state dict per
model-parallel rank), read and written one tensor at a time.

Meta's tensors are Hugging Face's, renamed, with two differences. The rows of wq and wk keep each head's rotary pairs
interleaved, where HF and we split each head into halves. And file NN holds rank NN's slice of every weight:
column-parallel ones (wq, wk, wv, w1, w3, output, and tok_embeddings, a VocabParallelEmbedding in Llama 3's
model.py) along rows, row-parallel ones (wo, w2) along columns, norms whole in every file. With more ranks than KV
heads, each KV head is repeated on consecutive ranks (rank r holds head r // (ranks / n_kv_heads)), as in Llama
3.1 405B's MP16 release and llama-models' resharding.

Reading maps nothing: `torch.load(map_location="meta")` gives every tensor's shape, dtype and byte offset without
reading data, then each slice is read with one `np.fromfile`. (`torch.load(mmap=True)` maps the whole file, and every
page touched stays resident until the last tensor from it is released, so its peak is the file, not the tensor.)
Writing reserves each file first, `torch.save` of fake tensors under `torch.serialization.skip_data` (PyTorch's way to
fill a checkpoint's bytes in a separate pass), then writes every slice at its offset. Either way host memory holds
one of our stacked parameters plus one layer's tensor. torch is imported only here, on first use.

In a bucket (gs://...) the same reads are ranged reads of the objects (torch reads the pickle through a file object,
fetching only the zip directory and the pickle); writes, which land at offsets, go to a local temporary directory
uploaded at the end, so disk holds the output meanwhile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from etils import epath

from llama_jax.convert import ParamSource, _tokenizer_in, _Weight, _weights, copy_tokenizer_files, hf_tensors
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.model import LlamaConfig
from llama_jax.workdir import is_remote, local_output, read_array, resolve

PARAMS_FILE = "params.json"
_SHARD = "consolidated.{:02d}.pth"
# use_scaled_rope means llama3 RoPE scaling with these constants, fixed in Meta's reference code
_SCALED_ROPE = {"rope_factor": 8.0, "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_len": 8192}
_NAMES = {  # HF name: (Meta name, the axis ranks split it along; None: whole in every file)
    "model.embed_tokens.weight": ("tok_embeddings.weight", 0),
    "model.layers.{i}.self_attn.q_proj.weight": ("layers.{i}.attention.wq.weight", 0),
    "model.layers.{i}.self_attn.k_proj.weight": ("layers.{i}.attention.wk.weight", 0),
    "model.layers.{i}.self_attn.v_proj.weight": ("layers.{i}.attention.wv.weight", 0),
    "model.layers.{i}.self_attn.o_proj.weight": ("layers.{i}.attention.wo.weight", 1),
    "model.layers.{i}.mlp.gate_proj.weight": ("layers.{i}.feed_forward.w1.weight", 0),
    "model.layers.{i}.mlp.down_proj.weight": ("layers.{i}.feed_forward.w2.weight", 1),
    "model.layers.{i}.mlp.up_proj.weight": ("layers.{i}.feed_forward.w3.weight", 0),
    "model.layers.{i}.input_layernorm.weight": ("layers.{i}.attention_norm.weight", None),
    "model.layers.{i}.post_attention_layernorm.weight": ("layers.{i}.ffn_norm.weight", None),
    "model.norm.weight": ("norm.weight", None),
    "lm_head.weight": ("output.weight", 0),
}


@dataclasses.dataclass(frozen=True)
class _MetaWeight:
    """A Meta tensor: the HF tensor it renames, how ranks split it, and its rotary row order."""

    hf: _Weight
    name: str  # "{i}" stands for the layer
    split: int | None
    rotary_heads: int  # wq / wk: the heads whose rows hold interleaved rotary pairs; 0 for the others
    kv_heads: int  # wk / wv: heads that ranks may outnumber (then repeated); 0 for the others

    def to_hf(self, w: np.ndarray) -> np.ndarray:
        """Interleaved rotary pairs -> halves (the permutation in NOTES.md)."""
        if not self.rotary_heads:
            return w
        rows, cols = w.shape
        return w.reshape(self.rotary_heads, rows // self.rotary_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)

    def to_meta(self, w: np.ndarray) -> np.ndarray:
        if not self.rotary_heads:
            return w
        rows, cols = w.shape
        return w.reshape(self.rotary_heads, 2, rows // self.rotary_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)

    def rank_slice(self, rank: int, ranks: int) -> tuple[slice, ...]:
        """The part of the whole tensor that rank `rank` of `ranks` holds."""
        shape = self.hf.hf_shape
        if self.split is None:
            return (slice(None),) * len(shape)
        if self.kv_heads and ranks > self.kv_heads:
            head_rows = shape[0] // self.kv_heads
            head = rank // (ranks // self.kv_heads)
            return slice(head * head_rows, (head + 1) * head_rows), slice(None)
        size = shape[self.split] // ranks
        index = [slice(None)] * len(shape)
        index[self.split] = slice(rank * size, (rank + 1) * size)
        return tuple(index)

    def rank_shape(self, rank: int, ranks: int) -> tuple[int, ...]:
        return tuple(len(range(*s.indices(n))) for s, n in zip(self.rank_slice(rank, ranks), self.hf.hf_shape))

    def names(self, n_layers: int) -> list[str]:
        return [self.name.format(i=i) for i in range(n_layers)] if self.hf.stacked else [self.name]


def _meta_weights(cfg: LlamaConfig) -> dict[str, _MetaWeight]:
    """{HF name: Meta weight} over every Meta tensor; output.weight always, as Meta's files have it tied or not."""
    heads = {"wq": cfg.n_heads, "wk": cfg.n_kv_heads}
    weights = {}
    for hf in _weights(cfg.replace(tie_embeddings=False)):
        name, split = _NAMES[hf.hf_name]
        kind = name.split(".")[-2]
        weights[hf.hf_name] = _MetaWeight(hf, name, split, heads.get(kind, 0), cfg.n_kv_heads if kind in ("wk", "wv") else 0)
    return weights


# ---------------------------------------------------------------------------------------------- params.json


def ffn_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The FFN width Meta's model.py derives from params.json."""
    hidden = int(2 * 4 * dim / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def _ffn_params(dim: int, ffn: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that give back `ffn` exactly: the shortest multiplier with the largest
    power-of-two multiple_of (Llama 3 8B's 14336 from dim 4096: 2048 and 1.3), else `ffn` itself as multiple_of."""
    ratio = ffn / int(2 * 4 * dim / 3)
    for multiple_of in (min(ffn & -ffn, 4096), ffn):
        for multiplier in (None, round(ratio, 1), round(ratio, 2), round(ratio, 3), ratio):
            if ffn_dim(dim, multiple_of, multiplier) == ffn:
                return multiple_of, multiplier
    raise AssertionError(f"no params.json gives ffn_dim {ffn}")  # unreachable: the last candidate gives ffn


def params_json(cfg: LlamaConfig) -> dict:
    """Meta's params.json for `cfg`; refuses what it cannot express."""
    if cfg.resolved_head_dim != cfg.dim // cfg.n_heads:
        raise ConfigError(f"the model's head_dim is {cfg.resolved_head_dim}, but Meta's params.json has no head_dim "
                          f"(it is dim / n_heads = {cfg.dim // cfg.n_heads}): convert to hf or ours instead")
    scaled = cfg.rope_type == "llama3"
    if scaled and any(getattr(cfg, key) != value for key, value in _SCALED_ROPE.items()):
        found = ", ".join(f"{key}={getattr(cfg, key)}" for key in _SCALED_ROPE)
        raise ConfigError(f"the model's llama3 RoPE scaling ({found}) is not what Meta's use_scaled_rope means "
                          f"({', '.join(f'{k}={v}' for k, v in _SCALED_ROPE.items())}), and params.json can say "
                          "nothing else: convert to hf or ours instead")
    multiple_of, multiplier = _ffn_params(cfg.dim, cfg.ffn_dim)
    return {"dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "ffn_dim_multiplier": multiplier, "multiple_of": multiple_of,
            "norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "use_scaled_rope": scaled}


def config_from_params(params: dict, *, tie_embeddings: bool, dtype: str) -> LlamaConfig:
    """Our config from params.json. Meta's files give no context length: 131072 with scaled RoPE (Llama 3.1 and
    later), else 8192 (Llama 3), as the published configs say."""
    unknown = sorted(key for key in params if key.startswith("rope_") and key != "rope_theta")
    if unknown:
        raise CheckpointError(f"params.json sets {unknown}, which llama_jax does not read: convert the Hugging Face "
                              "release of this model instead")
    try:
        scaled = bool(params.get("use_scaled_rope", False))
        return LlamaConfig(
            vocab_size=params["vocab_size"], dim=params["dim"], n_layers=params["n_layers"], n_heads=params["n_heads"],
            n_kv_heads=params.get("n_kv_heads") or params["n_heads"], head_dim=params["dim"] // params["n_heads"],
            ffn_dim=ffn_dim(params["dim"], params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
            norm_eps=params.get("norm_eps", 1e-5), rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_type="llama3" if scaled else "default", **_SCALED_ROPE, max_seq_len=131072 if scaled else 8192,
            tie_embeddings=tie_embeddings, dtype=dtype, param_dtype=dtype)
    except KeyError as e:
        raise CheckpointError(f"params.json lacks {e}: it is not a complete Llama params.json; re-download it") from None
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"params.json describes a model llama_jax cannot build: {e}") from None


# -------------------------------------------------------------------------------------------------- torch files


def _torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("Meta checkpoints are torch files: pip install torch (the CPU build is enough)") from None
    return torch


def _numpy_dtype(torch_dtype) -> np.dtype:
    name = str(torch_dtype).removeprefix("torch.")
    if name not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"a tensor is stored as {name}: Meta checkpoints are read in float32, bfloat16 or float16")
    return jnp.dtype(name)


class _TorchFile:
    """One consolidated.NN.pth: its tensors' layout from the pickle, their bytes read on demand."""

    def __init__(self, path: epath.Path):
        self.path = path
        try:
            if is_remote(path):
                with path.open("rb") as f:
                    self._tensors = _torch().load(f, map_location="meta", weights_only=True)
            else:
                self._tensors = _torch().load(path, map_location="meta", weights_only=True)
        except Exception as e:  # torch raises anything from RuntimeError to UnpicklingError for a damaged file
            raise CheckpointError(f"{path} is not a readable torch checkpoint ({e}): re-download it") from None

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise CheckpointError(f"{self.path} has no tensor {name!r}: the file is incomplete or not a Llama "
                                  "checkpoint; re-download it")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensor(name).shape)

    def dtype(self, name: str) -> np.dtype:
        return _numpy_dtype(self._tensor(name).dtype)

    def read(self, name: str) -> np.ndarray:
        tensor = self._tensor(name)
        dtype = _numpy_dtype(tensor.dtype)
        offset = tensor.untyped_storage()._checkpoint_offset + tensor.storage_offset() * dtype.itemsize
        span = 1 + sum((n - 1) * stride for n, stride in zip(tensor.shape, tensor.stride())) if tensor.numel() else 0
        data = read_array(self.path, dtype, span, offset)
        strides = [stride * dtype.itemsize for stride in tensor.stride()]
        return np.ascontiguousarray(np.lib.stride_tricks.as_strided(data, tuple(tensor.shape), strides))


def _shard_files(path: epath.Path) -> list[epath.Path]:
    numbers = sorted(int(match.group(1)) for file in path.glob("consolidated.*.pth")
                     if (match := re.fullmatch(r"consolidated\.(\d+)\.pth", file.name)))
    if not numbers:
        raise CheckpointError(f"{path} has no consolidated.NN.pth files: pass the directory holding them and params.json "
                              "(the original/ folder of a Hugging Face download)")
    missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(_SHARD.format(n) for n in missing)} of {numbers[-1] + 1} "
                              "model-parallel shards: download the missing files")
    return [path / _SHARD.format(n) for n in numbers]


class MetaSource(ParamSource):
    """A directory with params.json and consolidated.00.pth ... consolidated.NN.pth (any number of ranks)."""

    def __init__(self, path: epath.Path):
        params_file = path / PARAMS_FILE
        if not params_file.is_file():
            raise CheckpointError(f"{path} has no {PARAMS_FILE}: pass the directory holding params.json and "
                                  "consolidated.NN.pth (the original/ folder of a Hugging Face download)")
        try:
            params = json.loads(params_file.read_text())
        except ValueError as e:
            raise CheckpointError(f"{params_file} is not valid JSON ({e}): re-download it") from None
        self._files = [_TorchFile(file) for file in _shard_files(path)]
        dtype = self._files[0].dtype(_NAMES["model.embed_tokens.weight"][0]).name
        self.cfg = config_from_params(params, tie_embeddings=self._tied(), dtype=dtype)
        self.directory, self.tokenizer = path, _tokenizer_in(path)
        self._by_path = {w.hf.path: w for w in _meta_weights(self.cfg).values()}

    def _tied(self) -> bool:
        """Tied when output.weight is absent or equal bitwise to tok_embeddings (Llama 3.2 1B and 3B), compared
        rank by rank: both split the vocabulary the same way."""
        embed, output = _NAMES["model.embed_tokens.weight"][0], _NAMES["lm_head.weight"][0]
        return all(output not in file or np.array_equal(file.read(embed), file.read(output))
                   for file in self._files)

    def read(self, path: tuple[str, ...]) -> np.ndarray:
        weight = self._by_path[path]
        if not weight.hf.stacked:
            return weight.hf.to_ours(weight.to_hf(self._merged(weight, weight.name)))
        out = np.empty((self.cfg.n_layers, *weight.hf.shape), jnp.dtype(self.cfg.param_dtype))
        for i in range(self.cfg.n_layers):
            out[i] = weight.hf.to_ours(weight.to_hf(self._merged(weight, weight.name.format(i=i))))
        return out

    def _merged(self, weight: _MetaWeight, name: str) -> np.ndarray:
        """The whole tensor `name`, assembled from every rank's slice; repeated slices must agree."""
        whole = np.empty(weight.hf.hf_shape, jnp.dtype(self.cfg.param_dtype))
        filled = {}
        for rank, file in enumerate(self._files):
            index = weight.rank_slice(rank, len(self._files))
            want = whole[index].shape
            if file.shape(name) != want:
                raise CheckpointError(
                    f"{file.path.name}'s {name} has shape {file.shape(name)}, but params.json and {len(self._files)} "
                    f"shards imply {want}: the shards or params.json come from different checkpoints")
            part = file.read(name)
            key = str(index)
            if key in filled and not np.array_equal(whole[index], part):
                raise CheckpointError(f"{file.path.name} and {filled[key]} hold different copies of the same part of "
                                      f"{name}: the shards come from different checkpoints")
            whole[index] = part
            filled.setdefault(key, file.path.name)
        return whole


# ------------------------------------------------------------------------------------------------------ writing


def write_meta(source: ParamSource, out: str | os.PathLike, dtype: str | None = None, shards: int = 1) -> None:
    """`source` as Meta's layout in `out` (a local path or a URL): params.json, consolidated.00.pth ... one per
    model-parallel rank (`shards`), and the tokenizer files. output.weight is written even for tied embeddings, as
    Meta's files have it."""
    cfg, out = source.cfg, resolve(out)
    params = params_json(cfg)
    _check_ranks(cfg, shards)
    _torch()  # refuses before any file changes when torch is missing
    np_dtype = jnp.dtype(dtype or cfg.param_dtype)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("consolidated.*.pth"):
        stale.unlink()
    with local_output(out) as local:
        _write_files(source, local, np_dtype, shards, params)


def _write_files(source: ParamSource, out: pathlib.Path, np_dtype: np.dtype, shards: int, params: dict) -> None:
    """The files of `write_meta` in the local directory `out`."""
    cfg, torch = source.cfg, _torch()
    targets = {hf_name: [weight] for hf_name, weight in _meta_weights(cfg).items()}  # what each HF tensor becomes
    if cfg.tie_embeddings:  # the embedding is written twice, also as output.weight
        targets["model.embed_tokens.weight"] += targets.pop("lm_head.weight")
    tensors = [(weight, name) for weights in targets.values() for weight in weights for name in weight.names(cfg.n_layers)]
    files = [out / _SHARD.format(rank) for rank in range(shards)]
    offsets = [_reserve(torch, file, {name: weight.rank_shape(rank, shards) for weight, name in tensors},
                        getattr(torch, np_dtype.name)) for rank, file in enumerate(files)]
    descriptors = [os.open(file, os.O_WRONLY) for file in files]
    try:
        for hf, i, tensor in hf_tensors(cfg, source.read):
            for weight in targets[hf.hf_name]:
                meta = weight.to_meta(tensor).astype(np_dtype)
                name = weight.name.format(i=i)
                for rank, fd in enumerate(descriptors):
                    _pwrite(fd, meta[weight.rank_slice(rank, shards)], offsets[rank][name])
            del tensor, meta  # they may be views of the source's parameter, which must go before the next is read
    finally:
        for fd in descriptors:
            os.close(fd)
    (out / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")
    copy_tokenizer_files(source, out)


def _check_ranks(cfg: LlamaConfig, ranks: int) -> None:
    """Meta's model.py needs every split dimension divisible by the ranks, and the KV heads either split evenly or
    repeated a whole number of times."""
    if ranks < 1:
        raise ConfigError(f"--shards {ranks}: a Meta checkpoint has at least one rank")
    split = {"n_heads": cfg.n_heads, "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size}
    problems = [f"{key} {value} is not divisible by it" for key, value in split.items() if value % ranks]
    if cfg.n_kv_heads % ranks and ranks % cfg.n_kv_heads:
        problems.append(f"n_kv_heads {cfg.n_kv_heads} neither divides it nor is divisible by it")
    if problems:
        raise ConfigError(f"--shards {ranks} cannot split this model ({'; '.join(problems)}): use a number of ranks "
                          "that divides n_heads, ffn_dim and vocab_size, and divides or is a multiple of n_kv_heads")


def _reserve(torch, file: pathlib.Path, shapes: dict[str, tuple[int, ...]], dtype) -> dict[str, int]:
    """Writes `file` as torch.save would a state dict of these shapes, without the tensors' bytes; returns each
    tensor's byte offset in it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):
        torch.save(fake, file)
    layout = torch.load(file, map_location="meta", weights_only=True)
    return {name: tensor.untyped_storage()._checkpoint_offset for name, tensor in layout.items()}


def _pwrite(fd: int, array: np.ndarray, offset: int) -> None:
    data = memoryview(np.ascontiguousarray(array).view(np.uint8).reshape(-1))
    while data:  # one write() moves at most 2 GiB on Linux
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written
