"""Global-norm clipping (`optim.clip_by_global_norm`, one scalar factor times each gradient) against optax's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax.optim import clip_by_global_norm


def _grads(scale: float) -> dict:
    rng = np.random.default_rng(0)
    return {"w": jnp.asarray(rng.normal(size=(16, 8)) * scale, jnp.float32),
            "norm": {"scale": jnp.asarray(rng.normal(size=(8,)) * scale, jnp.float32)},
            "half": jnp.asarray(rng.normal(size=(4,)) * scale, jnp.bfloat16)}


@pytest.mark.parametrize("scale", [1e-3, 10.0])
def test_clipping_equals_optax_and_leaves_a_small_gradient_bitwise_unchanged(scale):
    grads = _grads(scale)
    norm = float(optax.tree.norm(grads))
    ours, _ = jax.jit(clip_by_global_norm(1.0).update)(grads, optax.EmptyState())
    theirs, _ = jax.jit(optax.clip_by_global_norm(1.0).update)(grads, optax.EmptyState())
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        assert a.dtype == b.dtype
        if norm < 1.0:
            assert np.array_equal(a, b), path
        else:  # the quotient rounds differently: one rounding of the factor and one of the product
            rtol = 2.0**-22 if a.dtype == jnp.float32 else 2.0**-7
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=rtol, err_msg=path)
    assert (norm < 1.0) == (scale < 1.0)
    if norm > 1.0:
        assert float(optax.tree.norm(ours)) == pytest.approx(1.0, rel=1e-2)  # bfloat16's share of the norm
