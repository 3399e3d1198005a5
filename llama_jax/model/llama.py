"""The Llama 3 decoder in Flax NNX.

Every parameter is declared once, in its module's constructor, with its shape, initializer and logical axis
names; nothing here knows about devices or meshes (parallel/mesh.py maps the names to a mesh). Layers are
created stacked along a leading `layers` axis and applied with `nnx.scan`, so compile time does not grow
with depth. Parameters are stored in `param_dtype` and cast to the compute `dtype` where they are used (a
weight's value may also be an array-like whose `astype` dequantises it, as `llama_jax.quantize` stores FP8 weights,
or one that computes its own product with the input, as `llama_jax.lora` does for adapter dropout);
normalisation, softmax, rotary math and logits are float32.

Generation runs the same blocks through `Llama.extend`: the next tokens of every row against a `KVCache` of the keys
and values seen so far, with the same parameters, projections and RoPE as training.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from llama_jax.model.attention import ATTENTION, MASKED_ATTENTION, AttentionFn
from llama_jax.model.config import LlamaConfig
from llama_jax.model.kv_cache import KVCache
from llama_jax.model.matmul import project
from llama_jax.model.rope import apply_rotary, inverse_frequencies, rotary_angles

REMAT = {
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str, ...], dtype) -> nnx.Param:
    """A parameter that carries its logical axis names; placement on devices is applied from outside."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def _linear(equation: str, x, weight: nnx.Param) -> jnp.ndarray:
    """`x` times `weight` in x's dtype (`matmul.project`). A weight whose value computes the product itself (`linear`)
    does so: LoRA's adapters with dropout act on the input, so they cannot be folded into the matrix
    (`llama_jax.lora`)."""
    w = weight[...]
    if hasattr(w, "linear"):
        return w.linear(equation, x)
    return project(equation, x, w)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), param_dtype)

    def __call__(self, x_btd: jnp.ndarray) -> jnp.ndarray:
        x32_btd = x_btd.astype(jnp.float32)
        normed_btd = x32_btd * jax.lax.rsqrt(jnp.mean(x32_btd**2, axis=-1, keepdims=True) + self.eps)
        return (normed_btd * self.scale[...].astype(jnp.float32)).astype(x_btd.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        d, n, k, h = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        self.cfg = cfg
        self.wq = _param(rngs, init, (d, n, h), ("embed", "heads", "head_dim"), cfg.param_dtype)
        self.wk = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.param_dtype)
        self.wv = _param(rngs, init, (d, k, h), ("embed", "kv_heads", "head_dim"), cfg.param_dtype)
        self.wo = _param(rngs, out_init, (n, h, d), ("heads", "head_dim", "embed"), cfg.param_dtype)

    def __call__(self, x_btd, cos_btp, sin_btp, segment_ids_bt, attention: AttentionFn):
        q_btnh, k_btkh, v_btkh = self.project(x_btd, cos_btp, sin_btp)
        return self.output(attention(q_btnh, k_btkh, v_btkh, segment_ids_bt))

    def extend(self, x_btd, cos_btp, sin_btp, cache: KVCache, k_bskh, v_bskh, mask_bts, attention):
        """Attention of the next tokens over this layer's cache with them written in; also returns their keys and
        values [b, t, k, h] for the caller to append. `attention` is a masked kernel (`MASKED_ATTENTION`)."""
        q_btnh, new_k_btkh, new_v_btkh = self.project(x_btd, cos_btp, sin_btp)
        k_bskh, v_bskh = cache.layer_with(k_bskh, v_bskh, new_k_btkh, new_v_btkh)
        return self.output(attention(q_btnh, k_bskh, v_bskh, mask_bts)), new_k_btkh, new_v_btkh

    def project(self, x_btd, cos_btp, sin_btp):
        """Queries [b, t, n, h] and keys, values [b, t, k, h] in x's dtype, queries and keys rotated."""
        q_btnh = _linear("btd,dnh->btnh", x_btd, self.wq)
        k_btkh = _linear("btd,dkh->btkh", x_btd, self.wk)
        v_btkh = _linear("btd,dkh->btkh", x_btd, self.wv)
        return apply_rotary(q_btnh, cos_btp, sin_btp), apply_rotary(k_btkh, cos_btp, sin_btp), v_btkh

    def output(self, out_btnh):
        return _linear("btnh,nhd->btd", out_btnh, self.wo)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(cfg.init_std)
        out_init = nnx.initializers.normal(cfg.init_std / (2 * cfg.n_layers) ** 0.5)
        self.w_gate = _param(rngs, init, (cfg.dim, cfg.ffn_dim), ("embed", "mlp"), cfg.param_dtype)
        self.w_up = _param(rngs, init, (cfg.dim, cfg.ffn_dim), ("embed", "mlp"), cfg.param_dtype)
        self.w_down = _param(rngs, out_init, (cfg.ffn_dim, cfg.dim), ("mlp", "embed"), cfg.param_dtype)

    def __call__(self, x_btd):
        gate_btf = _linear("btd,df->btf", x_btd, self.w_gate)
        up_btf = _linear("btd,df->btf", x_btd, self.w_up)
        return _linear("btf,fd->btd", jax.nn.silu(gate_btf) * up_btf, self.w_down)


class Block(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x_btd, cos_btp, sin_btp, segment_ids_bt, attention: AttentionFn):
        x_btd = x_btd + self.attn(self.attn_norm(x_btd), cos_btp, sin_btp, segment_ids_bt, attention)
        return x_btd + self.mlp(self.mlp_norm(x_btd))

    def extend(self, x_btd, cos_btp, sin_btp, cache: KVCache, k_bskh, v_bskh, mask_bts, attention):
        """The block on the next tokens against this layer's cache (see `Attention.extend`)."""
        attn_btd, new_k_btkh, new_v_btkh = self.attn.extend(self.attn_norm(x_btd), cos_btp, sin_btp, cache, k_bskh,
                                                            v_bskh, mask_bts, attention)
        x_btd = x_btd + attn_btd
        return x_btd + self.mlp(self.mlp_norm(x_btd)), new_k_btkh, new_v_btkh


# (stacked blocks, x, cos, sin, segment_ids) -> x: how the layer stack is run. The default is `apply_blocks` in
# order on one device group; parallel/ supplies pipelined and context-parallel versions, so the model itself
# never learns about meshes.
LayersFn = Callable[[Block, jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def apply_blocks(blocks: Block, x_btd, cos_btp, sin_btp, segment_ids_bt, *, remat: str, attention: AttentionFn,
                 scan: bool = True, after_block: Callable[[jnp.ndarray], jnp.ndarray] | None = None) -> jnp.ndarray:
    """Runs stacked blocks (a leading layers axis) in order: with `nnx.scan`, so that compile time does not grow
    with depth, or (`scan=False`) one layer after another, compiled once per layer. Unrolled, XLA keeps what the
    backward pass needs of each layer in buffers of its own instead of writing it into stacked arrays; on CPU it
    rewrites a whole stacked bfloat16 array for each layer's slice of it. `after_block` sees each block's output:
    the parallel code pins activations' sharding there."""

    def apply_block(x_btd, block: Block):
        x_btd = block(x_btd, cos_btp, sin_btp, segment_ids_bt, attention)
        return x_btd if after_block is None else after_block(x_btd)

    if remat != "none":
        apply_block = nnx.remat(apply_block, policy=REMAT[remat])
    if scan:
        return nnx.scan(apply_block, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x_btd, blocks)
    graphdef, stacked = nnx.split(blocks)
    leaves, treedef = jax.tree.flatten(stacked)
    n_layers = leaves[0].shape[0]
    # split, not indexing: the gradient of a split is one concatenation, that of each index a pad and an add
    # over the whole stack
    per_leaf = [jnp.split(leaf, n_layers) for leaf in leaves]
    for layer in range(n_layers):
        block = nnx.merge(graphdef, jax.tree.unflatten(treedef, [parts[layer][0] for parts in per_leaf]))
        x_btd = apply_block(x_btd, block)
    return x_btd


class Llama(nnx.Module):
    """Llama 3 decoder: `model(tokens_bt)` returns float32 logits [b, t, vocab].

    For packed batches pass `segment_ids` (documents within a row, >0; 0 marks padding) and `positions`
    (restarting at 0 per document); attention never crosses a document boundary.
    """

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(
            rngs, nnx.initializers.normal(cfg.init_std), (cfg.vocab_size, cfg.dim), ("vocab", "embed"), cfg.param_dtype
        )

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs)

        self.layers = stacked_blocks(rngs)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps, param_dtype=cfg.param_dtype, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(
                rngs, nnx.initializers.normal(cfg.init_std), (cfg.dim, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype
            )

    def __call__(self, tokens_bt: jnp.ndarray, *, segment_ids=None, positions=None,
                 layers_fn: LayersFn | None = None) -> jnp.ndarray:
        return self.logits(self.hidden(tokens_bt, segment_ids=segment_ids, positions=positions, layers_fn=layers_fn))

    def hidden(self, tokens_bt: jnp.ndarray, *, segment_ids=None, positions=None,
               layers_fn: LayersFn | None = None) -> jnp.ndarray:
        """Final normalised hidden states [b, t, dim] in the compute dtype (before the output projection).

        `layers_fn` replaces the plain in-order scan over the layer stack (see `LayersFn`)."""
        b, t = tokens_bt.shape
        segment_ids_bt = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        positions_bt = jnp.broadcast_to(jnp.arange(t), (b, t)) if positions is None else positions
        cos_btp, sin_btp = self.rotary(positions_bt)
        x_btd = self.embed_tokens(tokens_bt)
        if layers_fn is None:
            x_btd = apply_blocks(self.layers, x_btd, cos_btp, sin_btp, segment_ids_bt, remat=self.cfg.remat,
                                 attention=ATTENTION[self.cfg.attention], scan=self.cfg.scan_layers)
        else:
            x_btd = layers_fn(self.layers, x_btd, cos_btp, sin_btp, segment_ids_bt)
        return self.norm(x_btd)

    def extend(self, tokens_bt: jnp.ndarray, cache: KVCache) -> tuple[jnp.ndarray, KVCache]:
        """The next `t` tokens of every row run against `cache`: their final normalised hidden states [b, t, dim]
        and the cache with their keys and values appended.

        Prefill is one call with the (left-padded) prompts, decoding one call per token; each token takes its
        rotary position and attention mask from the cache, so rows of different lengths decode side by side.
        Tokens past the cache's last slot have nowhere to go: the write would clamp onto the last slots and the
        states look sound, so they come back NaN instead (the fill level is traced; `generate` sizes its cache)."""
        t = tokens_bt.shape[1]
        if t > cache.max_len:
            raise ValueError(f"{t} tokens do not fit a KV cache of {cache.max_len} slots: create a longer cache")
        cos_btp, sin_btp = self.rotary(cache.positions(t))
        mask_bts = cache.mask(t)
        attention = MASKED_ATTENTION[self.cfg.attention]

        def apply_block(x_btd, block: Block, k_bskh, v_bskh):
            x_btd, new_k_btkh, new_v_btkh = block.extend(x_btd, cos_btp, sin_btp, cache, k_bskh, v_bskh, mask_bts,
                                                         attention)
            return x_btd, (new_k_btkh, new_v_btkh)

        x_btd, (new_k_lbtkh, new_v_lbtkh) = nnx.scan(apply_block, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))(
            self.embed_tokens(tokens_bt), self.layers, cache.k_lbskh, cache.v_lbskh)
        h_btd = jnp.where(cache.end + t <= cache.max_len, self.norm(x_btd), jnp.nan)
        return h_btd, cache.appended(new_k_lbtkh, new_v_lbtkh)

    def embed_tokens(self, tokens_bt: jnp.ndarray) -> jnp.ndarray:
        return jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.cfg.dtype)

    def rotary(self, positions_bt: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """RoPE cos and sin [b, t, head_dim // 2] for these positions, shared by every layer."""
        return rotary_angles(positions_bt, inverse_frequencies(self.cfg))

    def logits(self, h_btd: jnp.ndarray) -> jnp.ndarray:
        """Output projection with float32 accumulation and result."""
        if self.cfg.tie_embeddings:
            w_dv = self.embed[...].astype(h_btd.dtype).T
        else:
            w_dv = self.lm_head[...]
        return project("btd,dv->btv", h_btd, w_dv, jnp.float32)


class ModelDef:
    """The static half of a model (graph and abstract parameters), to rebuild a `Llama` from a params pytree.

    Training keeps parameters as a plain nested dict of arrays; `merge` turns them back into a module inside
    or outside `jit` at the cost of a plain pytree rebuild.
    """

    def __init__(self, cfg: LlamaConfig):
        self.cfg = cfg
        self.graphdef, self.abstract_state = nnx.split(nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0))))

    def init(self, seed: int) -> dict:
        return nnx.to_pure_dict(nnx.state(Llama(self.cfg, rngs=nnx.Rngs(seed))))

    def merge(self, params: dict) -> Llama:
        state = jax.tree.map(lambda x: x, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)
