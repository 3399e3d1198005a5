"""Transparent huge pages for XLA's host buffers: the command line re-runs itself with glibc's
`glibc.malloc.hugetlb=1` tunable.

Why: on the CPU backend every execution of the jitted step allocates its temporary buffer (3.7 GB for the 50m step of
`benchmarks/train_step.py`) with malloc and frees it when the step ends. glibc serves an allocation that large with a
fresh mmap and returns it with munmap, so each step touches about a million new 4 KiB pages, a page fault each: 2-4 s
of kernel time per step on this project's 2-core machine. With the tunable, malloc marks those mappings for
transparent huge pages (the kernel's default THP mode, `madvise`, gives them only to memory marked so): 512 times
fewer faults, and the 50m and 150m steps run about 10% faster (benchmarks/README.md). The cost is once per process:
on a VM that hands the memory its guest frees back to the host (this project's 2-core machine), a process's first
huge pages come slowly, and the first step at 50m takes 12 s longer than the next. On accelerators the step's
buffers are device memory, and the tunable only changes how the host's large allocations are backed.

glibc reads tunables once, when a process starts, hence the re-exec (the same process id, so a supervisor's signals
still reach it). `GLIBC_TUNABLES=glibc.malloc.hugetlb=0` in the environment opts out; other C libraries, and glibc
older than 2.35 (which lacks the tunable), are left alone.
"""

from __future__ import annotations

import os
import sys
from typing import Mapping

TUNABLE = "glibc.malloc.hugetlb"


def environ_with_huge_pages(environ: Mapping[str, str] = os.environ) -> dict[str, str] | None:
    """`environ` with `glibc.malloc.hugetlb=1` added to GLIBC_TUNABLES, or None when there is nothing to add: the
    tunable is set already (to any value), or this C library does not have it."""
    if not _glibc_has_tunable() or TUNABLE in environ.get("GLIBC_TUNABLES", ""):
        return None
    tunables = ":".join(filter(None, [environ.get("GLIBC_TUNABLES", ""), f"{TUNABLE}=1"]))
    return {**environ, "GLIBC_TUNABLES": tunables}


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command line with the tunable (see the module docstring), unless it has it.
    Call it first thing: nothing done before it survives the exec."""
    environ = environ_with_huge_pages()
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)


def _glibc_has_tunable() -> bool:
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):  # not Linux, or not glibc
        return False
    return name == "glibc" and tuple(int(part) for part in version.split(".")[:2]) >= (2, 35)
