"""Goodput under repeated crashes: configs/tiny.py with short steps, run by the supervisor, its training process
SIGKILLed every --kill-every seconds (no warning, no save: the worst kind of interruption).

    python benchmarks/goodput.py [--kill-every 45] [--steps 240] [--checkpoint-every 25] [--workdir DIR]

`--kill-every 0` gives the baseline: the same run uninterrupted, whose losses are its start-up, compilation and
evaluations alone.

Each kill costs a restart (start-up, restore, compile) and the steps since the last checkpoint; the supervisor
restarts and the run finishes. Prints the supervisor's goodput and its breakdown; ends with one JSON line of the
figures. Linux only (it finds the training process through /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from llama_jax import goodput, supervise

REPO = Path(__file__).resolve().parents[1]


def training_pid(supervisor: subprocess.Popen) -> int | None:
    """The supervisor's current child, if one is running."""
    children = Path(f"/proc/{supervisor.pid}/task/{supervisor.pid}/children")
    pids = children.read_text().split() if children.exists() else []
    return int(pids[0]) if pids else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kill-every", type=float, default=45.0,
                        help="seconds between SIGKILLs of the trainer; 0: none (the baseline)")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints")
    parser.add_argument("--workdir", default="", help="default: a new temporary directory")
    parser.add_argument("--cache-dir", default="~/.cache/llama_jax", help="the corpus cache (built on first use)")
    parser.add_argument("--no-compilation-cache", action="store_true",
                        help="every process compiles (default: a compilation cache new to this run, so its first "
                             "process compiles and the restarts load what it compiled)")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="goodput_")) / "run"
    workdir.mkdir(parents=True, exist_ok=True)
    train = [sys.executable, "-m", "llama_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
             "--workdir", str(workdir), f"--config.data.cache_dir={args.cache_dir}",
             f"--config.train.steps={args.steps}", "--config.data.batch_size=8", "--config.data.seq_len=128",
             "--config.train.log_every=5", "--config.train.eval_every=60",
             f"--config.checkpoint.every_steps={args.checkpoint_every}",
             f"--config.train.compilation_cache_dir={'' if args.no_compilation_cache else workdir.parent / 'xla'}"]
    log = workdir.parent / "supervise.log"
    kills = f"SIGKILL every {args.kill_every:g} s" if args.kill_every else "no SIGKILL (the baseline)"
    print(f"supervising {args.steps} steps of configs/tiny.py (8 x 128 tokens each) in {workdir}, {kills}; output in "
          f"{log}", flush=True)
    with log.open("w") as out:
        # A restart budget large enough never to end the run: the figure is the cost of interruptions, not the policy.
        supervise_cmd = [sys.executable, "-m", "llama_jax.supervise", "--backoff", "1", "--max-restarts", "1000"]
        supervisor = subprocess.Popen([*supervise_cmd, "--", *train], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        kills = 0
        while supervisor.poll() is None:
            next_kill = time.monotonic() + (args.kill_every or float("inf"))
            while supervisor.poll() is None and time.monotonic() < next_kill:
                time.sleep(0.2)
            pid = training_pid(supervisor)
            if supervisor.poll() is not None or pid is None:
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # it finished between the look-up and the kill
                continue
            kills += 1
            print(f"{time.strftime('%H:%M:%S')} killed the trainer (pid {pid})", flush=True)
    records = [json.loads(line) for line in (workdir / supervise.LOG_FILE).read_text().splitlines()]
    [end] = [r for r in records if r["event"] == "end"]
    print(f"exit code {end['exit_code']}, {kills} kills, {end['interruptions']} interruptions; "
          f"{goodput.describe(end)}")
    print(json.dumps({"kill_every_s": args.kill_every, "steps": args.steps, "checkpoint_every": args.checkpoint_every,
                      "kills": kills, **{k: v for k, v in end.items() if k not in ("event", "time", "host")}}))


if __name__ == "__main__":
    main()
