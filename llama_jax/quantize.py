"""FP8 inference weights: the linear layers' matrices stored as float8 e4m3 with one float32 scale per output channel.

Generation reads every weight once per token, so on an accelerator its speed is bound by the bytes of weights moved;
FP8 halves them against bfloat16. Each output channel (a row of torch's [out, in] layout) gets its own scale,
max |w| / 448 (e4m3's largest finite value), so one large row does not cost the others their precision. The model
dequantises a weight inside the jitted computation just before its matmul (`Fp8Weight.astype`), so the full-precision
copy exists only transiently, one layer at a time, and model code is unchanged.

Only the attention (q, k, v, o) and MLP (gate, up, down) matrices are quantised by default; embeddings and norms never
are (a gather and a scale, not matmuls), the untied output projection only when asked (`lm_head=True`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from llama_jax.errors import ConfigError
from llama_jax.model import Llama

FP8_DTYPE = jnp.float8_e4m3fn
_FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448

# Parameter path -> the axes each of its matrices contracts over (after the leading `layers` axis where stacked);
# the scale keeps every other axis, so it is per output channel.
LINEAR_WEIGHTS: dict[tuple[str, ...], tuple[int, ...]] = {
    ("layers", "attn", "wq"): (1,),  # [layers, embed, heads, head_dim]
    ("layers", "attn", "wk"): (1,),
    ("layers", "attn", "wv"): (1,),
    ("layers", "attn", "wo"): (1, 2),  # [layers, heads, head_dim, embed]
    ("layers", "mlp", "w_gate"): (1,),  # [layers, embed, mlp]
    ("layers", "mlp", "w_up"): (1,),
    ("layers", "mlp", "w_down"): (1,),  # [layers, mlp, embed]
}
LM_HEAD = (("lm_head",), (0,))  # [embed, vocab]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["value", "scale"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """A weight as float8 e4m3 `value` times float32 `scale` (the weight's shape, 1 on the contracted axes).

    It stands where the model reads `param[...].astype(dtype)`: indexing with `...` returns it whole and `astype`
    dequantises, so a quantised model runs the same code as a full-precision one."""

    value: jax.Array
    scale: jax.Array

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("an Fp8Weight is read whole (weight[...]); dequantise it with .astype(dtype) first")
        return self

    def astype(self, dtype) -> jax.Array:
        return (self.value.astype(jnp.float32) * self.scale).astype(dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def ndim(self) -> int:
        return self.value.ndim

    @property
    def nbytes(self) -> int:
        return self.value.nbytes + self.scale.nbytes


@dataclasses.dataclass(frozen=True)
class Fp8Report:
    """What quantisation saved: bytes of the quantised matrices before (as stored, and as bfloat16) and after."""

    n_weights: int  # parameters (stacked matrices) quantised
    original_bytes: int  # as they were stored (param_dtype)
    bf16_bytes: int  # what they would take in bfloat16
    fp8_bytes: int  # float8 values plus float32 scales

    def describe(self) -> str:
        mib = 2.0**20
        return (f"fp8: {self.n_weights} weight matrices, {self.original_bytes / mib:.2f} MiB as loaded -> "
                f"{self.fp8_bytes / mib:.2f} MiB (bfloat16 would be {self.bf16_bytes / mib:.2f} MiB: "
                f"{self.bf16_bytes / self.fp8_bytes:.2f}x smaller; saved {(self.original_bytes - self.fp8_bytes) / mib:.2f}"
                f" MiB)")


def quantize_array(w: jax.Array, contract_axes: tuple[int, ...]) -> Fp8Weight:
    """`w` as float8 e4m3 with one float32 scale per output channel (the max over `contract_axes` maps to 448)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=contract_axes, keepdims=True)
    scale = jnp.where(amax > 0, amax / _FP8_MAX, 1.0)
    return Fp8Weight(jnp.clip(w32 / scale, -_FP8_MAX, _FP8_MAX).astype(FP8_DTYPE), scale)


def quantize_fp8(model: Llama, *, lm_head: bool = False) -> tuple[Llama, Fp8Report]:
    """A copy of `model` whose linear layers hold `Fp8Weight`s (the input model is left as it is), for generation.

    Shardings are kept: each FP8 value lives where its weight did, so a model loaded onto a mesh stays on it. With
    `lm_head=True` the untied output projection is quantised too (per vocabulary entry)."""
    targets = dict(LINEAR_WEIGHTS)
    if lm_head:
        if model.cfg.tie_embeddings:
            raise ConfigError("lm_head=True: this model ties its output projection to the embedding, which stays in "
                              "full precision; quantise without lm_head")
        targets[LM_HEAD[0]] = LM_HEAD[1]
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x, state)  # a new tree of Variables: quantising must not touch `model`
    original = bf16 = fp8 = 0
    for path, axes in targets.items():
        param = functools.reduce(lambda node, key: node[key], path, state)
        w = param[...]
        quantized = _quantize_jit(w, axes)
        param.set_value(quantized)
        original, bf16, fp8 = original + w.nbytes, bf16 + 2 * math.prod(w.shape), fp8 + quantized.nbytes
    return nnx.merge(graphdef, state), Fp8Report(len(targets), original, bf16, fp8)


def _quantize_jit(w: jax.Array, axes: tuple[int, ...]) -> Fp8Weight:
    sharding = getattr(w, "sharding", None)
    quantized = jax.jit(quantize_array, static_argnums=1)(w, axes)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return Fp8Weight(jax.device_put(quantized.value, sharding), quantized.scale)
    return quantized


def logit_error(reference: Llama, quantized: Llama, tokens_bt: np.ndarray | jax.Array) -> float:
    """max |quantized - reference| / max |reference| over the logits of `tokens_bt`: the error relative to the logits'
    scale (element-wise relative errors blow up where a logit is near 0)."""
    ref_btv = np.asarray(_forward(reference, jnp.asarray(tokens_bt)), np.float64)
    out_btv = np.asarray(_forward(quantized, jnp.asarray(tokens_bt)), np.float64)
    return float(np.abs(out_btv - ref_btv).max() / np.abs(ref_btv).max())


def _forward(model: Llama, tokens_bt: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, tokens_bt: nnx.merge(graphdef, state)(tokens_bt))(state, tokens_bt)
