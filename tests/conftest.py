"""Eight fake CPU devices for every test, so sharding and pipeline tests run anywhere, and caches for the session.

XLA reads the flag once, when JAX first initialises, so it is set here before anything imports JAX.
"""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Caches for the session, made by pytest-xdist's controller and inherited by its workers: the tokenized corpora
# (`cache_dir` in tests/cli_run.py, which the data code shares safely between processes, as a host's runs do) and
# XLA's persistent compilation cache, one directory for the test processes and one for the commands they start,
# which have other device counts and thread pools. Many tests build the same corpora and compile the same small
# programs; with the caches each is built and compiled once (a fresh compilation cache made test_dpo.py and
# test_train_step.py 12% faster run alone, and the suite repeats programs across files). A size limit turns on
# JAX's file lock, so that a worker never reads an entry the other is writing.
TESTS_CACHE = "LLAMA_JAX_TESTS_CACHE"
if TESTS_CACHE not in os.environ:
    os.environ[TESTS_CACHE] = tempfile.mkdtemp(prefix="llama_jax_tests_")
    atexit.register(shutil.rmtree, os.environ[TESTS_CACHE], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(os.environ[TESTS_CACHE], "xla_tests")
os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 * 2**30)

from llama_jax.parallel.cpu_threads import reserve_collective_threads  # noqa: E402

reserve_collective_threads()  # without it, a pipelined step aborted one run in three on 2 cores


def pytest_collection_modifyitems(items: list) -> None:
    """The longest tests (`@pytest.mark.long`) first. Each worker takes a contiguous half of the list and, once done,
    steals from the end of the other's, so a long test near the end of the list started late and ran on alone."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
