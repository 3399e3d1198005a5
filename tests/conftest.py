"""Eight fake CPU devices for every test, so sharding and pipeline tests run anywhere.

XLA reads the flag once, when JAX first initialises, so it is set here before anything imports JAX.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from llama_jax.parallel.cpu_threads import reserve_collective_threads  # noqa: E402

reserve_collective_threads()  # without it, a pipelined step aborted one run in three on 2 cores
