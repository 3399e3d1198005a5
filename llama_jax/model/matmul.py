"""The model's projections, x·W, with a derivative written out so that every matmul of the step has a float32 result.

Why: XLA's CPU backend runs a bfloat16 x bfloat16 dot with a float32 result on its YNNPACK path, which uses the
CPU's AMX/avx512_bf16 units (600-1,400 GFLOP/s measured on this project's CPU), while a bfloat16 result, the one
that `jnp.einsum` on bfloat16 operands asks for and that JAX's autodiff asks for in the backward pass, runs at
about 220 (benchmarks/README.md). Here the forward product and both products of the backward pass ask for float32
and round to the operands' dtype afterwards, which is also what a bfloat16 dot computes inside: the results are the
same up to the summation order. On GPU and TPU a float32 result of bfloat16 operands is the native form too.
The vocabulary head keeps its float32 logits; its float32 cotangent is rounded to bfloat16 for the backward
products (as under PyTorch's autocast), which halves the largest gradient of the step and lets both products run
on the fast path (10m step 4.7 -> 3.9 s).

Float32 operands keep the plain einsum: their dots already have a float32 result, and the float32 equivalence
tests (sharded == single device) stay bit-for-bit what they were.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def project(equation: str, x: jax.Array, w: jax.Array, result_dtype=None) -> jax.Array:
    """The einsum "x,w->out" of a projection, in `result_dtype` (default x's dtype): x's last axes meet W's first
    ones, as in "btd,df->btf" or "btnh,nhd->btd". A float32 result (the vocabulary head's logits) gets its
    cotangent rounded to x's dtype before the backward products, as those of the other projections are."""
    w = w.astype(x.dtype)
    result_dtype = jnp.dtype(result_dtype or x.dtype)
    if x.dtype == jnp.float32:
        return jnp.einsum(equation, x, w, preferred_element_type=result_dtype)
    return linear(x, w, contracted_axes(equation), result_dtype)


def contracted_axes(equation: str) -> int:
    """How many trailing axes of x an einsum "x,w->out" contracts with W's leading ones."""
    inputs, out = equation.split("->")
    x_sub, w_sub = inputs.split(",")
    n = len(set(x_sub) & set(w_sub))
    if n == 0 or x_sub[len(x_sub) - n:] != w_sub[:n] or out != x_sub[:len(x_sub) - n] + w_sub[n:]:
        raise ValueError(f"{equation!r} is not a projection: x's last axes must meet W's first ones")
    return n


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def linear(x: jax.Array, w: jax.Array, n_contract: int, result_dtype) -> jax.Array:
    """x·W in `result_dtype`, accumulated and computed with a float32 result."""
    return _product(x, w, n_contract, result_dtype)


def _product(x, w, n_contract, result_dtype):
    x_axes = tuple(range(x.ndim - n_contract, x.ndim))
    return _dot(x, w, x_axes, tuple(range(n_contract))).astype(result_dtype)


def _dot(a, b, a_axes, b_axes):
    return jax.lax.dot_general(a, b, ((a_axes, b_axes), ((), ())), preferred_element_type=jnp.float32)


def _linear_fwd(x, w, n_contract, result_dtype):
    return _product(x, w, n_contract, result_dtype), (x, w)


def _linear_bwd(n_contract, result_dtype, residuals, dy):
    x, w = residuals
    dy = dy.astype(x.dtype)
    rows = tuple(range(x.ndim - n_contract))
    dx = _dot(dy, w, tuple(range(len(rows), dy.ndim)), tuple(range(n_contract, w.ndim))).astype(x.dtype)
    dw = _dot(x, dy, rows, rows).astype(w.dtype)
    return dx, dw


linear.defvjp(_linear_fwd, _linear_bwd)
