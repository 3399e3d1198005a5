"""Simulated CPU devices get two of XLA's threads each (llama_jax/parallel/cpu_threads.py says why)."""

import os
import subprocess
import sys

import pytest

from llama_jax.parallel.cpu_threads import reserve_collective_threads

CORES = os.cpu_count() or 1


@pytest.mark.parametrize("environ, nproc", [
    ({}, None),
    ({"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}, None),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}, None),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, max(16, CORES)),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_force_host_platform_device_count=64"}, 128),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_NUM_CPU_DEVICES": "32"}, max(64, CORES)),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8", "NPROC": "3"}, 3),
])
def test_nproc_is_two_threads_per_simulated_device_unless_set(environ, nproc):
    environ = dict(environ)
    reserve_collective_threads(environ)
    assert environ.get("NPROC") == (None if nproc is None else str(nproc))


def test_xla_starts_that_many_threads():
    """The pool XLA starts really has the reserved size: the variable is the one this jaxlib reads."""
    count_threads = (
        "from llama_jax.parallel.cpu_threads import reserve_collective_threads\n"
        "reserve_collective_threads()\n"
        "import os, jax\n"
        "assert jax.device_count() == 8\n"
        "names = [open(f'/proc/self/task/{t}/comm').read() for t in os.listdir('/proc/self/task')]\n"
        "print(sum('XLAEigen' in name for name in names))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("NPROC", "JAX_NUM_CPU_DEVICES")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", count_threads], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) == max(16, CORES)
