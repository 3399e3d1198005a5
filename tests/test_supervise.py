"""Fault tolerance: the supervisor's restart rules (with a scripted fake child), the hang watchdog, goodput across
restarts, and GCE maintenance notices (a local HTTP server stands in for the metadata server)."""

import http.server
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cli_run import CLI_ENV, KILL_RUN, REPO, cache_dir, cli_command, read_metrics  # noqa: F401 (a fixture)
from test_multihost import TIMEOUT_S, checkpoint_steps, finish, job, start_two_processes  # noqa: F401 (a fixture)

from llama_jax import goodput, maintenance
from llama_jax import supervise as supervise_module
from llama_jax.config import default_config, validate
from llama_jax.errors import ConfigError
from llama_jax.watchdog import STALL_ENV

SUPERVISE = [sys.executable, "-m", "llama_jax.supervise"]

# A stand-in for the trainer: each start appends a line to WORKDIR/starts, then exits with CODES[start] (a negative
# code: killed by that signal). A start listed in PROGRESS first writes a new checkpoint directory.
FAKE_CHILD = """
import os, pathlib, sys
workdir = pathlib.Path(sys.argv[sys.argv.index("--workdir") + 1])
starts = workdir / "starts"
n = len(starts.read_text().splitlines()) if starts.exists() else 0
with starts.open("a") as f:
    f.write("start\\n")
if n in PROGRESS:
    (workdir / "checkpoints" / str(n + 1)).mkdir(parents=True)
code = CODES[n]
if code < 0:
    os.kill(os.getpid(), -code)
sys.exit(code)
"""


def fake_child(tmp_path: Path, codes: list[int], progress: tuple[int, ...] = ()) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(FAKE_CHILD.replace("CODES", repr(codes)).replace("PROGRESS", repr(progress)))
    return [sys.executable, str(script), "--workdir", str(tmp_path / "run")]


def supervise(tmp_path: Path, child: list[str], *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SUPERVISE, *options, "--", *child], capture_output=True, text=True, timeout=300, cwd=REPO)


def log_records(workdir: Path, event: str) -> list[dict]:
    lines = (workdir / "supervisor.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == event]


def test_every_kind_of_interruption_is_restarted_with_a_doubling_backoff(tmp_path):
    codes = [75, 76, -signal.SIGKILL, 1, 0]
    result = supervise(tmp_path, fake_child(tmp_path, codes), "--backoff", "0.05")
    assert result.returncode == 0, result.stderr
    workdir = tmp_path / "run"
    assert len((workdir / "starts").read_text().splitlines()) == 5
    records = log_records(workdir, "interruption")
    assert [(r["cause"], r["exit_code"], r["signal"]) for r in records] == [
        ("preempted", 75, None), ("hung", 76, None), ("crashed", -9, "SIGKILL"), ("crashed", 1, None)]
    assert [r["backoff_seconds"] for r in records] == [0.05, 0.1, 0.2, 0.4]
    assert all(r["restart_seconds"] >= r["backoff_seconds"] and r["down_seconds"] is None for r in records)
    assert "child hung (exit code 76)" in result.stderr and "child crashed (SIGKILL)" in result.stderr
    [end] = log_records(workdir, "end")
    assert (end["exit_code"], end["interruptions"]) == (0, 4)


def test_a_signal_during_the_listing_before_a_restart_starts_no_child(tmp_path):
    """SIGTERM while the supervisor lists the checkpoints after its backoff (a bucket takes its time), when no child
    was there to pass it to: the next child was started and never told, and trained on to its end."""
    script = (
        "import os, signal, sys\nfrom llama_jax import supervise\n"
        "listings = []\nlist_checkpoints = supervise.newest_checkpoint\n"
        "def slow_listing(workdir):\n"
        "    listings.append(workdir)\n"
        "    if len(listings) == 3:  # the one before the restart\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return list_checkpoints(workdir)\n"
        "supervise.newest_checkpoint = slow_listing\n"
        "sys.exit(supervise.main(['--backoff', '0.05', '--', *sys.argv[1:]]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, *fake_child(tmp_path, [75, 0])], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 75, result.stderr
    assert len((tmp_path / "run" / "starts").read_text().splitlines()) == 1, "no second child"
    assert [r["cause"] for r in log_records(tmp_path / "run", "interruption")] == ["preempted"]


def test_the_budget_counts_restarts_without_a_new_checkpoint_and_refills_on_one(tmp_path):
    """Starts 0, 1 fail; start 2 writes a checkpoint (progress) and fails; 3 and 4 fail: two in a row, give up."""
    result = supervise(tmp_path, fake_child(tmp_path, [1] * 10, progress=(2,)), "--backoff", "0.05",
                       "--max-restarts", "2")
    assert result.returncode == 1
    workdir = tmp_path / "run"
    assert len((workdir / "starts").read_text().splitlines()) == 5
    assert [r["backoff_seconds"] for r in log_records(workdir, "interruption")] == [0.05, 0.1, 0.05, 0.1]
    assert "giving up: 2 restarts in a row without a new checkpoint (--max-restarts 2)" in result.stderr


def test_a_configuration_error_is_not_restarted(tmp_path):
    result = supervise(tmp_path, fake_child(tmp_path, [2, 0]), "--backoff", "0.05")
    assert result.returncode == 2
    assert len((tmp_path / "run" / "starts").read_text().splitlines()) == 1
    assert log_records(tmp_path / "run", "interruption") == []


def test_the_training_command_must_name_its_workdir(tmp_path):
    result = supervise(tmp_path, [sys.executable, "-c", "pass"])
    assert result.returncode == 2
    assert "the training command has no --workdir DIR" in result.stderr


def test_a_command_or_options_that_cannot_run_are_refused_in_one_line(tmp_path, capsys):
    """Before, a missing program was a FileNotFoundError traceback, a workdir under a file an OSError's, and
    --max-restarts -1 ran the child once and ended with exit code 0."""
    (tmp_path / "file").write_text("")
    for argv, message in (
        (["--", str(tmp_path / "no-such-program"), "--workdir", str(tmp_path / "run")],
         f"the training command's program '{tmp_path / 'no-such-program'}' was not found"),
        (["--", sys.executable, "--workdir", str(tmp_path / "file" / "run")],
         f"the training command's --workdir {tmp_path / 'file' / 'run'} cannot be written ({tmp_path / 'file'} is a file)"),
        (["--max-restarts", "-1", "--", sys.executable, "--workdir", str(tmp_path / "run")],
         "--max-restarts must be 0 or more, and 0 <= --backoff <= --max-backoff (seconds); got -1, 10.0 and 600.0"),
    ):
        assert supervise_module.main(argv) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"error: {message}") and error.count("\n") == 1, error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    with pytest.raises(SystemExit) as shown:
        supervise_module.main(["--help"])
    assert shown.value.code == 0 and "--max-restarts MAX_RESTARTS" in capsys.readouterr().out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_supervisor_reaches_the_child_as_sigterm_and_ends_the_run(tmp_path, signum):
    """The child saves (here: writes a file) on SIGTERM and exits 75; the supervisor exits 75 and restarts nothing."""
    workdir = tmp_path / "run"
    child = [sys.executable, "-c", (
        "import pathlib, signal, sys, time\n"
        f"workdir = pathlib.Path({str(workdir)!r})\n"
        "def saved(signum, frame):\n"
        "    (workdir / 'saved').write_text(signal.Signals(signum).name)\n"
        "    sys.exit(75)\n"
        "signal.signal(signal.SIGTERM, saved)\n"
        "(workdir / 'ready').touch()\n"
        "time.sleep(300)\n"), "--workdir", str(workdir)]
    proc = subprocess.Popen([*SUPERVISE, "--backoff", "0.05", "--", *child], stderr=subprocess.PIPE, text=True,
                            cwd=REPO)
    deadline = time.monotonic() + 120
    while not (workdir / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)
    proc.send_signal(signum)
    assert proc.wait(timeout=120) == 75, proc.stderr.read()
    assert (workdir / "saved").read_text() == "SIGTERM"
    assert log_records(workdir, "interruption") == []
    assert log_records(workdir, "end")[0]["exit_code"] == 75


def test_a_signal_during_the_backoff_ends_the_run_without_a_restart(tmp_path):
    proc = subprocess.Popen([*SUPERVISE, "--backoff", "300", "--", *fake_child(tmp_path, [1, 0])],
                            stderr=subprocess.PIPE, text=True, cwd=REPO)
    for line in proc.stderr:
        if "restart 1 in 300 s" in line:
            break
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 75
    workdir = tmp_path / "run"
    assert len((workdir / "starts").read_text().splitlines()) == 1
    [crash] = log_records(workdir, "interruption")
    assert (crash["cause"], crash["restart_seconds"]) == ("crashed", None)


def test_a_compilation_has_no_limit_and_the_steps_after_it_have(tmp_path):
    """A later phase compiles its own step while the watchdog runs (the first phase's is done before it starts):
    a compilation longer than the limit was taken for a hang, and the run exited 76 at each phase change."""
    script = (
        "import time\nfrom pathlib import Path\nfrom llama_jax.watchdog import Watchdog\n"
        f"watchdog = Watchdog(multiple=1.0, min_seconds=0.3, workdir=Path({str(tmp_path)!r}))\n"
        "watchdog.start()\n"
        "with watchdog.phase('compilation', bounded=False):\n    time.sleep(1.5)\n"
        "print('compiled', flush=True)\n"
        "time.sleep(5)\n"
        "print('not stopped', flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert (result.returncode, result.stdout) == (76, "compiled\n"), result.stderr
    assert "watchdog: no progress in training steps for 0 s (limit 0 s" in result.stderr


@pytest.mark.long
def test_a_hung_step_dumps_every_stack_and_the_supervised_run_finishes(tmp_path, cache_dir):
    """Step 7 hangs in the first process (the test hook): the watchdog prints every thread's stack, naming the hung
    frame, and exits 76; the supervisor restarts from checkpoint 4 and the run finishes with every step logged once."""
    workdir = tmp_path / "run"
    train = cli_command(workdir, cache_dir, *KILL_RUN, "--config.checkpoint.every_steps=4",
                        "--config.watchdog.min_seconds=10")
    result = subprocess.run([*SUPERVISE, "--backoff", "0.1", "--", *train], capture_output=True, text=True,
                            timeout=900, env={**CLI_ENV, STALL_ENV: "7"}, cwd=REPO)
    assert result.returncode == 0, result.stderr[-5000:]
    assert "watchdog: no progress in training steps" in result.stderr
    assert "in _stall_forever_for_test" in result.stderr and "in run_phase" in result.stderr, result.stderr[-5000:]
    assert "Resumed from" in result.stdout and "checkpoints/4" in result.stdout
    lines = read_metrics(workdir)
    assert [m["step"] for m in lines] == list(range(1, 15)), "every step logged exactly once"

    interruptions = log_records(workdir, "interruption")
    assert len(interruptions) == 1, (interruptions, result.stderr[-5000:])
    [hang] = interruptions
    assert (hang["cause"], hang["exit_code"]) == ("hung", 76)
    assert hang["down_seconds"] > hang["restart_seconds"] > 0, "downtime runs to the next child's first step"
    [end] = log_records(workdir, "end")
    assert 0 < end["goodput"] < 1 and f"goodput {end['goodput']:.1%}" in result.stderr
    lost = {key.removeprefix(goodput.LOST): value for key, value in end.items() if key.startswith(goodput.LOST)}
    assert lost["redone"] > 0, "steps 5 and 6 ran twice"
    assert lost["compile"] > 0 and lost["checkpoint"] > 0 and lost["eval"] > 0 and lost["restart"] > 0
    assert end[goodput.PRODUCTIVE] + sum(lost.values()) == pytest.approx(end[goodput.WALL])
    for before, after in zip(lines, lines[1:]):
        assert after[goodput.PRODUCTIVE] >= before[goodput.PRODUCTIVE]


def test_a_run_after_another_in_one_process_counts_its_time_from_its_own_start(tmp_path, monkeypatch):
    """A sweep's runs trained one after another in one process (scaling's run, the notebook): each fresh run dated
    its start to the process's, so the runs before it counted as its time lost to restarts."""
    monkeypatch.setattr(goodput, "_IMPORTED", time.time() - 100.0)  # the process started long ago
    monkeypatch.setattr(goodput, "_run_start", None)
    starts = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        called = time.time()
        goodput.begin_run()
        accounts = goodput.Goodput(tmp_path / name, committed=None, dropped=[], writer=True)
        started = accounts.started
        accounts.first_step_trained()
        assert json.loads((tmp_path / name / goodput.START_FILE).read_text())["started"] == started
        starts.append((started, called))
    (first, _), (second, second_called) = starts
    assert first == goodput._IMPORTED, "the first run's start-up (imports, data) is its own"
    assert second >= second_called


def test_goodput_after_a_resume_counts_the_redone_steps_once(tmp_path):
    """The dead process logged steps 5 and 6 past checkpoint 4: their time is redone, not productive, and what it
    lost (compiling, saving) stays lost."""
    at_checkpoint = {goodput.PRODUCTIVE: 10.0, goodput.LOST + "compile": 5.0, goodput.LOST + "checkpoint": 1.0,
                     goodput.LOST + "eval": 0.0, goodput.LOST + "redone": 2.0}
    dead = [{"step": 5, **at_checkpoint, goodput.PRODUCTIVE: 11.0, goodput.LOST + "checkpoint": 1.5},
            {"step": 6, **at_checkpoint, goodput.PRODUCTIVE: 12.5, goodput.LOST + "checkpoint": 1.5}]
    resumed = goodput.Goodput(tmp_path, committed=at_checkpoint, dropped=dead, writer=True).ledger()
    assert resumed[goodput.PRODUCTIVE] == pytest.approx(10.0, abs=0.01)
    assert resumed[goodput.LOST + "redone"] == 2.0 + 2.5
    assert resumed[goodput.LOST + "checkpoint"] == 1.5 and resumed[goodput.LOST + "compile"] == 5.0
    fresh = goodput.Goodput(tmp_path, committed=None, dropped=dead, writer=True).ledger()  # died before any save
    assert fresh[goodput.LOST + "redone"] == 2.0 + 12.5 and fresh[goodput.PRODUCTIVE] < 0.01
    assert goodput.Goodput(tmp_path, committed=at_checkpoint, dropped=[], writer=True).ledger()[
        goodput.LOST + "redone"] == 2.0


class MetadataServer(http.server.ThreadingHTTPServer):
    """The maintenance-event key on a local port: NONE, except to the next `notices` requests after `announce`.
    Like the real server, it refuses requests without the Metadata-Flavor header."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _MetadataHandler)
        self.requests, self.notices = 0, 0
        self.url = f"http://127.0.0.1:{self.server_port}/computeMetadata/v1/instance/maintenance-event"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def announce(self, notices: int) -> None:
        self.notices = notices


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.headers.get("Metadata-Flavor") != "Google" or "maintenance-event" not in self.path:
            self.send_error(403)
            return
        self.server.requests += 1
        event = "NONE"
        if self.server.notices > 0:
            self.server.notices -= 1
            event = "TERMINATE_ON_HOST_MAINTENANCE"
        self.send_response(200)
        self.send_header("ETag", event)
        self.end_headers()
        self.wfile.write(event.encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata_server():
    server = MetadataServer()
    yield server
    server.shutdown()


def test_a_maintenance_notice_checkpoints_the_current_step_and_exits_75(tmp_path, cache_dir, metadata_server):
    workdir = tmp_path / "run"
    stderr_file = (tmp_path / "stderr.txt").open("w")
    overrides = [o for o in KILL_RUN if "train.steps" not in o and "every_steps" not in o]
    proc = subprocess.Popen(cli_command(workdir, cache_dir, *overrides, "--config.train.steps=100000",
                                       "--config.checkpoint.every_steps=100000",
                                       f"--config.checkpoint.maintenance_url={metadata_server.url}"),
                            stdout=subprocess.DEVNULL, stderr=stderr_file, env=CLI_ENV, cwd=REPO)
    try:
        deadline = time.monotonic() + 600
        while len(read_metrics(workdir)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        assert metadata_server.requests > 0, "the trainer did not watch the maintenance key"
        metadata_server.announce(1)
        assert proc.wait(timeout=300) == 75
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "host maintenance notice (TERMINATE_ON_HOST_MAINTENANCE)" in stderr
    assert "cannot read maintenance notices" not in stderr
    saved = checkpoint_steps(workdir)
    assert len(saved) == 1 and f"preempted: checkpoint saved at step {saved[0]}" in stderr, saved
    assert read_metrics(workdir)[-1]["step"] == saved[0], "the last logged step is the saved one"


def test_a_maintenance_notice_on_one_host_stops_every_host_at_the_same_step(tmp_path, job, metadata_server):
    """Only one of two processes sees the notice; JAX's preemption service makes both save the same step."""
    workdir = tmp_path / "run"
    started = start_two_processes(job, workdir, tmp_path / "cache", "--config.train.steps=100000",
                                  "--config.checkpoint.every_steps=100000",
                                  f"--config.checkpoint.maintenance_url={metadata_server.url}")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(read_metrics(workdir)) < 2:
            if any(proc.poll() is not None for proc, _ in started) or time.monotonic() > deadline:
                break  # the exit codes below say what went wrong, with the processes' output
            time.sleep(0.2)
        metadata_server.announce(1)
    finally:
        codes, outputs = finish(started)
    assert codes == [75, 75], "\n\n".join(out[-3000:] for out in outputs)
    assert sum("host maintenance notice" in out for out in outputs) == 1
    saved = checkpoint_steps(workdir)
    assert len(saved) == 1 and f"preempted: checkpoint saved at step {saved[0]}" in outputs[0], saved
    assert read_metrics(workdir)[-1]["step"] == saved[0], "the last logged step is the saved one"


def test_maintenance_notices_are_watched_on_compute_engine_only(tmp_path, monkeypatch):
    product = tmp_path / "product_name"
    monkeypatch.setattr(maintenance, "_PRODUCT_NAME", product)
    assert maintenance.maintenance_url("auto") is None  # no DMI data: not a VM we know
    product.write_text("Standard PC (Q35 + ICH9, 2009)\n")
    assert maintenance.maintenance_url("auto") is None
    product.write_text("Google Compute Engine\n")
    assert maintenance.maintenance_url("auto") == maintenance.METADATA_URL
    assert maintenance.maintenance_url("") is None
    assert maintenance.maintenance_url("http://127.0.0.1:1/x") == "http://127.0.0.1:1/x"


@pytest.mark.parametrize("key, value, message", [
    ("watchdog.multiple", -1.0, "watchdog.multiple must be zero or positive"),
    ("watchdog.min_seconds", -5.0, "watchdog.min_seconds must be zero or positive"),
    ("checkpoint.maintenance_url", "metadata.google.internal", "must be 'auto', '' \\(off\\) or an http:// URL"),
])
def test_fault_tolerance_settings_are_checked(key, value, message):
    cfg = default_config()
    section, name = key.split(".")
    cfg[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
