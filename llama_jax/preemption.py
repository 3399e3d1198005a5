"""Stopping a run cleanly: SIGTERM, Ctrl-C and host-maintenance notices become a flag the training loop reads
between steps, so that the step in flight finishes and is checkpointed before the process exits (with
`exit_codes.PREEMPTED`, which `train.py` gives a `Preempted` run)."""

from __future__ import annotations

import os
import signal
import sys

import jax
from etils import epath

from llama_jax import maintenance
from llama_jax.errors import LlamaJaxError


class Preempted(LlamaJaxError):
    """Raised after a SIGTERM (or a TPU maintenance notice) once the current step is checkpointed."""

    def __init__(self, step: int, directory: epath.Path):
        super().__init__(f"preempted: checkpoint saved at step {step} in {directory}; rerun the same command to resume")
        self.step = step


class PreemptionFlag:
    """Turns SIGTERM, a first Ctrl-C (SIGINT: an interactive run, a notebook's interrupt) or a GCE host-maintenance
    notice (`checkpoint.maintenance_url`) into a flag the loop checks between steps, so the step in flight finishes
    and is saved. A second Ctrl-C stops at once, without saving.

    With several processes SIGTERM is left to JAX's preemption service: it catches SIGTERM on any host and makes
    every host agree on the step to save at (`reached_preemption`), where flags of their own would let the hosts stop
    at different steps and wait for each other forever. A Ctrl-C or a maintenance notice there becomes a SIGTERM to
    this process, so that the service spreads it the same way and no step pays for a collective of its own."""

    def __init__(self, maintenance_url: str):
        self.raised = False
        self._interrupted = False
        self._installed = jax.process_count() == 1
        if self._installed:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        self._previous_interrupt = signal.signal(signal.SIGINT, self._interrupt)
        url = maintenance.maintenance_url(maintenance_url)
        self._watch = maintenance.MaintenanceWatch(url, self._notice) if url else None

    def _handle(self, signum, frame):
        self.raised = True

    def _interrupt(self, signum, frame):
        if self._interrupted:
            raise KeyboardInterrupt
        self._interrupted = True
        print("\nCtrl-C: the current step finishes and is saved, then the run exits (Ctrl-C again: stop now, without "
              "saving)", file=sys.stderr, flush=True)
        self._stop()

    def _notice(self, event: str) -> None:
        print(f"host maintenance notice ({event}): saving at the end of the current step, then exiting",
              file=sys.stderr, flush=True)
        self._stop()

    def _stop(self) -> None:
        if self._installed:
            self.raised = True
        else:
            os.kill(os.getpid(), signal.SIGTERM)

    def restore(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
        signal.signal(signal.SIGINT, self._previous_interrupt)
