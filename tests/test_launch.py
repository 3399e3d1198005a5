"""The launchers without a cloud or a cluster: exact dry-run commands, the TPU lifecycle against a fake `gcloud` on
PATH (tests/fake_gcloud.py: create, wait, install, start, stream, preemption, re-create, restart, finish), the
worker-side script run for real on this machine, the SLURM script run with a fake `srun`, and bad input."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from llama_jax.errors import ConfigError
from llama_jax.launch import remote, slurm, tpu, tpu_job
from llama_jax.launch.__main__ import main
from llama_jax.launch.executor import LaunchError, SubprocessExecutor

REPO = Path(__file__).resolve().parents[1]
FAKE_GCLOUD = Path(__file__).with_name("fake_gcloud.py")
WORKER_SCRIPT = REPO / "launch" / "tpu_worker.sh"
WHERE = "--zone=us-east5-a --project=proj"
TPU = ["tpu", "--config", "configs/tiny.py", "--name", "llama", "--zone", "us-east5-a", "--project", "proj"]


def _dry_run(capsys, *argv: str) -> list[str]:
    assert main(["tpu", *argv[1:], "--dry-run"] if argv[0] == "tpu" else [*argv, "--dry-run"]) == 0
    return capsys.readouterr().out.splitlines()


def _ssh(node: str, worker: str, command: str, keepalive: bool = False) -> str:
    alive = " --ssh-flag=-oServerAliveInterval=30 --ssh-flag=-oServerAliveCountMax=4" if keepalive else ""
    command = shlex.quote(f"--command={command}")
    return f"gcloud compute tpus tpu-vm ssh {node} --worker={worker} {WHERE} --quiet{alive} {command}"


# --- dry runs: the exact commands -----------------------------------------------------------------------------------

def test_dry_run_queued_spot_lists_every_command_of_a_launch(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    lines = _dry_run(capsys, *TPU, "--accelerator", "v5p-512", "--workdir", "gs://bucket/runs/llama", "--spot",
                     "--config.train.steps=10", "--config.data.batch_size=256")  # a row for each of 256 chips
    bundle = remote.bundle_path("llama")
    worker = "bash ~/llama_jax/launch/tpu_worker.sh"
    describe = f"gcloud compute tpus queued-resources describe llama {WHERE} --format=json"
    status = _ssh("llama", "0", f"{worker} status")
    assert lines == [
        f"bash -o pipefail -c 'git -C {REPO} ls-files -z --cached --others --exclude-standard | tar -czf {bundle} "
        f"-C {REPO} --null --ignore-failed-read -T -'",
        describe,
        "gcloud compute tpus queued-resources create llama --node-id=llama --accelerator-type=v5p-512 "
        f"--runtime-version=v2-alpha-tpuv5 {WHERE} --spot",
        describe,
        status,
        f"gcloud compute tpus tpu-vm scp {bundle} llama:llama_jax.tar.gz --worker=all {WHERE} --quiet",
        _ssh("llama", "all", "rm -rf ~/llama_jax && mkdir -p ~/llama_jax && tar -xzf llama_jax.tar.gz -C ~/llama_jax "
                             f"&& {worker} install"),
        _ssh("llama", "all", f"{worker} start configs/tiny.py gs://bucket/runs/llama --config.train.steps=10 "
                             "--config.data.batch_size=256"),
        _ssh("llama", "0", f"{worker} stream 1", keepalive=True),
        describe,
        status,
        f"gcloud compute tpus queued-resources delete llama {WHERE} --force --quiet",
    ]


def test_dry_run_on_demand_uses_tpu_vm_create_describe_and_delete(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    lines = _dry_run(capsys, *TPU, "--accelerator", "v4-8", "--workdir", "gs://b/r", "--on-demand", "--spot",
                     "--runtime-version", "tpu-ubuntu2204-base")
    assert lines[2] == (f"gcloud compute tpus tpu-vm create llama --accelerator-type=v4-8 "
                        f"--version=tpu-ubuntu2204-base {WHERE} --spot")
    assert lines[1] == lines[3] == f"gcloud compute tpus tpu-vm describe llama {WHERE} --format=json"
    assert lines[-1] == f"gcloud compute tpus tpu-vm delete llama {WHERE} --quiet"
    assert not any("queued-resources" in line for line in lines)


def test_dry_run_single_host_takes_a_local_workdir_and_defaults_the_runtime(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    lines = _dry_run(capsys, *TPU, "--accelerator", "v6e-8", "--workdir", "/tmp/runs/here")
    assert lines[2] == ("gcloud compute tpus queued-resources create llama --node-id=llama --accelerator-type=v6e-8 "
                        f"--runtime-version=v2-alpha-tpuv6e {WHERE}")
    assert _ssh("llama", "all", "bash ~/llama_jax/launch/tpu_worker.sh start configs/tiny.py /tmp/runs/here") in lines


def test_dry_run_multislice_creates_n_nodes_and_sets_megascale_per_slice(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    lines = _dry_run(capsys, *TPU, "--accelerator", "v5p-128", "--workdir", "gs://b/r", "--num-slices", "2",
                     "--config.data.batch_size=128")
    bundle = remote.bundle_path("llama")
    worker = "bash ~/llama_jax/launch/tpu_worker.sh"
    install = (f"rm -rf ~/llama_jax && mkdir -p ~/llama_jax && tar -xzf llama_jax.tar.gz -C ~/llama_jax && "
               f"{worker} install")
    start = ("MEGASCALE_COORDINATOR_ADDRESS='<ip-of-llama-0-worker-0>:8080' MEGASCALE_NUM_SLICES=2 "
             "MEGASCALE_SLICE_ID={} MEGASCALE_PORT=8080 " + f"{worker} start configs/tiny.py gs://b/r "
             "--config.data.batch_size=128")
    assert lines[2] == ("gcloud compute tpus queued-resources create llama --node-count=2 --node-prefix=llama "
                        f"--accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 {WHERE}")
    assert lines[5:] == [
        f"gcloud compute tpus tpu-vm scp {bundle} llama-0:llama_jax.tar.gz --worker=all {WHERE} --quiet",
        _ssh("llama-0", "all", install),
        f"gcloud compute tpus tpu-vm scp {bundle} llama-1:llama_jax.tar.gz --worker=all {WHERE} --quiet",
        _ssh("llama-1", "all", install),
        f"gcloud compute tpus tpu-vm describe llama-0 {WHERE} --format=json",
        _ssh("llama-0", "all", start.format(0)),
        _ssh("llama-1", "all", start.format(1)),
        _ssh("llama-0", "0", f"{worker} stream 1", keepalive=True),
        f"gcloud compute tpus queued-resources describe llama {WHERE} --format=json",
        _ssh("llama-0", "0", f"{worker} status"),
        f"gcloud compute tpus queued-resources delete llama {WHERE} --force --quiet",
    ]


@pytest.mark.parametrize("kind, expected", [
    ([], f"gcloud compute tpus queued-resources delete llama {WHERE} --force --quiet"),
    (["--on-demand"], f"gcloud compute tpus tpu-vm delete llama {WHERE} --quiet"),
])
def test_dry_run_teardown_is_one_delete_and_needs_no_config(capsys, kind, expected):
    argv = ["tpu", "--name", "llama", "--accelerator", "v5p-512", "--zone", "us-east5-a", "--project", "proj",
            "--teardown", *kind]
    assert _dry_run(capsys, *argv) == [expected]


# --- bad input: one line naming the problem and the fix, exit code 2 ------------------------------------------------

@pytest.mark.parametrize("change, message", [
    ({"--accelerator": "v5-512"}, "unknown accelerator type 'v5-512'"),
    ({"--accelerator": "v5p"}, "unknown accelerator type 'v5p'"),
    ({"--accelerator": "h100-8"}, "e.g. v5p-512"),
    ({"--zone": None}, "--zone is missing"),
    ({"--project": None}, "--project is missing"),
    ({"--config": "configs/nope.py"}, "config file configs/nope.py not found"),
    ({"--config": "/etc/hostname"}, "is outside the repository"),
    ({"--workdir": "runs/llama"}, "--workdir runs/llama for v5p-512 x 1 slice(s), which has several hosts"),
    ({"--workdir": None}, "gs://MY-BUCKET/runs/llama"),
    # inside the checkout, which the next launch's install deletes with the run's checkpoints
    ({"--workdir": "runs/llama", "--accelerator": "v6e-8"}, "--workdir runs/llama is relative: on the worker it would"),
    ({"--name": "Llama_8B"}, "--name 'Llama_8B' is not a valid TPU name"),
    ({"--on-demand": "", "--num-slices": "2"}, "--num-slices > 1 needs a queued resource"),
    ({"--num-slices": "0"}, "--num-slices 0"),
    ({"--poll-seconds": "0"}, "--poll-seconds 0"),
    ({"--epochs": "3"}, "unexpected argument '--epochs'"),
])
def test_tpu_argument_errors(capsys, monkeypatch, change, message):
    monkeypatch.chdir(REPO)
    flags = {"--config": "configs/tiny.py", "--name": "llama", "--accelerator": "v5p-512", "--zone": "us-east5-a",
             "--project": "proj", "--workdir": "gs://b/r", **change}
    argv = ["tpu", *[part for flag, value in flags.items() if value is not None
                     for part in ([flag, value] if value else [flag])], "--dry-run"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and message in captured.err, captured.err
    assert "Traceback" not in captured.err


def test_multislice_of_single_host_slices_still_needs_a_bucket(tmp_path):
    with pytest.raises(ConfigError, match="several hosts"):
        tpu_job.make_job(name="x", accelerator="v5litepod-8", zone="z", project="p",
                         config=str(REPO / "configs/tiny.py"), workdir="runs/x", repo=REPO, num_slices=2)


# --- the lifecycle against a fake gcloud ----------------------------------------------------------------------------

class _NoWaitExecutor(SubprocessExecutor):
    """The real executor (commands run, the fake gcloud answers), without the waits between polls."""

    def __init__(self):
        super().__init__(echo=False)
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


@pytest.fixture
def cloud(tmp_path, monkeypatch):
    """A fake gcloud first on PATH, a small git checkout to ship, and a way to run one scripted launch."""
    bin_dir, state_dir, repo = tmp_path / "bin", tmp_path / "cloud", tmp_path / "repo"
    for folder in (bin_dir, state_dir, repo / "configs", repo / "runs"):
        folder.mkdir(parents=True)
    (bin_dir / "gcloud").write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {FAKE_GCLOUD} "$@"\n')
    (bin_dir / "gcloud").chmod(0o755)
    (repo / "configs" / "c.py").write_text("def get_config(): ...\n")
    (repo / "runs" / "old.txt").write_text("ignored")
    (repo / ".gitignore").write_text("/runs/\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(state_dir))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    class Cloud:
        lines: list[str] = []

        def launch(self, state: dict, poll_seconds: float = 60.0, **job) -> int:
            defaults = {"exists": False, "queued": True, "pending": ["ACTIVE"], "states": [], "life": 0,
                        "started": False, "exit": None, "failure": ""}
            (state_dir / "state.json").write_text(json.dumps({**defaults, **state}))
            self.job = tpu_job.make_job(**{"name": "llama", "accelerator": "v5p-512", "zone": "us-east5-a",
                                           "project": "proj", "config": str(repo / "configs" / "c.py"),
                                           "workdir": "gs://b/r", "repo": repo, **job})
            self.executor = _NoWaitExecutor()
            launcher = tpu.TpuLauncher(self.job, self.executor, poll_seconds=poll_seconds, out=self.lines.append)
            self.code = launcher.launch()
            self.recreations = launcher.recreations
            return self.code

        @staticmethod
        def calls() -> list[list[str]]:
            return [json.loads(line) for line in (state_dir / "calls.jsonl").read_text().splitlines()]

        def steps(self) -> list[str]:
            return [_step(call) for call in self.calls()]

    yield Cloud()


def _step(call: list[str]) -> str:
    """A recorded gcloud call in short: "create", "describe", "ssh start", "ssh stream 3", ..."""
    if call[3] != "ssh":
        return call[3]
    words = shlex.split(next(arg for arg in call if arg.startswith("--command="))[len("--command="):])
    script = next(index for index, word in enumerate(words) if word.endswith("tpu_worker.sh"))
    action = words[script + 1]
    return f"ssh stream {words[script + 2]}" if action == "stream" else f"ssh {action}"


ONE_LIFE = ["describe", "ssh status", "scp", "ssh install", "ssh start"]


def test_preempted_spot_slice_is_deleted_recreated_and_the_run_restarted(cloud):
    lives = [{"log": ["step 1", "step 2"], "then": "preempt", "lost": "SUSPENDED"},
             {"log": ["resumed at step 2", "step 3", "done"], "then": "exit", "code": 0}]
    assert cloud.launch({"pending": ["WAITING_FOR_RESOURCES", "ACTIVE"], "lives": lives}, spot=True) == 0
    assert cloud.steps() == [
        "describe", "create", "describe", *ONE_LIFE, "ssh stream 1",  # queued, then up: install, start, follow
        "describe", "delete",  # the stream ended and the queued resource is SUSPENDED: preempted
        "describe", "create", "describe", *ONE_LIFE, "ssh stream 1",  # a new slice, the same run resumed
        "describe", "ssh status", "delete",  # worker 0 says 0: finished, and the slice goes
    ]
    assert cloud.recreations == 1
    assert cloud.lines == ["step 1", "step 2", "resumed at step 2", "step 3", "done"]
    creates = [call for call in cloud.calls() if call[3] == "create"]
    assert len(creates) == 2 and all("--spot" in call and "--node-id=llama" in call for call in creates)
    starts = [call[-1] for call in cloud.calls() if _step(call) == "ssh start"]
    assert starts == ["--command=bash ~/llama_jax/launch/tpu_worker.sh start configs/c.py gs://b/r"] * 2
    assert cloud.executor.slept == [60.0, 60.0]  # one poll while WAITING_FOR_RESOURCES, each time


def test_a_slice_lost_while_the_stream_hangs_is_noticed_by_the_watcher(cloud):
    lives = [{"log": ["step 1"], "then": "hang", "lost": "SUSPENDED"},
             {"log": ["step 1", "step 2"], "then": "exit", "code": 0}]
    assert cloud.launch({"lives": lives}, poll_seconds=0.2) == 0
    steps = cloud.steps()
    first_stream = steps.index("ssh stream 1")
    assert steps[first_stream + 1] == "describe" and steps.index("delete") > first_stream  # the watcher's describe
    assert steps.count("create") == 2 and steps.count("ssh start") == 2 and steps[-1] == "delete"
    assert cloud.recreations == 1
    assert cloud.lines == ["step 1", "step 1", "step 2"]


def test_on_demand_vm_that_vanishes_is_recreated(cloud):
    lives = [{"log": ["a"], "then": "vanish"}, {"log": ["b"], "then": "exit", "code": 0}]
    assert cloud.launch({"queued": False, "pending": ["CREATING", "READY"], "lives": lives}, queued=False) == 0
    steps = cloud.steps()
    assert steps == ["describe", "create", "describe", *ONE_LIFE, "ssh stream 1",
                     "describe", "delete",  # NOT_FOUND: gone; the delete finds nothing, which is fine
                     "describe", "create", "describe", *ONE_LIFE, "ssh stream 1", "describe", "ssh status", "delete"]
    assert all(call[2] == "tpu-vm" for call in cloud.calls())
    assert cloud.lines == ["a", "b"]


def test_a_dropped_connection_is_followed_again_from_the_next_line(cloud):
    lives = [{"log": ["1", "2"], "then": "drop"}, {"log": ["1", "2", "3", "4"], "then": "exit", "code": 0}]
    assert cloud.launch({"lives": lives}) == 0
    assert cloud.steps() == ["describe", "create", *ONE_LIFE, "ssh stream 1", "describe", "ssh status",
                             "ssh stream 3", "describe", "ssh status", "delete"]
    assert cloud.lines == ["1", "2", "3", "4"]
    assert cloud.recreations == 0


def test_running_again_attaches_to_the_run_on_an_existing_slice(cloud):
    state = {"exists": True, "states": ["ACTIVE"], "started": True,
             "lives": [{"log": ["x"], "then": "exit", "code": 0}]}
    assert cloud.launch(state) == 0
    assert cloud.steps() == ["describe", "ssh status", "ssh stream 1", "describe", "ssh status", "delete"]


def test_a_failed_run_keeps_the_slice_and_returns_the_supervisors_code(cloud):
    assert cloud.launch({"lives": [{"log": ["error: bad key"], "then": "exit", "code": 2}]}) == 2
    assert cloud.steps()[-3:] == ["ssh stream 1", "describe", "ssh status"]
    assert "delete" not in cloud.steps()


def test_a_failed_queued_resource_stops_with_its_reason(cloud):
    with pytest.raises(LaunchError, match="Quota 'TPUV5P' exceeded"):
        cloud.launch({"pending": ["FAILED"], "failure": "Quota 'TPUV5P' exceeded"})
    assert cloud.steps() == ["describe", "create", "describe", "describe"]


def test_multislice_starts_every_slice_with_its_megascale_env(cloud):
    assert cloud.launch({"lives": [{"log": ["ok"], "then": "exit", "code": 0}]}, num_slices=2) == 0
    calls = cloud.calls()
    assert sorted(call[5] for call in calls if call[3] == "scp") == [f"llama-{i}:llama_jax.tar.gz" for i in (0, 1)]
    assert sorted(call[4] for call in calls if _step(call) == "ssh install") == ["llama-0", "llama-1"]
    starts = {call[4]: call[-1] for call in calls if _step(call) == "ssh start"}
    for slice_id in (0, 1):
        assert starts[f"llama-{slice_id}"] == (
            "--command=MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2:8080 MEGASCALE_NUM_SLICES=2 "
            f"MEGASCALE_SLICE_ID={slice_id} MEGASCALE_PORT=8080 bash ~/llama_jax/launch/tpu_worker.sh start "
            "configs/c.py gs://b/r")
    assert [call[4] for call in calls if _step(call).startswith("ssh stream")] == ["llama-0"]
    before_starts = calls[cloud.steps().index("ssh start") - 1]
    assert before_starts[:5] == ["compute", "tpus", "tpu-vm", "describe", "llama-0"]  # the coordinator's address


def test_an_unpreempted_launch_runs_exactly_the_dry_run_plan(cloud):
    assert cloud.launch({"lives": [{"log": ["ok"], "then": "exit", "code": 0}]}, spot=True) == 0
    planned = [command[1:] for command in tpu.plan(cloud.job) if command[0] == "gcloud"]
    assert cloud.calls() == planned


def test_the_bundle_holds_the_checkout_without_ignored_files(cloud):
    cloud.launch({"lives": [{"log": [], "then": "exit", "code": 0}]})
    with tarfile.open(remote.bundle_path("llama")) as bundle:
        assert sorted(bundle.getnames()) == [".gitignore", "configs/c.py"]


def test_gcloud_without_credentials_stops_with_the_fix(cloud):
    with pytest.raises(LaunchError, match="failed 3 times: .*no.* active account.*gcloud auth login"):
        cloud.launch({"signed_out": True})
    assert cloud.steps() == ["describe"] * 3


def test_no_gcloud_on_path_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(LaunchError, match="gcloud not found on PATH: install the Google Cloud CLI"):
        SubprocessExecutor(echo=False).run(["gcloud", "version"])


def test_teardown_deletes_the_queued_resource(cloud):
    (Path(os.environ["FAKE_GCLOUD_DIR"]) / "state.json").write_text(json.dumps({"exists": True}))
    job = tpu_job.make_job(name="llama", accelerator="v5p-512", zone="z", project="p", config="", workdir=None,
                           repo=REPO, check_workdir=False)
    assert tpu.TpuLauncher(job, _NoWaitExecutor()).teardown() == 0
    assert cloud.calls() == [["compute", "tpus", "queued-resources", "delete", "llama", "--zone=z", "--project=p",
                              "--force", "--quiet"]]


# --- the worker's side, run here ------------------------------------------------------------------------------------

def test_worker_script_starts_detached_streams_to_the_end_and_reports_the_exit_code(tmp_path):
    venv, fake_bin = tmp_path / "venv", tmp_path / "fakebin"
    (venv / "bin").mkdir(parents=True)
    fake_bin.mkdir()
    (venv / "bin" / "activate").write_text(f'export PATH="{fake_bin}:$PATH"\n')
    # `python -m llama_jax.supervise -- CMD...` runs CMD; the "trainer" records its arguments, logs, and exits 3.
    (fake_bin / "python").write_text(
        '#!/usr/bin/env bash\n'
        'if [ "$2" = llama_jax.supervise ]; then shift 3; exec "$@"; fi\n'
        'printf "%s\\n" "$@" > "$ARGS"\n'
        'echo "step 1"; sleep 1; echo "step 2"; exit 3\n')
    (fake_bin / "python").chmod(0o755)
    env = {**os.environ, "LLAMA_JAX_VENV": str(venv), "LLAMA_JAX_RUN_DIR": str(tmp_path / "run"),
           "ARGS": str(tmp_path / "args")}

    def worker(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(WORKER_SCRIPT), *argv], env=env, capture_output=True, text=True,
                              timeout=30)

    assert worker("status").stdout == "none\n"
    assert worker("start", "configs/c.py", "gs://b/r x", "--config.a=b c").returncode == 0
    assert worker("status").stdout == "running\n"
    assert worker("start", "configs/c.py", "gs://b/r").returncode == 0  # a second start leaves the run alone
    assert worker("stream", "1").stdout == "step 1\nstep 2\n"  # returns when the run has ended
    assert worker("status").stdout == "3\n"
    assert worker("stream", "2").stdout == "step 2\n"
    assert (tmp_path / "args").read_text().splitlines() == [
        "-m", "llama_jax.train", "--config", "configs/c.py", "--workdir", "gs://b/r x", "--config.a=b c"]
    assert worker("bogus").returncode == 2


def test_worker_script_parses():
    assert subprocess.run(["bash", "-n", str(WORKER_SCRIPT)]).returncode == 0


# --- SLURM and one machine ------------------------------------------------------------------------------------------

def _slurm_job(**change) -> slurm.SlurmJob:
    return slurm.make_job(**{"config": str(REPO / "configs/tiny.py"), "nodes": 4, "gpus_per_node": 8,
                             "workdir": "/shared/runs/x", "partition": "h100", "time": "48:00:00", **change})


def test_sbatch_script_asks_for_one_task_per_node_and_starts_the_supervisor():
    text = slurm.script(_slurm_job())
    assert text.splitlines()[:11] == [
        "#!/usr/bin/env bash",
        "#SBATCH --job-name=llama_jax-tiny",
        "#SBATCH --nodes=4",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --exclusive",
        "#SBATCH --output=slurm/%x-%j.out",
        "#SBATCH --signal=TERM@300",
        "#SBATCH --partition=h100",
        "#SBATCH --time=48:00:00",
        "",
    ]
    assert text.endswith('srun --kill-on-bad-exit=1 python -m llama_jax.supervise -- \\\n'
                         '    python -m llama_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"\n')


def test_template_file_is_the_script_with_default_resources():
    assert (REPO / "launch" / "slurm.sbatch").read_text() == slurm.template()
    assert slurm.template().endswith(slurm.body())


def test_sbatch_script_runs_srun_with_all_gpus_and_the_cluster_flags(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$OUT/argv"\nenv > "$OUT/env"\n')
    (bin_dir / "srun").chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(slurm.script(_slurm_job()))
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(tmp_path),
           "SLURM_GPUS_ON_NODE": "4", "XLA_FLAGS": "--xla_dump_to=/tmp/mine"}
    env.pop("NCCL_DEBUG", None)
    done = subprocess.run(["bash", str(script), "/abs/configs/x.py", "/shared/runs/x", "--config.train.steps=5"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "argv").read_text().splitlines() == [
        "--kill-on-bad-exit=1", "python", "-m", "llama_jax.supervise", "--", "python", "-m", "llama_jax.train",
        "--config", "/abs/configs/x.py", "--workdir", "/shared/runs/x", "--config.train.steps=5"]
    seen = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert seen["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    assert seen["XLA_FLAGS"].split() == [*slurm.XLA_FLAGS, "--xla_dump_to=/tmp/mine"]  # the user's come last
    assert seen["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90" and seen["NCCL_DEBUG"] == "WARN"
    usage = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage: sbatch" in usage.stderr


def test_slurm_dry_run_prints_the_script_and_the_sbatch_command(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = _dry_run(capsys, "slurm", "--config", "configs/tiny.py", "--nodes", "2", "--gpus-per-node", "8",
                   "--time", "04:00:00", "--workdir", "gs://b/r", "--config.train.steps=5")
    job = slurm.make_job(config="configs/tiny.py", nodes=2, gpus_per_node=8, time="04:00:00", workdir="gs://b/r",
                         overrides=("--config.train.steps=5",))
    assert out == [*slurm.script(job).splitlines(),
                   f"sbatch slurm/llama_jax-tiny.sbatch {REPO}/configs/tiny.py gs://b/r --config.train.steps=5"]
    assert not (REPO / "slurm" / "llama_jax-tiny.sbatch").exists()  # a dry run writes nothing


def test_slurm_submits_the_written_script_with_sbatch(tmp_path, monkeypatch, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$OUT"\necho "Submitted batch job 42"\n')
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OUT", str(tmp_path / "argv"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.py").write_text("from llama_jax.config import default_config\n\n\n"
                                   "def get_config():\n    return default_config()\n")
    assert main(["slurm", "--config", "c.py", "--nodes", "1", "--gpus-per-node", "8", "--job-name", "j"]) == 0
    assert "Submitted batch job 42" in capsys.readouterr().out
    assert (tmp_path / "argv").read_text().splitlines() == ["slurm/j.sbatch", str(tmp_path / "c.py"),
                                                           str(tmp_path / "runs" / "c")]
    assert (tmp_path / "slurm" / "j.sbatch").read_text() == slurm.script(slurm.make_job(
        config="c.py", nodes=1, gpus_per_node=8, job_name="j"))


@pytest.mark.parametrize("limit", ["2-00", "1-12:30", "0-00:06:00", "90", "90:30", "48:00:00", "UNLIMITED"])
def test_slurm_takes_every_time_limit_form_sbatch_takes(monkeypatch, limit):
    """Minutes (`--time 90`) and days-hours (`--time 2-00`) were refused as not HH:MM:SS."""
    monkeypatch.chdir(REPO)
    job = slurm.make_job(config="configs/tiny.py", nodes=1, gpus_per_node=8, time=limit)
    assert f"#SBATCH --time={limit}" in slurm.script(job).splitlines()


@pytest.mark.parametrize("argv, message", [
    (["--time", "48h"], "--time '48h' is not a SLURM time limit: MINUTES, HH:MM:SS, D-HH or D-HH:MM:SS"),
    (["--time", "5"], "--time '5' is 300 s: SLURM sends the run its SIGTERM 300 s before the limit"),
    (["--nodes", "0"], "--nodes 0"),
    (["--gpus-per-node", "0"], "--gpus-per-node 0"),
    (["--config", "nope.py"], "config file nope.py not found"),
    (["--job-name", "a b"], "--job-name 'a b'"),
    (["--steps", "5"], "unexpected argument '--steps'"),
])
def test_slurm_argument_errors(capsys, monkeypatch, argv, message):
    monkeypatch.chdir(REPO)
    flags = {"--config": "configs/tiny.py", "--nodes": "2", "--gpus-per-node": "8"}
    flags.update(dict(zip(argv[::2], argv[1::2])))
    assert main(["slurm", *[part for item in flags.items() for part in item], "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: ") and message in captured.err, captured.err


@pytest.mark.parametrize("argv, code, message", [
    (["slurm", "--config", "configs/llama3_8b.py", "--nodes", "1", "--gpus-per-node", "8"], 2,
     "error: phase pretrain: mesh data=1 x stage=1 x fsdp=256 x context=1 x tensor=1 needs 256 devices but 8 are "
     "available: make the product equal 8, or set one axis (e.g. mesh.data) to -1 (checked before launching, for 8 "
     "devices; --no-check skips the check)"),
    (["slurm", "--config", "configs/tiny.py", "--nodes", "2", "--gpus-per-node", "8", "--config.optim.lr=fast"], 2,
     "error: flag --config.optim.lr=fast: could not convert string to float: 'fast' (checked before launching"),
    (["slurm", "--config", "configs/tiny.py", "--nodes", "2", "--gpus-per-node", "8", "--config.optim.rate=1"], 2,
     "error: unknown config override --config.optim.rate: optim has no key 'rate'; its keys: "),
    ([*TPU, "--accelerator", "v5p-512", "--workdir", "gs://b/r"], 2,
     "error: a batch of 16 sequences cannot be cut into optim.grad_accum (1) x pipeline microbatches (1) x "
     "data-parallel shards (mesh.data x mesh.fsdp = 256): make data.batch_size a multiple of 256 (checked"),
    ([*TPU, "--accelerator", "v5p-512", "--workdir", "gs://b/r", "--no-check"], 0, ""),
    # v4 sizes count TensorCores, two to a chip (one device); a family the plan has no memory figure for
    ([*TPU, "--accelerator", "v4-8", "--workdir", "gs://b/r"], 0,
     "check: configs/tiny.py runs on a mesh of 4 devices, 0.27 GiB a device"),
    (["slurm", "--config", "configs/tiny.py", "--nodes", "2", "--gpus-per-node", "8", "--gpu", "h200"], 0,
     "check: configs/tiny.py fits 16 x H200, 0.13 GiB a device of 141 GB"),
    ([*TPU[:2], "configs/llama3_8b.py", *TPU[3:], "--accelerator", "v5p-512", "--workdir", "gs://b/r"], 0,
     "check: configs/llama3_8b.py fits 256 x TPU v5p, 60.74 GiB a device in phase pretrain_2x of 95 GiB"),
    ([*TPU[:2], "configs/llama3_8b.py", *TPU[3:], "--accelerator", "v6e-256", "--workdir", "gs://b/r"], 0,
     "warning: configs/llama3_8b.py plans 60.74 GiB a device in phase pretrain_2x, more than a TPU v6e's 32 GiB: it "
     "may run out of memory (python -m llama_jax.plan --config configs/llama3_8b.py --devices 256 --accelerator v6e"),
])
def test_a_job_that_cannot_run_is_refused_before_it_is_submitted(capsys, monkeypatch, argv, code, message):
    """The config, its overrides and its mesh are checked against the job's devices (and the plan's memory against
    the chips', a warning) before sbatch or gcloud runs: the trainer found these after the queue or the slice's
    provisioning. A refused job writes and runs nothing."""
    monkeypatch.chdir(REPO)
    assert main([*argv, "--dry-run"]) == code
    captured = capsys.readouterr()
    assert message in captured.err and "Traceback" not in captured.err, captured.err
    assert bool(captured.out) == (code == 0)


def test_local_dry_run_is_one_supervised_process_with_the_gpu_environment(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("NCCL_DEBUG", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    (line,) = _dry_run(capsys, "local", "--config", "configs/tiny.py", "--workdir", "/tmp/run", "--config.seed=3")
    python = sys.executable
    assert line == (f"XLA_FLAGS={shlex.quote(' '.join(slurm.XLA_FLAGS))} XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 "
                    f"NCCL_DEBUG=WARN {python} -m llama_jax.supervise -- {python} -m llama_jax.train "
                    f"--config {REPO}/configs/tiny.py --workdir /tmp/run --config.seed=3")


def test_the_xla_flags_we_set_exist_in_this_jaxlib():
    """An unknown flag in XLA_FLAGS aborts every process at start-up; the bogus one shows that this check can fail."""
    def starts(flags: str) -> int:
        env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
        return subprocess.run([sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"], env=env,
                              capture_output=True, timeout=120).returncode

    assert starts(" ".join(slurm.XLA_FLAGS)) == 0
    assert starts("--xla_gpu_enable_no_such_flag=true") != 0
