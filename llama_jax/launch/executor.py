"""The one door through which launchers run outside commands (gcloud, sbatch, tar), so that tests can put a fake
behind it: either another `Executor`, or a fake `gcloud` script first on PATH behind the real one."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
import threading
import time
from typing import Callable, Mapping, Protocol, Sequence

from llama_jax.errors import LlamaJaxError


class LaunchError(LlamaJaxError):
    """An outside command failed (gcloud, sbatch, tar); the message holds its output and what to check."""


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


class Executor(Protocol):
    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Result:
        """Runs to the end and returns its output (captured)."""

    def stream(self, argv: Sequence[str], on_line: Callable[[str], None], stop: threading.Event | None = None,
               env: Mapping[str, str] | None = None) -> int:
        """Runs, handing each line of stdout to `on_line` as it comes (stderr goes to ours); ends the command
        when `stop` is set. Returns its exit code."""

    def sleep(self, seconds: float) -> None: ...


def shell_line(argv: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    """The command as one line a shell would run the same way (what --dry-run prints)."""
    assignments = [f"{name}={shlex.quote(value)}" for name, value in (env or {}).items()]
    return " ".join([*assignments, shlex.join(argv)])


class SubprocessExecutor:
    """Runs commands for real; with `echo`, each one is printed (on stderr, `+ command`) before it runs."""

    def __init__(self, echo: bool = True):
        self.echo = echo

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None) -> Result:
        self._echo(argv, env)
        try:
            done = subprocess.run(list(argv), capture_output=True, text=True, env=_merged(env))
        except FileNotFoundError:
            raise _not_found(argv[0]) from None
        return Result(done.returncode, done.stdout, done.stderr)

    def stream(self, argv: Sequence[str], on_line: Callable[[str], None], stop: threading.Event | None = None,
               env: Mapping[str, str] | None = None) -> int:
        self._echo(argv, env)
        try:
            child = subprocess.Popen(list(argv), stdout=subprocess.PIPE, text=True, env=_merged(env))
        except FileNotFoundError:
            raise _not_found(argv[0]) from None
        done = threading.Event()
        if stop is not None:
            threading.Thread(target=_end_on, args=(stop, done, child), daemon=True).start()
        try:
            for line in child.stdout:
                on_line(line.rstrip("\n"))
            return child.wait()
        finally:
            done.set()
            if child.poll() is None:
                child.kill()
                child.wait()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def _echo(self, argv: Sequence[str], env: Mapping[str, str] | None) -> None:
        if self.echo:
            print(f"+ {shell_line(argv, env)}", file=sys.stderr, flush=True)


def _end_on(stop: threading.Event, done: threading.Event, child: subprocess.Popen) -> None:
    while not done.is_set():
        if stop.wait(0.2):
            if child.poll() is None:
                child.terminate()
            return


def _merged(env: Mapping[str, str] | None) -> dict[str, str] | None:
    return None if not env else {**os.environ, **env}


def _not_found(program: str) -> LaunchError:
    fixes = {"gcloud": "install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) and run "
                       "`gcloud auth login`",
             "sbatch": "run this on a SLURM login node, or use --dry-run to write the script only"}
    return LaunchError(f"{program} not found on PATH: {fixes.get(program, f'install {program}')}")
