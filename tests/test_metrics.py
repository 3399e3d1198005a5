"""The memory figure every log line carries (`peak_memory_gib`), from devices that keep statistics and from a CPU; and
WORKDIR/metrics.jsonl as a resumed run finds it: whole for whoever follows the run, readable after a torn write."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from llama_jax import goodput
from llama_jax.errors import CheckpointError
from llama_jax.metrics import MetricsLogger, peak_memory_gib
from llama_jax.workdir import read_jsonl, write_whole


class _Device:
    def __init__(self, stats: dict | None):
        self.stats = stats

    def memory_stats(self) -> dict | None:
        return self.stats


def test_accelerators_report_their_busiest_devices_peak():
    devices = [_Device({"peak_bytes_in_use": 3 * 2**30, "bytes_in_use": 2**30, "bytes_limit": 80 * 2**30}),
               _Device({"peak_bytes_in_use": 5 * 2**29, "bytes_in_use": 2**30, "bytes_limit": 80 * 2**30})]
    assert peak_memory_gib(devices) == 3.0
    without_peak = [devices[0], _Device({"bytes_in_use": 2**30})]
    assert peak_memory_gib(without_peak) == pytest.approx(peak_memory_gib([_Device(None)]), rel=1e-3), "as on a CPU"


def test_a_cpu_reports_the_process_peak_resident_memory():
    assert all(device.memory_stats() is None for device in jax.local_devices()), "CPU devices keep no statistics"
    before = peak_memory_gib()
    held = np.ones(2**28, np.uint8)  # 256 MiB, touched: resident
    after = peak_memory_gib()
    status = Path("/proc/self/status").read_text().splitlines()
    high_water_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    assert after == pytest.approx(high_water_kib / 2**20, rel=0.02)  # the kernel's own figure, in GiB
    assert after >= before and after > held.nbytes / 2**30


def _logged(workdir: Path, steps: range, tail: str = "") -> Path:
    path = workdir / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, goodput.PRODUCTIVE: float(s)}) + "\n"
                            for s in steps) + tail)
    return path


def _resume(workdir: Path, step: int) -> MetricsLogger:
    logger = MetricsLogger(epath.Path(workdir), start_step=step, total_steps=10)
    logger.bar.close()
    logger.tensorboard.close()
    return logger


def test_a_resume_replaces_the_log_whole_and_only_when_it_drops_lines(tmp_path):
    """A reader following the run (a dashboard, `tail -f`, a sweep waiting for the last line) must never find the
    log emptied: it is replaced by a complete file, not truncated and refilled in place."""
    path = _logged(tmp_path, range(1, 9))
    before = path.read_text()
    with open(path) as follower:
        logger = _resume(tmp_path, 5)
        assert follower.read() == before, "the open file still holds every line: the new one was renamed into place"
    assert [m["step"] for m in read_jsonl(path)] == [1, 2, 3, 4, 5]
    assert [m["step"] for m in logger.dropped] == [6, 7, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"], "no partial file is left"

    stat = path.stat()
    _resume(tmp_path, 5)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), "nothing to drop"


def test_a_torn_last_line_is_left_out_as_never_logged(tmp_path):
    """A process killed mid-write (or stopped by a full disk) leaves half a line; before, the resume died on it with a
    JSONDecodeError, and a supervisor restarted it into the same error."""
    whole = _logged(tmp_path, range(1, 5)).read_text()
    path = _logged(tmp_path, range(1, 5), tail='{"step": 5, "loss": 0.2')
    assert [m["step"] for m in read_jsonl(path)] == [1, 2, 3, 4]
    assert goodput.final_goodput(epath.Path(tmp_path))[goodput.PRODUCTIVE] == 4.0
    logger = _resume(tmp_path, 4)
    assert logger.dropped == [] and path.read_text() == whole, "the torn line is gone, the others are as written"


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    path = _logged(tmp_path, range(1, 3), tail="not json\n" + json.dumps({"step": 3}) + "\n")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl line 3 is not JSON .*fix or delete that line"):
        _resume(tmp_path, 3)
    assert path.read_text().count("\n") == 4, "left as it was"


def test_a_write_that_fails_midway_leaves_the_old_file_whole_and_no_partial_one(tmp_path, monkeypatch):
    """The records every restart reads (goodput.json, peak_flops.json, the rewritten metrics.jsonl) go through
    `write_whole`: a full disk or a kill mid-write must not leave half a file for the next start to choke on."""
    path = tmp_path / "record.json"
    write_whole(path, "old\n")

    def torn(self, text, *args, **kwargs):
        with open(self, "w") as file:
            file.write(text[:3])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", torn)
    with pytest.raises(OSError, match="No space left"):
        write_whole(path, "new and longer\n")
    monkeypatch.undo()
    assert path.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


def _scalars(events_dir: Path) -> list[tuple[str, int, float]]:
    """The scalars of TensorBoard event files, read as TensorBoard does: length-prefixed records of Event protos."""
    from tensorboardX.proto.event_pb2 import Event

    found = []
    for path in sorted(events_dir.glob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4  # the length, its checksum, the record, its checksum
            found += [(value.tag, event.step, value.simple_value) for value in event.summary.value]
    return found


def test_a_run_s_process_never_loads_pytorch_and_its_events_read_back(tmp_path):
    """tensorboardX imports PyTorch wherever it is installed (here, for the parity tests): 2.0-2.5 s of every process's
    start. The logger keeps it out and still writes TensorBoard's events. In a process of its own: this one has
    PyTorch loaded."""
    script = """import sys
from etils import epath
import llama_jax.trainer
from llama_jax.metrics import MetricsLogger
logger = MetricsLogger(epath.Path(sys.argv[1]), start_step=0, total_steps=2)
for step in (1, 2):
    logger.log(step, {"loss": 3.0 / step})
logger.close()
assert "torch" not in sys.modules, "PyTorch was loaded"
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert _scalars(tmp_path / "tensorboard") == [("loss", 1, 3.0), ("loss", 2, 1.5)]
