"""Command-line parsing for the commands that take `--config FILE[:ARG]` (train, plan, and the launchers' check).

Every way the command line or the config file can be wrong becomes one `error:` line and exit code 2, where
ml_collections would print a traceback (a missing file is even reported only at the config's first use). An error
raised while the file's `get_config` runs keeps its traceback, unless it is one of ours: it points into the user's
own code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags

from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.exit_codes import CONFIG as EXIT_CONFIG


def parse(argv: list[str]) -> list[str]:
    """absl's `flags.FLAGS(argv)`, for `app.run(main, flags_parser=parse)`."""
    try:
        return _parse(flags.FLAGS, argv)
    except LlamaJaxError as err:  # a bad flag or value; a checkpoint that get_config reads is missing, ...
        fail(str(err))


def load_config(config: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config of `--config CONFIG [--config.KEY=VALUE ...]`, read as the train command reads it (for a launcher
    to check a job before it submits it). Raises the error (a LlamaJaxError) whose one line the command prints."""
    argv = ["llama_jax", "--config", config, *overrides]
    values = flags.FlagValues()  # not absl's global FLAGS, which the launcher's process may hold too
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=argv)
    _parse(values, argv)
    return values.config


def _parse(values: flags.FlagValues, argv: list[str]) -> list[str]:
    for config in _config_arguments(argv):
        if not Path(config.split(":")[0]).is_file():
            raise ConfigError(f"config file {config.split(':')[0]} does not exist: pass one of configs/*.py (e.g. "
                              "--config configs/tiny.py) or your own")
    try:
        return values(argv)
    except flags.Error as err:  # a bad flag or value
        raise ConfigError(str(err)) from None
    except SyntaxError as err:
        raise ConfigError(f"config file {err.filename}, line {err.lineno}: {err.msg}: fix the file") from None
    except (AttributeError, KeyError) as err:  # ml_collections: --config.KEY names no key
        if isinstance(err, AttributeError) and err.name == "get_config":
            raise ConfigError(f"config file {_config_arguments(argv)[0].split(':')[0]} has no get_config(): define "
                              "one that returns the config (a ConfigDict), as configs/tiny.py does") from None
        while isinstance(err, BaseException) and err.args:  # ml_collections nests the KeyError's message
            err = err.args[0]
        raise ConfigError(f"unknown config override: {err}") from None


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def _config_arguments(argv: list[str]) -> list[str]:
    """The values given to --config (as `--config FILE` or `--config=FILE`), before absl parses them."""
    return ([value for flag, value in zip(argv, argv[1:]) if flag == "--config"]
            + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")])
