"""`matmul.project`: the model's projections with a hand-written derivative whose dots all have float32 results.

Its value and both gradients must be the float64 products rounded once to bfloat16, as `jnp.einsum` on bfloat16
operands computes them (it too accumulates in float32 on every backend), for each equation shape the model uses.
And every product of a compiled bfloat16 training step must stay on the CPU path that runs that form."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import train_step
from llama_jax.model.matmul import contracted_axes, project

# (equation, x shape, w shape): the model's projections (q/k/v, output, MLP in and out) and LoRA's adapters
EQUATIONS = [
    ("btd,dnh->btnh", (2, 24, 16), (16, 4, 8)),
    ("btnh,nhd->btd", (2, 24, 4, 8), (4, 8, 16)),
    ("btd,df->btf", (2, 24, 16), (16, 40)),
    ("btf,fd->btd", (3, 8, 40), (40, 16)),
    ("btd,dr->btr", (2, 24, 16), (16, 4)),
]


def bf16(rng, shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)


def as_bf16_of_f64(value: np.ndarray) -> np.ndarray:
    return np.asarray(jnp.asarray(value.astype(np.float32), jnp.bfloat16).astype(jnp.float32))


@pytest.mark.parametrize("equation,x_shape,w_shape", EQUATIONS)
def test_bfloat16_value_and_gradients_are_the_exact_products_rounded_once(equation, x_shape, w_shape):
    rng = np.random.default_rng(0)
    x, w = bf16(rng, x_shape), bf16(rng, w_shape)
    y, pullback = jax.vjp(lambda x, w: project(equation, x, w), x, w)
    dy = bf16(rng, y.shape)
    dx, dw = pullback(dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16,) * 3
    assert_exact_products_rounded(equation, x, w, dy, {"y": y, "dx": dx, "dw": dw})


def test_a_float32_result_is_exact_and_its_cotangent_is_rounded_to_bfloat16():
    """The vocabulary head: float32 logits of bfloat16 operands; the backward products take the float32 cotangent
    rounded to bfloat16, as every other projection's cotangent is."""
    rng = np.random.default_rng(2)
    x, w = bf16(rng, (2, 24, 16)), bf16(rng, (16, 64))
    y, pullback = jax.vjp(lambda x, w: project("btd,dv->btv", x, w, jnp.float32), x, w)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx, dw = pullback(dy)
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.float32, jnp.bfloat16, jnp.bfloat16)
    exact = np.einsum("btd,dv->btv", np.asarray(x, np.float64), np.asarray(w, np.float64))
    np.testing.assert_allclose(y, exact, rtol=1e-6, atol=1e-6)
    assert_exact_products_rounded("btd,dv->btv", x, w, dy.astype(jnp.bfloat16), {"dx": dx, "dw": dw})


def assert_exact_products_rounded(equation, x, w, dy, actual: dict):
    """Each of `actual` (y, dx, dw) is the float64 product rounded to bfloat16, up to one ulp."""
    x64, w64, dy64 = (np.asarray(a, np.float64) for a in (x, w, dy))
    inputs, out = equation.split("->")
    x_sub, w_sub = inputs.split(",")
    expected = {
        "y": np.einsum(equation, x64, w64),
        "dx": np.einsum(f"{out},{w_sub}->{x_sub}", dy64, w64),
        "dw": np.einsum(f"{x_sub},{out}->{w_sub}", x64, dy64),
    }
    # float32 accumulation in another order may land on the neighbouring bfloat16 value: one ulp (2^-7 relative)
    for name, got in actual.items():
        want = expected[name]
        np.testing.assert_allclose(np.asarray(got, np.float32), as_bf16_of_f64(want), rtol=2**-7,
                                   atol=2**-7 * np.abs(want).max() * 1e-2, err_msg=name)
        exact = np.mean(np.asarray(got, np.float32) == as_bf16_of_f64(want))
        assert exact > 0.95, (name, exact)


def test_float32_is_the_plain_einsum_bit_for_bit():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 24, 16)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((16, 40)), jnp.float32)

    def loss(fn):
        return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(fn(x, w))), argnums=(0, 1)))(x, w)

    ours = loss(lambda x, w: project("btd,df->btf", x, w))
    plain = loss(lambda x, w: jnp.einsum("btd,df->btf", x, w))
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(plain)):
        np.testing.assert_array_equal(a, b)


def test_an_equation_that_is_not_a_projection_is_refused():
    assert contracted_axes("btnh,nhd->btd") == 2
    with pytest.raises(ValueError, match="not a projection"):
        contracted_axes("btd,fd->btf")


@pytest.mark.parametrize("scan_layers", [False, True])
def test_every_product_of_a_bfloat16_training_step_stays_in_a_ynnpack_fusion(tmp_path, scan_layers):
    """XLA's CPU backend runs a bfloat16 x bfloat16 dot with a float32 result only inside a YNNPACK fusion: a dot
    left outside one (after XLA folded a transposition into it, say) fails when the step runs, with "Unsupported
    element type for DotThunk::Execute: BF16 x BF16 = F32". The step is compiled at a length whose causal flash
    chunks hold one key block each, so that XLA inlines their loops (where a first version of flash's layout change
    lost a product)."""
    from llama_jax import trainer
    from llama_jax.config import default_config, model_section
    from llama_jax.model.flash import BLOCK, CAUSAL_CHUNKS
    from llama_jax.optim import lr_schedule

    cfg = default_config()
    seq = BLOCK * CAUSAL_CHUNKS
    # heads of 64 features and two rows: at the debug preset's heads of 16 and one row XLA kept the product in place
    cfg.model = model_section("debug", max_seq_len=seq, remat="none", attention="flash", scan_layers=scan_layers,
                              dim=256, n_layers=1, ffn_dim=256)
    cfg.data.batch_size, cfg.data.seq_len = 2, seq
    cfg.mesh.data = 1
    run = trainer.setup(cfg, str(tmp_path), devices=jax.devices()[:1])
    tokens = np.arange(2 * seq, dtype=np.int32).reshape(2, seq) % cfg.model.vocab_size
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), tokens.shape).copy()
    batch = run.to_global(dict(tokens=tokens, targets=tokens, segment_ids=np.ones_like(tokens), positions=positions,
                               loss_mask=np.ones(tokens.shape, np.float32)))
    with jax.set_mesh(run.mesh):
        step = jax.jit(train_step.make_train_step(run.model_def, run.tx, lr_schedule(cfg.optim, 10), 1,
                                               loss_chunk_len=seq // 2))
        hlo = step.lower(run.init(), batch).compile().as_text()
    ynn = set(re.findall(r'calls=%([\w.\-]+), [^\n]*"kind":"__ynn_fusion"', hlo))
    computation, stray, inside = None, [], 0
    for line in hlo.splitlines():
        if header := re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line):
            computation = header.group(1)
        elif re.search(r"= \w+\[[\d,]*\]\S* dot\(", line):
            if computation in ynn:
                inside += 1
            else:
                stray.append(line.strip()[:200])
    assert inside >= 10 and not stray, stray
