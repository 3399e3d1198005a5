"""The key/value cache for incremental decoding: what each layer's attention has seen so far, kv heads only.

One cache holds every layer's keys and values stacked along the same leading `layers` axis as the model's blocks,
so the decode path scans blocks and cache slices together. Under grouped-query attention only the `n_kv_heads`
heads are stored (the query heads of a group read the same slice), in the compute dtype.

Rows are left-aligned to a shared write index: row b's prompt fills slots [start_b, end) and every new token is
written at slot `end`, the same for all rows, so a step writes with one `dynamic_update_slice`. The slots before
start_b are padding: their keys are never attended by real tokens, and a token's rotary position is its slot minus
start_b, so each row counts its own positions from 0 whatever its padding.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from llama_jax.model.config import LlamaConfig

# Logical axis names of each field, mapped to mesh axes by parallel/mesh.py's rules (as the parameters' names are).
KV_AXES = ("layers", "batch", "length", "kv_heads", "head_dim")
START_AXES = ("batch",)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["k_lbskh", "v_lbskh", "start_b", "end"],
                   meta_fields=[])
@dataclasses.dataclass(frozen=True)
class KVCache:
    k_lbskh: jax.Array  # [layers, batch, max_len, kv_heads, head_dim], compute dtype
    v_lbskh: jax.Array
    start_b: jax.Array  # [batch] int32: first real slot of each row
    end: jax.Array  # [] int32: the slots below it are filled; the next token goes there

    @classmethod
    def create(cls, cfg: LlamaConfig, start_b: jax.Array, max_len: int) -> KVCache:
        """An empty cache of `max_len` slots for rows whose prompts start at slots `start_b`."""
        shape = (cfg.n_layers, start_b.shape[0], max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
        zeros = jnp.zeros(shape, cfg.dtype)
        return cls(zeros, zeros, jnp.asarray(start_b, jnp.int32), jnp.zeros((), jnp.int32))

    @classmethod
    def logical_axes(cls) -> KVCache:
        """The logical axis names of every field, in a KVCache of tuples (for shardings built by name)."""
        return cls(KV_AXES, KV_AXES, START_AXES, ())

    @property
    def max_len(self) -> int:
        return self.k_lbskh.shape[2]

    def positions(self, t: int) -> jax.Array:
        """Rotary positions [b, t] of the next `t` tokens: their slot minus each row's start (0 inside padding)."""
        slots_t = self.end + jnp.arange(t, dtype=jnp.int32)
        return jnp.maximum(slots_t[None, :] - self.start_b[:, None], 0)

    def mask(self, t: int) -> jax.Array:
        """Boolean [b, t, max_len]: which slots each of the next `t` tokens attends to once they are written.

        Causal over slots, and padding and real tokens never see each other (as segment ids 0 and 1 in training):
        a padding query still sees itself, so no softmax row is empty."""
        slots_t = self.end + jnp.arange(t, dtype=jnp.int32)
        slots_s = jnp.arange(self.max_len, dtype=jnp.int32)
        real_bt = slots_t[None, :] >= self.start_b[:, None]
        real_bs = slots_s[None, :] >= self.start_b[:, None]
        causal_ts = slots_s[None, :] <= slots_t[:, None]
        return causal_ts[None] & (real_bt[:, :, None] == real_bs[:, None, :])

    def layer_with(self, k_bskh: jax.Array, v_bskh: jax.Array, new_k_btkh: jax.Array,
                   new_v_btkh: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One layer's cached keys and values with the new tokens' written at slot `end` onward."""
        at = (0, self.end, 0, 0)
        return (jax.lax.dynamic_update_slice(k_bskh, new_k_btkh.astype(k_bskh.dtype), at),
                jax.lax.dynamic_update_slice(v_bskh, new_v_btkh.astype(v_bskh.dtype), at))

    def appended(self, new_k_lbtkh: jax.Array, new_v_lbtkh: jax.Array) -> KVCache:
        """This cache with every layer's new keys and values written at slot `end`, and `end` moved past them."""
        at = (0, 0, self.end, 0, 0)
        return dataclasses.replace(
            self,
            k_lbskh=jax.lax.dynamic_update_slice(self.k_lbskh, new_k_lbtkh.astype(self.k_lbskh.dtype), at),
            v_lbskh=jax.lax.dynamic_update_slice(self.v_lbskh, new_v_lbtkh.astype(self.v_lbskh.dtype), at),
            end=self.end + new_k_lbtkh.shape[2],
        )
