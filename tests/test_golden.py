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
    9.05941, 9.04395, 8.93051, 8.63797, 8.42914, 8.27299,
    8.16871, 7.79827, 7.67002, 7.39448, 7.20835, 7.04280,
    7.20925, 7.19893, 7.15102, 6.77175, 6.88278, 7.00232,
    6.74325, 7.02287, 6.92125, 6.92440, 6.97758, 6.72572,
    6.78151, 6.78377, 6.86175, 6.73701, 6.56225, 6.79294,
]
GOLDEN_EVAL_LOSS = 6.82842


def test_the_default_job_follows_the_golden_loss_curve(tmp_path, cache_dir):
    result = run_cli(tmp_path / "golden", cache_dir, *GOLDEN_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_metrics(tmp_path / "golden")
    assert [m["step"] for m in lines] == list(range(1, 31))
    # Same machine type, same XLA: the curve reproduces to float32 rounding; 1e-4 leaves room for nothing else.
    np.testing.assert_allclose([m["loss"] for m in lines], GOLDEN, rtol=1e-4)
    np.testing.assert_allclose(lines[-1]["eval_loss"], GOLDEN_EVAL_LOSS, rtol=1e-4)
