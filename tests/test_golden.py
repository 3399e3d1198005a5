"""The golden run: 30 steps of configs/tiny.py with a fixed seed and data, the loss of every step pinned.

Any change in training behaviour (initialisation, data order, the model's numerics, the optimizer, the schedule) moves
this curve. Update GOLDEN only on purpose, saying why in the commit, from the output of:

    python -m llama_jax.train --config configs/tiny.py --workdir /tmp/golden --config.train.steps=30 \
        --config.optim.warmup_steps=10 --config.train.log_every=1 --config.train.eval_every=0 \
        --config.checkpoint.every_steps=1000
"""

import numpy as np

from cli_run import cache_dir, read_metrics, run_cli  # noqa: F401 (a fixture)

GOLDEN_OVERRIDES = ("--config.train.steps=30", "--config.optim.warmup_steps=10", "--config.train.log_every=1",
                    "--config.train.eval_every=0", "--config.checkpoint.every_steps=1000")
GOLDEN = [
    9.05938, 9.04391, 8.93040, 8.63798, 8.42920, 8.27300,
    8.16870, 7.79819, 7.67007, 7.39440, 7.20840, 7.04280,
    7.20918, 7.19869, 7.15074, 6.77219, 6.88274, 7.00260,
    6.74416, 7.02282, 6.92267, 6.92342, 6.97902, 6.72468,
    6.78048, 6.78301, 6.86009, 6.73574, 6.56077, 6.79250,
]
GOLDEN_EVAL_LOSS = 6.82866


def test_the_default_job_follows_the_golden_loss_curve(tmp_path, cache_dir):
    result = run_cli(tmp_path / "golden", cache_dir, *GOLDEN_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_metrics(tmp_path / "golden")
    assert [m["step"] for m in lines] == list(range(1, 31))
    # Same machine type, same XLA: the curve reproduces to float32 rounding; 1e-4 leaves room for nothing else.
    np.testing.assert_allclose([m["loss"] for m in lines], GOLDEN, rtol=1e-4)
    np.testing.assert_allclose(lines[-1]["eval_loss"], GOLDEN_EVAL_LOSS, rtol=1e-4)
