"""Command-line parsing for the commands that take `--config FILE[:ARG]` (train, plan).

Every way the command line or the config file can be wrong becomes one `error:` line and exit code 2, where
ml_collections would print a traceback (a missing file is even reported only at the config's first use). An error
raised while the file's `get_config` runs keeps its traceback, unless it is one of ours: it points into the user's
own code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

from absl import flags

from llama_jax.errors import LlamaJaxError
from llama_jax.exit_codes import CONFIG as EXIT_CONFIG


def parse(argv: list[str]) -> list[str]:
    """absl's `flags.FLAGS(argv)`, for `app.run(main, flags_parser=parse)`."""
    for config in _config_arguments(argv):
        if not Path(config.split(":")[0]).is_file():
            fail(f"config file {config.split(':')[0]} does not exist: pass one of configs/*.py (e.g. --config "
                 "configs/tiny.py) or your own")
    try:
        return flags.FLAGS(argv)
    except (flags.Error, LlamaJaxError) as err:  # a bad flag or value; a checkpoint get_config reads is missing, ...
        fail(str(err))
    except SyntaxError as err:
        fail(f"config file {err.filename}, line {err.lineno}: {err.msg}: fix the file")
    except (AttributeError, KeyError) as err:  # ml_collections: --config.KEY names no key
        if isinstance(err, AttributeError) and err.name == "get_config":
            fail(f"config file {_config_arguments(argv)[0].split(':')[0]} has no get_config(): define one that returns "
                 "the config (a ConfigDict), as configs/tiny.py does")
        while isinstance(err, BaseException) and err.args:  # ml_collections nests the KeyError's message
            err = err.args[0]
        fail(f"unknown config override: {err}")


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def _config_arguments(argv: list[str]) -> list[str]:
    """The values given to --config (as `--config FILE` or `--config=FILE`), before absl parses them."""
    return ([value for flag, value in zip(argv, argv[1:]) if flag == "--config"]
            + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")])
