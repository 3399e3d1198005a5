"""Joining the processes of a multi-host run: one process per host runs the same command, and `initialize()`
connects them through `jax.distributed.initialize` before anything touches a device.

Where the process count and this process's id come from, first match wins:
1. explicit variables, set on every host: LLAMA_JAX_COORDINATOR=host:port (process 0's address; JAX's own
   JAX_COORDINATOR_ADDRESS is accepted too), LLAMA_JAX_NUM_PROCESSES and LLAMA_JAX_PROCESS_ID;
2. a SLURM job step started by `srun` with more than one task (JAX reads SLURM's variables itself);
3. a Cloud TPU VM, or a TPU pod under GKE / multislice: JAX asks the TPU runtime and VM metadata itself.
Anything else is a single process, and nothing is done.

Processes wait for each other up to LLAMA_JAX_INIT_TIMEOUT_S seconds (default 300, JAX's own). The ways joining
fails are told in one line: process 0's port is taken, or the coordinator never answers (with explicit variables;
found before JAX is asked), or a process never joins (its command failed on its host). In JAX the first is a
traceback, the others C++ aborts after the whole timeout.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
from typing import Callable, Iterator, Mapping, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.exit_codes import CONFIG as EXIT_CONFIG

COORDINATOR = "LLAMA_JAX_COORDINATOR"
NUM_PROCESSES = "LLAMA_JAX_NUM_PROCESSES"
PROCESS_ID = "LLAMA_JAX_PROCESS_ID"
JAX_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
INIT_TIMEOUT = "LLAMA_JAX_INIT_TIMEOUT_S"
_DEFAULT_INIT_TIMEOUT_S = 300
# What JAX's SLURM detection reads; SLURM_STEP_NODELIST is set by srun only, so a batch script that runs python
# directly (one process, however many tasks the job has) is not mistaken for a multi-process step.
_SLURM = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
# Set on TPU pods under GKE (the workers' addresses) and on multislice jobs.
_TPU_POD = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")

T = TypeVar("T")


def initialize(environ: Mapping[str, str] | None = None) -> None:
    """Connects this process to the others of its run, when the environment says there are others. Idempotent."""
    arguments = distributed_arguments(os.environ if environ is None else environ)
    if arguments is None or jax.distributed.is_initialized():
        return
    coordinator = arguments.get("coordinator_address")
    if coordinator is not None and arguments["process_id"] == 0:
        check_port_free(coordinator)
    elif coordinator is not None:
        wait_for_coordinator(coordinator, arguments["initialization_timeout"])
    timeout_s = arguments["initialization_timeout"]
    with _exit_unless_joined(timeout_s, arguments.get("num_processes")):
        jax.distributed.initialize(**{**arguments, "initialization_timeout": timeout_s + _JAX_EXTRA_WAIT_S})
    _end_the_service_last()


# How much longer JAX's own wait for the other processes is than ours, so that ours, which says what to do, ends it.
_JAX_EXTRA_WAIT_S = 30


@contextlib.contextmanager
def _exit_unless_joined(timeout_s: int, num_processes: int | None) -> Iterator[None]:
    """Ends this process with one error line (exit code 2) unless every process has joined within `timeout_s`. JAX's
    own wait ends in a C++ check failure and a stack trace (`DEADLINE_EXCEEDED ... RegisterTask`), as when one host's
    command failed before it joined. A timer thread, since the join blocks in C++ (which lets Python threads run)."""

    def give_up() -> None:
        processes = f"all {num_processes} processes" if num_processes else "every process"
        print(f"error: not {processes} of the run joined within {timeout_s} s: start the same command on every host; "
              f"a host whose command failed says why in its own output (or wait longer: {INIT_TIMEOUT})",
              file=sys.stderr, flush=True)
        os._exit(EXIT_CONFIG)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def persistent_cache_hangs() -> bool:
    """Whether JAX's persistent compilation cache would hang this run: several processes on the CPU backend, with
    JAX 0.12 or newer. There a process whose step is read from the cache waits in that step's first collective
    forever (JAX 0.12.1: the tests' two-process resume hung until killed; it ends in 13-14 s on JAX 0.10.2 and
    0.11.2, and on 0.12.1 without the cache). No later JAX was there to check, so every later one is held to it."""
    return jax.process_count() > 1 and jax.default_backend() == "cpu" and jax.__version_info__ >= (0, 12)


# How long process 0 keeps JAX's coordination service up once every process has reached JAX's exit barrier.
_SERVICE_GRACE_S = 1.0


def _end_the_service_last() -> None:
    """Makes process 0, which hosts JAX's coordination service, pause between its own leaving and the service's end.
    JAX ends the service as soon as every process has reached its exit barrier, while a message another process sent
    just before (a heartbeat) may still be arriving: gRPC's server teardown then aborts process 0 (`Check failed:
    queue.Pop() == nullptr`, exit code -6 after the run's own last line; seen here once, in a two-process run that
    stopped on a host's memory refusal). JAX has no hook for it, so its service object is wrapped."""
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    if getattr(state, "service", None) is not None:
        state.service = _ServiceEndingLate(state.service)


class _ServiceEndingLate:
    def __init__(self, service):
        self._service = service

    def shutdown(self) -> None:
        time.sleep(_SERVICE_GRACE_S)
        self._service.shutdown()


def check_port_free(address: str) -> None:
    """Raises ConfigError unless process 0 can listen on the port of host:port, on every interface as JAX's
    coordinator does."""
    port = int(address.rpartition(":")[2])
    dual_stack = socket.has_dualstack_ipv6()
    try:
        with socket.create_server(("", port), family=socket.AF_INET6 if dual_stack else socket.AF_INET,
                                  dualstack_ipv6=dual_stack):
            pass
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else err
        raise ConfigError(f"process 0 cannot listen on port {port} of {COORDINATOR}={address} ({reason}): choose a "
                          "free port and set it on every host") from None


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Returns once process 0's coordinator at host:port accepts connections, or raises ConfigError after
    `timeout_s`: JAX's own wait ends the process with a C++ check failure, after the same time."""
    host, _, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")  # an IPv6 address is written [::1]:8476
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=max(min(deadline - time.monotonic(), 5), 0.1)):
                return
        except OSError as err:
            reason = err
        if time.monotonic() >= deadline:
            raise ConfigError(f"nothing answered at {COORDINATOR}={address} in {timeout_s:g} s ({reason}): start "
                              f"process 0 of the run, which listens there, and check that this host can reach that "
                              f"address (or wait longer: {INIT_TIMEOUT})")
        time.sleep(0.5)


def distributed_arguments(environ: Mapping[str, str]) -> dict | None:
    """The arguments of `jax.distributed.initialize` for this environment ({}: JAX detects the cluster), or None
    for a single process. Inconsistent variables raise ConfigError, since a guess would hang every host."""
    if any(name in environ for name in (COORDINATOR, NUM_PROCESSES, PROCESS_ID)):
        return _explicit(environ)
    if all(name in environ for name in _SLURM):
        count = _integer(environ, "SLURM_NTASKS", "the number of srun tasks")
        rank = _integer(environ, "SLURM_PROCID", "this task's rank")
        if not 0 <= rank < count:
            raise ConfigError(f"SLURM_PROCID={rank} is not below SLURM_NTASKS={count}: start the run with srun, "
                              "which sets both, and do not set them by hand")
        return dict(cluster_detection_method="slurm", initialization_timeout=_timeout(environ)) if count > 1 else None
    if any(name in environ for name in _TPU_POD) or _on_cloud_tpu_vm():
        return dict(initialization_timeout=_timeout(environ))
    if JAX_COORDINATOR in environ:
        return _explicit(environ)  # a coordinator without a process count: _explicit says what is missing
    return None


def _explicit(environ: Mapping[str, str]) -> dict | None:
    if NUM_PROCESSES not in environ or PROCESS_ID not in environ:
        given = [name for name in (COORDINATOR, JAX_COORDINATOR, NUM_PROCESSES, PROCESS_ID) if name in environ]
        raise ConfigError(
            f"{' and '.join(given)} set, but not both {NUM_PROCESSES} and {PROCESS_ID}: on every host set "
            f"{NUM_PROCESSES} (the number of processes), {PROCESS_ID} (0, 1, ... distinct per host) and "
            f"{COORDINATOR}=host:port (process 0's address)"
        )
    count = _integer(environ, NUM_PROCESSES, "the number of processes")
    rank = _integer(environ, PROCESS_ID, "this process's id")
    if count < 1:
        raise ConfigError(f"{NUM_PROCESSES}={count}: set it to the number of processes (one per host), at least 1")
    if not 0 <= rank < count:
        raise ConfigError(f"{PROCESS_ID}={rank} with {NUM_PROCESSES}={count}: the ids must be 0 to "
                          f"{NUM_PROCESSES} - 1, one per process")
    if count == 1:
        return None
    coordinator = environ.get(COORDINATOR) or environ.get(JAX_COORDINATOR)
    if not coordinator:
        raise ConfigError(f"{NUM_PROCESSES}={count} but {COORDINATOR} is not set: set it on every host to process 0's "
                          f"host:port, e.g. {COORDINATOR}=10.0.0.1:8476")
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"{COORDINATOR}={coordinator!r} is not host:port: give process 0's address and a free port "
                          "(1 to 65535), e.g. 10.0.0.1:8476 or [fd00::1]:8476")
    return dict(coordinator_address=coordinator, num_processes=count, process_id=rank,
                initialization_timeout=_timeout(environ))


def _timeout(environ: Mapping[str, str]) -> int:
    if INIT_TIMEOUT not in environ:
        return _DEFAULT_INIT_TIMEOUT_S
    seconds = _integer(environ, INIT_TIMEOUT, "how many seconds the processes wait for each other to start")
    if seconds < 1:
        raise ConfigError(f"{INIT_TIMEOUT}={seconds}: set it to how many seconds the processes wait for each other "
                          f"to start, at least 1 (default {_DEFAULT_INIT_TIMEOUT_S})")
    return seconds


def _integer(environ: Mapping[str, str], name: str, meaning: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ConfigError(f"{name}={environ[name]!r} is not an integer: set it to {meaning}") from None


def _on_cloud_tpu_vm() -> bool:
    """JAX's own finding at import (libtpu installed, TPU chips on the PCI bus). On any TPU VM, one host or a pod
    slice, `jax.distributed.initialize()` reads the slice's workers from the VM metadata; there is no public name."""
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def process_zero_first(fn: Callable[[], T], what: str) -> T:
    """`fn()` on process 0, then on the others once it has returned (or failed); every process stops if it failed on
    any, as in `on_every_process`.

    For work that fills a cache the hosts may share, such as tokenizing a corpus: started everywhere at once it
    would be repeated on every host and the copies would race to publish. The others find process 0's result (or,
    with a cache on a disk of their own, build it then; the builds are deterministic). What it reads may be missing
    on one host only (a disk of its own): a process that stopped alone would leave the others waiting in their next
    collective, and itself in JAX's shutdown, which waits for them (up to 300 s)."""
    if jax.process_count() == 1:
        return fn()
    if jax.process_index() == 0:
        try:
            outcome = _outcome(fn)
        finally:
            multihost_utils.sync_global_devices(what)
    else:
        multihost_utils.sync_global_devices(what)
        outcome = _outcome(fn)
    return _agree(outcome, what, ConfigError)


def on_every_process(check: Callable[[], T], what: str, elsewhere: type[LlamaJaxError] = ConfigError) -> T:
    """`check()` on every process, which all stop if it fails on any: there with its own error, elsewhere with an
    `elsewhere` naming the first process that failed and its reason. For a check whose answer depends on the host (its
    free memory): a process that stopped alone would leave the others waiting in their next collective until its
    timeout ends them with a traceback (gloo on CPU: `DEADLINE_EXCEEDED` after 30 s)."""
    if jax.process_count() == 1:
        return check()
    return _agree(_outcome(check), what, elsewhere)


# How much of a failed process's message the others repeat: the first line of any of ours fits.
_REASON_BYTES = 1024


def _outcome(fn: Callable[[], T]) -> tuple[T | None, LlamaJaxError | None]:
    try:
        return fn(), None
    except LlamaJaxError as e:
        return None, e


def _agree(outcome: tuple[T | None, LlamaJaxError | None], what: str, elsewhere: type[LlamaJaxError]) -> T:
    """Every process's outcome, gathered as a failed flag and the failure's message (cut to _REASON_BYTES)."""
    result, error = outcome
    reason = str(error).encode() if error is not None else b""
    reason = reason if len(reason) <= _REASON_BYTES else reason[:_REASON_BYTES - 4] + b" ..."
    mine = np.zeros(1 + _REASON_BYTES, np.uint8)
    mine[0], mine[1:1 + len(reason)] = error is not None, np.frombuffer(reason, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    if error is not None:
        raise error
    failed = np.flatnonzero(every[:, 0])
    if failed.size:
        why = bytes(every[failed[0], 1:]).rstrip(b"\0").decode(errors="ignore")
        raise elsewhere(f"{what} failed on process {int(failed[0])} of {jax.process_count()}: {why}")
    return result
