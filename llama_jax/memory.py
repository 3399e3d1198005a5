"""Whether a run's training state can fit its devices at all, checked before anything is allocated.

A model too large for its devices otherwise fails late and badly: on a CPU the kernel's OOM killer ends the process
with no message (and a supervisor restarts it into the same end), on an accelerator XLA's RESOURCE_EXHAUSTED comes
from deep inside the first step. The check counts only what must exist at once during a step, whatever the remat
policy or the compiler does: each device's shards of the parameters, of their gradients, of the optimizer state
and, with LoRA, of the frozen base. Activations come on top, so passing the check does not promise a fit
(`python -m llama_jax.plan` estimates the whole step), but failing it promises the run could not train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import jax

from llama_jax.errors import ConfigError

GiB = 2**30
_CGROUP = Path("/sys/fs/cgroup")


def shard_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of `jax.ShapeDtypeStruct`s that carry their shardings."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def device_memory_bytes(devices: Sequence[jax.Device]) -> tuple[int, str]:
    """(bytes, a phrase saying so) that the run's state may use on each of `devices` (this process's): an
    accelerator's allocator limit; for CPU devices, which share the host's memory, the host's available memory (the
    smaller of the kernel's MemAvailable and the container's cgroup limit) divided among them."""
    stats = devices[0].memory_stats()
    if stats and "bytes_limit" in stats:
        limit = int(stats["bytes_limit"])
        return limit, f"each {devices[0].device_kind} can hold {limit / GiB:.2f} GiB"
    available = _host_available_bytes()
    limit = available // len(devices)
    if len(devices) == 1:
        return limit, f"the host has {limit / GiB:.2f} GiB free"
    return limit, (f"the host's {available / GiB:.2f} GiB free, shared by {len(devices)} CPU devices, give each "
                   f"{limit / GiB:.2f} GiB")


def _host_available_bytes() -> int:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    available = int(meminfo["MemAvailable"].split()[0]) * 1024
    try:
        limit, used = ((_CGROUP / name).read_text().strip() for name in ("memory.max", "memory.current"))
    except OSError:
        return available
    return available if limit == "max" else min(available, int(limit) - int(used))


def check_state_fits(parts: dict[str, int], devices: Sequence[jax.Device]) -> None:
    """Refuses a run whose state (`parts`: bytes per device, by name) exceeds what each of `devices` can hold."""
    needed = sum(parts.values())
    limit, available = device_memory_bytes(devices)
    if needed <= limit:
        return
    listed = ", ".join(f"{name} {size / GiB:.2f}" for name, size in parts.items() if size)
    raise ConfigError(
        f"the training state needs {needed / GiB:.2f} GiB per device before any activation ({listed} GiB), but "
        f"{available}: shard it over more devices (mesh.fsdp), train a smaller model, or train LoRA adapters "
        "(lora.rank); python -m llama_jax.plan --config ... estimates the whole step")
