"""Flash attention (model/flash.py) is the reference attention, computed in key blocks in linear memory.

- The kernel: outputs and the gradients of q, k and v equal `reference_attention`'s on packed rows (several
  documents, padding with segment id 0) under grouped-query attention, for block sizes that divide the sequence and
  ones that do not; its masked form equals `reference_masked`, rows that see no key included.
- The model: attention="flash" gives the logits and loss gradient of attention="reference".
- Context parallelism: with flash, zig-zag-split queries against gathered keys give plain attention, and a whole
  training step on context x fsdp and context x stage x tensor meshes equals the single-device step.
- Memory: XLA's compiled temporaries for one attention forward and backward grow linearly with the sequence under
  flash and quadratically under the reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from test_train_step import BATCHES, Harness, assert_steps_match, make_cfg, setup_run

from llama_jax import plan as plan_lib
from llama_jax.config import default_config, model_section, validate
from llama_jax.errors import ConfigError
from llama_jax.model import ModelDef, preset
from llama_jax.model.attention import ATTENTION, document_causal_mask, reference_attention, reference_masked
from llama_jax.model.flash import BLOCK, flash_attention, flash_masked, flash_segment_attention
from llama_jax.objectives import token_nll
from llama_jax.parallel import mesh as mesh_lib
from llama_jax.parallel.context import context_attention, zigzag_order

# float32: the same sums in another order (online softmax over blocks). [largest differences measured: 7e-7 for
# outputs and gradients of size ~1]
F32_ATOL = 1e-5
# bfloat16 inputs and outputs: both kernels round probabilities and gradients to bfloat16 at different points
# (flash rounds the unnormalised exp, the reference the normalised probabilities), a few bfloat16 ulps apart,
# relative to the largest entry. [measured over 3 seeds: up to 7.1e-3 of the largest entry (~3); each kernel is
# within 6.5e-3 of the float32 result]
BF16_ATOL_OF_MAX = 1.5e-2

B, T, N, K, H = 2, 40, 4, 2, 16
SEGMENTS = np.asarray([[1] * 7 + [2] * 20 + [3] * 5 + [0] * 8,  # three documents, then padding
                       [1] * 25 + [2] * 15], np.int32)


def qkv(dtype=np.float32, seed=0, t=T, n=N, k=K):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.normal(size=(B, t, heads, H)), dtype) for heads in (n, k, k)]


def index_positions(t=T):
    return jnp.broadcast_to(jnp.arange(t), (B, t))


def assert_close(got, expected, atol):
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), rtol=0, atol=atol)


def grads(attention, q, k, v):
    """Gradients of q, k, v under a fixed random cotangent (so that every output entry matters)."""
    out, vjp = jax.vjp(attention, q, k, v)
    cotangent = jnp.asarray(np.random.default_rng(9).normal(size=out.shape), out.dtype)
    return out, vjp(cotangent)


@pytest.mark.parametrize("block", [1, 8, 7, 16, 40, 512])  # 7 and 16 do not divide 40; 512: one block
def test_forward_and_gradients_equal_reference_in_float32(block):
    q, k, v = qkv()
    positions = index_positions()
    expected, expected_grads = jax.jit(grads, static_argnums=0)(
        lambda q, k, v: reference_attention(q, k, v, SEGMENTS), q, k, v)
    out, got_grads = jax.jit(grads, static_argnums=0)(
        lambda q, k, v: flash_attention(q, k, v, SEGMENTS, SEGMENTS, positions, positions, block=block), q, k, v)
    assert out.dtype == jnp.float32
    assert_close(out, expected, F32_ATOL)
    for name, got, want in zip("qkv", got_grads, expected_grads):
        assert np.abs(np.asarray(want)).max() > 0.1, name  # a gradient that could show an error
        assert_close(got, want, F32_ATOL)


def test_registered_flash_equals_reference_without_gqa_and_in_bfloat16():
    """The `ATTENTION["flash"]` entry (positions = index) with n = k heads, and bfloat16 in and out."""
    q, k, v = qkv(n=4, k=4)
    assert_close(ATTENTION["flash"](q, k, v, SEGMENTS), reference_attention(q, k, v, SEGMENTS), F32_ATOL)

    q, k, v = qkv(jnp.bfloat16, seed=1)
    expected, expected_grads = jax.jit(grads, static_argnums=0)(
        lambda q, k, v: reference_attention(q, k, v, SEGMENTS), q, k, v)
    out, got_grads = jax.jit(grads, static_argnums=0)(lambda q, k, v: ATTENTION["flash"](q, k, v, SEGMENTS), q, k, v)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_grads)
    assert_close(out, expected, BF16_ATOL_OF_MAX * np.abs(np.asarray(expected, np.float32)).max())
    for got, want in zip(got_grads, expected_grads):
        assert_close(got, want, BF16_ATOL_OF_MAX * np.abs(np.asarray(want, np.float32)).max())


@pytest.mark.parametrize("block", [8, 7, 13, 40])  # 5, 6 and 4 blocks in 4 query chunks; one block, one chunk
def test_self_attention_in_query_chunks_equals_reference(block):
    """`flash_segment_attention` skips the key blocks after each query chunk: outputs and gradients still equal the
    reference's, for chunks of unequal sizes and a block that does not divide the sequence."""
    q, k, v = qkv(seed=3)
    expected, expected_grads = jax.jit(grads, static_argnums=0)(
        lambda q, k, v: reference_attention(q, k, v, SEGMENTS), q, k, v)
    out, got_grads = jax.jit(grads, static_argnums=0)(
        lambda q, k, v: flash_segment_attention(q, k, v, SEGMENTS, block=block), q, k, v)
    assert_close(out, expected, F32_ATOL)
    for got, want in zip(got_grads, expected_grads):
        assert_close(got, want, F32_ATOL)


def test_masking_follows_positions_and_segments_not_indices():
    """Keys in another order than the queries (as context parallelism's gathered keys): the mask comes from their
    positions and segments, so permuting the keys changes nothing."""
    q, k, v = qkv(seed=2)
    positions = index_positions()
    perm = np.random.default_rng(3).permutation(T)
    out = flash_attention(q, k[:, perm], v[:, perm], SEGMENTS, SEGMENTS[:, perm], positions, positions[:, perm],
                          block=8)
    assert_close(out, reference_attention(q, k, v, SEGMENTS), F32_ATOL)


def test_masked_form_equals_reference_masked_even_for_rows_that_see_nothing():
    """A query with no visible key gets what the reference gives it (the mean of all values), not NaN."""
    q, k, v = qkv(seed=4)
    mask = np.array(document_causal_mask(SEGMENTS))
    mask[0, 3] = False  # one row masked entirely
    mask[1, :6] = False  # and several
    expected, expected_grads = jax.jit(grads, static_argnums=0)(
        lambda q, k, v: reference_masked(q, k, v, mask), q, k, v)
    out, got_grads = jax.jit(grads, static_argnums=0)(lambda q, k, v: flash_masked(q, k, v, mask, block=16), q, k, v)
    assert not np.isnan(np.asarray(out)).any()
    assert_close(out, expected, F32_ATOL)
    for got, want in zip(got_grads, expected_grads):
        assert_close(got, want, F32_ATOL)


@pytest.mark.parametrize("block", [0, -3, 2.5])
def test_bad_block_is_a_config_error(block):
    q, k, v = qkv()
    with pytest.raises(ConfigError, match="block"):
        flash_attention(q, k, v, SEGMENTS, SEGMENTS, index_positions(), index_positions(), block=block)


# ---------------------------------------------------------------------------------------------- the model


def test_model_with_flash_gives_reference_logits_and_loss_gradient():
    cfg = preset("debug").replace(dtype="float32", n_layers=2)
    params = ModelDef(cfg).init(0)
    rng = np.random.default_rng(5)
    tokens, targets = (jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32) for _ in range(2))
    positions = np.concatenate([np.arange(7), np.arange(20), np.arange(5), np.arange(8)])
    positions = jnp.asarray(np.stack([positions, np.concatenate([np.arange(25), np.arange(15)])]), jnp.int32)

    def logits_and_grads(attention):
        model_def = ModelDef(cfg.replace(attention=attention))

        def loss(params):
            logits = model_def.merge(params)(tokens, segment_ids=SEGMENTS, positions=positions)
            return jnp.mean(token_nll(logits, targets) * (SEGMENTS > 0)), logits

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    expected_grads, expected_logits = logits_and_grads("reference")
    got_grads, got_logits = logits_and_grads("flash")
    assert_close(got_logits, expected_logits, F32_ATOL)

    def check(path, want, got):
        scale = np.abs(np.asarray(want)).max()
        assert scale > 0, path
        assert_close(got, want, 1e-5 * scale)

    jax.tree_util.tree_map_with_path(check, expected_grads, got_grads)


# ---------------------------------------------------------------------------------------------- context parallelism


@pytest.mark.parametrize("context", [2, 4])
def test_context_flash_attention_equals_reference_and_stays_split(context):
    """1,024 tokens: four blocks of the default 256 keys, each holding one or two zig-zag chunks (256 or 128
    tokens), so masking by the permuted positions is exercised across blocks."""
    t = 1024
    q, k, v = qkv(seed=context, t=t)
    segments = np.asarray([[1] * 150 + [2] * 600 + [3] * 100 + [0] * 174, [1] * 413 + [2] * 611], np.int32)
    mesh = mesh_lib.make_mesh(dict(data=1, stage=1, fsdp=1, context=context, tensor=-1))
    order = zigzag_order(t, context)
    with jax.set_mesh(mesh):
        spec = mesh_lib.logical_to_spec(("batch", "length"))
        placed = [jax.device_put(np.asarray(a)[:, order],
                                 jax.sharding.NamedSharding(mesh, P(*spec, *(None,) * (a.ndim - 2))))
                  for a in (q, k, v, segments)]
        out = jax.jit(context_attention("flash", context))(*placed)
    assert {s.data.shape[1] for s in out.addressable_shards} == {t // context}  # the queries stay split
    assert_close(np.asarray(out)[:, np.argsort(order)], reference_attention(q, k, v, segments), F32_ATOL)


def step_cfg(attention: str, mesh: dict):
    """test_parallel.py's GQA model (4 layers, 8 heads, 2 KV heads, untied output) on 8 rows of 32 tokens."""
    cfg = make_cfg(**mesh)
    cfg.model.update(n_layers=4, n_heads=8, n_kv_heads=2, head_dim=8, tie_embeddings=False, attention=attention)
    validate(cfg)
    return cfg


@pytest.fixture(scope="module")
def single_device_reference(tmp_path_factory):
    """The initial state, and the states and metrics after each of BATCHES, on one device with reference attention."""
    harness = Harness(setup_run(step_cfg("reference", {}), tmp_path_factory.mktemp("flash"), devices=jax.devices()[:1]))
    with jax.set_mesh(harness.run.mesh):
        init = jax.device_get(harness.run.init())
    states, metrics, _ = harness.train(init, BATCHES)
    return init, states, metrics


@pytest.mark.parametrize("mesh", [dict(context=2, fsdp=4), dict(context=2, stage=2, tensor=2)],
                         ids=["context2-fsdp4", "context2-stage2-tensor2"])
def test_context_parallel_flash_step_equals_single_device_reference_step(single_device_reference, tmp_path, mesh):
    """Two training steps with flash attention, sequences split over `context` (and a GPipe pipeline over `stage`,
    whose shard_map the kernel runs inside), against one device running the reference attention: the tolerances of
    test_parallel.py (float32 rounding)."""
    init, expected_states, expected_metrics = single_device_reference
    run = setup_run(step_cfg("flash", mesh), tmp_path)
    assert {axis: size for axis, size in run.mesh.shape.items() if size > 1} == mesh
    assert_steps_match(Harness(run), init, expected_states, expected_metrics, "flash")


# ---------------------------------------------------------------------------------------------- memory


def attention_temp_bytes(name: str, t: int, n: int = 2, k: int = 1, h: int = 16) -> int:
    """XLA's temporaries for one attention forward and backward over a [1, t] row (compiled, nothing run)."""
    attention = ATTENTION[name]

    def forward_backward(q, key, value, segment_ids, cotangent):
        _, vjp = jax.vjp(lambda q, key, value: attention(q, key, value, segment_ids), q, key, value)
        return vjp(cotangent)

    shapes = [jax.ShapeDtypeStruct((1, t, heads, h), jnp.float32) for heads in (n, k, k)]
    shapes += [jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t, n, h), jnp.float32)]
    return jax.jit(forward_backward).lower(*shapes).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_flash_memory_stays_linear_inside_remat_layers(policy):
    """The model runs attention inside `jax.checkpoint` inside a scan over layers. A remat policy must not split
    flash's loop over key blocks and stack per-block values (a scan there kept [blocks, t, block] masks and, under
    "dots", the scores): the temporaries of two such layers' forward and backward still double with the sequence.
    [measured: 13 -> 26 MiB]"""
    rule = None if policy == "full" else jax.checkpoint_policies.checkpoint_dots

    def temp_bytes(t: int) -> int:
        segment_ids = jnp.ones((1, t), jnp.int32)

        def layer(x_btnh, w_nh):
            q_btnh = x_btnh * w_nh
            return x_btnh + ATTENTION["flash"](q_btnh, q_btnh[:, :, :2], x_btnh[:, :, 2:], segment_ids), None

        def loss(x_btnh, w_lnh):
            return jax.lax.scan(jax.checkpoint(layer, policy=rule), x_btnh, w_lnh)[0].sum()

        shapes = jax.ShapeDtypeStruct((1, t, 4, 16), jnp.float32), jax.ShapeDtypeStruct((2, 4, 16), jnp.float32)
        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(2048), temp_bytes(4096)
    assert 1.8 < large / small < 2.2, (small, large)


def test_flash_memory_grows_linearly_and_the_reference_quadratically():
    """4K -> 8K tokens (2 heads): flash's temporaries double (one [t / 4, 256] tile of scores per head and pass), the
    reference's quadruple ([t, t] scores). [measured: flash 10 -> 20 MiB, reference 385 -> 1538 MiB]"""
    flash = [attention_temp_bytes("flash", t) for t in (4096, 8192)]
    reference = [attention_temp_bytes("reference", t) for t in (4096, 8192)]
    assert 1.8 < flash[1] / flash[0] < 2.2
    assert 3.6 < reference[1] / reference[0] < 4.4
    assert flash[1] < reference[1] / 8  # at 8K tokens already
    one_tile = 2 * 8192 * BLOCK * 4  # scores of one key block, float32, both heads
    assert flash[1] < 12 * one_tile


def test_plan_fits_the_405b_at_128k_tokens_with_flash_only():
    """The fit plan (plan.py) of Llama 3.1 405B on 14,336 H100s at 131,072 tokens (stage 7 x tensor 8 x context 32
    x fsdp 8, circular pipeline, full remat): flash attention fits in 80 GB, the dense kernels' [4096, 131072]
    scores per head do not. [plan: 44.2 GiB with flash, 187.8 GiB with xla]"""
    totals = {}
    for attention in ("flash", "xla"):
        cfg = default_config()
        cfg.model = model_section("llama3.1-405b", remat="full", attention=attention)
        cfg.data.batch_size, cfg.data.seq_len = 128, 131072
        cfg.mesh.update(data=1, stage=7, fsdp=8, context=32, tensor=8)
        cfg.pipeline.update(schedule="circular", repeats=6, microbatches=8)
        cfg.optim.grad_accum = 2
        planned = plan_lib.plan(cfg, accelerator="h100")
        assert planned.devices == 14336
        totals[attention] = planned.total_bytes
    h100 = plan_lib.ACCELERATORS["h100"].memory_bytes
    assert totals["flash"] < 0.6 * h100 < 2 * h100 < totals["xla"]
