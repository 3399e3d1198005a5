"""Multi-host training for real: two processes on this machine, 4 CPU devices each, joined by jax.distributed (gloo
collectives) into one 8-device mesh, against one process with 8 devices; and the errors of a bad environment."""

import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from llama_jax import checkpoint, trainer
from llama_jax import workdir as workdir_lib
from llama_jax.errors import CheckpointError, ConfigError, DataError
from llama_jax.evaluate import BUILTIN_TASKS
from llama_jax.parallel import distributed
from llama_jax.parallel.distributed import check_port_free, distributed_arguments
from llama_jax.workdir import read_jsonl

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # per two-process invocation; a hang is killed, never waited on
GRACE_S = 60  # how long the other process may take to end once one has failed

# Float32 compute so that the two layouts can be compared closely: the mesh (data=2 x fsdp=4) is the same, only the
# collectives differ (gloo between the processes, in-process within one).
CONFIG = """
from llama_jax.config import default_config, model_section


def get_config():
    cfg = default_config()
    cfg.model = model_section("debug", vocab_size=1024, dtype="float32")
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = 8, 64, 1
    cfg.optim.warmup_steps, cfg.optim.decay_steps = 2, 10
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every = 8, 1, 0
    cfg.checkpoint.every_steps = 2
    return cfg
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """The config file and a small source of documents (a few stdlib modules: the tokenizer trains in a second)."""
    root = tmp_path_factory.mktemp("multihost")
    (root / "config.py").write_text(CONFIG)
    docs = root / "docs"
    docs.mkdir()
    for name in ("argparse.py", "csv.py", "glob.py", "textwrap.py", "shlex.py"):
        shutil.copy(Path(os.__file__).parent / name, docs / name)
    return {"config": root / "config.py", "source": f"{docs}/*.py"}


def load_config(job: dict, cache_dir: Path, steps: int):
    """The config the CLI runs, for a run in this process."""
    spec = importlib.util.spec_from_file_location("_multihost_config", job["config"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    cfg.data.source, cfg.data.cache_dir, cfg.train.steps = job["source"], str(cache_dir), steps
    return cfg


def start_two_processes(job: dict, workdir: Path, cache_dir: Path, *overrides: str) -> list[tuple[subprocess.Popen, Path]]:
    """Both processes of one run (process i logs to workdir/../process<i>.log), coordinator on a free local port."""
    port = coordinator_port()
    cmd = [sys.executable, "-m", "llama_jax.train", "--config", str(job["config"]), "--workdir", str(workdir),
           f"--config.data.source={job['source']}", f"--config.data.cache_dir={cache_dir}", *overrides]
    started = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   LLAMA_JAX_COORDINATOR=f"127.0.0.1:{port}", LLAMA_JAX_NUM_PROCESSES="2", LLAMA_JAX_PROCESS_ID=str(i),
                   PYTHONFAULTHANDLER="1")  # SIGABRT prints every thread's stack: `finish` uses it on a hang
        log = workdir.parent / f"{workdir.name}-process{i}.log"
        with log.open("w") as out:
            started.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO), log))
    return started


def coordinator_port() -> int:
    """A free port below Linux's ephemeral range (32768-60999), which portpicker draws from: so does every outgoing
    connection and every gloo listener on the machine (the other test worker starts such processes), and one of them
    can take a picked port in the seconds before process 0 listens on it. Process 1 then waits for a coordinator that
    never comes: the likeliest reading of a CI run in which a two-process run timed out after 300 s."""
    for _ in range(100):
        port = random.randrange(15000, 32768)
        try:
            check_port_free(f"127.0.0.1:{port}")
            return port
        except ConfigError:
            continue
    raise RuntimeError("no free port in 15000-32767 after 100 tries")


def finish(started: list[tuple[subprocess.Popen, Path]]) -> tuple[list[int], list[str]]:
    """Waits for both processes: (exit codes, outputs). If they take over TIMEOUT_S, or one outlives the other's
    failure by GRACE_S, the test fails with both logs, which end with every thread's stack (where each one waited)."""
    deadline, failed_at = time.monotonic() + TIMEOUT_S, None
    try:
        while any(proc.poll() is None for proc, _ in started):
            now = time.monotonic()
            if failed_at is None and any(proc.returncode not in (None, 0) for proc, _ in started):
                failed_at = now
            if now > deadline or (failed_at is not None and now > failed_at + GRACE_S):
                _abort(started, signal.SIGABRT)
                pytest.fail("a process hung:\n\n" + "\n\n".join(
                    f"process {i} (exit code {proc.returncode}):\n{log.read_text()[-6000:]}"
                    for i, (proc, log) in enumerate(started)))
            time.sleep(0.2)
    finally:
        _abort(started, signal.SIGKILL)
    return [proc.returncode for proc, _ in started], [log.read_text() for _, log in started]


def _abort(started: list[tuple[subprocess.Popen, Path]], signum: int) -> None:
    for proc, _ in started:
        if proc.poll() is None:
            proc.send_signal(signum)
    for proc, _ in started:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_two_processes(job: dict, workdir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    codes, outputs = finish(start_two_processes(job, workdir, cache_dir, *overrides))
    assert codes == [0, 0], "\n\n".join(f"process {i}:\n{out[-3000:]}" for i, out in enumerate(outputs))
    return outputs


def read_metrics(workdir: Path) -> list[dict]:
    return read_jsonl(workdir / "metrics.jsonl")


def checkpoint_steps(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


# Resumed with a pipeline stage per process: both processes' devices hold every row of the batch. Each read half of it,
# which JAX made into a batch of half the size: the step-5 loss was 9.2e-3 off the one-process run's, with no error.
STAGE_PER_PROCESS = {"mesh.data": 1, "mesh.stage": 2, "mesh.fsdp": 4, "pipeline.microbatches": 2}


@pytest.mark.long
def test_two_processes_train_resume_and_match_one_process(tmp_path, job):
    """Steps 1-4 and, resumed from checkpoint 4 with a pipeline stage per process, steps 5-8 on two processes; the same
    8 steps in one process. The second part is profiled: process 0 alone writes the trace, and the steps stay the
    same."""
    cache, workdir = tmp_path / "cache", tmp_path / "two"
    first = run_two_processes(job, workdir, cache, "--config.train.steps=4")
    assert "Preparing" in first[0] and "Preparing" not in first[1], "process 0 builds the corpus cache, 1 reuses it"
    second = run_two_processes(job, workdir, cache, "--config.train.steps=8", "--config.train.profile_skip=1",
                               "--config.train.profile_steps=2",
                               *(f"--config.{key}={value}" for key, value in STAGE_PER_PROCESS.items()))
    assert "Resumed from" in second[0] and f"checkpoints{os.sep}4" in second[0]
    assert "profile: tracing steps 6-7" in second[0] and "profile:" not in second[1]
    session, = (workdir / "profile" / "plugins" / "profile").iterdir()
    assert len(list(session.glob("*.xplane.pb"))) == 1
    assert not any("Resumed from" in out or "step 1 |" in out for out in first[1:] + second[1:]), "process 1 logs nothing"
    two = read_metrics(workdir)
    assert [m["step"] for m in two] == list(range(1, 9)), "process 0 alone writes metrics.jsonl, each step once"
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 2, "one events file per run, process 0's"
    assert checkpoint_steps(workdir) == [6, 8]

    trainer.train(load_config(job, cache, steps=4), tmp_path / "one")  # this process: 8 devices, the same meshes
    resumed = load_config(job, cache, steps=8)
    for key, value in STAGE_PER_PROCESS.items():
        section, name = key.split(".")
        resumed[section][name] = value
    trainer.train(resumed, tmp_path / "one")
    one = read_metrics(tmp_path / "one")
    # Only the order of float32 additions differs (gloo's all-reduce between the processes). Measured over 8 steps:
    # losses and grad norms within 1.5e-7 relative (2 ulps), parameters within 1.2e-7 absolute; the tolerances
    # leave about 8x room. Process 0's rows fed on both processes would move a step's loss by 4e-3 to 7e-3 relative.
    for key in ("loss", "grad_norm", "tokens", "lr"):
        np.testing.assert_allclose([m[key] for m in two], [m[key] for m in one], rtol=1e-6, err_msg=key)
    np.testing.assert_allclose(two[-1]["eval_loss"], one[-1]["eval_loss"], rtol=1e-6)
    model_two, _ = checkpoint.load_model(workdir)
    model_one, _ = checkpoint.load_model(tmp_path / "one")
    for a, b in zip(jax.tree.leaves(nnx.state(model_two)), jax.tree.leaves(nnx.state(model_one))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("signum, hosts", [(signal.SIGTERM, [1]), (signal.SIGINT, [0, 1])], ids=["sigterm", "ctrl-c"])
def test_sigterm_on_one_host_or_ctrl_c_checkpoints_every_host_at_the_same_step(tmp_path, job, signum, hosts):
    """JAX's preemption service spreads one host's SIGTERM: both save the same step together and exit 75. Ctrl-C in
    a terminal reaches every process of the job, and each turns it into that SIGTERM (before, each raised
    KeyboardInterrupt: tracebacks and nothing saved)."""
    workdir = tmp_path / "run"
    started = start_two_processes(job, workdir, tmp_path / "cache", "--config.train.steps=100000",
                                  "--config.checkpoint.every_steps=100000")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(read_metrics(workdir)) < 2:
            assert all(proc.poll() is None for proc, _ in started) and time.monotonic() < deadline, "did not start"
            time.sleep(0.2)
        for host in hosts:  # 1: the host that does not log
            started[host][0].send_signal(signum)
    finally:
        codes, outputs = finish(started)
    assert codes == [75, 75], "\n\n".join(out[-3000:] for out in outputs)
    saved = checkpoint_steps(workdir)
    assert len(saved) == 1 and f"preempted: checkpoint saved at step {saved[0]}" in outputs[0], saved
    assert read_metrics(workdir)[-1]["step"] == saved[0], "the last logged step is the saved one"


EXPLICIT = {"LLAMA_JAX_COORDINATOR": "10.0.0.1:8476", "LLAMA_JAX_NUM_PROCESSES": "4", "LLAMA_JAX_PROCESS_ID": "3"}
SRUN = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4", "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("free_bytes, refusal", [
    (2**20, "error: the training state, before any activation, needs"),
    (4 * 2**20, "error: the compiled training step needs, for its activations and other temporaries,"),
], ids=["state", "compiled-step"])
def test_a_memory_check_failing_on_one_host_stops_every_host_in_one_line(tmp_path, job, free_bytes, refusal):
    """The checks read each host's own free memory. Here process 1's host has too little (its config file says so):
    1 MiB (a quarter per device) fails the state check, 4 MiB passes it (0.63 MiB per device) but not the compiled
    step's (1.53 MiB per device). Process 1 says why; process 0 names process 1. Without the agreement process 0
    went on alone and died 30 s later in its next collective, with gloo's DEADLINE_EXCEEDED and a traceback."""
    config = tmp_path / "low_memory_host.py"
    config.write_text(f"""import os
from llama_jax import memory

if os.environ["LLAMA_JAX_PROCESS_ID"] == "1":
    memory._host_available_bytes = lambda: {free_bytes}
""" + CONFIG)
    codes, outputs = finish(start_two_processes({**job, "config": config}, tmp_path / "run", tmp_path / "cache"))
    assert codes == [2, 2], outputs
    assert "Traceback" not in outputs[0] + outputs[1], outputs
    errors = [[line for line in output.splitlines() if line.startswith("error:")] for output in outputs]
    assert len(errors[1]) == 1 and errors[1][0].startswith(refusal), outputs[1][-2000:]
    assert errors[0] == [errors[1][0].replace("error: ", "error: the memory check failed on process 1 of 2: ", 1)]


@pytest.mark.parametrize("what", ["eval set", "task file"])
def test_data_missing_on_one_host_stops_every_host_in_one_line(tmp_path, job, what):
    """An evaluation set, or a task file, on a disk of each host's own, missing on process 1's. Process 1 says what is
    missing; process 0 names process 1. Before, process 1 stopped alone and waited in JAX's shutdown for process 0,
    which waited in its next collective: both hung (the test gave up after a minute)."""
    (tmp_path / "host0").mkdir()
    on_this_host = f'"{tmp_path}/host" + os.environ["LLAMA_JAX_PROCESS_ID"]'
    if what == "eval set":
        shutil.copy(Path(os.__file__).parent / "glob.py", tmp_path / "host0" / "glob.py")
        setting = f'cfg.data.eval_sources = dict(extra=eval_source({on_this_host} + "/*.py"))'
        done = "preparing the data"
        refusal = (f"error: No files match '{tmp_path}/host1/*.py'. Fix: check the path and the glob (** matches "
                   "subdirectories; a directory is searched for .txt .md .py .rst .jsonl .jsonl.gz .json.gz .jsonl.zst "
                   ".json.zst .parquet files), or use a built-in source: stdlib, stdlib_docstrings, pydoc_topics, or, with "
                   "data.tokenizer set, the built-in chat data: stdlib_chat, stdlib_preferences.")
    else:
        shutil.copy(BUILTIN_TASKS["stdlib_mc"], tmp_path / "host0" / "mc.jsonl")
        setting = f'cfg.train.eval_tasks = {on_this_host} + "/mc.jsonl"'
        done = "loading the evaluation tasks"
        refusal = (f"error: task file {tmp_path}/host1/mc.jsonl does not exist: pass a .jsonl(.gz|.zst) or .parquet "
                   "file or one of ['stdlib_mc']")
    config = tmp_path / "on_each_host.py"
    config.write_text(CONFIG.replace("    return cfg", f"    {setting}\n    return cfg").replace(
        "from llama_jax.config import", "import os\nfrom llama_jax.config import eval_source,"))
    codes, outputs = finish(start_two_processes({**job, "config": config}, tmp_path / "run", tmp_path / "cache"))
    assert codes == [2, 2], outputs
    assert "Traceback" not in outputs[0] + outputs[1], outputs
    errors = [[line for line in output.splitlines() if line.startswith("error:")] for output in outputs]
    assert errors == [[refusal.replace("error: ", f"error: {done} failed on process 1 of 2: ", 1)], [refusal]]


def test_a_checkpoint_to_start_from_missing_on_one_host_stops_every_host_in_one_line(tmp_path, job):
    """`checkpoint.init_from` on a disk of each host's own, a llama_jax run on process 0's and nothing on process 1's.
    Before, process 1 stopped alone and process 0 waited in its next collective."""
    cache = tmp_path / "cache"
    trainer.train(load_config(job, cache, steps=1), tmp_path / "host0" / "base")
    config = tmp_path / "on_each_host.py"
    setting = (f'cfg.checkpoint.init_from = "{tmp_path}/host" + os.environ["LLAMA_JAX_PROCESS_ID"] + "/base"\n'
               f'    cfg.data.tokenizer = "{tmp_path}/host0/base/tokenizer.model"')
    config.write_text("import os\n" + CONFIG.replace("    return cfg", f"    {setting}\n    return cfg"))
    codes, outputs = finish(start_two_processes({**job, "config": config}, tmp_path / "run", cache))
    assert codes == [2, 2], outputs
    assert "Traceback" not in outputs[0] + outputs[1], outputs
    errors = [[line for line in output.splitlines() if line.startswith("error:")] for output in outputs]
    assert errors[1] == [f"error: checkpoint path {tmp_path}/host1/base does not exist"], outputs[1][-2000:]
    assert errors[0] == [errors[1][0].replace("error: ", "error: reading checkpoint.init_from failed on process 1 of 2: ",
                                              1)]


def test_a_tokenizer_other_than_the_run_s_on_one_host_stops_every_host_in_one_line(tmp_path, job):
    """`data.tokenizer` on a disk of each host's own: the run's tokenizer on process 0's, another (two tokens' ids
    swapped) on process 1's. Before, process 1 stopped alone and process 0 waited in its next collective; the same
    happened when process 1 read the workdir's copy while process 0 rewrote it (seen on Python 3.12)."""
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    trainer.train(load_config(job, cache, steps=1), workdir)
    lines = (workdir / "tokenizer.model").read_text().splitlines(keepends=True)
    (last_token, last_id), (token, id_) = (line.split() for line in lines[-2:])
    for host, ids in [("host0", (last_id, id_)), ("host1", (id_, last_id))]:
        (tmp_path / host).mkdir()
        swapped = f"{last_token} {ids[0]}\n{token} {ids[1]}\n"
        (tmp_path / host / "tokenizer.model").write_text("".join(lines[:-2]) + swapped)
    config = tmp_path / "on_each_host.py"
    setting = f'cfg.data.tokenizer = "{tmp_path}/host" + os.environ["LLAMA_JAX_PROCESS_ID"] + "/tokenizer.model"'
    config.write_text("import os\n" + CONFIG.replace("    return cfg", f"    {setting}\n    return cfg"))
    codes, outputs = finish(start_two_processes({**job, "config": config}, workdir, cache))
    assert codes == [2, 2], outputs
    assert "Traceback" not in outputs[0] + outputs[1], outputs
    errors = [[line for line in output.splitlines() if line.startswith("error:")] for output in outputs]
    assert errors[1] == [f"error: {workdir} was trained with the tokenizer {workdir / 'tokenizer.model'}, but the data "
                         f"now comes with another ({tmp_path / 'host1' / 'tokenizer.model'}): its token ids would mean "
                         f"other text. To train this run on new data, keep its tokenizer with "
                         f"--config.data.tokenizer={workdir / 'tokenizer.model'}; or start a fresh --workdir"], outputs[1]
    assert errors[0] == [errors[1][0].replace("error: ", "error: checking the run's tokenizer failed on process 1 of 2: ",
                                              1)]


def test_a_workdir_in_use_stops_every_host_in_one_line(tmp_path, job):
    """Process 0 alone takes the workdir's lock, held here by this test. Before, process 0 stopped and process 1 went
    on to wait in its first collective."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = workdir_lib.lock(workdir)
    try:
        codes, outputs = finish(start_two_processes(job, workdir, tmp_path / "cache"))
    finally:
        holder.release()
    assert codes == [2, 2], outputs
    errors = [[line for line in output.splitlines() if line.startswith("error:")] for output in outputs]
    in_use = f"error: {workdir} is in use by a running job (pid {os.getpid()} on {socket.gethostname()}): "
    assert len(errors[0]) == 1 and errors[0][0].startswith(in_use), outputs[0][-2000:]
    assert errors[1] == [errors[0][0].replace("error: ", "error: opening the workdir failed on process 0 of 2: ", 1)]
    assert not (workdir / "checkpoints").exists()


def test_the_others_repeat_the_failed_process_s_message_up_to_a_kilobyte(monkeypatch):
    """What process 1 sends when its check fails, then what process 0 (whose check passed) makes of it, with the
    gather between them played by hand. A message past 1024 bytes is cut, never inside a character."""
    sent = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed.multihost_utils, "process_allgather", lambda mine: sent.append(mine) or
                        np.stack([mine, mine]))
    message = "the file x.jsonl is missing: " + "é" * 600  # 1229 bytes

    def fail():
        raise DataError(message)

    with pytest.raises(DataError, match="^the file x.jsonl is missing: é+$"):
        distributed.on_every_process(fail, "loading")
    assert distributed.on_every_process(lambda: 7, "loading") == 7, "both gathered rows say it passed"
    monkeypatch.setattr(distributed.multihost_utils, "process_allgather", lambda mine: np.stack([mine, sent[0]]))
    with pytest.raises(CheckpointError) as raised:
        distributed.on_every_process(lambda: 7, "reading checkpoint 4", elsewhere=CheckpointError)
    kept = message.encode()[:1020].decode(errors="ignore")
    assert str(raised.value) == f"reading checkpoint 4 failed on process 1 of 2: {kept} ...", str(raised.value)[-80:]


@pytest.mark.long
def test_a_checkpoint_damaged_where_only_one_host_reads_it_sends_every_host_back_to_the_one_before(tmp_path, job):
    """With the parameters sharded over both processes (fsdp=8), each process reads only the files it wrote. Process
    1's files of checkpoint 4 are cut in half: its read fails, process 0's succeeds. Both set step 4 aside and resume
    from step 2, and process 0 says why. Before, process 0 waited in Orbax's barrier after its read, process 1 in
    setting the step aside, and both ended in JAX's `sync_global_devices name mismatch` with a traceback."""
    workdir, cache, mesh = tmp_path / "run", tmp_path / "cache", ("--config.mesh.data=1", "--config.mesh.fsdp=8")
    run_two_processes(job, workdir, cache, "--config.train.steps=4", *mesh)
    cut = list((workdir / "checkpoints" / "4" / "params").glob("ocdbt.process_1/d/*"))
    assert cut, "process 1 wrote its shards' files"
    for data_file in cut:
        data_file.write_bytes(data_file.read_bytes()[:data_file.stat().st_size // 2])
    outputs = run_two_processes(job, workdir, cache, "--config.train.steps=6", *mesh)
    warning, = [line for line in outputs[0].splitlines() if line.startswith("warning: reading")]
    step_4 = workdir / "checkpoints" / "4"
    assert warning.startswith(f"warning: reading checkpoint {step_4} failed on process 1 of 2: checkpoint {step_4} "
                              "could not be restored (OUT_OF_RANGE: Error reading "), warning
    aside, = (workdir / "checkpoints").glob("damaged-4-*")
    assert warning.endswith(f"Moved it to {aside} and fell back to checkpoint 2."), warning
    assert f"Resumed from {workdir / 'checkpoints' / '2'}" in outputs[0]
    assert [m["step"] for m in read_metrics(workdir)] == list(range(1, 7)), "steps 3-4 logged once, as retrained"
    assert checkpoint_steps(workdir) == [4, 6]


def test_the_environment_decides_how_processes_join():
    assert distributed_arguments({}) is None
    assert distributed_arguments(EXPLICIT) == dict(coordinator_address="10.0.0.1:8476", num_processes=4, process_id=3,
                                                   initialization_timeout=300)
    assert distributed_arguments({**EXPLICIT, "LLAMA_JAX_INIT_TIMEOUT_S": "900"})["initialization_timeout"] == 900
    jax_own = {**EXPLICIT, "JAX_COORDINATOR_ADDRESS": EXPLICIT["LLAMA_JAX_COORDINATOR"]}
    del jax_own["LLAMA_JAX_COORDINATOR"]
    assert distributed_arguments(jax_own)["coordinator_address"] == "10.0.0.1:8476"
    assert distributed_arguments({"LLAMA_JAX_NUM_PROCESSES": "1", "LLAMA_JAX_PROCESS_ID": "0"}) is None
    assert distributed_arguments(SRUN) == dict(cluster_detection_method="slurm", initialization_timeout=300)
    batch_script = {k: v for k, v in SRUN.items() if k != "SLURM_STEP_NODELIST"}  # sbatch running python directly
    assert distributed_arguments(batch_script) is None
    assert distributed_arguments({**SRUN, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    gke_tpu_pod = {"TPU_WORKER_HOSTNAMES": "t-0,t-1", "TPU_WORKER_ID": "1", "LLAMA_JAX_INIT_TIMEOUT_S": "600"}
    assert distributed_arguments(gke_tpu_pod) == dict(initialization_timeout=600)


@pytest.mark.parametrize("environ, message", [
    ({**EXPLICIT, "LLAMA_JAX_PROCESS_ID": "4"}, r"LLAMA_JAX_PROCESS_ID=4 with LLAMA_JAX_NUM_PROCESSES=4: the ids must be 0"),
    ({**EXPLICIT, "LLAMA_JAX_NUM_PROCESSES": "four"}, r"LLAMA_JAX_NUM_PROCESSES='four' is not an integer"),
    ({**EXPLICIT, "LLAMA_JAX_NUM_PROCESSES": "0"}, r"LLAMA_JAX_NUM_PROCESSES=0: set it to the number of processes"),
    ({"LLAMA_JAX_NUM_PROCESSES": "2", "LLAMA_JAX_PROCESS_ID": "0"}, r"LLAMA_JAX_COORDINATOR is not set: set it on every"),
    ({**EXPLICIT, "LLAMA_JAX_COORDINATOR": "10.0.0.1"}, r"'10.0.0.1' is not host:port"),
    ({**EXPLICIT, "LLAMA_JAX_COORDINATOR": "10.0.0.1:99999"}, r"'10.0.0.1:99999' is not host:port.*\(1 to 65535\)"),
    ({"LLAMA_JAX_COORDINATOR": "10.0.0.1:8476"}, r"not both LLAMA_JAX_NUM_PROCESSES and LLAMA_JAX_PROCESS_ID"),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:8476"}, r"JAX_COORDINATOR_ADDRESS set, but not both"),
    ({**SRUN, "SLURM_PROCID": "4"}, r"SLURM_PROCID=4 is not below SLURM_NTASKS=4: start the run with srun"),
    ({**EXPLICIT, "LLAMA_JAX_INIT_TIMEOUT_S": "5m"}, r"LLAMA_JAX_INIT_TIMEOUT_S='5m' is not an integer: set it to how"),
    ({**SRUN, "LLAMA_JAX_INIT_TIMEOUT_S": "0"}, r"LLAMA_JAX_INIT_TIMEOUT_S=0: set it to how many seconds .* least 1"),
])
def test_bad_variables_name_the_variable_and_the_fix(environ, message):
    with pytest.raises(ConfigError, match=message):
        distributed_arguments(environ)


def test_an_ipv6_coordinator_is_reached_without_its_brackets(monkeypatch):
    """`[fd00::1]:8476` was dialled with its brackets, which no resolver reads: the other processes waited out the
    timeout, then stopped."""
    dialled = []
    monkeypatch.setattr(socket, "create_connection",
                        lambda address, timeout: dialled.append(address) or socket.socket())
    distributed.wait_for_coordinator("[fd00::1]:8476", timeout_s=5)
    assert dialled == [("fd00::1", 8476)]


def run_one_process(job: dict, workdir: Path, **variables: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, LLAMA_JAX_NUM_PROCESSES="2", **variables)
    return subprocess.run([sys.executable, "-m", "llama_jax.train", "--config", str(job["config"]),
                           "--workdir", str(workdir)], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)


def test_the_cli_reports_bad_variables_in_one_line(tmp_path, job):
    result = run_one_process(job, tmp_path / "run", LLAMA_JAX_COORDINATOR="127.0.0.1:1", LLAMA_JAX_PROCESS_ID="2")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: LLAMA_JAX_PROCESS_ID=2 with LLAMA_JAX_NUM_PROCESSES=2: the ids must be 0 to LLAMA_JAX_NUM_PROCESSES - 1, "
        "one per process"
    ]
    assert not (tmp_path / "run").exists()


def test_a_coordinator_port_in_use_a_coordinator_that_never_answers_or_a_process_that_never_joins_is_one_line(
        tmp_path, job):
    """In JAX the first is a traceback from process 0 ("Failed to start RPC server"), the second and third a C++ check
    failure after the whole timeout (300 s by default), on the other processes and on process 0."""
    dual_stack = socket.has_dualstack_ipv6()
    with socket.create_server(("", 0), family=socket.AF_INET6 if dual_stack else socket.AF_INET,
                              dualstack_ipv6=dual_stack) as taken:
        port = taken.getsockname()[1]
        result = run_one_process(job, tmp_path / "run", LLAMA_JAX_COORDINATOR=f"127.0.0.1:{port}",
                                 LLAMA_JAX_PROCESS_ID="0")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: process 0 cannot listen on port {port} of LLAMA_JAX_COORDINATOR=127.0.0.1:{port} (Address already in "
        "use): choose a free port and set it on every host"
    ]

    port = coordinator_port()  # free, and nothing listens on it
    started = time.monotonic()
    result = run_one_process(job, tmp_path / "run", LLAMA_JAX_COORDINATOR=f"127.0.0.1:{port}",
                             LLAMA_JAX_PROCESS_ID="1", LLAMA_JAX_INIT_TIMEOUT_S="2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: nothing answered at LLAMA_JAX_COORDINATOR=127.0.0.1:{port} in 2 s ([Errno 111] Connection refused): "
        "start process 0 of the run, which listens there, and check that this host can reach that address (or wait "
        "longer: LLAMA_JAX_INIT_TIMEOUT_S)"
    ]
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()

    started = time.monotonic()  # process 0 alone, as when process 1's command failed before it joined
    result = run_one_process(job, tmp_path / "run", LLAMA_JAX_COORDINATOR=f"127.0.0.1:{coordinator_port()}",
                             LLAMA_JAX_PROCESS_ID="0", LLAMA_JAX_INIT_TIMEOUT_S="2")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: not all 2 processes of the run joined within 2 s: start the same command on every host; a host whose "
        "command failed says why in its own output (or wait longer: LLAMA_JAX_INIT_TIMEOUT_S)"
    ]
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run").exists()
