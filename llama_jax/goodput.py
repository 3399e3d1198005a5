"""Goodput: the share of a run's wall time that went into training steps the run kept, across every restart.

Wall time runs from the first start in the workdir (WORKDIR/goodput.json) to now, so time between processes counts.
Productive time is time in the loop outside the measured losses: compiling (each process's first step),
evaluating, saving. A crash throws away the steps after the last checkpoint; their time is lost as well.

It survives restarts by riding on what already does: the counters as of a checkpoint go into that checkpoint's meta,
and every metrics line carries them as of that line. On resume, the lines past the restored step (the ones the
metrics logger drops) tell what the dead process did after the checkpoint: its losses stay lost, and its productive
time beyond the checkpoint becomes `redone`. What no measure covers (start-up, restore, the gap between a death and
the next start, the dead process's last unlogged steps) is `restart`: wall time minus everything else.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Iterator

from etils import epath

from llama_jax.workdir import read_jsonl, write_whole

GOODPUT = "goodput"
PRODUCTIVE = "goodput/productive_seconds"
WALL = "goodput/wall_seconds"
LOST = "goodput/lost_seconds/"
COMPILE, EVAL, CHECKPOINT, REDONE, RESTART = "compile", "eval", "checkpoint", "redone", "restart"
COUNTERS = (PRODUCTIVE, *(LOST + cause for cause in (COMPILE, EVAL, CHECKPOINT, REDONE)))
START_FILE = "goodput.json"
_IMPORTED = time.time()  # about when this process started (the trainer imports this module early)
_run_start: float | None = None  # when this process's current run began (`begin_run`)


def begin_run() -> None:
    """Marks the start of a run in this process: the process's own start for its first run (its imports and start-up
    are the run's time), the call's time for each later one (a sweep's runs trained one after another in one
    process, which counted the runs before as their own time lost to restarts)."""
    global _run_start
    _run_start = _IMPORTED if _run_start is None else time.time()


class Goodput:
    """The run's time accounts in this process: productive unless `lost` says otherwise."""

    def __init__(self, workdir: epath.Path, *, committed: dict | None, dropped: list[dict], writer: bool):
        """`committed`: the counters in the restored checkpoint's meta (None: fresh start); `dropped`: the metrics
        lines logged past the restored step; `writer`: this process records the run's first start (process 0)."""
        self._start_file = workdir / START_FILE if writer else None
        self.started = _first_start(workdir / START_FILE)
        self.seconds = _resumed(committed or {}, dropped)
        self._mark = time.monotonic()

    def first_step_trained(self) -> None:
        """Records the run's first start, once it has trained a step: an attempt refused before its first step (the
        memory check, after compiling) recorded one, and the time until the corrected rerun counted as lost."""
        if self._start_file is not None and not self._start_file.exists():
            write_whole(self._start_file, json.dumps({"started": self.started}) + "\n")  # never half written

    def charge(self, cause: str) -> None:
        """The time since the last mark was lost to `cause` (e.g. the first step, which compiles)."""
        self._add(LOST + cause)

    @contextlib.contextmanager
    def lost(self, cause: str) -> Iterator[None]:
        """The time inside the block is lost to `cause`; the time before it was productive."""
        self._add(PRODUCTIVE)
        try:
            yield
        finally:
            self.charge(cause)

    def rolled_back(self, committed: dict | None) -> None:
        """The run went back to a checkpoint whose counters are `committed` (None: to its start): the productive
        time since then trained steps that no longer count, so it becomes `redone`."""
        self._add(PRODUCTIVE)
        kept = float((committed or {}).get(PRODUCTIVE, 0.0))
        self.seconds[LOST + REDONE] += self.seconds[PRODUCTIVE] - kept
        self.seconds[PRODUCTIVE] = kept

    def ledger(self) -> dict[str, float]:
        """The counters up to now: what a checkpoint's meta stores."""
        self._add(PRODUCTIVE)
        return dict(self.seconds)

    def summary(self) -> dict[str, float]:
        """Goodput and its breakdown, for a metrics line."""
        return _figures(self.ledger(), time.time() - self.started)

    def _add(self, key: str) -> None:
        now = time.monotonic()
        self.seconds[key] += now - self._mark
        self._mark = now


def _resumed(committed: dict, dropped: list[dict]) -> dict[str, float]:
    kept = {key: float(committed.get(key, 0.0)) for key in COUNTERS}
    last = next((line for line in reversed(dropped) if PRODUCTIVE in line), None)
    if last is None:
        return kept
    seconds = {key: float(last.get(key, 0.0)) for key in COUNTERS}
    seconds[LOST + REDONE] += seconds[PRODUCTIVE] - kept[PRODUCTIVE]
    seconds[PRODUCTIVE] = kept[PRODUCTIVE]
    return seconds


def _first_start(path: epath.Path) -> float:
    if path.exists():
        return float(json.loads(path.read_text())["started"])
    return _IMPORTED if _run_start is None else _run_start


def final_goodput(workdir: epath.Path) -> dict[str, float] | None:
    """The run's goodput now, from its last metrics line's counters: the time since that line (the final save, the
    exit) counts as lost. None when no line has them yet."""
    last = next((record for record in reversed(read_jsonl(workdir / "metrics.jsonl")) if PRODUCTIVE in record), None)
    if last is None:
        return None
    return _figures({key: float(last.get(key, 0.0)) for key in COUNTERS},
                    time.time() - _first_start(workdir / START_FILE))


def describe(figures: dict[str, float]) -> str:
    """One line for a person: the goodput, then where the rest of the wall time went."""
    lost = ", ".join(f"{key.removeprefix(LOST)} {seconds:.0f} s" for key, seconds in figures.items()
                     if key.startswith(LOST))
    return (f"goodput {figures[GOODPUT]:.1%}: {figures[PRODUCTIVE]:.0f} s of productive steps in "
            f"{figures[WALL]:.0f} s; lost: {lost}")


def _figures(ledger: dict[str, float], wall: float) -> dict[str, float]:
    wall = max(wall, 1e-9)
    restart = max(0.0, wall - sum(ledger.values()))
    return {GOODPUT: ledger[PRODUCTIVE] / wall, WALL: wall, **ledger, LOST + RESTART: restart}
