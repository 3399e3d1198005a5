"""What a launcher checks before it submits a job or asks for a slice: that the config file loads with its
`--config.KEY=VALUE` overrides as the trainer will read them, validates, that its mesh covers the job's devices and
its batches divide over them, and how much memory each device needs (the fit plan, `llama_jax.plan`).

Each of these would otherwise stop the trainer in its first seconds, after the job waited in the queue or a slice
was provisioned. The plan's memory is an estimate (it leans high on accelerators), so a job that exceeds the chips'
memory is reported, not refused. A config that reads files the launching machine cannot see (an `init_from` only
the cluster mounts) fails the check: `--no-check` launches without it.
"""

from __future__ import annotations

from collections.abc import Sequence

from llama_jax import command_line
from llama_jax.errors import ConfigError, LlamaJaxError


def check(config: str, overrides: Sequence[str], *, devices: int, accelerator: str | None) -> str:
    """A line saying what the plan found for `config` on `devices` chips of `accelerator` (memory is judged for the
    chips the plan knows, `plan.ACCELERATORS`, only). Raises ConfigError naming the problem."""
    from llama_jax.plan import ACCELERATORS, plan_phases  # imported here: it pulls in JAX and the trainer

    chip = ACCELERATORS.get(accelerator)
    try:
        cfg = command_line.load_config(config, overrides)
        planned = plan_phases(cfg, devices=devices, accelerator=accelerator if chip else "h100")
    except LlamaJaxError as err:
        raise ConfigError(f"{err} (checked before launching, for {devices} devices; --no-check skips the check)"
                          ) from None
    phase, largest = max(planned, key=lambda entry: entry[1].total_bytes)
    where = f" in phase {phase}" if len(planned) > 1 else ""
    need = f"{largest.total_bytes / 2**30:.2f} GiB a device{where}"
    if chip is None:
        return f"check: {config} runs on a mesh of {devices} devices, {need}"
    if largest.fits:
        return f"check: {config} fits {devices} x {chip.name}, {need} of {chip.memory_label}"
    return (f"warning: {config} plans {need}, more than a {chip.name}'s {chip.memory_label}: it may run out of "
            f"memory (python -m llama_jax.plan --config {config} --devices {devices} --accelerator {accelerator} "
            "shows where)")
