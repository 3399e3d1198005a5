"""The memory figure every log line carries (`peak_memory_gib`), from devices that keep statistics and from a CPU."""

from pathlib import Path

import jax
import numpy as np
import pytest

from llama_jax.metrics import peak_memory_gib


class _Device:
    def __init__(self, stats: dict | None):
        self.stats = stats

    def memory_stats(self) -> dict | None:
        return self.stats


def test_accelerators_report_their_busiest_devices_peak():
    devices = [_Device({"peak_bytes_in_use": 3 * 2**30, "bytes_in_use": 2**30, "bytes_limit": 80 * 2**30}),
               _Device({"peak_bytes_in_use": 5 * 2**29, "bytes_in_use": 2**30, "bytes_limit": 80 * 2**30})]
    assert peak_memory_gib(devices) == 3.0
    without_peak = [devices[0], _Device({"bytes_in_use": 2**30})]
    assert peak_memory_gib(without_peak) == pytest.approx(peak_memory_gib([_Device(None)]), rel=1e-3), "as on a CPU"


def test_a_cpu_reports_the_process_peak_resident_memory():
    assert all(device.memory_stats() is None for device in jax.local_devices()), "CPU devices keep no statistics"
    before = peak_memory_gib()
    held = np.ones(2**28, np.uint8)  # 256 MiB, touched: resident
    after = peak_memory_gib()
    status = Path("/proc/self/status").read_text().splitlines()
    high_water_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    assert after == pytest.approx(high_water_kib / 2**20, rel=0.02)  # the kernel's own figure, in GiB
    assert after >= before and after > held.nbytes / 2**30
