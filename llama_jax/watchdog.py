"""Hang detection: a thread that ends a training process which has stopped making progress.

At pod scale a hang (a collective waiting on a dead peer, a stuck filesystem, a deadlocked data reader) costs the
whole job until a person notices; exiting lets the supervisor restart from the last checkpoint instead. A hung
collective cannot be unwound from Python, so the thread dumps every thread's stack (to tell where it hung) and
leaves with `os._exit(EXIT_HUNG)`.

Progress is a step whose result is ready on the device, not a step dispatched: JAX's dispatch runs ahead of the
device, so the loop's own pace says nothing until it blocks. The thread polls the steps' metrics arrays
(`Array.is_ready()`), which costs the loop nothing. Evaluations and saves are phases the loop announces; each
must end within the same limit, which is `multiple` x the median step time, never below `min_seconds`. Compiling a
later phase's step is a phase without a limit, as the first phase's compilation is (the watchdog starts after it):
a large model's compilation may take longer than any limit its steps suggest.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import statistics
import sys
import threading
import time
from typing import Iterator

from etils import epath

from llama_jax.exit_codes import HUNG as EXIT_HUNG

STALL_ENV = "LLAMA_JAX_TEST_STALL_STEP"  # tests: step N never starts (once per workdir), as if the process hung
_POLL_SECONDS = 0.1
_SAMPLES = 64  # step times the median is taken over
_STEPS = "training steps"  # the phase between evaluations and saves


class Watchdog:
    """Started once the first (compiling) step has finished; `dispatched` each later step's metrics array."""

    def __init__(self, multiple: float, min_seconds: float, workdir: epath.Path):
        self.multiple, self.min_seconds = multiple, min_seconds
        self._stall_marker = _stall_marker(workdir)
        self._pending: collections.deque = collections.deque()
        self._step_seconds: collections.deque = collections.deque(maxlen=_SAMPLES)
        self._last_progress = time.monotonic()
        self._phase = _STEPS
        self._bounded = True  # whether the current phase must end within the limit
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Arms the watchdog (once; never when `multiple` or `min_seconds` is 0)."""
        if self.multiple > 0 and self.min_seconds > 0 and self._thread is None:
            self._last_progress = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stopped.set()

    def dispatched(self, step_result) -> None:
        """A jax.Array that is ready once the step that computed it has run."""
        if self._thread is not None:
            self._pending.append(step_result)

    @contextlib.contextmanager
    def phase(self, name: str, *, bounded: bool = True) -> Iterator[None]:
        """Work between steps (an evaluation, a save): progress when it starts and when it ends. An unbounded
        phase (a compilation) may last as long as it takes."""
        self._beat()
        self._phase, self._bounded = name, bounded
        try:
            yield
        finally:
            self._phase, self._bounded = _STEPS, True
            self._beat()

    def limit(self) -> float:
        if not self._step_seconds:
            return self.min_seconds
        return max(self.min_seconds, self.multiple * statistics.median(self._step_seconds))

    def stall_if_asked(self, step: int) -> None:
        """The test hook: hangs before `step` when LLAMA_JAX_TEST_STALL_STEP names it, the first time only, so that
        the restarted run goes past it."""
        if self._stall_marker is not None and self._stall_marker.name == f".test-stalled-{step}" \
                and not self._stall_marker.exists():
            self._stall_marker.touch()
            _stall_forever_for_test()

    def _beat(self) -> None:
        self._last_progress = time.monotonic()

    def _watch(self) -> None:
        while not self._stopped.wait(_POLL_SECONDS):
            ready = 0
            while self._pending and self._pending[0].is_ready():
                self._pending.popleft()
                ready += 1
            now = time.monotonic()
            if ready:
                if self._phase == _STEPS:
                    self._step_seconds.append((now - self._last_progress) / ready)
                self._last_progress = now
            idle, limit = now - self._last_progress, self.limit()
            if idle > limit and self._bounded:
                self._fire(idle, limit)

    def _fire(self, idle: float, limit: float) -> None:
        median = statistics.median(self._step_seconds) if self._step_seconds else float("nan")
        print(f"\nwatchdog: no progress in {self._phase} for {idle:.0f} s (limit {limit:.0f} s: the larger of "
              f"watchdog.min_seconds={self.min_seconds:g} and watchdog.multiple={self.multiple:g} x the median step "
              f"time {median:.3g} s). The stacks of every thread follow; exiting with code {EXIT_HUNG} so that a "
              f"supervisor restarts from the last checkpoint.", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        os._exit(EXIT_HUNG)


def _stall_marker(workdir: epath.Path) -> epath.Path | None:
    step = os.environ.get(STALL_ENV)
    return workdir / f".test-stalled-{int(step)}" if step else None


def _stall_forever_for_test() -> None:
    threading.Event().wait()
