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
    9.05940, 9.04394, 8.93046, 8.63800, 8.42920, 8.27305,
    8.16865, 7.79819, 7.67022, 7.39452, 7.20844, 7.04276,
    7.20909, 7.19852, 7.15130, 6.77260, 6.88269, 7.00296,
    6.74361, 7.02163, 6.92249, 6.92402, 6.97996, 6.72601,
    6.78055, 6.78462, 6.86145, 6.73581, 6.56089, 6.79309,
]
GOLDEN_EVAL_LOSS = 6.82993


def test_the_default_job_follows_the_golden_loss_curve(tmp_path, cache_dir):
    result = run_cli(tmp_path / "golden", cache_dir, *GOLDEN_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_metrics(tmp_path / "golden")
    assert [m["step"] for m in lines] == list(range(1, 31))
    # Same machine type, same XLA: the curve reproduces to float32 rounding; 1e-4 leaves room for nothing else.
    np.testing.assert_allclose([m["loss"] for m in lines], GOLDEN, rtol=1e-4)
    np.testing.assert_allclose(lines[-1]["eval_loss"], GOLDEN_EVAL_LOSS, rtol=1e-4)
