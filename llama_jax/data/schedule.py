"""The batch-size and sequence-length schedule: which (global batch, seq_len) every step uses.

Llama 3 grows its batch during pretraining (4M tokens at sequence 4,096, then 8M at 8,192 after 252M tokens,
then 16M after 2.87T). A stage is given by the number of tokens seen at which it begins; it starts at the
first step whose tokens-seen count reaches that number. Stage boundaries are therefore a pure function of the
config, which is what lets the data pipeline place every step's rows without replaying the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from llama_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Stage:
    start_step: int
    stop_step: int | None  # None: the last stage runs for the rest of training
    start_tokens: int  # tokens consumed by all steps before start_step
    batch_size: int  # global, in sequences
    seq_len: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def num_steps(self) -> int | None:
        return None if self.stop_step is None else self.stop_step - self.start_step


class BatchSchedule:
    """Stages from a base (batch_size, seq_len) and a ramp of (tokens_seen, batch_size, seq_len) entries."""

    def __init__(self, batch_size: int, seq_len: int, ramp: Sequence[Sequence[int]] = ()):
        entries = [(0, batch_size, seq_len)] + [_checked_entry(i, e) for i, e in enumerate(ramp)]
        for i in range(1, len(entries)):
            if entries[i][0] <= entries[i - 1][0]:
                raise ConfigError(
                    f"data.ramp[{i - 1}] starts at {entries[i][0]:,} tokens, not after the previous stage "
                    f"({entries[i - 1][0]:,}): list the ramp's entries in increasing order of tokens_seen"
                )
        stages: list[Stage] = []
        step, tokens = 0, 0
        for i, (_, batch, length) in enumerate(entries):
            if i + 1 == len(entries):
                stages.append(Stage(step, None, tokens, batch, length))
                break
            steps = max(0, -(-(entries[i + 1][0] - tokens) // (batch * length)))
            stages.append(Stage(step, step + steps, tokens, batch, length))
            step, tokens = step + steps, tokens + steps * batch * length
        self.stages: tuple[Stage, ...] = tuple(stages)

    def stage_index(self, step: int) -> int:
        for i, stage in enumerate(self.stages):
            if stage.stop_step is None or step < stage.stop_step:
                return i
        raise AssertionError("the last stage has no end")

    def stage(self, step: int) -> Stage:
        return self.stages[self.stage_index(step)]

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by steps [0, step)."""
        stage = self.stage(step)
        return stage.start_tokens + (step - stage.start_step) * stage.tokens_per_step

    def steps_for_tokens(self, tokens: int) -> int:
        """The fewest steps whose batches hold at least `tokens` tokens."""
        for stage in self.stages:
            end_tokens = None if stage.stop_step is None else stage.start_tokens + stage.num_steps * stage.tokens_per_step
            if end_tokens is None or tokens <= end_tokens:
                return stage.start_step + max(0, -(-(tokens - stage.start_tokens) // stage.tokens_per_step))
        raise AssertionError("the last stage has no end")

    def placement(self, steps: int) -> list[tuple[int, int, int]]:
        """(first step, batch_size, seq_len) of each stage that steps [0, steps) use: two schedules of the same
        placement put the same rows into those steps, and have seen the same tokens after them."""
        return [(s.start_step, s.batch_size, s.seq_len) for s in self.stages
                if s.start_step < steps and s.num_steps != 0]

    @property
    def shapes(self) -> list[tuple[int, int]]:
        """The distinct (batch_size, seq_len) of the stages that have steps."""
        return list(dict.fromkeys((s.batch_size, s.seq_len) for s in self.stages if s.num_steps != 0))


def _checked_entry(index: int, entry: Sequence[int]) -> tuple[int, int, int]:
    fix = "each data.ramp entry is (tokens_seen, global batch_size, seq_len) with positive integers"
    if not isinstance(entry, (tuple, list)):
        raise ConfigError(f"data.ramp[{index}] = {entry!r} is not an entry: {fix}, inside a tuple of entries, e.g. "
                          "data.ramp=((8192, 32, 256),)")
    if len(entry) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in entry):
        raise ConfigError(f"data.ramp[{index}] = {tuple(entry)!r} is not three integers: {fix}")
    if min(entry) <= 0:
        raise ConfigError(f"data.ramp[{index}] = {tuple(entry)!r} has a non-positive value: {fix}")
    return tuple(entry)
