"""Conversion streams: a conversion's peak memory is a few times the largest parameter, not the model.

Each conversion runs in a subprocess that first imports what conversion imports, then resets its peak resident
memory and reports how far the conversion took it above where it started. The model's size is nine times its largest
parameter and every bound is lower, so a conversion that held the model would fail."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from test_convert import add_tokenizer

from llama_jax.convert import _weights, config_to_hf
from llama_jax.model import LlamaConfig

# nine float32 parameters of 64 MiB (wq, wk, wv, wo, w_gate, w_up, w_down stacked over 16 layers; embed; lm_head)
CFG = LlamaConfig(vocab_size=16384, dim=1024, n_layers=16, n_heads=8, n_kv_heads=8, ffn_dim=1024, dtype="float32",
                  param_dtype="float32")
MIB = 2**20
# peak above the imports, in largest parameters; measured on 2 shared CPUs: 3.0 to 5.0, 2.7, 1.7 (Orbax's writes
# vary with the threads' timing)
BOUNDS = {"hf -> ours": 6, "ours -> meta (2 ranks)": 3.5, "meta -> hf": 2.5}

# Runs a module's main in a process that has already imported what conversion imports, resets its peak resident
# memory (Linux's clear_refs "5"), and prints how far the run took it above the memory it started from: the part
# of the peak that the conversion itself costs.
PEAK = """
import pathlib, runpy, sys, tempfile
import llama_jax.average, llama_jax.convert, llama_jax.meta_format, llama_jax.ours_format, torch

with tempfile.TemporaryDirectory() as tmp:  # what writing Meta's files imports on first use (about 70 MiB)
    llama_jax.meta_format._reserve(torch, pathlib.Path(tmp) / "x.pth", {"x": (1,)}, torch.float32)

def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0])

open("/proc/self/clear_refs", "w").write("5")
start = status("VmRSS")
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    runpy.run_module(module, run_name="__main__")
except SystemExit as e:
    code = e.code
print("peak_kib", status("VmHWM") - start)
sys.exit(code)
"""


def peak_mib(*args) -> float:
    """How far the run of `args` (a module and its arguments) took resident memory above its start, in MiB."""
    result = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return int(result.stdout.split("peak_kib")[-1]) / 1024


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """The model as a Hugging Face directory, one safetensors file per layer, written without building a model;
    deleted after this module's tests (576 MiB)."""
    path = tmp_path_factory.mktemp("big_hf")
    rng = np.random.default_rng(0)
    files = {}
    for weight in _weights(CFG):
        for i in range(CFG.n_layers) if weight.stacked else [None]:
            files.setdefault(i, {})[weight.hf_name.format(i=i)] = rng.standard_normal(weight.hf_shape, np.float32)
    for i, tensors in files.items():
        save_file(tensors, path / f"model-{'top' if i is None else i}.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config_to_hf(CFG, "float32")))
    add_tokenizer(path)
    yield path
    shutil.rmtree(path)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures with Linux's /proc/self")
def test_conversion_memory_stays_near_the_largest_parameter(hf_dir, tmp_path):
    model_mib = sum(math.prod(w.hf_shape) * (CFG.n_layers if w.stacked else 1) for w in _weights(CFG)) * 4 / MIB
    largest_mib = max(math.prod(w.hf_shape) * (CFG.n_layers if w.stacked else 1) for w in _weights(CFG)) * 4 / MIB
    steps = {
        "hf -> ours": ("llama_jax.convert", "--from", "hf", "--to", "ours", hf_dir, tmp_path / "ours"),
        "ours -> meta (2 ranks)": ("llama_jax.convert", "--from", "ours", "--to", "meta", tmp_path / "ours",
                                   tmp_path / "meta", "--shards", 2),
        "meta -> hf": ("llama_jax.convert", "--from", "meta", "--to", "hf", tmp_path / "meta", tmp_path / "hf"),
    }
    peaks = {name: peak_mib(*args) for name, args in steps.items()}
    print(f"\nmodel {model_mib:.0f} MiB, largest parameter {largest_mib:.0f} MiB; peak above the imports: "
          + ", ".join(f"{name} {mib:.0f} MiB ({mib / largest_mib:.1f}x)" for name, mib in peaks.items()))
    assert model_mib >= 9 * largest_mib
    for name, mib in peaks.items():
        assert mib < BOUNDS[name] * largest_mib, f"{name}: {mib:.0f} MiB"
