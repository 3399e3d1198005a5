"""Command line: `python -m llama_jax.train --config configs/tiny.py [--workdir DIR] [--config.KEY=VALUE ...]`.

Running again with the same workdir resumes from its latest checkpoint. Exit codes: 0 finished; 2 a
configuration, data or checkpoint problem (the message says what to fix); 75 (EX_TEMPFAIL) preempted: a
SIGTERM or a GCE host-maintenance notice arrived, the step in flight was finished and checkpointed, and rerunning
the command resumes; 76 hung: the watchdog saw no progress for too long (`watchdog.*` keys), printed every thread's
stack and ended the process; rerunning resumes from the last checkpoint. `python -m llama_jax.supervise -- <this
command>` reruns it by itself (llama_jax/supervise.py).

On several hosts, run the same command on every host: parallel/distributed.py says how the processes find each
other (TPU pods and SLURM by themselves, or LLAMA_JAX_* variables). Process 0 writes the logs; all write checkpoints.
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from llama_jax import command_line
from llama_jax.errors import LlamaJaxError
from llama_jax.exit_codes import PREEMPTED as EXIT_PREEMPTED

_CONFIG = config_flags.DEFINE_config_file("config", None, "Python config file (see configs/).", lock_config=True,
                                          sys_argv=command_line.config_first(sys.argv))
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (metrics, checkpoints). Default: runs/<config name>.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:  # exit 2, as every command-line error: the supervisor retries a crash (exit 1) in vain
        command_line.fail(f"unexpected arguments {argv[1:]}: every setting is a flag (--config, --workdir, "
                          "--config.SECTION.KEY=VALUE)")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file it writes at INFO
    from llama_jax.parallel import distributed

    try:
        distributed.initialize()  # before anything touches a device: joins the other hosts of a multi-host run
    except LlamaJaxError as err:
        command_line.fail(str(err))
    from llama_jax import checkpoint, compilation_cache, trainer  # imported after flag parsing: --help stays fast
    from llama_jax.preemption import Preempted

    checkpoint.quiet_background_failures()

    config_file = flags.FLAGS["config"].config_filename.split(":")[0]  # FILE:ARG passes ARG to get_config
    workdir = _WORKDIR.value or str(Path("runs") / Path(config_file).stem)
    compilation_cache.use(_CONFIG.value.train.compilation_cache_dir)
    try:
        trainer.train(_CONFIG.value, workdir)
    except Preempted as err:
        print(str(err), file=sys.stderr)
        sys.exit(EXIT_PREEMPTED)
    except LlamaJaxError as err:
        command_line.fail(str(err))


if __name__ == "__main__":
    from llama_jax.huge_pages import reexec_with_huge_pages
    from llama_jax.parallel.cpu_threads import reserve_collective_threads

    reexec_with_huge_pages()  # first: the process starts again with the tunable
    reserve_collective_threads()  # before the config file, which may start JAX's backend
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=command_line.parse)
