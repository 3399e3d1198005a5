"""benchmarks/gpu.py runs end to end off a GPU (its "smoke" size), so that it still works when a GPU is lent.

Its figures mean nothing here; what is checked is that each stage ran: the kernel checks (the Triton kernel through
Pallas's interpreter within the bound, or skipped with the reason by a JAX that no longer ships it; cuDNN skipped
with the reason), our step and PyTorch's, the README table and
the JSON line.
"""

from __future__ import annotations

import json
import subprocess
import sys

from config_files import REPO
from jax_features import triton_attention_shipped


def test_gpu_benchmark_smoke_runs_every_stage_off_a_gpu():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--sizes", "smoke", "--attention", "flash",
         "--steps", "1", "--no-compile"], capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["checks"]["cudnn"].startswith("skipped: model.attention='cudnn' runs on NVIDIA GPUs only")
    checked = ("triton", "flash", "xla") if triton_attention_shipped() else ("flash", "xla")
    for kernel in checked:
        errors = result["checks"][kernel]
        assert set(errors) == {"out", "dq", "dk", "dv"} and max(errors.values()) <= 1.5e-2, kernel
    if triton_attention_shipped():
        assert result["checks"]["triton"]["out"] > 0  # a real comparison: bfloat16 kernels round differently
    else:
        assert result["checks"]["triton"].startswith("skipped: model.attention='triton' needs "
                                                     "jax.experimental.pallas.ops.gpu.attention, which JAX")
    (row,) = result["sizes"]
    assert (row["name"], row["attention"], row["batch"], row["seq"]) == ("smoke", "flash", 2, 256)
    assert row["tokens_per_s"] > 0 and row["torch_tokens_per_s"] > 0 and row["mfu"] > 0
    assert row["ratio"] == row["tokens_per_s"] / row["torch_tokens_per_s"]
    assert "| smoke | 0.00B | 2 x 256 | flash |" in proc.stdout  # the README's table
