"""The command line's huge pages (llama_jax/huge_pages.py): the tunable it adds, the re-exec that applies it, and its
effect on a large malloc."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_run import CLI_ENV, REPO
from llama_jax import huge_pages
from llama_jax.huge_pages import environ_with_huge_pages

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@pytest.fixture
def glibc(monkeypatch):
    monkeypatch.setattr(huge_pages.os, "confstr", lambda name: "glibc 2.36")


def test_the_tunable_is_added_to_the_environment_unless_it_is_set(glibc):
    assert environ_with_huge_pages({"HOME": "/h"}) == {"HOME": "/h", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert environ_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == (
        "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    assert environ_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # the user's opt-out
    assert environ_with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None  # after the re-exec


@pytest.mark.parametrize("libc", ["glibc 2.31", "musl 1.2", None])
def test_a_c_library_without_the_tunable_is_left_alone(monkeypatch, libc):
    def confstr(name):
        if libc is None:
            raise ValueError("unrecognized configuration name")
        return libc

    monkeypatch.setattr(huge_pages.os, "confstr", confstr)
    assert environ_with_huge_pages({}) is None


def record_environment_config(tmp_path: Path) -> Path:
    """A config file that writes its process id and GLIBC_TUNABLES, then fails as a bad config does (exit code 2):
    what the command line's process looks like once its flags are parsed."""
    config = tmp_path / "record.py"
    config.write_text(
        "import os\nfrom llama_jax.errors import ConfigError\n\n\ndef get_config():\n"
        f"    with open({str(tmp_path / 'record.txt')!r}, 'w') as f:\n"
        "        f.write(f\"{os.getpid()} {os.environ.get('GLIBC_TUNABLES')}\")\n"
        "    raise ConfigError('recorded')\n")
    return config


@pytest.mark.skipif(environ_with_huge_pages({}) is None, reason="this C library has no glibc.malloc.hugetlb")
@pytest.mark.parametrize("given, expected", [(None, "glibc.malloc.hugetlb=1"),
                                             ("glibc.malloc.hugetlb=0", "glibc.malloc.hugetlb=0")])
def test_the_command_line_runs_with_the_tunable_in_the_same_process(tmp_path, given, expected):
    env = {k: v for k, v in CLI_ENV.items() if k != "GLIBC_TUNABLES"}
    if given:
        env["GLIBC_TUNABLES"] = given
    proc = subprocess.Popen([sys.executable, "-m", "llama_jax.train", "--config", str(record_environment_config(tmp_path))],
                            env=env, cwd=REPO, stderr=subprocess.PIPE, text=True)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "error: recorded" in stderr, stderr
    pid, tunables = (tmp_path / "record.txt").read_text().split(" ")
    assert int(pid) == proc.pid  # execve: a supervisor's signals still reach the run
    assert tunables == expected


MALLOC_64MB = """
import ctypes
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
ctypes.memset(libc.malloc(n), 1, n)
print(next(int(line.split()[1]) for line in open('/proc/self/smaps_rollup') if line.startswith('AnonHugePages')))
"""


@pytest.mark.skipif(environ_with_huge_pages({}) is None or not THP_MODE.exists()
                    or "[never]" in THP_MODE.read_text(), reason="no glibc tunable or no transparent huge pages here")
def test_the_tunable_backs_a_large_malloc_with_huge_pages():
    """What the re-exec is for: a 64 MiB malloc (an mmap of its own, like XLA's per-step buffer) gets huge pages.
    Without the tunable, the kernel's default mode (`madvise`) gives it none."""
    def huge_kib(env):
        return int(subprocess.run([sys.executable, "-c", MALLOC_64MB], env=env, capture_output=True, text=True,
                                  check=True).stdout)

    plain = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    assert huge_kib(environ_with_huge_pages(plain)) >= 32 << 10
    if "[madvise]" in THP_MODE.read_text():
        assert huge_kib(plain) == 0
