"""End to end: the README's default job, resuming, and bad checkpoints."""

import gzip
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cli_run import CLI_ENV, KILL_RUN, REPO, cache_dir, cli_command, read_metrics, run_cli  # noqa: F401 (a fixture)
from cli_run import without_timing as _without_timing
from config_files import load_config_file

from llama_jax import checkpoint, generate, trainer
from llama_jax import workdir as workdir_lib
from llama_jax.config import default_config, model_config, model_section, plain
from llama_jax.model import param_count
from llama_jax.phases import phase
from llama_jax.preemption import PreemptionFlag
from llama_jax.errors import CheckpointError, ConfigError

QUICK = ("--config.data.batch_size=8", "--config.data.seq_len=128", "--config.optim.warmup_steps=4",
         "--config.train.log_every=4", "--config.train.eval_every=8", "--config.checkpoint.every_steps=8",
         "--config.data.eval_batches=2")


@pytest.mark.long
def test_default_job_learns_logs_and_resumes(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    first = run_cli(workdir, cache_dir, "--config.train.steps=16", *QUICK)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = read_metrics(workdir)
    assert [m["step"] for m in lines] == [4, 8, 12, 16]
    for m in lines:
        assert {"step", "loss", "lr", "tokens", "grad_norm", "tokens_per_s", "mfu", "peak_memory_gib"} <= m.keys()
    peaks = [m["peak_memory_gib"] for m in lines]
    assert 0.2 < peaks[0] and peaks == sorted(peaks) and peaks[-1] < 24, peaks  # one process's high-water mark
    assert lines[-1]["tokens"] == 16 * 8 * 128
    assert lines[-1]["loss"] < lines[0]["loss"] - 0.5, [m["loss"] for m in lines]
    evals = [m["eval_loss"] for m in lines if "eval_loss" in m]
    assert len(evals) == 2 and evals[-1] < math.log(8192) - 1.0, evals  # well below a uniform guess
    assert (workdir / "checkpoints" / "16").is_dir()
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert (workdir / "tokenizer.model").is_file()
    cfg = load_config_file("tiny.py")
    assert (f"Training: steps 0 to 16, batch 8 x 128 tokens, {param_count(model_config(cfg)):,} parameters on 1 cpu "
            "device(s), mesh {'data': 1, 'stage': 1, 'fsdp': 1, 'context': 1, 'tensor': 1}") in first.stdout

    second = run_cli(workdir, cache_dir, "--config.train.steps=24", *QUICK)
    assert second.returncode == 0, second.stderr[-3000:]
    # one phase: none named; the settings changed since the checkpoint
    assert (f"Resumed from {workdir / 'checkpoints' / '16'}, with settings changed since it was saved: train.steps: 16 "
            "-> 24\n") in second.stdout
    assert "Training: steps 16 to 24, batch 8 x 128 tokens" in second.stdout
    resumed = read_metrics(workdir)
    assert resumed[:4] == lines, "the first run's lines must be kept as they were"
    assert [m["step"] for m in resumed[4:]] == [20, 24]


def small_config(cache_dir: Path, steps: int):
    cfg = default_config()
    cfg.model = model_section("debug", vocab_size=8192)
    cfg.data.cache_dir = str(cache_dir)
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = 8, 64, 1
    cfg.optim.warmup_steps, cfg.optim.decay_steps = 2, 10  # the schedule must not depend on train.steps
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every = steps, 1, 0
    cfg.checkpoint.every_steps = 3
    return cfg


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> Callable[[int], Path]:
    """The uninterrupted `small_config` run of N steps that several tests compare their resumed runs with, trained
    once per module (the tests only read it)."""
    runs = {}

    def run(steps: int) -> Path:
        if steps not in runs:
            runs[steps] = tmp_path_factory.mktemp(f"straight{steps}") / "run"
            trainer.train(small_config(cache_dir, steps), runs[steps])
        return runs[steps]

    return run


def test_resumed_run_is_bitwise_identical_to_uninterrupted(tmp_path, cache_dir, uninterrupted, capsys):
    straight = uninterrupted(6)
    interrupted = tmp_path / "interrupted"
    trainer.train(small_config(cache_dir, 3), interrupted)
    kept = interrupted / "tokenizer.model"
    os.utime(kept, ns=(10**18, 10**18))
    trainer.train(small_config(cache_dir, 6), interrupted)
    # not rewritten: a copy cut short by a kill there made every later resume refuse the run's own tokenizer
    assert kept.stat().st_mtime_ns == 10**18
    assert [m["loss"] for m in read_metrics(straight)] == [m["loss"] for m in read_metrics(interrupted)]
    model_a, _ = checkpoint.load_model(straight)
    model_b, tokenizer = checkpoint.load_model(interrupted)
    assert Path(tokenizer).is_file()
    a, b = (np.asarray(model.layers.attn.wq[...]) for model in (model_a, model_b))
    assert np.array_equal(a, b)
    assert np.array_equal(np.asarray(model_a.embed[...]), np.asarray(model_b.embed[...]))

    before = read_metrics(interrupted)
    trainer.train(small_config(cache_dir, 6), interrupted)  # already finished
    assert "nothing to do" in capsys.readouterr().out
    assert read_metrics(interrupted) == before

    assert generate.main(["--checkpoint", str(interrupted), "--prompt", "def main(", "--max_new_tokens", "8"]) == 0
    assert capsys.readouterr().out.strip(), "generation from our own checkpoint printed nothing"


class _Killed(Exception):
    pass


def test_a_resume_judges_spikes_and_logs_windows_as_the_uninterrupted_run(tmp_path, cache_dir, monkeypatch):
    """The loss guard's recent losses and the steps not yet logged restarted empty in a resumed process: with spike
    detection it applied updates the uninterrupted run skipped, and with log_every > 1 its next line was the mean of
    fewer steps. The run is killed right after its step-10 save, between two log lines; the uninterrupted run skips
    step 13, judged against the losses of steps 10-12."""
    def config():
        cfg = small_config(cache_dir, 16)
        cfg.train.log_every, cfg.checkpoint.every_steps = 4, 5
        cfg.stability.policy, cfg.stability.spike_factor, cfg.stability.window = "skip", 1.001, 3
        return cfg

    trainer.train(config(), tmp_path / "straight")
    save = trainer._Loop._save

    def save_then_die(self, done, *args):
        seconds = save(self, done, *args)
        if done == 10:
            self.checkpointer.wait()
            raise _Killed
        return seconds

    monkeypatch.setattr(trainer._Loop, "_save", save_then_die)
    with pytest.raises(_Killed):
        trainer.train(config(), tmp_path / "resumed")
    monkeypatch.undo()
    trainer.train(config(), tmp_path / "resumed")
    straight, resumed = (_without_timing(read_metrics(tmp_path / run)) for run in ("straight", "resumed"))
    assert [m["step"] for m in resumed] == [4, 8, 12, 16]
    assert straight[-1].get("bad_steps") == 1, "the uninterrupted run skipped a step after the kill's"
    for line in (*straight, *resumed):
        line.pop("bad_steps", None)  # counted by each process
    assert resumed == straight
    model_a, _ = checkpoint.load_model(tmp_path / "straight")
    model_b, _ = checkpoint.load_model(tmp_path / "resumed")
    for a, b in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_resuming_under_another_tokenizer_is_refused_naming_the_run_s_own(tmp_path, cache_dir):
    """Before, resuming with a new data.source trained a tokenizer for it and went on: the model read other text under
    the same token ids, and the workdir's tokenizer, which its earlier checkpoints are used with, was replaced."""
    workdir = tmp_path / "run"
    trainer.train(small_config(cache_dir, 3), workdir)
    kept = (workdir / "tokenizer.model").read_bytes()
    cfg = small_config(cache_dir, 6)
    cfg.data.source = "pydoc_topics"
    with pytest.raises(ConfigError) as refused:
        trainer.train(cfg, workdir)
    assert str(refused.value).startswith(f"{workdir} was trained with the tokenizer {workdir / 'tokenizer.model'}, but "
                                         "the data now comes with another (")
    assert str(refused.value).endswith(f"--config.data.tokenizer={workdir / 'tokenizer.model'}; or start a fresh "
                                       "--workdir")
    assert (workdir / "tokenizer.model").read_bytes() == kept
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2, 3]
    cfg.data.tokenizer = os.path.relpath(workdir / "tokenizer.model")  # new data under the run's tokenizer: it goes on
    trainer.train(cfg, workdir)
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
    assert (workdir / "tokenizer.model").read_bytes() == kept


def test_resuming_with_another_training_state_is_refused_and_every_checkpoint_stays(tmp_path, cache_dir):
    """LoRA switched on over full-parameter checkpoints (or another objective's state): Orbax's read failed in its
    own words, the newest checkpoint was moved aside as damaged and the one before it failed the same way."""
    workdir = tmp_path / "run"
    trainer.train(small_config(cache_dir, 6), workdir)
    cfg = small_config(cache_dir, 9)
    cfg.lora.rank, cfg.checkpoint.init_from, cfg.data.tokenizer = 4, str(workdir), str(workdir / "tokenizer.model")
    with pytest.raises(CheckpointError, match=r"checkpoints/6 holds another training state than this config trains "
                                              r"\(LoRA adapters: 'none' -> 'rank 4 on wq,wk,wv,wo,w_gate,w_up,w_down'\)"):
        trainer.train(cfg, workdir)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]


def test_a_run_resumes_with_clipping_turned_off_or_on(tmp_path, cache_dir, capsys):
    """Clipping was a link of the optimizer's chain only when on, so the optimizer state had another structure: each
    checkpoint failed to restore and was moved aside as damaged, and the run stopped or started over."""
    workdir = tmp_path / "run"
    trainer.train(small_config(cache_dir, 3), workdir)
    for steps, clip in ((6, 0.0), (9, 1.0)):
        cfg = small_config(cache_dir, steps)
        cfg.optim.grad_clip = clip
        trainer.train(cfg, workdir)
        assert f"Resumed from {workdir / 'checkpoints' / str(steps - 3)}" in capsys.readouterr().out
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6", "9"]


def test_float16_compute_on_a_cpu_is_refused_before_the_step_compiles(tmp_path, cache_dir):
    """XLA's CPU backend has no float16 product with a float32 result: compiling the step failed with XLA's
    ValueError, "The precision 'F16_F16_F32' is not supported by dot_general on CPU"."""
    cfg = small_config(cache_dir, 2)
    cfg.model.dtype = "float16"
    with pytest.raises(ConfigError, match=r"model.dtype='float16' does not run on CPUs \(.*\): use model.dtype='bf"):
        trainer.setup(cfg, tmp_path / "run")


def test_batches_the_mesh_cannot_split_are_refused_before_the_data_is_prepared(tmp_path):
    """The check ran when the first phase's step was set up: after the corpus was built and its tokenizer trained
    (minutes for a large source), and after the workdir's logs and progress bar had started."""
    cfg = small_config(tmp_path / "cache", 2)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.data.batch_size = 1, 8, 4
    with pytest.raises(ConfigError, match=r"a batch of 4 sequences cannot be split over the 8 data-parallel shards "
                                          r"\(mesh.data x mesh.fsdp\): make data.batch_size \(and every data.ramp "
                                          r"batch size\) a multiple of 8$"):
        trainer.train(cfg, tmp_path / "run")
    assert not (tmp_path / "cache").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def traced_ops(session: Path) -> dict[int, set[str]]:
    """The XLA operations (fusions, products, collectives) a Perfetto trace saw start inside each step's annotation:
    every operation of the step program runs in every step."""
    with gzip.open(session / "perfetto_trace.json.gz") as f:
        events = json.load(f)["traceEvents"]
    steps = [e for e in events if e.get("name") == "train"]
    xla_threads = {(e["pid"], e["tid"]) for e in events
                   if e.get("name") == "thread_name" and e["args"]["name"].startswith("tf_XLA")}
    ops = [e for e in events if e.get("ph") == "X" and (e["pid"], e.get("tid")) in xla_threads
           and re.fullmatch(r"[\w.-]+", e["name"])]
    return {int(step["args"]["step_num"]): {e["name"] for e in ops
                                            if step["ts"] <= e["ts"] and e["ts"] + e["dur"] <= step["ts"] + step["dur"]}
            for step in sorted(steps, key=lambda e: e["ts"])}


def test_a_profiled_run_traces_the_steps_asked_for_each_with_its_work(tmp_path, cache_dir, capsys):
    cfg = small_config(cache_dir, 4)
    cfg.train.profile_skip, cfg.train.profile_steps = 1, 2
    trainer.train(cfg, tmp_path / "run")
    session, = (tmp_path / "run" / "profile" / "plugins" / "profile").iterdir()
    assert list(session.glob("*.xplane.pb")), "TensorBoard's profile plugin reads the xplane file"
    ops = traced_ops(session)
    assert list(ops) == [2, 3]
    assert ops[3] == ops[2] and len(ops[2]) > 50, "each step's XLA work is all inside its annotation"
    out = capsys.readouterr().out
    assert f"profile: tracing steps 2-3 into {tmp_path / 'run' / 'profile'}" in out and "profile: written to" in out

    cfg.train.steps = 5  # one more step, after a skip of 1: it ends before the window
    cfg.train.profile_skip = 1
    trainer.train(cfg, tmp_path / "run")
    assert "profile: nothing traced: this process ran 1 step(s) here, and the trace starts after train.profile_skip=1" \
        in capsys.readouterr().out
    assert len(list((tmp_path / "run" / "profile" / "plugins" / "profile").iterdir())) == 1


def test_each_phase_is_traced_after_its_own_compilation(tmp_path, cache_dir):
    cfg = small_config(cache_dir, 3)
    cfg.phases = (phase("second", steps=3, data=dict(seq_len=32)),)  # a new shape: the step compiles again
    cfg.train.profile_skip, cfg.train.profile_steps = 1, 1
    trainer.train(cfg, tmp_path / "run")
    for name, step in (("pretrain", 2), ("second", 5)):
        session, = (tmp_path / "run" / "profile" / name / "plugins" / "profile").iterdir()
        assert list(traced_ops(session)) == [step], name


def test_a_trace_that_cannot_be_written_is_a_warning_and_the_run_goes_on(tmp_path, cache_dir, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "profile").write_text("a file where the trace should go")
    cfg = small_config(cache_dir, 3)
    cfg.train.profile_skip, cfg.train.profile_steps = 1, 1
    trainer.train(cfg, tmp_path / "run")
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoints" / "3").is_dir()
    err = capsys.readouterr().err
    assert f"warning: profile: the trace could not be written to {tmp_path / 'run' / 'profile'}" in err, err
    trainer.train(cfg, tmp_path / "next")  # JAX's profiler is left able to trace again in this process
    assert list((tmp_path / "next" / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))


def test_resuming_on_another_data_parallel_layout_continues_with_the_same_batches(tmp_path, cache_dir,
                                                                                  uninterrupted):
    """Steps 1-3 on 8 data-parallel devices, 4-6 on 2 x 4 FSDP: the losses follow the uninterrupted run's."""
    straight = uninterrupted(6)
    moved = tmp_path / "moved"
    trainer.train(small_config(cache_dir, 3), moved)
    resharded = small_config(cache_dir, 6)
    resharded.mesh.data, resharded.mesh.fsdp = 2, 4
    trainer.train(resharded, moved)
    expected, got = ([m["loss"] for m in read_metrics(run)] for run in (straight, moved))
    assert got[:3] == expected[:3]
    np.testing.assert_allclose(got[3:], expected[3:], rtol=2e-5)  # only the reduction order differs


def test_a_run_restarted_on_fewer_devices_and_another_mesh_continues_the_same_training(tmp_path, cache_dir):
    """Steps 1-3 on 8 devices as 8-way FSDP, then a restart on 4 devices as 2 FSDP x 2 tensor: each array is restored
    from the abstract targets of the new mesh, and the losses follow a one-device run's (float32 compute)."""
    quick = ("--config.train.log_every=1", "--config.train.eval_every=0", "--config.data.batch_size=8",
             "--config.data.seq_len=64", "--config.data.eval_batches=1", "--config.optim.warmup_steps=2",
             "--config.optim.decay_steps=10", "--config.checkpoint.every_steps=3", "--config.model.dtype=float32")
    straight = run_cli(tmp_path / "straight", cache_dir, "--config.train.steps=6", *quick)
    assert straight.returncode == 0, straight.stderr[-3000:]
    for devices, steps, mesh in ((8, 3, ("--config.mesh.data=1", "--config.mesh.fsdp=8")),
                                 (4, 6, ("--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"))):
        moved = subprocess.run(cli_command(tmp_path / "moved", cache_dir, f"--config.train.steps={steps}", *quick, *mesh),
                               capture_output=True, text=True, timeout=900, cwd=REPO,
                               env=dict(CLI_ENV, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"))
        assert moved.returncode == 0, moved.stderr[-3000:]
    assert "Resumed from" in moved.stdout
    expected, got = ([m["loss"] for m in read_metrics(run)] for run in (tmp_path / "straight", tmp_path / "moved"))
    assert len(got) == 6
    np.testing.assert_allclose(got, expected, rtol=2e-5)  # only the order of sums differs


@pytest.mark.parametrize("damage", ["every file halved", "the data file cut"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, cache_dir, uninterrupted, capsys,
                                                                   damage):
    """A cut data file (its index intact) fails inside Orbax's reads, which wrap the error in a bare Exception: it
    ended the run with a traceback, where the newest step should have been set aside."""
    straight = uninterrupted(9)
    damaged = tmp_path / "damaged"
    trainer.train(small_config(cache_dir, 6), damaged)  # checkpoints 3 and 6
    files = sorted((f for f in (damaged / "checkpoints" / "6" / "params").rglob("*") if f.is_file()),
                   key=lambda f: f.stat().st_size)
    for f in files if damage == "every file halved" else files[-1:]:
        f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])  # truncated, as a crash mid-copy leaves it
    trainer.train(small_config(cache_dir, 9), damaged)
    err = capsys.readouterr().err
    assert "checkpoints/6 could not be restored" in err and "fell back to checkpoint 3" in err
    assert len(list((damaged / "checkpoints").glob("damaged-6-*"))) == 1, "the damaged step is kept aside"
    assert [m["step"] for m in read_metrics(damaged)] == list(range(1, 10)), "every step logged exactly once"
    assert _without_timing(read_metrics(damaged)) == _without_timing(read_metrics(straight))


def test_the_commands_reading_a_cut_checkpoint_say_so_in_one_line(tmp_path, cache_dir):
    """Before, generate and evaluate printed Orbax's and TensorStore's tracebacks, convert a ValueError's."""
    run = tmp_path / "run"
    trainer.train(small_config(cache_dir, 3), run)
    params = run / "checkpoints" / "3" / "params"
    data = max((f for f in params.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[:1000])
    for command in (["generate", "--checkpoint", str(run), "--prompt", "def"], ["evaluate", "--checkpoint", str(run)],
                    ["convert", "--from", "ours", "--to", "hf", str(run), str(tmp_path / "hf")]):
        result = subprocess.run([sys.executable, "-m", f"llama_jax.{command[0]}", *command[1:]], capture_output=True,
                                text=True, timeout=300, env=CLI_ENV, cwd=REPO)
        assert result.returncode == 2, result.stderr[-3000:]
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr[-3000:]
        assert f"in {params.parent}" in result.stderr and "could not be restored (OUT_OF_RANGE" in result.stderr
        assert "use another step" in result.stderr


def test_keep_policy_and_wall_clock_saves(tmp_path, cache_dir):
    cfg = small_config(cache_dir, 8)
    cfg.checkpoint.every_steps, cfg.checkpoint.max_to_keep, cfg.checkpoint.keep_every = 1, 1, 4
    trainer.train(cfg, tmp_path / "kept")
    assert sorted(int(p.name) for p in (tmp_path / "kept" / "checkpoints").iterdir() if p.name.isdigit()) == [4, 8]
    timed = small_config(cache_dir, 4)
    timed.checkpoint.every_steps, timed.checkpoint.max_to_keep, timed.checkpoint.every_minutes = 1000, 10, 1e-6
    trainer.train(timed, tmp_path / "timed")
    assert sorted(int(p.name) for p in (tmp_path / "timed" / "checkpoints").iterdir() if p.name.isdigit()) == [1, 2, 3, 4]


def test_step_rates_leave_out_the_time_of_saves(tmp_path, cache_dir, monkeypatch):
    """Evaluations were left out of a window's step_time, tokens_per_s and mfu, saves were not: the window after each
    save counted it, here 2 s a save."""
    save = checkpoint.Checkpointer.save

    def slow_save(self, *args, **kwargs):
        time.sleep(2.0)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", slow_save)
    trainer.train(small_config(cache_dir, 7), tmp_path / "run")  # saves at steps 3, 6 and 7, logs every step
    lines = read_metrics(tmp_path / "run")
    assert lines[-1]["goodput/lost_seconds/checkpoint"] > 4  # the saves at steps 3 and 6 (7's comes after its line)
    assert [line["step"] for line in lines if "step_time" in line] == [2, 3, 4, 5, 6, 7]
    assert max(line["step_time"] for line in lines if "step_time" in line) < 1.0, lines


def test_a_second_run_on_a_busy_workdir_refuses_to_start(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    workdir.mkdir()
    holder = workdir_lib.lock(workdir_lib.resolve(workdir))
    with pytest.raises(CheckpointError, match=r"is in use by a running job \(pid \d+ on .*\): .*another --workdir"):
        trainer.train(small_config(cache_dir, 3), workdir)
    assert not (workdir / "checkpoints").exists(), "the refused run wrote nothing"
    holder.release()
    trainer.train(small_config(cache_dir, 3), workdir)
    assert (workdir / "checkpoints" / "3").is_dir()


def test_bad_checkpoints_give_clear_errors(tmp_path, cache_dir):
    workdir = tmp_path / "run"
    trainer.train(small_config(cache_dir, 3), workdir)
    other_model = small_config(cache_dir, 6)
    other_model.model.dim = 128
    with pytest.raises(CheckpointError, match=r"checkpoints/3 was written for a different model \(model.dim: 64 -> 128\)"):
        trainer.train(other_model, workdir)
    for f in (workdir / "checkpoints" / "3" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoints/3 could not be restored"):
        trainer.train(small_config(cache_dir, 6), workdir)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_model(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        checkpoint.load_model(tmp_path)


def test_the_resume_line_names_changed_settings_by_dotted_key_and_a_phase_by_its_index():
    saved = default_config()
    saved.phases = (phase("long", steps=10, data=dict(seq_len=512)), phase("anneal", steps=4, lr="anneal"))
    now = default_config()
    now.optim.lr = saved.optim.lr / 2
    now.phases = (phase("long", steps=20, data=dict(seq_len=1024)), phase("anneal", steps=4, lr="anneal"))
    stored = json.loads(json.dumps(plain(saved)))
    assert checkpoint.config_changes(stored, plain(saved)) == []
    assert checkpoint.config_changes(stored, plain(now)) == [
        f"optim.lr: {saved.optim.lr!r} -> {now.optim.lr!r}", "phases[0].overrides.data.seq_len: 512 -> 1024",
        "phases[0].steps: 10 -> 20"]
    now.phases = now.phases[:1]
    assert checkpoint.config_changes(stored, plain(now))[1:3] == [
        "phases: 2 entries -> 1", "phases[0].overrides.data.seq_len: 512 -> 1024"]
    del stored["optim"]["lr"]  # a key the saving version did not have is not a change
    assert not any(c.startswith("optim.") for c in checkpoint.config_changes(stored, plain(now)))


def test_a_run_resumes_with_another_way_of_running_its_model(tmp_path, cache_dir, uninterrupted, capsys):
    """A remat policy that saves memory, unrolled layers, another attention kernel: the same training, rounded
    differently (bfloat16), from the same state."""
    straight = uninterrupted(6)
    workdir = tmp_path / "run"
    trainer.train(small_config(cache_dir, 3), workdir)
    other = small_config(cache_dir, 6)
    other.model.remat, other.model.scan_layers, other.model.attention = "full", False, "flash"
    trainer.train(other, workdir)
    said = capsys.readouterr().out
    assert ("checkpoints/3, with settings changed since it was saved: model.attention: 'xla' -> 'flash'; model.remat: "
            "'dots_no_batch' -> 'full'; model.scan_layers: True -> False; train.steps: 3 -> 6\n") in said
    resumed, expected = ([m["loss"] for m in read_metrics(w)] for w in (workdir, straight))
    assert resumed[:3] == expected[:3] and np.allclose(resumed[3:], expected[3:], rtol=1e-4), (resumed, expected)
    other.model.param_dtype = "bfloat16"  # the stored state's dtype is what a checkpoint holds
    with pytest.raises(CheckpointError, match=r"model.param_dtype: 'float32' -> 'bfloat16'"):
        trainer.train(other, workdir)


@pytest.mark.long
def test_a_checkpoint_that_cannot_be_written_ends_the_run_saying_what_is_left(tmp_path, cache_dir):
    """A full disk or a quota, as the OS reports it to the writer: here a file-size limit (EFBIG) on the process."""
    quick = ("--config.data.batch_size=8", "--config.data.seq_len=64", "--config.train.log_every=1",
             "--config.train.eval_every=0", "--config.data.eval_batches=1", "--config.checkpoint.every_steps=2",
             "--config.optim.warmup_steps=2")
    straight = tmp_path / "straight"
    assert run_cli(straight, cache_dir, "--config.train.steps=4", *quick).returncode == 0
    workdir = tmp_path / "run"
    assert run_cli(workdir, cache_dir, "--config.train.steps=2", *quick).returncode == 0

    def small_files_only():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # the parameters' data file is larger

    env = {k: v for k, v in CLI_ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # the shared cache is left alone
    full = subprocess.run(cli_command(workdir, cache_dir, "--config.train.steps=4", "--config.train.compilation_cache_dir=",
                                      *quick), capture_output=True, text=True, timeout=900, env=env, cwd=REPO,
                          preexec_fn=small_files_only)
    assert full.returncode == 2, full.stderr[-3000:]
    # Orbax's background threads log their failures too, one line each (before, with tracebacks, and TensorStore's
    # callbacks into Orbax's closed event loop printed dozens more); which of its writes fails first varies, and so
    # does the storage layer's text around the OS's reason
    assert "Traceback" not in full.stderr and "Event loop is closed" not in full.stderr, full.stderr[-3000:]
    [said] = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert re.fullmatch(r"error: a checkpoint could not be written to .*/run/checkpoints \(File too large: .+\); the "
                        r"newest complete checkpoint is step 2\. Fix the cause \(free space, permissions, quota\) and "
                        r"rerun to resume from there", said), said

    assert run_cli(workdir, cache_dir, "--config.train.steps=4", *quick).returncode == 0
    assert [m["step"] for m in read_metrics(workdir)] == [1, 2, 3, 4]
    assert [m["loss"] for m in read_metrics(workdir)] == [m["loss"] for m in read_metrics(straight)]


def test_orbax_tasks_never_retrieved_are_not_reported_again():
    """asyncio reports Orbax's failed writer tasks too, at times (the test above failed twice on it: once a task, once
    a gathering future, which names Orbax only in its traceback), and the reads left in flight by a failed one: their
    error is the one the command reports, so their records go; other asyncio errors keep theirs, with their
    tracebacks. In a process of its own: the filters are process-wide."""
    script = """import logging
from llama_jax import checkpoint
checkpoint.quiet_background_failures()

def raised_in(where, word):
    try:
        exec(compile("raise ValueError(word)", where, "exec"), {"word": word})
    except ValueError as e:
        return ValueError, e, e.__traceback__

for where, word in (("/venv/orbax/checkpoint/_src/serialization.py", "dropped"), ("/app/mine.py", "kept")):
    logging.getLogger("asyncio").error(f"Task exception was never retrieved\\nfuture: <Task coro=<f() defined at {where}:1>>",
                                       exc_info=(ValueError, ValueError(word), None))
    logging.getLogger("asyncio").error(f"_GatheringFuture exception was never retrieved\\nfuture: <_GatheringFuture "
                                       f"finished exception=ValueError('gathered {word}')>",
                                       exc_info=raised_in(where, f"gathered {word}"))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "ValueError: kept" in result.stderr and "dropped" not in result.stderr, result.stderr
    assert "ValueError: gathered kept" in result.stderr and 'File "/app/mine.py"' in result.stderr, result.stderr
    assert result.stderr.count("Task exception was never retrieved") == 1 and "/venv/orbax/" not in result.stderr
    assert result.stderr.count("_GatheringFuture exception was never retrieved") == 1


def test_killed_anywhere_and_restarted_equals_never_interrupted(tmp_path, cache_dir):
    """SIGKILL at random moments (some land in asynchronous saves); each restart resumes from the newest complete
    checkpoint. The final parameters are bitwise those of an uninterrupted run and every step is logged once."""
    straight = tmp_path / "straight"
    assert run_cli(straight, cache_dir, *KILL_RUN).returncode == 0
    killed = tmp_path / "killed"
    rng = random.Random(7)
    for kill in range(3):
        proc = subprocess.Popen(cli_command(killed, cache_dir, *KILL_RUN), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=CLI_ENV, cwd=REPO)
        logged_before = len(read_metrics(killed)) if (killed / "metrics.jsonl").exists() else 0
        deadline = time.monotonic() + 600
        while (not (killed / "metrics.jsonl").exists()) or len(read_metrics(killed)) < logged_before + 2:
            assert proc.poll() is None and time.monotonic() < deadline, f"kill {kill}: the run ended or stalled"
            time.sleep(0.05)
        time.sleep(rng.uniform(0, 1.0))
        proc.kill()
        proc.wait()
    final = run_cli(killed, cache_dir, *KILL_RUN)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "Resumed from" in final.stdout + final.stderr
    lines = read_metrics(killed)
    assert [m["step"] for m in lines] == list(range(1, 15)), "every step logged exactly once"
    assert _without_timing(lines) == _without_timing(read_metrics(straight))
    model_a, _ = checkpoint.load_model(straight)
    model_b, _ = checkpoint.load_model(killed)
    for a, b in zip(jax.tree.leaves(nnx.state(model_a)), jax.tree.leaves(nnx.state(model_b))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_second_process_loads_its_compiled_programs_from_the_compilation_cache(tmp_path, cache_dir):
    """`train.compilation_cache_dir`: the first process writes its compiled programs there, a second one of the same
    job finds every one (it writes none) and trains exactly the same; a truncated entry, as a process killed while
    writing it leaves, is compiled again with a warning."""
    xla = tmp_path / "xla"
    # Every program cached, however fast it compiles: at JAX's default of 1 s, a program compiled in 0.9 s by the first
    # process and 1.1 s by the second (a busier machine) is written by the second alone.
    env = {**{k: v for k, v in CLI_ENV.items() if k != "JAX_COMPILATION_CACHE_DIR"},
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def run(workdir):
        done = subprocess.run(cli_command(workdir, cache_dir, *KILL_RUN[1:], "--config.train.steps=2",
                                          f"--config.train.compilation_cache_dir={xla}"),
                              capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run(tmp_path / "first")
    entries = sorted(xla.iterdir())
    assert entries, "nothing was written to the compilation cache"
    run(tmp_path / "second")
    assert sorted(xla.iterdir()) == entries, "the second process compiled a program the first had cached"
    assert _without_timing(read_metrics(tmp_path / "second")) == _without_timing(read_metrics(tmp_path / "first"))

    largest = max(entries, key=lambda path: path.stat().st_size)
    largest.write_bytes(largest.read_bytes()[:largest.stat().st_size // 2])
    third = run(tmp_path / "third")
    assert "Error reading persistent compilation cache entry" in third.stderr
    assert _without_timing(read_metrics(tmp_path / "third")) == _without_timing(read_metrics(tmp_path / "first"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_ctrl_c_checkpoints_the_current_step_and_exits_75(tmp_path, cache_dir, signum):
    workdir = tmp_path / "run"
    overrides = ("--config.data.batch_size=8", "--config.data.seq_len=64", "--config.train.log_every=1",
                 "--config.data.eval_batches=1", "--config.checkpoint.every_steps=1000")
    stderr_file = (tmp_path / "stderr.txt").open("w")
    proc = subprocess.Popen(cli_command(workdir, cache_dir, "--config.train.steps=100000", *overrides),
                            stdout=subprocess.DEVNULL, stderr=stderr_file, env=CLI_ENV, cwd=REPO)
    deadline = time.monotonic() + 600
    while not ((workdir / "metrics.jsonl").exists() and len(read_metrics(workdir)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.5)
    proc.send_signal(signum)
    assert proc.wait(timeout=300) == 75
    stderr = (tmp_path / "stderr.txt").read_text()
    assert ("Ctrl-C: the current step finishes and is saved" in stderr) == (signum == signal.SIGINT)
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert len(saved) == 1 and saved[0] >= 2, saved  # no periodic save was due: this is the preemption save
    assert f"preempted: checkpoint saved at step {saved[0]}" in stderr
    assert read_metrics(workdir)[-1]["step"] == saved[0], "the last logged step is the saved one"

    resumed = run_cli(workdir, cache_dir, f"--config.train.steps={saved[0] + 2}", *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"checkpoints/{saved[0]}" in resumed.stdout


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_are_given_back():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    flag = PreemptionFlag("")
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)  # the handler runs in this thread at its next instruction
    assert flag.raised
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)
    flag.restore()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_trained_run_exports_to_a_complete_hugging_face_directory(tmp_path, cache_dir, capsys):
    """The workdir of a short tiny-config run, converted with the CLI, opens in transformers as a whole: the model's
    logits and greedy generation equal ours, and the tokenizer.json built from the run's tiktoken tokenizer.model
    encodes code and multilingual text, frames it and renders chats exactly as llama_jax does."""
    import torch
    import transformers

    from llama_jax import convert
    from llama_jax.data.chat import ChatFormat
    from llama_jax.data.tokenizer import Tokenizer

    workdir, out = tmp_path / "run", tmp_path / "hf"
    trainer.train(small_config(cache_dir, 3), workdir)
    code = convert.main(["--from", "ours", "--to", "hf", str(workdir), str(out)])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors",
                                               "tokenizer.json", "tokenizer_config.json"}

    ours_tok = Tokenizer.from_file(workdir / "tokenizer.model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    samples = [(REPO / "llama_jax" / "trainer.py").read_text()[:4000],
               "Grüße aus Köln! 東京は晴れ。 Привет, мир. مرحبا بالعالم 🙂🚀 — naïve café\n\t\tx = 1_000_000  # 12345",
               "I'LL don't    \n\n\n   spaces", ""]
    for text in samples:
        assert hf_tok(text).input_ids == ours_tok.encode(text)
        assert hf_tok.decode(ours_tok.encode(text), skip_special_tokens=True) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def main("},
                {"role": "assistant", "content": "pass"}, {"role": "user", "content": "More?"}]
    for prompt in (False, True):
        rendered = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=prompt)
        rendered = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
        assert rendered == ChatFormat(ours_tok).render_ids(messages, add_generation_prompt=prompt)

    ours, _ = checkpoint.load_model(workdir)
    exported = convert.load_hf(out)
    for a, b in zip(jax.tree.leaves(nnx.state(ours, nnx.Param)), jax.tree.leaves(nnx.state(exported, nnx.Param))):
        assert np.array_equal(np.asarray(a), np.asarray(b))  # float32 in, float32 out: bitwise
    reference = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    prompt_ids = ours_tok.encode("def main(")
    with torch.no_grad():
        expected = reference(torch.tensor([prompt_ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(exported(jnp.asarray([prompt_ids]))), expected, atol=1e-4, rtol=0)

    stops = [ours_tok.eos_id, ours_tok.special_tokens["<|eom_id|>"], ours_tok.special_tokens["<|eot_id|>"]]
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == stops
    hf_new = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=12)[0, len(prompt_ids):].tolist()
    assert hf_new == generate.generate(exported, prompt_ids, 12, stop_ids=stops)[0]


@pytest.fixture(scope="module")
def tiny_hf_dir(tmp_path_factory) -> Path:
    """A random transformers Llama with a byte-level BPE tokenizer.json (no bos added) trained on a few stdlib files."""
    import sysconfig

    import tokenizers
    import torch
    import transformers

    path = tmp_path_factory.mktemp("hf_finetune")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = tokenizers.decoders.ByteLevel()
    bpe.train_from_iterator([(stdlib / name).read_text() for name in ("textwrap.py", "shlex.py")],
                            tokenizers.trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
                                                           show_progress=False))
    bpe.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    cfg = transformers.LlamaConfig(vocab_size=bpe.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=None, eos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0], "do_sample": True, "temperature": 0.7}))
    return path


def finetune_config(hf_dir: Path, cache_dir: Path, source: Path, **optim):
    cfg = load_config_file("finetune.py", str(hf_dir))
    cfg.data.source, cfg.data.cache_dir = f"{source}/*.py", str(cache_dir)
    cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = 8, 64, 1
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.checkpoint.every_steps = 2, 1, 0, 2
    cfg.optim.update(optim)
    return cfg


def test_finetuning_starts_from_the_hugging_face_weights(tmp_path, cache_dir, tiny_hf_dir):
    from llama_jax import convert

    source = tmp_path / "docs"
    source.mkdir()
    for name in ("argparse.py", "csv.py", "glob.py"):
        shutil.copy(Path(os.__file__).parent / name, source / name)
    original = convert.load_hf(tiny_hf_dir)
    frozen = finetune_config(tiny_hf_dir, cache_dir, source, lr=0.0, weight_decay=0.0)
    trainer.train(frozen, tmp_path / "frozen")
    ours, tokenizer_path = checkpoint.load_model(tmp_path / "frozen")
    for a, b in zip(jax.tree.leaves(nnx.state(original, nnx.Param)), jax.tree.leaves(nnx.state(ours, nnx.Param))):
        assert np.array_equal(np.asarray(a), np.asarray(b)), "lr 0 must leave the loaded weights exactly as they were"
    assert Path(tokenizer_path).name == "tokenizer.json"
    settings = convert.open_checkpoint(tmp_path / "frozen").generation  # the run kept the checkpoint's settings
    assert (settings.stop_ids, settings.do_sample, settings.temperature) == ((0,), True, 0.7)
    first_loss = read_metrics(tmp_path / "frozen")[0]["loss"]
    assert first_loss < math.log(original.cfg.vocab_size) + 0.5  # a random init at init_std would be near ln V too

    trainer.train(finetune_config(tiny_hf_dir, cache_dir, source, lr=1e-2), tmp_path / "moved")
    moved, _ = checkpoint.load_model(tmp_path / "moved")
    assert not np.array_equal(np.asarray(moved.embed[...]), np.asarray(original.embed[...]))

    wrong = finetune_config(tiny_hf_dir, cache_dir, source)
    wrong.model.n_layers = 3
    with pytest.raises(ConfigError, match=r"is a different model: model.n_layers=3 \(checkpoint: 2\)"):
        trainer.train(wrong, tmp_path / "wrong")
    no_tokenizer = finetune_config(tiny_hf_dir, cache_dir, source)
    no_tokenizer.data.tokenizer = ""
    with pytest.raises(ConfigError, match="needs the tokenizer the checkpoint was trained with"):
        trainer.train(no_tokenizer, tmp_path / "no_tokenizer")


def test_finetuning_starts_from_a_llama_jax_run_with_only_its_parameters(tmp_path, cache_dir):
    """init_from a step of our own run, on another mesh: the weights are exactly the run's, while the optimizer
    state, the step and the data position start afresh."""
    import orbax.checkpoint as ocp

    base = tmp_path / "base"
    trainer.train(small_config(cache_dir, 3), base)
    cfg = load_config_file("finetune.py", str(base / "checkpoints" / "3"))
    assert model_config(cfg) == model_config(small_config(cache_dir, 3))
    assert Path(cfg.data.tokenizer).parent == base and Path(cfg.data.tokenizer).is_file()  # the run's own copy
    cfg.data.cache_dir, cfg.data.batch_size, cfg.data.seq_len, cfg.data.eval_batches = str(cache_dir), 8, 64, 1
    cfg.train.steps, cfg.train.log_every, cfg.train.eval_every, cfg.checkpoint.every_steps = 2, 1, 0, 2
    cfg.optim.lr, cfg.optim.weight_decay = 0.0, 0.0
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, 4, 2
    trainer.train(cfg, tmp_path / "tuned")
    assert [m["step"] for m in read_metrics(tmp_path / "tuned")] == [1, 2]
    original, _ = checkpoint.load_model(base)
    tuned, _ = checkpoint.load_model(tmp_path / "tuned")
    for a, b in zip(jax.tree.leaves(nnx.state(original)), jax.tree.leaves(nnx.state(tuned))):
        assert np.array_equal(np.asarray(a), np.asarray(b)), "lr 0 must leave the loaded weights exactly as they were"
    opt_state = ocp.StandardCheckpointer().restore(tmp_path / "tuned" / "checkpoints" / "2" / "opt_state")
    counts = [int(v) for path, v in jax.tree_util.tree_leaves_with_path(opt_state) if "count" in jax.tree_util.keystr(path)]
    assert counts and set(counts) == {2}, "the optimizer restarted at step 0, not at the base run's step 3"

    wrong = load_config_file("finetune.py", str(base))
    wrong.model.n_layers = 3
    with pytest.raises(ConfigError, match=r"is a different model: model.n_layers=3 \(checkpoint: 2\)"):
        trainer.train(wrong, tmp_path / "wrong")


def test_the_default_job_trains_the_same_on_a_4d_mesh(tmp_path, cache_dir):
    """configs/tiny.py from the command line on 8 devices as 2 pipeline stages x 2 context x 2 tensor follows the
    one-device run's losses (float32 compute, so only the order of sums differs)."""
    quick = ("--config.train.steps=4", "--config.train.log_every=1", "--config.train.eval_every=0",
             "--config.data.batch_size=8", "--config.data.seq_len=128", "--config.data.eval_batches=1",
             "--config.optim.warmup_steps=2", "--config.model.dtype=float32")
    single = run_cli(tmp_path / "single", cache_dir, *quick)
    assert single.returncode == 0, single.stderr[-3000:]
    mesh = ("--config.mesh.data=1", "--config.mesh.stage=2", "--config.mesh.context=2", "--config.mesh.tensor=2")
    cmd = cli_command(tmp_path / "4d", cache_dir, *quick, *mesh)
    parallel = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                              env=dict(CLI_ENV, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    assert parallel.returncode == 0, parallel.stderr[-3000:]
    assert "Pipeline: 2 stages, 4 microbatches, gpipe schedule" in parallel.stdout, parallel.stdout[-2000:]
    expected, got = read_metrics(tmp_path / "single"), read_metrics(tmp_path / "4d")
    assert [m["step"] for m in got] == [1, 2, 3, 4]
    np.testing.assert_allclose([m["loss"] for m in got], [m["loss"] for m in expected], rtol=2e-5)
    np.testing.assert_allclose(got[-1]["eval_loss"], expected[-1]["eval_loss"], rtol=2e-5)


def test_a_run_resumes_on_another_number_of_hosts(tmp_path, cache_dir, uninterrupted, capsys):
    """grain's restore read only the data-position file of the current process count: a run saved on two hosts and
    resumed on one set every checkpoint aside as damaged and stopped. Here the files are those a run of two processes
    writes (the same position in each)."""
    hosts_before = 2
    straight = uninterrupted(9)
    run = tmp_path / "run"
    trainer.train(small_config(cache_dir, 6), run)  # checkpoints 3 and 6
    for step in (3, 6):
        data = run / "checkpoints" / str(step) / "data"
        position = (data / "process_0-of-1.json").read_text()
        (data / "process_0-of-1.json").unlink()
        for process in range(hosts_before):
            (data / f"process_{process}-of-{hosts_before}.json").write_text(position)
    trainer.train(small_config(cache_dir, 9), run)
    assert "could not be restored" not in capsys.readouterr().err
    assert not list((run / "checkpoints").glob("damaged-*"))
    resumed, expected = ([{key: value for key, value in m.items() if key != "eval_loss"} for m in read_metrics(workdir)]
                         for workdir in (run, straight))  # (the first run evaluated at its end, at step 6)
    assert _without_timing(resumed) == _without_timing(expected)
