"""The persistent compilation cache's choice (llama_jax/compilation_cache.py): off, with a warning, where it hung runs.

Several CPU processes on JAX 0.12.1 hung in the first step they read from the cache. Checked by hand there: the
two-process resume of tests/test_multihost.py hung until killed, and ended in 11 s with the cache off. JAX 0.10.2 and
0.11.2 do not hang, and keep it. That a process loads its programs from the cache is tests/test_train.py's.
"""

from __future__ import annotations

import jax
import pytest

from llama_jax import compilation_cache
from llama_jax.parallel import distributed


@pytest.mark.parametrize("processes, backend, version, hangs", [
    (2, "cpu", (0, 12, 1), True), (2, "cpu", (0, 13, 0), True), (1, "cpu", (0, 12, 1), False),
    (2, "gpu", (0, 12, 1), False), (2, "cpu", (0, 11, 2), False), (2, "cpu", (0, 10, 2), False),
])
def test_the_compilation_cache_is_off_where_it_hangs_a_run_and_says_so(monkeypatch, capsys, processes, backend,
                                                                       version, hangs):
    """The command line's choice, with JAX's answers (process count, backend, version) played by hand."""
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "__version_info__", version)
    monkeypatch.setattr(jax, "__version__", ".".join(map(str, version)))
    assert distributed.persistent_cache_hangs() == hangs
    try:
        compilation_cache.use("")  # "": the cache's directory stays as the session's conftest set it
        assert jax.config.jax_enable_compilation_cache == (not hangs)
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
    warning = ("warning: the compilation cache is off: with JAX " + ".".join(map(str, version)) + ", several processes "
               "on CPUs hang in the first step read from it, so each process compiles its steps afresh\n")
    assert capsys.readouterr().err == (warning if hangs else "")
