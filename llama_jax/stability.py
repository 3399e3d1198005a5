"""Telling a bad step from a good one: a non-finite loss or gradient norm, or a loss spike.

Large runs diverge now and then (a bad batch, an unlucky update); the remedies in use are to drop the update
(`stability.policy = "skip"`, decided inside the step against the threshold given to it), or to go back to the last
checkpoint and carry on past the batches that caused it ("rollback", PaLM's remedy), or to stop before the bad state
is saved ("stop"). A spike is a loss above `spike_factor` x the median of the last `window` good losses; it is looked
for only once that window is full, so the fast early fall of the loss is never mistaken for one.
"""

from __future__ import annotations

import collections
import math

import numpy as np

from llama_jax.errors import LlamaJaxError


class Diverged(LlamaJaxError):
    """The run met more bad steps than `stability.max_events` allows, or one under the "stop" policy."""


class LossGuard:
    """Keeps the recent good losses and judges new ones."""

    def __init__(self, spike_factor: float, window: int):
        self.spike_factor = spike_factor
        self._recent: collections.deque[float] = collections.deque(maxlen=window)

    def threshold(self) -> float:
        """The largest loss that is not a spike (inf while there is no full window, or with spikes not looked for)."""
        if not self.spike_factor or len(self._recent) < self._recent.maxlen:
            return math.inf
        return self.spike_factor * float(np.median(self._recent))

    def problem(self, loss: float, grad_norm: float) -> str | None:
        """Why this step is bad (None: it is good, and joins the window)."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return f"non-finite loss {loss} or gradient norm {grad_norm}"
        limit = self.threshold()
        if loss > limit:
            return (f"loss spike: {loss:.4f} > {self.spike_factor} x the median {limit / self.spike_factor:.4f} of the "
                    f"last {len(self._recent)} losses")
        self._recent.append(loss)
        return None

    @property
    def recent(self) -> list[float]:
        """The window's losses, oldest first: saved with each checkpoint, so that a run resumed (or rolled back) there
        judges its next steps as the uninterrupted run did."""
        return list(self._recent)

    def restore(self, losses: list[float]) -> None:
        self._recent.clear()
        self._recent.extend(losses)
