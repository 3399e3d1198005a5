"""benchmarks/attention.py runs end to end on this CPU, PyTorch's fused attention included (`--torch`), with the
rows per call that `--batch` sets: each kernel's forward and forward + backward times and the JSON line."""

from __future__ import annotations

import json
import subprocess
import sys

from config_files import REPO


def test_attention_benchmark_times_flash_and_pytorch_on_the_same_shapes():
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "attention.py"), "--seqs", "64,128", "--heads", "4", "--kv_heads",
         "2", "--head_dim", "16", "--batch", "3", "--impls", "flash,xla", "--torch", "--repeats", "1"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["batch"], result["heads"], result["kv_heads"]) == (3, 4, 2)
    assert [row["seq"] for row in result["results"]] == [64, 128]
    for row in result["results"]:
        for kernel in ("flash", "xla", "torch_sdpa"):
            assert 0 < row[f"{kernel}_forward_seconds"] and 0 < row[f"{kernel}_seconds"], kernel
        assert "torch_sdpa_temp_mib" not in row and row["flash_temp_mib"] > 0
    assert " torch_sdpa " in proc.stdout


def test_attention_benchmark_rejects_a_batch_below_one():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "attention.py"), "--batch", "0"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "--batch at least 1" in proc.stderr
