"""A `jax.profiler` trace of a few training steps (`train.profile_steps`), to see where a step's time goes.

The trace starts after the first `train.profile_skip` steps this process runs of a phase, since the first compiles
the step and the next is the first to use its memory (see benchmarks/README.md, "The first step"), so that it shows
steady steps; each phase of a run compiles a step of its own, so each is traced in its own window (into
WORKDIR/profile/<phase>). Each traced step is marked as one (`StepTraceAnnotation`, with its step number), and
waited for inside that mark: a step's dispatch returns before its work is done (on a CPU too), so the mark would
otherwise hold the dispatch only, and XProf's step times would be dispatch times. So in the trace the loop's work
for the next step (taking its batch, placing it on the devices) no longer overlaps this step's; it shows as the gap
between the marks. The last step's work is all in the trace.

Only process 0 traces (MaxText, too, keeps only the first host's trace unless told otherwise): every process runs
the same program, and processes that share a host would write files of the same name (a trace's are named after
its host). JAX writes the trace into a local temporary directory, with `perfetto_trace.json.gz` beside XProf's files
(ui.perfetto.dev opens it without TensorBoard); when it stops, the files are copied into WORKDIR/profile through
`etils.epath`, as the run's other files reach a bucket. A trace that cannot be written there is a warning: it must
not stop the training it was watching (and JAX, when its own export fails, stays in a state that starts no other
trace, which writing into a fresh directory of its own avoids).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

import jax
from etils import epath

T = TypeVar("T")


class StepProfiler:
    """Traces steps `skip + 1` to `skip + steps` of this process's run into `directory` (no trace when `steps` is
    0, or in a process other than 0)."""

    def __init__(self, directory: epath.Path, skip: int, steps: int, say: Callable[[str], None] = print):
        """`say` prints a line of news (the training loop's goes above its progress bar)."""
        self.directory, self.skip, self.say = directory, skip, say
        self.steps = steps if jax.process_index() == 0 else 0
        self.started = 0  # steps this process has dispatched
        self.local: Path | None = None  # where the open trace is being written

    def step(self, step_num: int, dispatch: Callable[[], T]) -> T:
        """`dispatch()` (one training step's dispatch), traced as step `step_num` of the run when it falls in the
        window."""
        if self.steps and self.started == self.skip:
            self.local = Path(tempfile.mkdtemp(prefix="llama_jax_profile_"))
            jax.profiler.start_trace(self.local, create_perfetto_trace=True)
            self.say(f"profile: tracing steps {step_num}-{step_num + self.steps - 1} into {self.directory}")
        self.started += 1
        if self.local is None:
            return dispatch()
        with jax.profiler.StepTraceAnnotation("train", step_num=step_num):
            outputs = jax.block_until_ready(dispatch())
        if self.started == self.skip + self.steps:
            self.close()
        return outputs

    def close(self) -> None:
        """Stops an open trace (the window's end, or the run's when it ends inside it) and copies it out; at the
        run's end, says so when the run ended before the window."""
        if self.local is None:
            if self.steps and self.started <= self.skip:
                self.say(f"profile: nothing traced: this process ran {self.started} step(s) here, and the trace starts "
                         f"after train.profile_skip={self.skip}")
            return
        try:
            jax.profiler.stop_trace()
            for file in self.local.rglob("*"):
                if file.is_file():
                    target = self.directory / file.relative_to(self.local).as_posix()
                    target.parent.mkdir(parents=True, exist_ok=True)
                    epath.Path(file).copy(target, overwrite=True)
        except (OSError, RuntimeError) as e:
            print(f"warning: profile: the trace could not be written to {self.directory} ({e}); training goes on",
                  file=sys.stderr, flush=True)
        else:
            self.say(f"profile: written to {self.directory} (view it with TensorBoard's profile plugin: pip install "
                     f"tensorboard-plugin-profile; tensorboard --logdir {self.directory})")
        finally:
            shutil.rmtree(self.local, ignore_errors=True)
            self.local = None
