"""JAX's persistent compilation cache for a training process (`train.compilation_cache_dir`).

Its own module, without the command line's flags, so that a test can call it in a process that has defined them
elsewhere (llama_jax.plan defines --config as well).
"""

from __future__ import annotations

import os
import sys

import jax

from llama_jax.parallel import distributed


def use(directory: str) -> None:
    """Points JAX's persistent compilation cache at `directory` unless it is off ("") or JAX_COMPILATION_CACHE_DIR
    chose one, and turns it off where it would hang the run. It must happen before the first compilation, which
    fixes the cache."""
    if distributed.persistent_cache_hangs():
        jax.config.update("jax_enable_compilation_cache", False)
        if jax.process_index() == 0:
            print(f"warning: the compilation cache is off: with JAX {jax.__version__}, several processes on CPUs hang "
                  "in the first step read from it, so each process compiles its steps afresh", file=sys.stderr)
        return
    if directory and not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))  # gs:// stays as it is
