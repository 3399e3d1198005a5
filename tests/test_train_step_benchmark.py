"""benchmarks/train_step.py names the machine its figures come from: the processor and its bfloat16 matmul units."""

import importlib.util
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpuinfo(name: str, flags: str) -> str:
    core = f"processor\t: {{}}\nvendor_id\t: x\nmodel name\t: {name}\nflags\t\t: fpu sse2 {flags} avx2\n\n"
    return core.format(0) + core.format(1)


@pytest.mark.parametrize("flags, units", [
    ("avx512f amx_tile amx_bf16 avx512_bf16 amx_int8", ["amx_bf16", "avx512_bf16"]),
    ("avx512f avx512_bf16 avx512_vnni", ["avx512_bf16"]),
    ("avx512f", []),
])
def test_the_machine_is_named_with_its_bfloat16_units(bench, flags, units):
    machine = bench.describe_machine(cpuinfo("Some CPU @ 2.1GHz", flags))
    assert machine == {"processor": "Some CPU @ 2.1GHz", "cores": os.cpu_count(), "bfloat16_units": units}


def test_without_cpuinfo_the_processor_still_has_a_name(bench):
    machine = bench.describe_machine("")
    assert machine["processor"] and machine["bfloat16_units"] == []


def test_this_machine(bench):
    machine = bench.describe_machine()
    assert machine["processor"] and machine["cores"] == os.cpu_count()
    if Path("/proc/cpuinfo").exists():
        assert machine["processor"] in Path("/proc/cpuinfo").read_text()
