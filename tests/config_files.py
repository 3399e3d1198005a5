"""Loading the repository's configs/ files in tests (configs/ is not a package)."""

import importlib.util
from pathlib import Path

import ml_collections

REPO = Path(__file__).resolve().parents[1]


def load_config_file(name: str, *args: str) -> ml_collections.ConfigDict:
    """`get_config(*args)` of configs/<name>; the arguments are what `--config configs/<name>:ARG` passes."""
    spec = importlib.util.spec_from_file_location(f"_config_{Path(name).stem}", REPO / "configs" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)
