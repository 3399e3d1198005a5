"""Enough threads for XLA's CPU collectives when one process stands in for several devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N` or `JAX_NUM_CPU_DEVICES=N`: the tests, and trying a mesh on a
laptop).

XLA's CPU runtime runs the work of every such device, collectives included, on one pool of max(cores, N) threads, and
a collective holds its thread until every device has joined it. It also runs a loop that holds collectives (a
pipeline's scan over microbatches) at the same time as collectives outside it that do not depend on it, in whichever
order each device reaches them. With one thread per device the two orders can take every thread: seven devices wait
in an all-gather for the eighth, whose only thread waits in the loop's collective-permute for them, and XLA aborts
the process 40 s later ("Termination timeout ... Expected 8 threads to join the rendezvous, but only 7 of them
arrived"). Two threads per device leave each device one to finish the other order with. XLA sizes the pool from the
NPROC variable when it starts the CPU backend.
"""

from __future__ import annotations

import os
import re
from typing import Mapping, MutableMapping

_FORCED_DEVICES = re.compile(r"--xla_force_host_platform_device_count=(\d+)")
NPROC = "NPROC"


def reserve_collective_threads(environ: MutableMapping[str, str] = os.environ) -> None:
    """Sets NPROC to two threads per simulated CPU device (at least one per core) unless it is set already. Does
    nothing without simulated devices; has no effect once JAX has started its CPU backend, so call it first."""
    devices = simulated_cpu_devices(environ)
    if devices > 1 and NPROC not in environ:
        environ[NPROC] = str(max(2 * devices, os.cpu_count() or 1))


def simulated_cpu_devices(environ: Mapping[str, str]) -> int:
    """How many CPU devices this environment asks for in one process (0: none asked). JAX_NUM_CPU_DEVICES wins over
    the XLA flag, as in JAX."""
    given = environ.get("JAX_NUM_CPU_DEVICES", "")
    if given.isdigit():
        return int(given)
    counts = _FORCED_DEVICES.findall(environ.get("XLA_FLAGS", ""))
    return int(counts[-1]) if counts else 0  # XLA takes the last of repeated flags
