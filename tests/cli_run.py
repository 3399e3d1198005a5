"""Running `python -m llama_jax.train` in a subprocess, as a user does: shared by the end-to-end tests."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from config_files import SESSION_DATA_CACHE
from llama_jax.goodput import GOODPUT
from llama_jax.parallel.cpu_threads import NPROC
from llama_jax.workdir import read_jsonl

REPO = Path(__file__).resolve().parents[1]
# One CPU device and XLA's own thread count, as a user's machine has: conftest's NPROC is for its 8 devices, and
# XLA's CPU reductions split by thread count, so the golden curve moves (2.4e-4) with it.
CLI_ENV = {**{k: v for k, v in os.environ.items() if k != NPROC}, "XLA_FLAGS": ""}
# The commands of the whole session share one compilation cache (`train.compilation_cache_dir`; conftest.py makes the
# session's caches): the many runs of the same small jobs compile each program once.
SESSION_CACHE = Path(os.environ["LLAMA_JAX_TESTS_CACHE"])
CLI_ENV["JAX_COMPILATION_CACHE_DIR"] = str(SESSION_CACHE / "xla_commands")

# A short run that logs every step and saves every other one: quick to kill and restart.
KILL_RUN = ("--config.train.steps=14", "--config.data.batch_size=8", "--config.data.seq_len=64",
            "--config.train.log_every=1", "--config.train.eval_every=0", "--config.data.eval_batches=1",
            "--config.checkpoint.every_steps=2", "--config.optim.warmup_steps=2")


@pytest.fixture(scope="session")
def cache_dir():
    """One build of each corpus and tokenizer (the default one takes about 20 s) for the whole session's tests."""
    SESSION_DATA_CACHE.mkdir(exist_ok=True)
    return SESSION_DATA_CACHE


def cli_command(workdir: Path, cache_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "llama_jax.train", "--config", str(REPO / "configs" / "tiny.py"),
            "--workdir", str(workdir), f"--config.data.cache_dir={cache_dir}", *overrides]


def run_cli(workdir: Path, cache_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = cli_command(workdir, cache_dir, *overrides)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=CLI_ENV, cwd=REPO)


def read_metrics(workdir: Path) -> list[dict]:
    """The lines logged so far, as the trainer reads them on resume: none before the file exists, and without a last
    line that the run is writing at this instant."""
    return read_jsonl(workdir / "metrics.jsonl")


def without_timing(lines: list[dict]) -> list[dict]:
    """Metrics lines without their wall-clock and memory fields, which differ between any two runs."""
    varying = ("tokens_per_s", "mfu", "step_time", "peak_memory_gib")
    return [{k: v for k, v in m.items() if k not in varying and not k.startswith(GOODPUT)} for m in lines]
