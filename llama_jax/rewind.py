"""Rewinding a run to an earlier checkpoint, and skipping the data that followed it.

    python -m llama_jax.rewind WORKDIR --step N [--skip_batches K]

When a large run's loss diverges late, the remedy in use is by hand: go back to a checkpoint from before the trouble
and train on past the batches that preceded it (PaLM restarted about 100 steps before a spike and skipped 200-500
batches; the OPT and BLOOM logbooks record many such restarts), often with a changed setting. The stability policies
(llama_jax/stability.py) do this automatically for the newest checkpoint; this command goes back further.

It makes checkpoint N the newest: the later ones are moved, not deleted, into WORKDIR/rewound/<time>/<step> (with a
copy of metrics.jsonl and skip_batches.json as they stood, and an averaged model of a later phase end, which no
longer describes the run), so the next `python -m llama_jax.train` with this workdir resumes from N as from any
checkpoint. That run drops the metrics lines past N as it does after a crash, and counts their time as lost
(`redone`) in its goodput.

`--skip_batches K` records in WORKDIR/skip_batches.json that a run resuming from N first draws and discards the K
batches that follow it. The record belongs to step N: a run that dies before its next save and resumes from N again
skips them again, and one that resumes from a later checkpoint, whose data position already lies past them, does
not. A rewind drops the records of N and of later steps, which belonged to the checkpoints it moves aside. A batch
is a function of its position in the data (see data/pipeline.py), so a skipping run sees exactly the batches an
uninterrupted run would have met K steps later.

A rewind needs the workdir to itself: it refuses while a run holds it. Run it on one machine (a pod's processes read
the result from the shared workdir when they start).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys

from etils import epath

from llama_jax import workdir as workdir_lib
from llama_jax.checkpoint import saved_steps
from llama_jax.errors import CheckpointError, ConfigError, LlamaJaxError

SKIPS_FILE = "skip_batches.json"


def rewind(workdir: str, step: int, skip_batches: int = 0) -> str:
    """Makes checkpoint `step` the workdir's newest and records the batches to skip after it; returns what it did."""
    directory = workdir_lib.resolve(workdir)
    checkpoints = directory / "checkpoints"
    steps = _saved_steps(checkpoints)
    if step not in steps:
        raise CheckpointError(f"{checkpoints} has no checkpoint of step {step} (its steps: {steps}): rewind to one of "
                              "them")
    if skip_batches < 0:
        raise ConfigError(f"--skip_batches={skip_batches}: give the number of batches to skip, 0 or more")
    hold = workdir_lib.lock(directory)
    try:
        later = [s for s in steps if s > step]
        stale_average = _averaged_after(directory / "averaged", step)
        done = []
        if later or stale_average:
            aside = directory / "rewound" / datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
            aside.mkdir(parents=True)
            # written first: in a bucket, a folder exists once it holds an object, and a rename needs its target's
            (aside / "rewind.json").write_text(json.dumps({"to_step": step, "moved_steps": later,
                                                           "averaged_moved": stale_average,
                                                           "skip_batches": skip_batches}) + "\n")
            for kept in ("metrics.jsonl", SKIPS_FILE):
                if (directory / kept).exists():
                    (directory / kept).copy(aside / kept)
            for s in later:
                (checkpoints / str(s)).rename(aside / str(s))
            if stale_average:
                (directory / "averaged").rename(aside / "averaged")
            done.append(f"moved checkpoints {later}" + (" and the averaged model" if stale_average else "") +
                        f" to {aside}")
        _record_skip(directory / SKIPS_FILE, step, skip_batches)
    finally:
        hold.release()
    skipping = f", skipping the {skip_batches} batches after it" if skip_batches else ""
    return (f"{directory}: {'; '.join(done) or 'no later checkpoint'}. The next run with this workdir resumes from step "
            f"{step}{skipping}.")


def batches_to_skip(workdir: epath.Path, step: int) -> int:
    """How many batches a run resuming from checkpoint `step` discards first (0 unless a rewind asked for some)."""
    record = workdir / SKIPS_FILE
    return json.loads(record.read_text()).get(str(step), 0) if record.exists() else 0


def _saved_steps(checkpoints: epath.Path) -> list[int]:
    if not checkpoints.is_dir():
        raise CheckpointError(f"{checkpoints} does not exist: give the --workdir of a run that saved checkpoints")
    return saved_steps(checkpoints)


def _averaged_after(averaged: epath.Path, step: int) -> bool:
    """Whether WORKDIR/averaged holds a phase's average of checkpoints later than `step`."""
    record = averaged / "eval.json"
    return record.exists() and max(json.loads(record.read_text())["steps"], default=0) > step


def _record_skip(path: epath.Path, step: int, batches: int) -> None:
    """The skip for `step`, in place of the records of it and of later steps: those belong to checkpoints the
    rewind moved aside, and a run that came back to such a step would skip again (the copy under
    WORKDIR/rewound/<time> keeps them)."""
    skips = json.loads(path.read_text()) if path.exists() else {}
    skips = {key: value for key, value in skips.items() if int(key) < step}
    if batches:
        skips[str(step)] = batches
    if skips or path.exists():
        workdir_lib.write_whole(path, json.dumps(skips, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.rewind", description=__doc__.split("\n")[0])
    parser.add_argument("workdir", help="the run's --workdir (a local path or a URL such as gs://bucket/run)")
    parser.add_argument("--step", type=int, required=True, help="the saved step to go back to")
    parser.add_argument("--skip_batches", type=int, default=0,
                        help="batches that a run resuming from that step discards first (default 0)")
    args = parser.parse_args(argv)
    try:
        print(rewind(args.workdir, args.step, args.skip_batches))
    except LlamaJaxError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
