"""The memory figure every log line carries (`peak_memory_gib`), from devices that keep statistics and from a CPU; and
WORKDIR/metrics.jsonl as a resumed run finds it: whole for whoever follows the run, readable after a torn write."""

import importlib.machinery
import importlib.util
import json
import struct
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from etils import epath

from cli_run import cache_dir  # noqa: F401 (a fixture)
from test_train import small_config

from llama_jax import goodput, trainer
from llama_jax.config import default_config, validate
from llama_jax.errors import CheckpointError, ConfigError
from llama_jax.phases import phase
from llama_jax.metrics import MetricsLogger, peak_memory_gib, table_peak_flops
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
    write_whole(path, b"\x00bytes")  # a tokenizer file, copied into the workdir
    assert path.read_bytes() == b"\x00bytes" and [p.name for p in tmp_path.iterdir()] == ["record.json"]


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


class _FakeWandb(types.ModuleType):
    """The parts of the `wandb` package the logger uses, recording each call; `refuse` makes `init` fail as wandb does
    without an API key."""

    class errors:  # noqa: N801 (wandb's own name)
        class Error(Exception):
            pass

    def __init__(self, refuse: str = "", error: type[Exception] = errors.Error):
        super().__init__("wandb")
        self.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.refuse, self.error, self.inits, self.logged, self.finished = refuse, error, [], [], 0

    def init(self, **kwargs):
        if self.refuse:
            raise self.error(self.refuse)
        self.inits.append(kwargs)
        return self

    def log(self, metrics: dict, step: int) -> None:
        self.logged.append({"step": step, **metrics})

    def finish(self) -> None:
        self.finished += 1


def test_a_run_logs_every_metrics_line_to_one_wandb_run_across_restarts(tmp_path, cache_dir, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = small_config(cache_dir, 3)
    cfg.phases = (phase("more", steps=1),)  # a config whose phases (ConfigDicts in a tuple) W&B takes as JSON
    cfg.train.wandb = "team/llama"
    workdir = tmp_path / "run"
    trainer.train(cfg, workdir)
    cfg.phases = (phase("more", steps=3),)  # a second process, from the last step's checkpoint
    trainer.train(cfg, workdir)
    first, second = fake.inits
    for init, steps in ((first, 1), (second, 3)):  # the same W&B run, resumed
        assert {key: value for key, value in init.items() if key != "config"} == dict(
            project="llama", entity="team", id=first["id"], resume="allow", name="run", dir=str(workdir))
        assert json.loads(json.dumps(init["config"])) == init["config"], "plain JSON"
        assert init["config"]["phases"][0]["steps"] == steps and init["config"]["train"]["wandb"] == "team/llama"
    assert json.loads((workdir / "wandb.json").read_text()) == {"id": first["id"], "project": "team/llama"}
    assert fake.finished == 2
    assert fake.logged == read_jsonl(workdir / "metrics.jsonl"), "every line of metrics.jsonl, as it was logged"


def test_wandb_that_is_missing_refuses_or_misnamed_is_one_config_error(tmp_path, monkeypatch):
    cfg = default_config()
    cfg.train.wandb = "a/b/c"
    with pytest.raises(ConfigError, match=r"train.wandb='a/b/c' is not a W&B project: give PROJECT or ENTITY/PROJECT"):
        validate(cfg)
    cfg.train.wandb = "llama"
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: importing it fails
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"train.wandb='llama' needs the wandb package: pip install wandb"):
        validate(cfg)
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb(refuse="No API key configured. Use `wandb login` to log in."))
    with pytest.raises(ConfigError, match=r"W&B could not start the run \(No API key configured.*\): log in \(wandb "
                                          r"login, or WANDB_API_KEY\), or set WANDB_MODE=offline"):
        MetricsLogger(epath.Path(tmp_path), start_step=0, total_steps=2, wandb_project="llama")
    assert not (tmp_path / "wandb.json").exists()
    # WANDB_MODE=ofline: wandb's settings raise pydantic's ValidationError (a ValueError), which was a traceback
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb(refuse="1 validation error for Settings\nmode\n  Input should "
                                                               "be 'online', 'offline'", error=ValueError))
    with pytest.raises(ConfigError, match=r"(?s)W&B could not start the run \(1 validation error.*check the WANDB_\* "
                                          r"environment variables"):
        MetricsLogger(epath.Path(tmp_path), start_step=0, total_steps=2, wandb_project="llama")


@pytest.mark.parametrize("in_the_way", ["metrics.jsonl", "tensorboard"])
def test_a_log_that_cannot_be_opened_is_one_checkpoint_error(tmp_path, in_the_way):
    """A directory where metrics.jsonl goes, or a file where tensorboard/ goes, gave an OSError's traceback (exit 1,
    which a supervisor restarts into the same failure)."""
    (tmp_path / "metrics.jsonl").mkdir() if in_the_way == "metrics.jsonl" else (tmp_path / "tensorboard").write_text("")
    with pytest.raises(CheckpointError, match=rf"the run's logs cannot be written in {tmp_path} \(.*{in_the_way}.*\): "
                                              r"move aside what is in the way"):
        MetricsLogger(epath.Path(tmp_path), start_step=0, total_steps=2)


@pytest.mark.parametrize("kind, peak", [("TPU v5", 459e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12), ("cpu", None)])
def test_the_peak_flops_of_each_device_kind(kind, peak):
    """A TPU v5p's device_kind is "TPU v5", which matched no name of the table: its MFU was measured against a CPU
    matmul's rate."""
    assert table_peak_flops(kind) == peak
