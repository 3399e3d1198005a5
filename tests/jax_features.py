"""What the installed JAX ships, for the tests of kernels that depend on it."""

from __future__ import annotations

import importlib.util


def triton_attention_shipped() -> bool:
    """Pallas's Triton attention kernel, which JAX 0.12 no longer ships: there `model.attention="triton"` is a
    ConfigError (tests/test_fused_attention.py plays such a JAX), and the kernel's own tests have nothing to run."""
    try:
        return importlib.util.find_spec("jax.experimental.pallas.ops.gpu.attention") is not None
    except ModuleNotFoundError:
        return False
