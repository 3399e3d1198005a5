"""Where training numbers go: the console (progress bar), TensorBoard, WORKDIR/metrics.jsonl, and Weights & Biases
when `train.wandb` names a project.

Also the model-FLOPs utilisation: achieved training FLOPs over the hardware's peak. Accelerator peaks come
from a table of published dense bf16 figures (or `train.peak_flops`); on CPU the peak is measured with a large matmul
once per workdir and kept there, so that the MFU of a resumed run, or of a run started on a busy machine, is
measured against the same figure rather than against a peak re-timed under whatever load the machine had. And the
peak memory every logged line reports, to hold against the fit plan (plan.py).
"""

from __future__ import annotations

import json
import resource
import secrets
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import tqdm
from etils import epath

from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.workdir import is_remote, parse_jsonl, write_whole


def _import_tensorboardx():
    """tensorboardX imports PyTorch wherever it is installed, only to recognise its tensors, which a JAX run never
    passes: 2.0-2.5 s of every process's start (measured on this 2-core CPU). It is kept from that import unless
    something loaded PyTorch already."""
    if "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


tensorboardX = _import_tensorboardx()

_DETAIL = "goodput/"  # the goodput breakdown: in metrics.jsonl and TensorBoard, not on the console

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
# Kinds matched whole: a TPU v5p says "TPU v5", which is part of v5e's "TPU v5 lite" (and matched no name above, so
# its MFU was against one CPU core's measured matmul rate).
EXACT_PEAK_FLOPS = {"TPU v5": 459e12}


def table_peak_flops(device_kind: str) -> float | None:
    """A device's dense bf16 peak FLOP/s from the tables, or None for a kind they do not know."""
    if device_kind in EXACT_PEAK_FLOPS:
        return EXACT_PEAK_FLOPS[device_kind]
    return next((flops for name, flops in PEAK_FLOPS.items() if name in device_kind), None)


def run_peak_flops(workdir: epath.Path, configured: float) -> float:
    """Peak FLOP/s of all devices of the run: `configured` per device, or the table's figure, or the CPU peak
    recorded in WORKDIR/peak_flops.json (measured by the run's first start: other devices, the CPU among them)."""
    if configured:
        return configured * jax.device_count()
    record = workdir / "peak_flops.json"
    if table_peak_flops(jax.local_devices()[0].device_kind) is not None:
        return peak_flops_per_second() * jax.process_count()
    if record.exists():
        return json.loads(record.read_text())["peak_flops"] * jax.process_count()
    peak = _measured_cpu_peak()
    if jax.process_index() == 0:
        write_whole(record, json.dumps({"peak_flops": peak, "how": "float32 2048^3 matmul, best of 5"}) + "\n")
    return peak * jax.process_count()


def peak_flops_per_second() -> float:
    """Peak FLOP/s of all local devices together."""
    devices = jax.local_devices()
    flops = table_peak_flops(devices[0].device_kind)
    return _measured_cpu_peak() if flops is None else flops * len(devices)


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


def peak_memory_gib(devices: list | None = None) -> float:
    """The most memory this process's run has held so far, in GiB, as logged (`peak_memory_gib`): on accelerators,
    the busiest local device's peak bytes in use (their memory is what a model's fit is about); on a CPU, whose
    devices keep no statistics (or any device without that one), the process's peak resident memory."""
    stats = [device.memory_stats() for device in (jax.local_devices() if devices is None else devices)]
    if all(s and "peak_bytes_in_use" in s for s in stats):
        return max(s["peak_bytes_in_use"] for s in stats) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB


class MetricsLogger:
    """Appends one JSON object per logged step; on resume, drops lines past the restored step and keeps them in
    `dropped` (what the interrupted process did after its last checkpoint: goodput counts that time as lost).

    An object store (gs://) cannot append, so there the file is rewritten whole, at most every `REWRITE_S` seconds
    and at every `flush()`; the loop flushes before each checkpoint, so the lines of every restorable step exist.
    TensorBoard's event files are written locally there and copied up at the same moments, through the same
    `epath` as everything else (tensorboardX's own bucket clients differ per store and retry for minutes)."""

    REWRITE_S = 30.0

    def __init__(self, workdir: epath.Path, *, start_step: int, total_steps: int, enabled: bool = True,
                 wandb_project: str = "", config: dict | None = None):
        self.enabled = enabled
        self.dropped: list[dict] = []
        if not enabled:
            return
        self.wandb = start_wandb(workdir, wandb_project, config or {}) if wandb_project else None
        self.path = workdir / "metrics.jsonl"
        self._remote = is_remote(workdir)
        self._written = time.monotonic()
        self._events = workdir / "tensorboard"
        try:
            self._lines, self.dropped = self._truncate_after(start_step)
            self.jsonl = None if self._remote else self.path.open("a")
            self._local_events = (epath.Path(tempfile.mkdtemp(prefix="llama_jax_tensorboard_")) if self._remote
                                  else self._events)
            # purge_step hides the events an earlier, interrupted process logged past the restored step.
            self.tensorboard = tensorboardX.SummaryWriter(str(self._local_events), purge_step=start_step + 1)
        except OSError as err:  # a file where the directory goes, or the other way round; no permission
            raise CheckpointError(f"the run's logs cannot be written in {workdir} ({err}): move aside what is in the "
                                  "way of metrics.jsonl (a file) and tensorboard/ (a directory), or give another "
                                  "--workdir") from None
        self.bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> tuple[list[str], list[dict]]:
        """Drops the lines past `step` (and a torn last line); returns the lines kept and the records dropped. The
        file is replaced whole, and only when it changes, so that whoever follows the run never sees it emptied."""
        if not self.path.exists():
            return [], []
        text = self.path.read_text()
        records = parse_jsonl(text, self.path)
        kept = [json.dumps(record) + "\n" for record in records if record["step"] <= step]
        if "".join(kept) != text:
            write_whole(self.path, "".join(kept))
        return kept, [record for record in records if record["step"] > step]

    def rewind(self, step: int) -> None:
        """Forgets what was logged past `step` (a rollback retrains from there), in the file and in TensorBoard."""
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.close()
        self._lines, _ = self._truncate_after(step)
        self.jsonl = None if self._remote else self.path.open("a")
        self.tensorboard.close()
        self.tensorboard = tensorboardX.SummaryWriter(str(self._local_events), purge_step=step + 1)
        self.bar.n = step
        self.bar.refresh()

    def advance(self, steps: int = 1) -> None:
        if self.enabled:
            self.bar.update(steps)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **{k: float(v) for k, v in metrics.items()}}) + "\n"
        if self._remote:
            self._lines.append(line)
            if time.monotonic() - self._written >= self.REWRITE_S:
                self.flush()
        else:
            self.jsonl.write(line)
            self.jsonl.flush()
        for key, value in metrics.items():
            self.tensorboard.add_scalar(key, float(value), step)
        if self.wandb is not None:
            self.wandb.log({k: float(v) for k, v in metrics.items()}, step=step)
        shown = {k: v for k, v in metrics.items() if not k.startswith(_DETAIL)}
        self.bar.write(" | ".join([f"step {step}"] + [_format(k, v) for k, v in shown.items()]))

    def write(self, text: str) -> None:
        """A line on the console above the progress bar (process 0's)."""
        if self.enabled:
            self.bar.write(text)

    def flush(self) -> None:
        """Makes every line and event logged so far durable."""
        if not self.enabled:
            return
        self.tensorboard.flush()
        if self._remote:
            self.path.write_text("".join(self._lines))
            self._events.mkdir(parents=True, exist_ok=True)
            for events in self._local_events.iterdir():
                events.copy(self._events / events.name, overwrite=True)
            self._written = time.monotonic()

    def close(self) -> None:
        if self.enabled:
            if self.wandb is not None:
                self.wandb.finish()
            self.tensorboard.close()
            self.flush()
            self.bar.close()
            if self.jsonl is not None:
                self.jsonl.close()
            if self._remote:
                self._local_events.rmtree()


def start_wandb(workdir: epath.Path, project: str, config: dict):
    """The Weights & Biases run of this workdir, begun or resumed: "PROJECT" or "ENTITY/PROJECT", named after the
    workdir. Its id is kept in WORKDIR/wandb.json, so every restart of the run logs into the same W&B run. W&B keeps
    the first value logged for a step: steps redone after a restart log what the interrupted process had logged (the
    same values, since a resumed run repeats it exactly), and a rollback's or rewind's new values reach
    metrics.jsonl and TensorBoard only. A local workdir holds W&B's own files too (WORKDIR/wandb/). The config's
    check (`config.validate`) has made sure that wandb is installed."""
    import wandb

    entity, _, name = project.rpartition("/")
    record = workdir / "wandb.json"
    run_id = json.loads(record.read_text())["id"] if record.exists() else secrets.token_hex(6)
    try:
        run = wandb.init(project=name, entity=entity or None, id=run_id, resume="allow", name=workdir.name,
                         config=config, dir=None if is_remote(workdir) else str(workdir))
    except (wandb.errors.Error, ValueError) as err:  # no API key in a job without a terminal, a project the key may
        # not write; a WANDB_* variable wandb's settings refuse (pydantic's ValidationError, a ValueError)
        raise ConfigError(f"W&B could not start the run ({err}): log in (wandb login, or WANDB_API_KEY), or set "
                          "WANDB_MODE=offline to log locally and upload later with wandb sync; check the WANDB_* "
                          "environment variables") from None
    if not record.exists():
        write_whole(record, json.dumps({"id": run_id, "project": project}) + "\n")
    return run


def _format(key: str, value: float) -> str:
    if key in ("loss", "grad_norm") or key.startswith("eval_loss"):
        return f"{key} {value:.4f}"
    if key in ("mfu", "goodput"):
        return f"{key} {100 * value:.1f}%"
    if key in ("tokens", "tokens_per_s"):
        return f"{key} {value:,.0f}"
    return f"{key} {value:.3g}"
