"""Attention kernels chosen by name. All take segment ids, so packed documents never see each other.

Shapes: q [b, t, n, h]; k, v [b, s, k, h] with n a multiple of k (grouped-query attention: query head i
reads kv head i // (n // k), as in Llama's repeat_kv). Causal within a document: query at position i sees
key j only when j <= i and both carry the same segment id.

Each kernel also exists in a masked form (`MASKED_ATTENTION`) that takes the boolean [b, t, s] mask itself:
context-parallel attention (parallel/context.py) builds its own mask over a permuted, gathered sequence, and KV-cache
decoding masks by the cache. The accelerators' fused kernels (fused_attention.py) take segment ids only; their masked
form is XLA's, which XLA fuses itself on those backends.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from llama_jax.model.flash import flash_masked, flash_segment_attention
from llama_jax.model.fused_attention import cudnn_attention, splash_attention, triton_attention

AttentionFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def document_causal_mask(segment_ids_bt: jnp.ndarray) -> jnp.ndarray:
    """Boolean [b, t, t]: causal and same-document."""
    t = segment_ids_bt.shape[1]
    causal_tt = jnp.tril(jnp.ones((t, t), dtype=bool))
    same_doc_btt = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return causal_tt[None] & same_doc_btt


def reference_masked(q_btnh, k_bskh, v_bskh, mask_bts):
    """Plain einsum attention with float32 scores and softmax: the readable ground truth for the others."""
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
    scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh, preferred_element_type=jnp.float32)
    scores_bkgts = scores_bkgts * (h**-0.5)
    scores_bkgts = jnp.where(mask_bts[:, None, None], scores_bkgts, jnp.finfo(jnp.float32).min)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
    return out_btkgh.reshape(b, t, n, h)


def xla_masked(q_btnh, k_bskh, v_bskh, mask_bts):
    """`jax.nn.dot_product_attention`: native GQA, float32 softmax, and fused kernels where XLA has them."""
    return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh, mask=mask_bts[:, None])


MASKED_ATTENTION = {"reference": reference_masked, "xla": xla_masked, "flash": flash_masked, "cudnn": xla_masked,
                    "triton": xla_masked, "splash": xla_masked}


def reference_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt):
    return reference_masked(q_btnh, k_bskh, v_bskh, document_causal_mask(segment_ids_bt))


def xla_attention(q_btnh, k_bskh, v_bskh, segment_ids_bt):
    return xla_masked(q_btnh, k_bskh, v_bskh, document_causal_mask(segment_ids_bt))


ATTENTION: dict[str, AttentionFn] = {"reference": reference_attention, "xla": xla_attention,
                                     "flash": flash_segment_attention, "cudnn": cudnn_attention,
                                     "triton": triton_attention, "splash": splash_attention}
