"""Which source each row of the global row stream comes from, as a pure function of the row's index.

Rows are dealt in blocks of `block_rows`. Every block holds the same number of rows of each source (the weights
times the block size, rounded by largest remainder). Within a block each source's rows are spread evenly, at
a random phase drawn per block, so any run of consecutive rows (a batch) holds each source's share to within
a row or two, not just the block as a whole. A row's source and its index among that source's rows are
computed from (seed, row) alone, without replaying the stream: each process builds only its own rows, a run
resumes at any step on any topology, and the realised proportions equal the rounded weights exactly at every
block boundary.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from llama_jax.errors import ConfigError

BLOCK_ROWS = 1024


class Mixture:
    def __init__(self, weights: Sequence[float], seed: Sequence[int], block_rows: int = BLOCK_ROWS):
        weights = np.asarray(weights, dtype=np.float64)
        if weights.ndim != 1 or len(weights) == 0 or not np.all(np.isfinite(weights)) or np.any(weights <= 0):
            raise ConfigError(f"mixture weights must be positive numbers, got {weights.tolist()}: fix the weights")
        self.weights = weights / weights.sum()
        self.counts = _largest_remainder(self.weights * block_rows)
        if np.any(self.counts == 0):
            raise ConfigError(
                f"a mixture weight below 1/{block_rows} of the total gets no rows: raise it, or drop that source "
                f"(normalised weights {np.round(self.weights, 6).tolist()})"
            )
        self.block_rows = block_rows
        self.seed = tuple(seed)

    @property
    def num_sources(self) -> int:
        return len(self.counts)

    def assign(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, index among that source's rows) for each global row index."""
        rows = np.asarray(rows, dtype=np.int64)
        source = np.empty_like(rows)
        index = np.empty_like(rows)
        blocks, slots = np.divmod(rows, self.block_rows)
        for block in np.unique(blocks):
            here = blocks == block
            pattern, rank = self._block(int(block))
            source[here] = pattern[slots[here]]
            index[here] = block * self.counts[source[here]] + rank[slots[here]]
        return source, index

    def rows_before(self, row: int) -> np.ndarray:
        """Per source, how many of the global rows [0, row) it supplied."""
        block, slot = divmod(int(row), self.block_rows)
        pattern, _ = self._block(block)
        return block * self.counts + np.bincount(pattern[:slot], minlength=self.num_sources)

    @functools.lru_cache(maxsize=64)
    def _block(self, block: int) -> tuple[np.ndarray, np.ndarray]:
        """The block's source per slot, and each slot's rank among the block's slots of the same source."""
        rng = np.random.default_rng([*self.seed, block])
        phases = rng.random(self.num_sources)
        # Source s takes the slots nearest (j + phase_s) / count_s for j < count_s: evenly spaced, randomly shifted.
        keys = np.concatenate([(np.arange(c) + phase) / c for c, phase in zip(self.counts, phases)])
        pattern = np.repeat(np.arange(self.num_sources), self.counts)[np.argsort(keys, kind="stable")]
        order = np.argsort(pattern, kind="stable")
        first_slot_of_source = np.concatenate([[0], np.cumsum(self.counts)[:-1]])
        rank = np.empty(self.block_rows, dtype=np.int64)
        rank[order] = np.arange(self.block_rows) - first_slot_of_source[pattern[order]]
        return pattern, rank


def _largest_remainder(quotas: np.ndarray) -> np.ndarray:
    """Integers summing to round(sum(quotas)) that are each within 1 of their quota."""
    counts = np.floor(quotas).astype(np.int64)
    short = round(quotas.sum()) - int(counts.sum())
    counts[np.argsort(-(quotas - counts), kind="stable")[:short]] += 1
    return counts
