"""llama_jax/cpu_info.py: the processor and its bfloat16 matmul units, which benchmark tables name and the golden curve
is pinned by."""

import os
from pathlib import Path

import pytest

from llama_jax.cpu_info import bfloat16_unit, describe_cpu


def cpuinfo(name: str, flags: str) -> str:
    core = f"processor\t: {{}}\nvendor_id\t: x\nmodel name\t: {name}\nflags\t\t: fpu sse2 {flags} avx2\n\n"
    return core.format(0) + core.format(1)


@pytest.mark.parametrize("flags, units", [
    ("avx512f amx_tile avx512_bf16 amx_bf16 amx_int8", ["amx_bf16", "avx512_bf16"]),
    ("avx512f avx512_bf16 avx512_vnni", ["avx512_bf16"]),
    ("avx512f", []),
])
def test_the_cpu_is_named_with_its_bfloat16_units(flags, units):
    text = cpuinfo("Some CPU @ 2.1GHz", flags)
    assert describe_cpu(text) == {"processor": "Some CPU @ 2.1GHz", "cores": os.cpu_count(), "bfloat16_units": units}
    assert bfloat16_unit(text) == (units[0] if units else None)


def test_without_cpuinfo_the_processor_still_has_a_name():
    cpu = describe_cpu("")
    assert cpu["processor"] and cpu["bfloat16_units"] == [] and bfloat16_unit("") is None


def test_this_machine():
    cpu = describe_cpu()
    assert cpu["processor"] and cpu["cores"] == os.cpu_count()
    if Path("/proc/cpuinfo").exists():
        assert cpu["processor"] in Path("/proc/cpuinfo").read_text()
