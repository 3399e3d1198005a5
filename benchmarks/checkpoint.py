"""How long a checkpoint holds training up: the blocking part of an asynchronous save (the step loop waits for it),
the whole save (until the files are final), and a restore, for the tiny model and a ~116M-parameter one.

    python benchmarks/checkpoint.py [--repeats 3]

A save is parameters + AdamW state (three times the parameters, float32) + the data-iterator position + the config,
exactly what the trainer writes (`checkpoint.Checkpointer`), on one device into a local temporary directory. Each
figure is the median of the repeats. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import tempfile
import time

import grain
import jax

from llama_jax import checkpoint, train_step, trainer
from llama_jax.config import default_config, model_section
from llama_jax.model import ModelDef, param_count
from llama_jax.optim import make_optimizer

SIZES = {"tiny": model_section("tiny"), "medium-4-layers": model_section("medium", n_layers=4)}


def measure(name: str, model: dict, repeats: int) -> dict:
    cfg = default_config()
    cfg.model = model
    model_def = ModelDef(trainer.model_config(cfg))
    tx = make_optimizer(cfg.optim, cfg.train.steps)
    state = jax.jit(functools.partial(train_step.init_state, model_def, tx, 0))()
    jax.block_until_ready(state)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    data_iter = iter(grain.MapDataset.range(1000).to_iter_dataset())
    meta = {"config": cfg.to_dict()}
    blocking, total, restore = [], [], []
    with tempfile.TemporaryDirectory() as directory:
        saver = checkpoint.Checkpointer(directory, max_to_keep=repeats + 1)
        for step in range(1, repeats + 1):
            start = time.perf_counter()
            saver.save(step, state.params, state.opt_state, data_iter, meta)
            blocking.append(time.perf_counter() - start)
            saver.wait()
            total.append(time.perf_counter() - start)
        for step in range(1, repeats + 1):
            start = time.perf_counter()
            restored = saver.restore(step, abstract.params, abstract.opt_state, data_iter)
            jax.block_until_ready(restored)
            restore.append(time.perf_counter() - start)
        saver.close()
    state_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state)))
    return {"name": name, "params": param_count(model_def.cfg), "state_mb": state_bytes / 2**20,
            "save_blocking_s": statistics.median(blocking), "save_total_s": statistics.median(total),
            "restore_s": statistics.median(restore)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [measure(name, model, args.repeats) for name, model in SIZES.items()]
    print(f"{'model':>16} {'params':>12} {'state MB':>9} {'save blocks':>12} {'save total':>11} {'restore':>8}")
    for r in rows:
        print(f"{r['name']:>16} {r['params']:>12,} {r['state_mb']:>9.0f} {r['save_blocking_s']:>11.3f}s "
              f"{r['save_total_s']:>10.3f}s {r['restore_s']:>7.3f}s")
    print(json.dumps({"sizes": rows}))


if __name__ == "__main__":
    main()
