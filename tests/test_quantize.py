"""FP8 inference weights: which matrices are quantised and how, their bytes against bfloat16, and the logit and greedy
token error they cost on a tiny random model (init std 0.02, the gain of a real Llama's matrices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llama_jax.errors import ConfigError
from llama_jax.generate import generate
from llama_jax.model import Llama, LlamaConfig
from llama_jax.quantize import LINEAR_WEIGHTS, Fp8Weight, logit_error, quantize_array, quantize_fp8

CFG = LlamaConfig(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=256, dtype="float32",
                  rope_type="default", rope_theta=10000.0, max_seq_len=256)
TOKENS_BT = np.random.default_rng(0).integers(0, CFG.vocab_size, (4, 48))


@pytest.fixture(scope="module")
def model() -> Llama:
    with nnx.use_eager_sharding(False):
        return Llama(CFG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def quantized(model):
    return quantize_fp8(model)


def _at(model: Llama, path: tuple[str, ...]):
    node = model
    for name in path:
        node = getattr(node, name)
    return node[...]


def test_each_row_is_fp8_with_one_float32_scale(model, quantized):
    """Every linear matrix becomes float8 e4m3 values and a float32 scale per output channel (1 on the contracted
    axes); each weight is recovered within e4m3's rounding (3 mantissa bits: 2^-4 relative, and an absolute floor
    for the subnormals at 2^-9 of the row's scale). Embedding, norms and lm_head are untouched."""
    fp8_model, _ = quantized
    for path, axes in LINEAR_WEIGHTS.items():
        w, q = np.asarray(_at(model, path)), _at(fp8_model, path)
        assert isinstance(q, Fp8Weight) and q.value.dtype == jnp.float8_e4m3fn and q.scale.dtype == jnp.float32
        assert q.scale.shape == tuple(1 if i in axes else n for i, n in enumerate(w.shape))
        scale = np.asarray(q.scale)
        assert np.allclose(np.abs(w).max(axis=axes, keepdims=True), 448 * scale)  # each row's max maps to e4m3's max
        error = np.abs(np.asarray(q.astype(jnp.float32)) - w)
        assert np.all(error <= np.maximum(np.abs(w) * 2.0**-4, scale * 2.0**-9) * 1.0001)
        assert error.max() > 0  # quantised, not copied
    for path in (("embed",), ("lm_head",), ("norm", "scale"), ("layers", "attn_norm", "scale")):
        assert np.array_equal(np.asarray(_at(fp8_model, path)), np.asarray(_at(model, path)))
    assert not isinstance(_at(model, ("layers", "attn", "wq")), Fp8Weight)  # the input model is left as it was


def test_fp8_weights_take_about_half_of_bfloat16(quantized):
    _, report = quantized
    linear = sum(int(np.prod(_at(quantized[0], path).shape)) for path in LINEAR_WEIGHTS)
    assert report.n_weights == 7 and report.bf16_bytes == 2 * linear and report.original_bytes == 4 * linear
    ratio = report.bf16_bytes / report.fp8_bytes
    print(f"fp8 {report.fp8_bytes} B vs bf16 {report.bf16_bytes} B: {ratio:.3f}x smaller")
    # one byte per weight plus 4 per output row; rows here are 128 or 256 long: 2 / (1 + 4/128) = 1.94 at worst
    assert 1.93 < ratio < 2.0
    assert "x smaller" in report.describe()


def test_logit_error_and_greedy_tokens_stay_close(model, quantized):
    """Bounds measured on this model with margin: max |logit error| / max |logit| 0.034, teacher-forced argmax
    agreement 94%. Each matmul's output carries e4m3's ~2.6% RMS weight error; greedy continuations may part
    after a near tie, so their agreement is checked on the first tokens."""
    fp8_model, _ = quantized
    error = logit_error(model, fp8_model, TOKENS_BT)
    print(f"max |logit error| / max |logit| = {error:.4f}")
    assert 0 < error < 0.05
    ref_btv, out_btv = np.asarray(model(jnp.asarray(TOKENS_BT))), np.asarray(fp8_model(jnp.asarray(TOKENS_BT)))
    agreement = np.mean(ref_btv.argmax(-1) == out_btv.argmax(-1))
    print(f"teacher-forced argmax agreement {agreement:.3f}")
    assert agreement > 0.9
    prompts = TOKENS_BT[:, :8].tolist()
    ours, theirs = np.array(generate(fp8_model, prompts, 8)), np.array(generate(model, prompts, 8))
    assert np.mean(ours[:, :4] == theirs[:, :4]) >= 0.75


def test_lm_head_only_when_asked(model):
    fp8_model, report = quantize_fp8(model, lm_head=True)
    assert report.n_weights == 8 and isinstance(fp8_model.lm_head[...], Fp8Weight)
    assert fp8_model.lm_head[...].scale.shape == (1, CFG.vocab_size)  # one scale per vocabulary entry
    assert logit_error(model, fp8_model, TOKENS_BT[:1]) < 0.05
    with nnx.use_eager_sharding(False):
        tied = Llama(CFG.replace(tie_embeddings=True, n_layers=1), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="ties its output projection"):
        quantize_fp8(tied, lm_head=True)


def test_quantize_array_handles_zero_rows_and_refuses_slicing():
    w = jnp.array([[0.0, 0.0], [0.5, -896.0]]).T  # output channel 0 all zeros
    q = quantize_array(w, (0,))
    assert np.asarray(q.scale).tolist() == [[1.0, 2.0]]
    assert np.array_equal(np.asarray(q.astype(jnp.float32)), np.asarray(w))  # 0.25 and -448 are exact in e4m3
    assert q[...] is q
    with pytest.raises(TypeError, match="read whole"):
        q[0]
    assert jax.tree.leaves(q) == [q.value, q.scale]  # a pytree: it crosses jit, scan and shardings as two arrays
