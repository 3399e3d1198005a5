"""The accelerators' fused attention kernels: cuDNN's and JAX's Pallas Triton kernel on NVIDIA GPUs, and JAX's
Pallas splash attention on TPUs.

On an accelerator the pure-JAX flash attention (flash.py) is a loop of small XLA ops; these are single fused kernels,
the speed MaxText-style runs rely on. All take the `attention.ATTENTION` form (q [b, t, n, h], k and v [b, s, k, h],
segment ids [b, t]; causal within a document):

- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, with grouped-query attention native. cuDNN takes
  causality as a mask type (it skips the blocks above the diagonal) and other masks as a dense additive bias, so the
  same-document mask goes in as a [b, 1, t, t] bias: O(t^2) memory per row, which a 128K-token run should avoid.
  cuDNN computes in bfloat16 or float16 only.
- "triton": `jax.experimental.pallas.ops.gpu.attention.mha`, which reads segment ids block by block (linear memory).
  It has one key/value head per query head, so grouped heads are repeated for it (autodiff sums their gradients
  back). JAX 0.12 no longer ships it (checked with 0.12.1), so it is imported when first used: there, choosing it
  is a `ConfigError`, and the rest of llama_jax still imports.
- "splash": `jax.experimental.pallas.ops.tpu.splash_attention`, MaxText's TPU kernel: a causal mask per head, the
  segment ids read block by block, grouped-query attention native; it runs per row (vmapped over the batch).
The Pallas kernels take whole blocks of 128 positions: sequences are padded to them with a segment id no document
has, and the padding is cut off the output.

None runs elsewhere, so the model's entries raise a `ConfigError` off their hardware; `triton_attention` and
`splash_attention` take `interpret=True` to run through Pallas's interpreter on any backend, which is how the tests
check them against the reference attention. cuDNN cannot be traced without a GPU: benchmarks/gpu.py checks it there.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

from llama_jax.errors import ConfigError

PALLAS_BLOCK = 128  # the Pallas kernels' default query and key block
_PADDING_SEGMENT = -1  # differs from every document's id, including padding's 0


def _require(name: str, backend: str, hardware: str) -> None:
    if jax.default_backend() != backend:
        raise ConfigError(f"model.attention={name!r} runs on {hardware} only, and this run's backend is "
                          f"{jax.default_backend()!r}: use model.attention='flash' (or 'xla') here")


def _pallas_triton_attention():
    try:
        return importlib.import_module("jax.experimental.pallas.ops.gpu.attention")
    except ImportError as e:
        raise ConfigError(f"model.attention='triton' needs jax.experimental.pallas.ops.gpu.attention, which JAX "
                          f"{jax.__version__} does not ship: use model.attention='cudnn' on this JAX") from e


def cudnn_attention(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray,
                    segment_ids_bt: jnp.ndarray) -> jnp.ndarray:
    """cuDNN flash attention, causal within each document."""
    _require("cudnn", "gpu", "NVIDIA GPUs")
    same_doc_b1ts = (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=same_doc_b1ts, is_causal=True,
                                        implementation="cudnn")


def triton_attention(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray, segment_ids_bt: jnp.ndarray,
                     *, interpret: bool = False, block: int = PALLAS_BLOCK) -> jnp.ndarray:
    """The Pallas Triton flash kernel, causal within each document. `interpret` runs it off the GPU (slowly)."""
    if not interpret:
        _require("triton", "gpu", "NVIDIA GPUs")
    pallas_gpu = _pallas_triton_attention()
    groups = q_btnh.shape[2] // k_bskh.shape[2]
    k_btnh, v_btnh = (jnp.repeat(x, groups, axis=2) for x in (k_bskh, v_bskh))
    (q_btnh, k_btnh, v_btnh), segment_ids_bt, t = _padded_to_blocks((q_btnh, k_btnh, v_btnh), segment_ids_bt, block)
    small = min(block, 32)  # the backward pass's blocks, as in the kernel's defaults
    sizes = pallas_gpu.BlockSizes(block_q=block, block_k=block, block_q_dkv=small, block_kv_dkv=small,
                                  block_q_dq=small, block_kv_dq=small)
    out_btnh = pallas_gpu.mha(q_btnh, k_btnh, v_btnh, segment_ids_bt, sm_scale=q_btnh.shape[-1] ** -0.5, causal=True,
                              block_sizes=sizes, interpret=interpret)
    return out_btnh[:, :t]


def splash_attention(q_btnh: jnp.ndarray, k_bskh: jnp.ndarray, v_bskh: jnp.ndarray, segment_ids_bt: jnp.ndarray,
                     *, interpret: bool = False, block: int = PALLAS_BLOCK) -> jnp.ndarray:
    """Pallas splash attention, causal within each document. `interpret` runs it off the TPU (slowly)."""
    if not interpret:
        _require("splash", "tpu", "TPUs")
    scale = q_btnh.shape[-1] ** -0.5
    (q_btnh, k_bskh, v_bskh), segment_ids_bt, t = _padded_to_blocks((q_btnh * scale, k_bskh, v_bskh),
                                                                      segment_ids_bt, block)
    kernel = _splash_kernel(q_btnh.shape[2], q_btnh.shape[1], block, interpret)

    def one_row(q_nth, k_ksh, v_ksh, segment_ids_t):
        return kernel(q_nth, k_ksh, v_ksh, segment_ids=splash.SegmentIds(q=segment_ids_t, kv=segment_ids_t))

    heads_first = functools.partial(jnp.swapaxes, axis1=1, axis2=2)
    out_bnth = jax.vmap(one_row)(heads_first(q_btnh), heads_first(k_bskh), heads_first(v_bskh), segment_ids_bt)
    return heads_first(out_bnth)[:, :t]


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, t: int, block: int, interpret: bool):
    """The kernel for this shape: splash precomputes which blocks of its mask are empty, full or partial, as
    constants (made outside any trace, so that the cached kernel holds no tracer of the step that built it)."""
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((t, t)) for _ in range(heads)])
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _padded_to_blocks(xs_bt, segment_ids_bt: jnp.ndarray, block: int):
    """Arrays [b, t, ...] and segment ids padded along t to whole blocks (the padding its own document), and t."""
    t = segment_ids_bt.shape[1]
    extra = -t % block
    padded = tuple(jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2)) for x in xs_bt)
    return padded, jnp.pad(segment_ids_bt, [(0, 0), (0, extra)], constant_values=_PADDING_SEGMENT), t
