"""The accelerators' fused attention kernels (model/fused_attention.py) on a machine without them.

- Triton (GPU) and splash (TPU): each Pallas kernel, run through Pallas's interpreter, gives the reference
  attention's outputs and gradients on packed rows (several documents, padding with segment id 0) under
  grouped-query attention, for a sequence its block does not divide, in float32 and bfloat16.
- On a mesh they run per device (parallel/layers.py): the sharded step equals the single-device one; in a pipeline
  they are a ConfigError.
- Off their hardware, choosing any of the kernels is a ConfigError that names the fix, raised from the model's own
  forward pass; cuDNN with float32 compute is one on construction.
- The fit plan counts them without [t, t] scores, like flash, plus cuDNN's dense same-document bias.
cuDNN itself cannot be traced without a GPU; benchmarks/gpu.py checks it against the reference on one.
"""

from __future__ import annotations

import functools
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jax_features import triton_attention_shipped
from test_flash import BF16_ATOL_OF_MAX, F32_ATOL, SEGMENTS, assert_close, grads, qkv
from test_parallel import case_cfg, references  # noqa: F401 (a fixture)
from test_train_step import Harness, assert_steps_match, setup_run

from llama_jax import plan as plan_lib
from llama_jax.config import default_config, model_section, validate
from llama_jax.errors import ConfigError
from llama_jax.model import Llama, preset
from llama_jax.model.attention import ATTENTION, reference_attention
from llama_jax.model.fused_attention import splash_attention, triton_attention

PALLAS = {"triton": triton_attention, "splash": splash_attention}
NO_TRITON = pytest.mark.skipif(not triton_attention_shipped(), reason=f"JAX {jax.__version__} ships no Triton "
                               "attention kernel (choosing it there is tested as a ConfigError)")
SMALLEST_BLOCK = {"triton": 16, "splash": 128}  # splash computes in blocks of whole 128-lane vectors
# 300 tokens: three documents and padding, then one document (3 blocks of 128 for splash, the last one part-filled)
LONG_SEGMENTS = np.asarray([[1] * 90 + [2] * 150 + [3] * 20 + [0] * 40, [1] * 300], np.int32)


def triton(*args):
    """A parameter set of the Triton kernel's, run where the installed JAX ships it."""
    return pytest.param("triton", *args, marks=NO_TRITON)


def reference_and_kernel(kernel, q, k, v, block, segments=SEGMENTS):
    expected = jax.jit(grads, static_argnums=0)(lambda q, k, v: reference_attention(q, k, v, segments), q, k, v)
    got = jax.jit(grads, static_argnums=0)(
        lambda q, k, v: PALLAS[kernel](q, k, v, segments, interpret=True, block=block), q, k, v)
    return expected, got


# 40 tokens padded to 3 blocks of 16 or to one of 128; 300 tokens padded to 3 blocks of 128
@pytest.mark.parametrize("kernel,block,t", [triton(16, 40), triton(128, 40), ("splash", 128, 40), ("splash", 128, 300)])
def test_pallas_kernel_equals_reference_in_float32(kernel, block, t):
    q, k, v = qkv(t=t)
    segments = SEGMENTS if t == 40 else LONG_SEGMENTS
    (expected, expected_grads), (out, got_grads) = reference_and_kernel(kernel, q, k, v, block, segments)
    assert out.shape == expected.shape and out.dtype == jnp.float32
    assert_close(out, expected, F32_ATOL)
    for name, got, want in zip("qkv", got_grads, expected_grads):
        assert np.abs(np.asarray(want)).max() > 0.1, name  # a gradient that could show an error
        assert_close(got, want, F32_ATOL)


@pytest.mark.parametrize("kernel", [triton(), "splash"])
def test_pallas_kernel_equals_reference_in_bfloat16(kernel):
    q, k, v = qkv(jnp.bfloat16, seed=1)
    (expected, expected_grads), (out, got_grads) = reference_and_kernel(kernel, q, k, v, SMALLEST_BLOCK[kernel])
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got_grads)
    assert_close(out, expected, BF16_ATOL_OF_MAX * np.abs(np.asarray(expected, np.float32)).max())
    for got, want in zip(got_grads, expected_grads):
        assert_close(got, want, BF16_ATOL_OF_MAX * np.abs(np.asarray(want, np.float32)).max())


@pytest.mark.parametrize("attention,hardware", [("cudnn", "NVIDIA GPUs"), ("triton", "NVIDIA GPUs"),
                                                ("splash", "TPUs")])
def test_kernels_off_their_hardware_are_a_config_error_from_the_model(attention, hardware):
    model = Llama(preset("debug", attention=attention), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match=f"model.attention='{attention}' runs on {hardware} only.*'flash'"):
        model(jnp.zeros((1, 8), jnp.int32))


def test_a_jax_without_the_triton_kernel_refuses_it_and_still_imports_llama_jax(monkeypatch):
    """JAX 0.12 dropped `jax.experimental.pallas.ops.gpu.attention`; a None in sys.modules makes its import fail
    here as it does there."""
    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.ops.gpu.attention", None)
    q, k, v = qkv(jnp.float32)
    with pytest.raises(ConfigError, match=r"model.attention='triton' needs jax.experimental.pallas.ops.gpu.attention, "
                                          r"which JAX \S+ does not ship: use model.attention='cudnn'"):
        triton_attention(q, k, v, SEGMENTS, interpret=True)
    blocked = ("import sys; sys.modules['jax.experimental.pallas.ops.gpu.attention'] = None; "
               "import llama_jax.trainer, llama_jax.model.fused_attention; print('imported')")
    assert subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True).stdout == "imported\n"


def test_cudnn_with_float32_compute_is_a_config_error():
    with pytest.raises(ConfigError, match="model.attention='cudnn' computes in bfloat16 or float16 only"):
        preset("debug", attention="cudnn", dtype="float32")


def test_plan_counts_the_fused_kernels_linear_in_the_sequence():
    def activations(attention: str, seq: int) -> int:
        cfg = default_config()
        # a small vocabulary, so that the layers' activations outweigh the output layer's
        cfg.model = model_section("llama3.2-1b", attention=attention, remat="full", vocab_size=8192)
        cfg.data.batch_size, cfg.data.seq_len = 8, seq
        cfg.mesh.data, cfg.mesh.fsdp = 1, 8
        return plan_lib.plan(cfg, accelerator="h100").activation_bytes

    for name in ("flash", "triton", "splash"):  # 4x the tokens: linear, less the fixed output-layer weights
        assert 3.5 < activations(name, 32768) / activations(name, 8192) < 4.0, name
    long = {name: activations(name, 131072) for name in ("flash", "triton", "splash", "cudnn", "xla")}
    # no tiles of scores off chip (and no repeated KV heads for splash); cuDNN's [t, t] bias; the reference's scores
    assert long["splash"] < long["triton"] < long["flash"] < long["cudnn"] < long["xla"] / 4


@pytest.mark.parametrize("kernel,mesh", [triton(dict(data=2, fsdp=2, tensor=2)), triton(dict(fsdp=4, tensor=2)),
                                         ("splash", dict(data=2, fsdp=2, tensor=2))])
def test_pallas_kernel_on_a_mesh_runs_per_device_and_matches_one_device(references, kernel, mesh, monkeypatch):
    """A Pallas call is opaque to XLA's partitioner, so parallel/layers.py runs it per device under a shard_map
    (rows over data x fsdp, heads over tensor): the sharded step, through Pallas's interpreter, equals the
    single-device step with XLA's attention."""
    monkeypatch.setitem(ATTENTION, kernel, functools.partial(PALLAS[kernel], interpret=True,
                                                             block=SMALLEST_BLOCK[kernel]))
    workdir, get = references
    reference = get("gqa")
    cfg = case_cfg("gqa", mesh, {})
    cfg.model.attention = kernel
    run = setup_run(cfg, workdir)
    with jax.set_mesh(run.mesh):
        jaxpr = str(jax.make_jaxpr(lambda params: run.model_def.merge(params).hidden(
            jnp.zeros((8, 32), jnp.int32), layers_fn=run.layers_fn))(reference["init"].params))
    assert "shard_map" in jaxpr and "pallas_call" in jaxpr
    assert_steps_match(Harness(run), reference["init"], reference["states"], reference["metrics"], kernel)


@pytest.mark.parametrize("kernel", PALLAS)
def test_pallas_kernel_in_a_pipeline_is_a_config_error(kernel):
    cfg = case_cfg("gqa", {}, {})
    cfg.model.attention = kernel
    cfg.mesh.stage = 2
    with pytest.raises(ConfigError, match=f"model.attention='{kernel}' does not run inside the pipeline"):
        validate(cfg)
