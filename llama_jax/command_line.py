"""Command-line parsing for the commands that take `--config FILE[:ARG]` (train, plan, and the launchers' check).

Every way the command line or the config file can be wrong becomes one `error:` line and exit code 2, where
ml_collections would print a traceback (a missing file is even reported only at the config's first use). An error
raised while the file's `get_config` runs keeps its traceback, unless it is one of ours: it points into the user's
own code.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import ml_collections
from absl import flags
from ml_collections import config_flags

from llama_jax.errors import ConfigError, LlamaJaxError
from llama_jax.exit_codes import CONFIG as EXIT_CONFIG
from llama_jax.workdir import not_a_file


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
        path = Path(config.split(":")[0])
        if not path.is_file():
            raise ConfigError(f"config file {path} {not_a_file(path)}: pass one of configs/*.py (e.g. "
                              "--config configs/tiny.py) or your own")
    try:
        return values(config_first(argv))
    except flags.Error as err:  # a bad flag or value
        if not _config_arguments(argv):  # absl's words are "--config=None" or an unknown flag --config.KEY
            raise ConfigError("no --config given: pass one of configs/*.py (e.g. --config configs/tiny.py) or your "
                              "own") from None
        call = re.search(r"TypeError: (get_config\(\) .*)", str(err))  # FILE:ARG for a get_config of no argument
        if call:
            raise ConfigError(f"config file {_config_arguments(argv)[0]}: {call.group(1)}: pass FILE:ARG only when "
                              "its get_config takes an argument (see the file's docstring)") from None
        raise ConfigError(str(err)) from None
    except SyntaxError as err:
        raise ConfigError(f"config file {err.filename}, line {err.lineno}: {err.msg}: fix the file") from None
    except (AttributeError, KeyError) as err:  # ml_collections: --config.KEY names no key
        if isinstance(err, AttributeError) and err.name == "get_config":
            raise ConfigError(f"config file {_config_arguments(argv)[0].split(':')[0]} has no get_config(): define "
                              "one that returns the config (a ConfigDict), as configs/tiny.py does") from None
        raise ConfigError(_unknown_override(argv) or f"unknown config override: {_innermost(err)}") from None


def _innermost(err: BaseException) -> object:
    while isinstance(err, BaseException) and err.args:  # ml_collections nests the KeyError's message
        err = err.args[0]
    return err


def _unknown_override(argv: list[str]) -> str | None:
    """Which `--config.KEY` names no key, where, and the keys there, in one line. ml_collections names only the last
    part of the key, and suggests a near spelling on a second line or not at all (`mesh.pipeline` is `mesh.stage`)."""
    files_only = ["llama_jax", *_config_flags(argv)]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True, sys_argv=files_only)
    values(files_only)
    for key in _override_keys(argv):
        node, parents = values.config, []
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict):
                return f"unknown config override --config.{key}: {'.'.join(parents)} is a value, not a section"
            if part not in node:
                where = ".".join(parents) or "the config"
                close = difflib.get_close_matches(part, list(node), n=1)
                hint = f" (did you mean {'.'.join([*parents, close[0]])}?)" if close else ""
                keys = f"its keys: {', '.join(sorted(node))}" if node else "it is empty (add keys in the config file)"
                return f"unknown config override --config.{key}: {where} has no key {part!r}{hint}; {keys}"
            node, parents = node[part], [*parents, part]
    return None


def config_first(argv: list[str]) -> list[str]:
    """argv with its `--config FILE` ahead of the other flags: ml_collections refuses a `--config.KEY` override that
    comes before the file, and the commands take their flags in any order. The commands' config flag reads its
    overrides from this (`sys_argv=`), parsing from it too."""
    config = _config_flags(argv)
    rest = [arg for i, arg in enumerate(argv[1:], 1)
            if not (arg == "--config" or arg.startswith("--config=") or argv[i - 1] == "--config")]
    return [*argv[:1], *config, *rest]


def _config_flags(argv: list[str]) -> list[str]:
    """argv's `--config FILE` / `--config=FILE` arguments alone."""
    return [arg for config in _config_arguments(argv) for arg in ("--config", config)]


def _override_keys(argv: list[str]) -> list[str]:
    """The KEY of each `--config.KEY=VALUE` or `--config.KEY VALUE` in argv."""
    return [arg.removeprefix("--config.").split("=", 1)[0] for arg in argv if arg.startswith("--config.")]


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def _config_arguments(argv: list[str]) -> list[str]:
    """The values given to --config (as `--config FILE` or `--config=FILE`), before absl parses them."""
    return ([value for flag, value in zip(argv, argv[1:]) if flag == "--config"]
            + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")])
