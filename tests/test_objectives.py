"""The causal-LM loss in chunks: the same value and gradients as the whole loss, and a step whose memory no longer
grows with vocabulary x sequence (XLA's own memory analysis of the compiled step)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import trainer
from llama_jax import train_step
from llama_jax.config import default_config, model_section
from llama_jax.errors import ConfigError
from llama_jax.model import ModelDef
from llama_jax.model.matmul import project
from llama_jax.objectives import lm_loss_sum, token_nll
from llama_jax.optim import lr_schedule, make_optimizer


def loss_inputs(b=3, t=24, d=16, v=50, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    h_btd = jax.random.normal(keys[0], (b, t, d))
    w_dv = jax.random.normal(keys[1], (d, v)) * 0.5
    targets_bt = jax.random.randint(keys[2], (b, t), 0, v)
    mask_bt = (jax.random.uniform(keys[3], (b, t)) > 0.3).astype(jnp.float32)
    return h_btd, w_dv, targets_bt, mask_bt


@pytest.mark.parametrize("chunk_len", [1, 4, 8, 12])
def test_chunks_give_the_whole_loss_and_its_gradients(chunk_len):
    h_btd, w_dv, targets_bt, mask_bt = loss_inputs()

    def loss(h, w, chunk):
        total, count = lm_loss_sum(lambda x: x @ w, h, targets_bt, mask_bt, chunk_len=chunk)
        return total / count

    whole, (dh_whole, dw_whole) = jax.value_and_grad(loss, argnums=(0, 1))(h_btd, w_dv, 0)
    chunked, (dh, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)(h_btd, w_dv, chunk_len)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6)
    np.testing.assert_allclose(dh, dh_whole, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, dw_whole, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(dh_whole).max()) > 1e-3  # the gradients compared are not trivially zero
    masked = np.asarray(mask_bt) == 0
    assert np.all(np.asarray(dh)[masked] == 0), "masked positions get no gradient"


@pytest.mark.parametrize("chunk_len, z_loss", [(0, 0.0), (8, 0.0), (4, 1e-2)])
def test_the_loss_and_its_gradients_are_autodiffs_of_the_formula(chunk_len, z_loss):
    """`lm_loss_sum` makes its gradients in the forward pass, for a cotangent of 1, and scales them in the backward
    pass; under a cotangent other than 1 they equal autodiff's of the plain formula, for the hidden states and for
    the weights its logits function closes over."""
    h_btd, w_dv, targets_bt, mask_bt = loss_inputs()

    def formula(h, w):
        logits = h @ w
        log_z = jax.nn.logsumexp(logits, axis=-1)
        nll = log_z - jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0] + z_loss * log_z**2
        return jnp.sum(nll * mask_bt)

    def ours(h, w):
        return lm_loss_sum(lambda x: x @ w, h, targets_bt, mask_bt, chunk_len=chunk_len, z_loss=z_loss)[0]

    cotangent = 0.37
    want, want_vjp = jax.vjp(formula, h_btd, w_dv)
    got, got_vjp = jax.jit(lambda h, w: jax.vjp(ours, h, w))(h_btd, w_dv)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for have, expected in zip(got_vjp(cotangent), want_vjp(cotangent)):
        assert float(jnp.abs(expected).max()) > 1e-2
        np.testing.assert_allclose(have, expected, rtol=1e-5, atol=1e-6)


def test_under_differentiation_each_chunks_logits_are_made_once():
    """The head's forward product runs once per chunk in a training step: the chunk's gradients are made next to
    its logits, not from logits recomputed in the backward pass (which ran the head twice per chunk)."""
    h_btd, w_dv, targets_bt, mask_bt = loss_inputs()
    calls = []

    def logits_fn(x):
        jax.debug.callback(lambda: calls.append(1))
        return x @ w_dv

    grad = jax.jit(jax.grad(lambda h: lm_loss_sum(logits_fn, h, targets_bt, mask_bt, chunk_len=8)[0]))
    jax.block_until_ready(grad(h_btd))
    assert len(calls) == 24 // 8


def test_bfloat16_gradients_are_the_float32_ones_up_to_rounding():
    """In bfloat16 through the model's projection (float32 logits, the logits' gradient rounded to bfloat16 for
    the backward products, the hidden states' gradient rounded at a cotangent of 1 and again once scaled), the
    gradients stay within bfloat16's rounding of the float32 ones."""
    h_btd, w_dv, targets_bt, mask_bt = loss_inputs(t=32, d=64, v=300)

    def loss(h, w, chunk_len):
        return lm_loss_sum(lambda x: project("btd,dv->btv", x, w, jnp.float32), h, targets_bt, mask_bt,
                           chunk_len=chunk_len)[0] / 7.0

    h_bf16 = h_btd.astype(jnp.bfloat16)
    want = jax.grad(loss, argnums=(0, 1))(h_bf16.astype(jnp.float32), w_dv, 0)
    for chunk_len in (0, 8):
        got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(h_bf16, w_dv, chunk_len)
        for have, expected in zip(got, want):
            scale = float(jnp.abs(expected).max())
            error = float(jnp.abs(have.astype(jnp.float32) - expected).max())
            assert 0 < error < 2**-7 * scale, (chunk_len, error, scale)  # measured: 2.6e-3 to 3.5e-3 x scale


def test_a_chunk_length_that_does_not_divide_the_sequence_is_refused():
    h_btd, w_dv, targets_bt, mask_bt = loss_inputs(t=24)
    with pytest.raises(ConfigError, match=r"sequence length 24 is not a multiple of objective.loss_chunk_len=10"):
        lm_loss_sum(lambda x: x @ w_dv, h_btd, targets_bt, mask_bt, chunk_len=10)


def step_temp_bytes(vocab: int, chunk_len: int, batch: int = 4, seq: int = 1024) -> int:
    """Scratch memory XLA plans for one compiled training step (forward, backward, AdamW) of a 1-layer model."""
    cfg = default_config()
    cfg.model = model_section("debug", vocab_size=vocab, n_layers=1, dtype="float32", max_seq_len=seq)
    model_def = ModelDef(trainer.model_config(cfg))
    tx = make_optimizer(cfg.optim, 10)
    state = jax.eval_shape(functools.partial(train_step.init_state, model_def, tx, 0))
    rows = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    rows["loss_mask"] = jax.ShapeDtypeStruct((batch, seq), jnp.float32)
    step = jax.jit(train_step.make_train_step(model_def, tx, lr_schedule(cfg.optim, 10), 1, loss_chunk_len=chunk_len),
                   donate_argnums=0)
    return step.lower(state, rows).compile().memory_analysis().temp_size_in_bytes


def test_in_chunks_the_step_no_longer_holds_the_logits():
    """At vocabulary 32,768 x 4 x 1,024 positions the whole float32 logits are 512 MiB. Measured: the unchunked step
    plans about 1,250 MiB of scratch and grows by ~900 MiB from vocabulary 4,096 to 32,768; in chunks of 128
    positions it plans about 370 MiB and grows by ~100 MiB (the chunk's own logits)."""
    small, large = 4096, 32768
    whole = {v: step_temp_bytes(v, 0) for v in (small, large)}
    chunked = {v: step_temp_bytes(v, 128) for v in (small, large)}
    logits_bytes = 4 * 1024 * large * 4
    print(f"\nscratch MiB: whole {[round(x / 2**20) for x in whole.values()]}, "
          f"chunked {[round(x / 2**20) for x in chunked.values()]}")
    assert whole[large] - whole[small] > logits_bytes * (1 - small / large)  # whole: at least the logits, once
    assert chunked[large] - chunked[small] < 0.15 * (whole[large] - whole[small])
    assert chunked[large] < whole[large] - logits_bytes


def test_z_loss_adds_the_squared_log_normaliser_in_whole_and_in_chunks():
    h_btd, w_dv, targets_bt, mask_bt = loss_inputs()
    logits = np.asarray(h_btd @ w_dv, np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    nll = log_z - np.take_along_axis(logits, np.asarray(targets_bt)[..., None], -1)[..., 0]
    expected = float(((nll + 1e-2 * log_z**2) * np.asarray(mask_bt)).sum())
    for chunk_len in (0, 8):
        total, _ = lm_loss_sum(lambda x: x @ w_dv, h_btd, targets_bt, mask_bt, chunk_len=chunk_len, z_loss=1e-2)
        np.testing.assert_allclose(float(total), expected, rtol=1e-5)
    plain, _ = lm_loss_sum(lambda x: x @ w_dv, h_btd, targets_bt, mask_bt)
    assert float(total) - float(plain) > 1e-2  # the z term is there and not negligible here


@pytest.mark.parametrize("grad_dtype", ["float32", "bfloat16"])  # the one-hot part as a scatter, as a select
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_token_nll_gradient_is_autodiffs_of_its_formula(z_loss, grad_dtype):
    """`token_nll` writes its gradient out (softmax x (1 + 2 z log Z) - onehot: one pass over the logits); values and
    gradients under a random cotangent equal autodiff's of log Z - logit[target] + z log Z^2."""
    keys = jax.random.split(jax.random.key(3), 3)
    logits = jax.random.normal(keys[0], (3, 24, 50)) * 3
    targets = jax.random.randint(keys[1], (3, 24), 0, 50)
    cotangent = jax.random.normal(keys[2], (3, 24))

    def formula(logits):
        log_z = jax.nn.logsumexp(logits, axis=-1)
        return log_z - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0] + z_loss * log_z**2

    expected, expected_vjp = jax.vjp(formula, logits)
    got, got_vjp = jax.vjp(lambda logits: token_nll(logits, targets, z_loss, grad_dtype), logits)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    (want,), (have,) = expected_vjp(cotangent), got_vjp(cotangent)
    assert float(jnp.abs(want).max()) > 0.1
    np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, logits_buffers", [("float32", 2), ("bfloat16", 1.5)])
def test_the_loss_gradient_is_written_once(dtype, logits_buffers):
    """The loss's forward and backward over [2,048 x 8,192] float32 logits (64 MiB) from the model's projection:
    in float32 the logits, their gradient and its transposed copy for the weight gradient; in bfloat16 the logits
    and the gradient rounded to bfloat16. XLA's CPU backend keeps nothing else that size. (With the one-hot as a
    select in float32, or as a scatter in bfloat16, it kept one more float32 buffer: 3 and 2 logits.)"""
    t, d, v = 2048, 64, 8192

    def loss(w_dv, h_btd, targets_bt, mask_bt):
        return lm_loss_sum(lambda x: project("btd,dv->btv", x, w_dv, jnp.float32), h_btd, targets_bt, mask_bt)[0]

    args = (jax.ShapeDtypeStruct((d, v), jnp.float32), jax.ShapeDtypeStruct((1, t, d), dtype),
            jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), jnp.float32))
    temp = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes
    logits_bytes = t * v * 4
    print(f"\n{dtype}: scratch {temp / logits_bytes:.2f} x the float32 logits")
    assert temp < (logits_buffers + 0.25) * logits_bytes
