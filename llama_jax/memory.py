"""Whether a run's training state, or a model being loaded, can fit its devices at all, checked before anything is
allocated.

A model too large for its devices otherwise fails late and badly: after the data is read and the workdir written,
with XLA's RESOURCE_EXHAUSTED from deep inside the first step, or on a CPU host possibly with the kernel's OOM killer
ending the process without a message (which a supervisor restarts into the same end). The check counts only what must exist at once during a step, whatever the remat
policy or the compiler does: each device's shards of the parameters, of their gradients, of the optimizer state
and, with LoRA, of the frozen base. Activations come on top, so passing the check does not promise a fit
(`python -m llama_jax.plan` estimates the whole step), but failing it promises the run could not train. Loading a
model (generate, evaluate, rejection sampling) is checked the same way on its parameters alone.

Once a phase's step is compiled, and before it first runs, the compiler's own account of it (`memory_analysis`:
its arguments, results and temporaries, activations included) is checked the same way, so that a batch too large
for the devices ends in a message naming what to lower rather than in XLA's RESOURCE_EXHAUSTED, or in the OOM killer.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from llama_jax.errors import ConfigError
from llama_jax.exit_codes import CONFIG as EXIT_CONFIG
from llama_jax.model import LlamaConfig, ModelDef
from llama_jax.parallel.mesh import param_shardings

GiB = 2**30
_LOWER = ("lower what a step holds at once: optim.grad_accum=N (the batch in N microbatches), model.remat='full' (each "
          "layer's activations recomputed in the backward pass), or a smaller data.batch_size or data.seq_len")
# What to change when a run runs out of memory (`out_of_memory`)
TRAIN_FIX = (f"{_LOWER}, or shard over more accelerators (mesh.fsdp); the checkpoints saved so far are intact: rerun "
             "with the change to resume")
_CGROUP = Path("/sys/fs/cgroup")


def shard_bytes(tree) -> int:
    """Bytes of one device's shards of a tree of `jax.ShapeDtypeStruct`s that carry their shardings."""
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def local_devices(mesh: Mesh) -> list[jax.Device]:
    """The devices of `mesh` that this process drives: those whose memory it fills."""
    return [d for d in mesh.devices.flat if d.process_index == jax.process_index()]


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


def check_fits(parts: dict[str, int], devices: Sequence[jax.Device], *, subject: str, fix: str, cpu_fix: str) -> str:
    """Refuses what needs `parts` (bytes per device, by name) when it exceeds what each of `devices` can hold; the
    message ends with `fix`, or with `cpu_fix` where the devices are CPU ones sharing one host's memory. Returns the
    same figures when it fits, for the log."""
    needed = sum(parts.values())
    limit, available = device_memory_bytes(devices)
    listed = f" ({', '.join(f'{name} {size / GiB:.2f}' for name, size in parts.items() if size)} GiB)"
    figures = f"{subject} {needed / GiB:.2f} GiB per device{listed if len(parts) > 1 else ''}"
    if needed <= limit:
        return f"{figures}, and {available}"
    raise ConfigError(f"{figures}, but {available}: {cpu_fix if devices[0].platform == 'cpu' else fix}")


def check_train_state_fits(parts: dict[str, int], devices: Sequence[jax.Device]) -> None:
    plan = "python -m llama_jax.plan --config ... estimates the whole step"
    check_fits(parts, devices, subject="the training state, before any activation, needs",
               fix=f"shard it over more devices (mesh.fsdp), train a smaller model, or train LoRA adapters "
                   f"(lora.rank); {plan}",
               cpu_fix=f"train a smaller model or LoRA adapters (lora.rank), or use accelerators or a machine with "
                       f"more memory (CPU devices share the host's, so sharding over them does not help); {plan}")


def check_step_fits(compiled: jax.stages.Compiled, devices: Sequence[jax.Device]) -> str | None:
    """Refuses a compiled training step that cannot run on `devices`. An accelerator's allocator must hold the whole
    step: its arguments (the state, the batch), its results beyond the donated state, and its temporaries. CPU devices
    already hold the arguments in the host's memory, which `device_memory_bytes` counts as used, so only what the
    step allocates on top is compared with what is free. Returns the figures (None without the analysis)."""
    stats = compiled.memory_analysis()
    if stats is None:  # a backend without the analysis
        return None
    allocated = stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    if devices[0].platform == "cpu":
        subject = "the compiled training step needs, for its activations and other temporaries,"
        parts = {"activations and other temporaries": allocated}  # one part: named by the subject
    else:
        subject = "the compiled training step needs"
        parts = {"state and batch": stats.argument_size_in_bytes, "activations and other temporaries": allocated}
    return check_fits(parts, devices, subject=subject,
                      fix=f"shard over more devices (mesh.fsdp), or {_LOWER}",
                      cpu_fix=f"{_LOWER} (CPU devices share the host's memory, so sharding over them does not help)")


def out_of_memory(err: Exception, fix: str) -> ConfigError | None:
    """XLA's RESOURCE_EXHAUSTED as a ConfigError ending with `fix`, which the commands print as one line (None for
    any other error). It comes from allocations the checks above cannot foresee: a batch shape they do not see
    (evaluation, generation), an accelerator's fragmented memory, a CPU host's memory taken by other processes."""
    if not isinstance(err, jax.errors.JaxRuntimeError) or "RESOURCE_EXHAUSTED" not in str(err):
        return None
    return ConfigError(f"the devices ran out of memory ({str(err).strip().splitlines()[0]}): {fix}")


def report_out_of_memory(err: jax.errors.JaxRuntimeError, fix: str) -> int:
    """For a command's `except jax.errors.JaxRuntimeError`: prints RESOURCE_EXHAUSTED as one error line ending with
    `fix` and returns the exit code; any other runtime error goes on up, with its traceback."""
    error = out_of_memory(err, fix)
    if error is None:
        raise err
    print(f"error: {error}", file=sys.stderr)
    return EXIT_CONFIG


def check_model_fits(model_cfg: LlamaConfig, mesh: Mesh | None) -> None:
    """Refuses to load a model whose parameters alone exceed a device's memory: on one device, or each device's
    shards of them on `mesh`."""
    with jax.set_mesh(None):
        abstract = ModelDef(model_cfg).abstract_state
    if mesh is None:
        devices = [jax.devices()[0]]
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(devices[0]), nnx.to_pure_dict(abstract))
    else:
        devices = local_devices(mesh)
        shardings = param_shardings(abstract, mesh)
    params = jax.tree.map(lambda x, where: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where),
                          nnx.to_pure_dict(abstract), shardings)
    check_fits({"parameters": shard_bytes(params)}, devices, subject="the model's parameters need",
               fix="shard them over more devices (--mesh, e.g. fsdp=8 or tensor=8)",
               cpu_fix="use accelerators or a machine with more memory (CPU devices share the host's, so --mesh "
                       "does not help)")
