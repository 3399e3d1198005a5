"""The training command's exit codes: the contract between `llama_jax.train`, `llama_jax.supervise` and launchers.

Their own module, so that the supervisor and the trainer's threads can share them without importing the CLI.
"""

FINISHED = 0
CONFIG = 2  # a configuration, data or checkpoint problem: running again fails the same way
PREEMPTED = 75  # EX_TEMPFAIL: SIGTERM or a maintenance notice; the step in flight was checkpointed
HUNG = 76  # the watchdog saw no progress and ended the process; the last checkpoint is intact
