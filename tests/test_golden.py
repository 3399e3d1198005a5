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
    9.05941, 9.04395, 8.93051, 8.63798, 8.42913, 8.27299,
    8.16870, 7.79819, 7.67012, 7.39444, 7.20842, 7.04282,
    7.20918, 7.19868, 7.15075, 6.77240, 6.88284, 7.00283,
    6.74406, 7.02262, 6.92387, 6.92267, 6.98166, 6.72488,
    6.78142, 6.78449, 6.85986, 6.73472, 6.56038, 6.79271,
]
GOLDEN_EVAL_LOSS = 6.82975


def test_the_default_job_follows_the_golden_loss_curve(tmp_path, cache_dir):
    result = run_cli(tmp_path / "golden", cache_dir, *GOLDEN_OVERRIDES)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = read_metrics(tmp_path / "golden")
    assert [m["step"] for m in lines] == list(range(1, 31))
    # Same machine type, same XLA: the curve reproduces to float32 rounding; 1e-4 leaves room for nothing else.
    np.testing.assert_allclose([m["loss"] for m in lines], GOLDEN, rtol=1e-4)
    np.testing.assert_allclose(lines[-1]["eval_loss"], GOLDEN_EVAL_LOSS, rtol=1e-4)
