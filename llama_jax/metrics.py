"""Where training numbers go: the console (progress bar), TensorBoard, and WORKDIR/metrics.jsonl.

Also the model-FLOPs utilisation: achieved training FLOPs over the hardware's peak. Accelerator peaks come
from a table of published dense bf16 figures; on CPU the peak is measured with a large matmul at start-up.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import tensorboardX
import tqdm

# Dense bf16 peak FLOP/s per device, by substring of jax's device_kind.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops_per_second() -> float:
    """Peak FLOP/s of all local devices together."""
    devices = jax.local_devices()
    kind = devices[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name in kind:
            return flops * len(devices)
    return _measured_cpu_peak()


def _measured_cpu_peak(n: int = 2048, repeats: int = 5) -> float:
    """The host's best float32 matmul rate: the CPU 'devices' share the same cores, so one matmul measures
    them all. The fastest of several runs, so that a busy moment does not lower the peak."""
    x = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class MetricsLogger:
    """Appends one JSON object per logged step; on resume, drops lines past the restored step."""

    def __init__(self, workdir: Path, *, start_step: int, total_steps: int, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        self.path = workdir / "metrics.jsonl"
        self._truncate_after(start_step)
        self.jsonl = self.path.open("a")
        # purge_step hides the events an earlier, interrupted process logged past the restored step.
        self.tensorboard = tensorboardX.SummaryWriter(str(workdir / "tensorboard"), purge_step=start_step + 1)
        self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, float(value), step)
        self.bar.write(" | ".join([f"step {step}"] + [_format(k, v) for k, v in metrics.items()]))

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.jsonl.close()
            self.tensorboard.close()


def _format(key: str, value: float) -> str:
    if key in ("loss", "eval_loss", "grad_norm"):
        return f"{key} {value:.4f}"
    if key == "mfu":
        return f"mfu {100 * value:.1f}%"
    if key in ("tokens", "tokens_per_s"):
        return f"{key} {value:,.0f}"
    return f"{key} {value:.3g}"
