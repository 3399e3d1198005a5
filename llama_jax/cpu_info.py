"""What this host's CPU is, for benchmark tables and for tests whose exact figures depend on it.

XLA's CPU backend (through YNNPACK) and PyTorch's oneDNN run bfloat16 products on whichever unit the CPU has: AMX tiles
or AVX-512 BF16 dot products. The unit decides the speed (PyTorch's AMX products ran 1.6-2.3x as fast as XLA's best
form on an Intel Xeon; on an AMD EPYC with AVX-512 BF16 alone, 1.08x) and the order in which a product's terms are
summed, so bfloat16 results repeat to the last bit only on the same kind of unit (`tests/test_golden.py`).
"""

from __future__ import annotations

import os
import platform

# x86 flags of the units that multiply bfloat16, in the order the kernels prefer them (AMX tiles, AVX-512 dot products)
BFLOAT16_UNITS = ("amx_bf16", "avx512_bf16")


def describe_cpu(cpuinfo: str | None = None) -> dict:
    """The processor, its core count and the bfloat16 matmul units among its flags, from `cpuinfo` (the text of
    Linux's /proc/cpuinfo, read when not given; elsewhere the processor's name is what `platform` knows)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"processor": fields.get("model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "bfloat16_units": [unit for unit in BFLOAT16_UNITS if unit in flags]}


def bfloat16_unit(cpuinfo: str | None = None) -> str | None:
    """The unit bfloat16 products run on here (the first of `BFLOAT16_UNITS` the CPU has), or None."""
    units = describe_cpu(cpuinfo)["bfloat16_units"]
    return units[0] if units else None
