"""The NVIDIA GPU attention kernels: cuDNN's fused flash attention and JAX's Pallas Triton flash kernel.

On a GPU the pure-JAX flash attention (flash.py) is a loop of small XLA ops; these are single fused kernels, the
speed the GPU benchmark (benchmarks/gpu.py) and MaxText-style GPU runs rely on. Both take the `attention.ATTENTION`
form (q [b, t, n, h], k and v [b, s, k, h], segment ids [b, t]; causal within a document):

- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, with grouped-query attention native. cuDNN takes
  causality as a mask type (it skips the blocks above the diagonal) and other masks as a dense additive bias, so the
  same-document mask goes in as a [b, 1, t, t] bias: O(t^2) memory per row, which a 128K-token run should avoid.
  cuDNN computes in bfloat16 or float16 only.
- "triton": `jax.experimental.pallas.ops.gpu.attention.mha`, which reads segment ids block by block (linear memory).
  It has one key/value head per query head, so grouped heads are repeated for it (autodiff sums their gradients
  back); sequences are padded to its block of 128 with a segment id no document has.

Neither runs off an NVIDIA GPU, so the model's entries raise a `ConfigError` there; `triton_attention(...,
interpret=True)` runs the Triton kernel through Pallas's interpreter on any backend, which is how the tests check it
against the reference attention. cuDNN cannot be traced without a GPU: benchmarks/gpu.py checks it on one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

from llama_jax.errors import ConfigError

TRITON_BLOCK = 128  # the Pallas kernel's default query and key block (`BlockSizes.block_q`, `block_k`)
_PADDING_SEGMENT = -1  # differs from every document's id, including padding's 0


def _require_gpu(name: str) -> None:
    backend = jax.default_backend()
    if backend != "gpu":
        raise ConfigError(f"model.attention={name!r} runs on NVIDIA GPUs only, and this run's backend is {backend!r}: "
                          "use model.attention='flash' (or 'xla') here")


def cudnn_attention(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray,
                    segment_ids_bt: jnp.ndarray) -> jnp.ndarray:
    """cuDNN flash attention, causal within each document."""
    _require_gpu("cudnn")
    same_doc_b1ts = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=same_doc_b1ts, is_causal=True,
                                        implementation="cudnn")


def triton_attention(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray, segment_ids_bt: jnp.ndarray,
                     *, interpret: bool = False, block: int = TRITON_BLOCK) -> jnp.ndarray:
    """The Pallas Triton flash kernel, causal within each document. `interpret` runs it off the GPU (slowly)."""
    if not interpret:
        _require_gpu("triton")
    b, t, n, h = q_btnh.shape
    groups = n // k_bskh.shape[2]
    padded = -(-t // block) * block
    pad = [(0, 0), (0, padded - t), (0, 0), (0, 0)]
    q_btnh, k_btnh, v_btnh = (jnp.pad(x, pad) for x in
                              (q_btnh, jnp.repeat(k_bskh, groups, axis=2), jnp.repeat(v_bskh, groups, axis=2)))
    segment_ids_bt = jnp.pad(segment_ids_bt, [(0, 0), (0, padded - t)], constant_values=_PADDING_SEGMENT)
    sizes = pallas_gpu.BlockSizes(block_q=block, block_k=block, block_q_dkv=min(block, 32),
                                  block_kv_dkv=min(block, 32), block_q_dq=min(block, 32), block_kv_dq=min(block, 32))
    out_btnh = pallas_gpu.mha(q_btnh, k_btnh, v_btnh, segment_ids_bt, sm_scale=h**-0.5, causal=True,
                              block_sizes=sizes, interpret=interpret)
    return out_btnh[:, :t]
