"""Loading the repository's configs/ files in tests (configs/ is not a package)."""

import importlib.util
import os
from pathlib import Path

import ml_collections

REPO = Path(__file__).resolve().parents[1]
# The session's corpus cache, which conftest.py makes (the `cache_dir` fixture of cli_run.py).
SESSION_DATA_CACHE = Path(os.environ["LLAMA_JAX_TESTS_CACHE"]) / "data"


def load_config_file(name: str, *args: str) -> ml_collections.ConfigDict:
    """`get_config(*args)` of configs/<name>, its data cached in the session's cache, not the user's home (the
    post-training configs' runs wrote their chat data into ~/.cache/llama_jax); the arguments are what `--config
    configs/<name>:ARG` passes."""
    spec = importlib.util.spec_from_file_location(f"_config_{Path(name).stem}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config(*args)
    cfg.data.cache_dir = str(SESSION_DATA_CACHE)
    return cfg
