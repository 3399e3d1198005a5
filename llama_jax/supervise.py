"""Restarts a training command until it finishes; what launchers run.

    python -m llama_jax.supervise [--max-restarts N] [--backoff S] [--max-backoff S] -- \\
        python -m llama_jax.train --config FILE --workdir DIR [--config.KEY=VALUE ...]

At scale a job is interrupted many times (the Llama 3 paper counts 466 interruptions in 54 days); restarting by
hand loses hours each time, so the restart is automatic and the child's exit code (see llama_jax/train.py) decides:
  0 finished, and 2 (configuration, data or checkpoint error: a restart would fail the same way) end the supervisor
  with that code; 75 preempted, 76 hung (the watchdog) and every other code or signal (crashed) restart it.
Backoff: --backoff seconds before a restart, doubled after each restart without progress, at most --max-backoff.
Budget: at most --max-restarts restarts in a row without progress. Progress is a newer checkpoint than the child
started with (WORKDIR/checkpoints/<step>); it refills the budget and resets the backoff. So a run interrupted every
few hours restarts forever, while one that crashes at the same step each time stops after --max-restarts tries.
Signals: SIGTERM or SIGINT to the supervisor reaches the child as SIGTERM (it saves at the step boundary, exits 75);
the supervisor restarts nothing and exits with the child's code (75 when it came between two children). A second
signal kills the child. The child also gets SIGTERM if the supervisor itself is killed.
Log: each interruption on stderr and as one JSON line in WORKDIR/supervisor.jsonl (WORKDIR: the child's --workdir):
cause, exit code, the child's lifetime, the backoff, and the time it cost: from the death to the next child's first
finished step (`down_seconds`), which the child reports through the file named by LLAMA_JAX_FIRST_STEP_FILE. At the
end the run's goodput (llama_jax/goodput.py) is logged the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from etils import epath

from llama_jax import exit_codes, goodput
from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.workdir import check_writable, resolve, write_whole

FIRST_STEP_ENV = "LLAMA_JAX_FIRST_STEP_FILE"
LOG_FILE = "supervisor.jsonl"
_PR_SET_PDEATHSIG = 1
_POLL_SECONDS = 0.5  # how often the supervisor looks for the child's first-step report


def report_first_step(step: int) -> None:
    """Called by the trainer once its first step has finished, for the supervisor's downtime measure."""
    path = os.environ.get(FIRST_STEP_ENV)
    if path:
        write_whole(path, json.dumps({"step": step, "time": time.time()}))  # the supervisor never reads half of it


@dataclasses.dataclass(frozen=True)
class Policy:
    max_restarts: int = 8
    backoff: float = 10.0
    max_backoff: float = 600.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.backoff < 0 or self.max_backoff < self.backoff:
            raise ConfigError(f"--max-restarts must be 0 or more, and 0 <= --backoff <= --max-backoff (seconds); got "
                              f"{self.max_restarts}, {self.backoff} and {self.max_backoff}")

    def delay(self, failures: int) -> float:
        """Seconds to wait before the restart that follows `failures` restarts without progress."""
        return min(self.max_backoff, self.backoff * 2.0**failures)


def cause_of(code: int) -> str:
    if code == exit_codes.PREEMPTED:
        return "preempted"
    if code == exit_codes.HUNG:
        return "hung"
    return "crashed"


def child_workdir(command: list[str]) -> epath.Path:
    """The --workdir of the training command (a local path or a URL, as the trainer takes it)."""
    for index, arg in enumerate(command):
        if arg == "--workdir" and index + 1 < len(command):
            return resolve(command[index + 1])
        if arg.startswith("--workdir="):
            return resolve(arg.split("=", 1)[1])
    raise ConfigError("the training command has no --workdir DIR: give it one, so that the supervisor finds the run's "
                      "checkpoints and can write its log there")


def newest_checkpoint(workdir: epath.Path) -> int:
    directory = workdir / "checkpoints"
    steps = [int(p.name) for p in directory.iterdir() if p.name.isdigit()] if directory.is_dir() else []
    return max(steps, default=-1)


@dataclasses.dataclass
class _Interruption:
    """A child's death, logged once the next child has finished its first step (or has failed before it)."""

    record: dict
    died: float


class Supervisor:
    """Runs the training command again and again, by the rules in this module's docstring."""

    def __init__(self, command: list[str], policy: Policy):
        self.command, self.policy = command, policy
        if shutil.which(command[0]) is None:
            raise ConfigError(f"the training command's program {command[0]!r} was not found: give one on PATH or its "
                              "path, e.g. -- python -m llama_jax.train --config FILE --workdir DIR")
        self.workdir = child_workdir(command)
        check_writable(self.workdir, "the training command's --workdir", directory=True)
        self.log_path = self.workdir / LOG_FILE
        self.child: subprocess.Popen | None = None
        self._signals = 0
        self._stopped = False  # set by the signal handler
        self._forwarded = False  # whether the handler passed a signal on to a child

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        self.workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="llama_jax_supervise_") as scratch:
            return self._restart_loop(Path(scratch) / "first_step.json")

    def _restart_loop(self, first_step_file: Path) -> int:
        failures, interruptions, pending = 0, 0, None
        while True:
            newest_before = newest_checkpoint(self.workdir)  # a listing: on a bucket, time for a signal to land
            if self._stopped:  # before a child was there to pass it to: start none
                if pending is not None:
                    self._log(pending.record)
                return self._end(exit_codes.PREEMPTED, interruptions)
            started = time.time()
            code = self._run_child(first_step_file, pending)
            died = time.time()
            if code in (exit_codes.FINISHED, exit_codes.CONFIG) or self._stopped:
                return self._end(code, interruptions)
            if newest_checkpoint(self.workdir) > newest_before:
                failures = 0
            if failures >= self.policy.max_restarts:
                self._say(f"giving up: {failures} restarts in a row without a new checkpoint (--max-restarts "
                          f"{self.policy.max_restarts}); the last exit code was {code}")
                return self._end(code, interruptions)
            delay = self.policy.delay(failures)
            failures += 1
            interruptions += 1
            pending = _Interruption(self._describe(code, died - started, delay, interruptions), died)
            if self._stopped_within(delay):
                self._log(pending.record)
                return self._end(exit_codes.PREEMPTED, interruptions)

    def _run_child(self, first_step_file: Path, pending: _Interruption | None) -> int:
        """Runs the command to its end; logs `pending` (the interruption before it) once its first step is done,
        or, when it never gets there, at its end."""
        first_step_file.unlink(missing_ok=True)
        env = dict(os.environ, **{FIRST_STEP_ENV: str(first_step_file)})
        if pending is not None:
            pending.record["restart_seconds"] = round(time.time() - pending.died, 3)
        # Its own process group, so that a terminal's Ctrl-C reaches the supervisor alone, which turns it into SIGTERM.
        self.child = subprocess.Popen(self.command, env=env, process_group=0, preexec_fn=_die_with_parent)
        if self._stopped and not self._forwarded:  # a signal while it started, when there was no child to pass it to
            self.child.send_signal(signal.SIGTERM)
            self._forwarded = True
        while True:
            try:
                code = self.child.wait(timeout=_POLL_SECONDS)
                break
            except subprocess.TimeoutExpired:
                if pending is not None and first_step_file.exists():
                    self._log_recovered(pending, json.loads(first_step_file.read_text())["time"])
                    pending = None
        self.child = None
        if pending is not None:
            self._log(pending.record)
        return code

    def _describe(self, code: int, lifetime: float, delay: float, number: int) -> dict:
        killed = signal.Signals(-code).name if code < 0 else None
        cause = cause_of(code)
        self._say(f"child {cause} ({killed or f'exit code {code}'}) after {lifetime:.0f} s; restart {number} in "
                  f"{delay:g} s")
        return {"event": "interruption", "time": _now(), "host": socket.gethostname(), "cause": cause,
                "exit_code": code, "signal": killed, "child_seconds": round(lifetime, 3), "restart": number,
                "backoff_seconds": delay, "restart_seconds": None, "down_seconds": None}

    def _log_recovered(self, pending: _Interruption, first_step_time: float) -> None:
        down = first_step_time - pending.died
        self._say(f"restart {pending.record['restart']} finished its first step {down:.1f} s after the "
                  f"{pending.record['cause']} child died")
        self._log({**pending.record, "down_seconds": round(down, 3)})

    def _end(self, code: int, interruptions: int) -> int:
        code = code if code >= 0 else 128 - code  # killed by signal N: the shell's 128 + N
        figures = goodput.final_goodput(self.workdir)
        summary = "no goodput yet (no step was logged)" if figures is None else goodput.describe(figures)
        self._say(f"exit code {code} after {interruptions} interruption(s); {summary}")
        self._log({"event": "end", "time": _now(), "host": socket.gethostname(), "exit_code": code,
                   "interruptions": interruptions, **(figures or {})})
        return code

    def _stopped_within(self, seconds: float) -> bool:
        """Waits up to `seconds` for a signal. A plain flag polled between short sleeps, not a threading.Event: the
        handler runs on this thread, and an Event's set() there deadlocks when the signal lands while this thread
        holds the Event's lock inside wait()."""
        deadline = time.monotonic() + seconds
        while not self._stopped and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        return self._stopped

    def _on_signal(self, signum: int, frame) -> None:
        self._signals += 1
        self._stopped = True
        if self.child is not None:
            self.child.send_signal(signal.SIGTERM if self._signals == 1 else signal.SIGKILL)
            self._forwarded = True

    def _log(self, record: dict) -> None:
        """Rewrites the (small) log with one more line: object stores have no append."""
        logged = self.log_path.read_text() if self.log_path.exists() else ""
        write_whole(self.log_path, logged + json.dumps(record) + "\n")

    @staticmethod
    def _say(message: str) -> None:
        print(f"supervise: {message}", file=sys.stderr, flush=True)


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the supervisor dies, so a killed supervisor leaves no orphan run."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    usage = "python -m llama_jax.supervise [options] -- python -m llama_jax.train --config FILE --workdir DIR ..."
    parser = argparse.ArgumentParser(prog="python -m llama_jax.supervise", usage=usage,
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--max-restarts", type=int, default=Policy.max_restarts,
                        help="restarts in a row without a new checkpoint before giving up")
    parser.add_argument("--backoff", type=float, default=Policy.backoff, help="seconds before the first restart")
    parser.add_argument("--max-backoff", type=float, default=Policy.max_backoff, help="the doubled backoff's cap")
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.parse_known_args(argv)  # --help shows the options
        print(f"usage: {usage}", file=sys.stderr)
        return exit_codes.CONFIG
    split = argv.index("--")
    options = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    try:
        supervisor = Supervisor(command, Policy(options.max_restarts, options.backoff, options.max_backoff))
    except LlamaJaxError as err:
        print(f"error: {err}", file=sys.stderr)
        return exit_codes.CONFIG
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
