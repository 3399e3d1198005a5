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
    9.05940, 9.04394, 8.93052, 8.63799, 8.42922, 8.27306,
    8.16875, 7.79832, 7.67015, 7.39458, 7.20845, 7.04290,
    7.20936, 7.19923, 7.15046, 6.77215, 6.88223, 7.00251,
    6.74423, 7.02301, 6.92917, 6.92031, 6.98386, 6.72124,
    6.77696, 6.78052, 6.85675, 6.73341, 6.55743, 6.79339,
]
GOLDEN_EVAL_LOSS = 6.82836


def test_the_default_job_follows_the_golden_loss_curve(tmp_path, cache_dir):
    result = run_cli(tmp_path / "golden", cache_dir, *GOLDEN_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_metrics(tmp_path / "golden")
    assert [m["step"] for m in lines] == list(range(1, 31))
    # Same machine type, same XLA: the curve reproduces to float32 rounding; 1e-4 leaves room for nothing else.
    np.testing.assert_allclose([m["loss"] for m in lines], GOLDEN, rtol=1e-4)
    np.testing.assert_allclose(lines[-1]["eval_loss"], GOLDEN_EVAL_LOSS, rtol=1e-4)
