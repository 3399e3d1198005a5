"""GPU clusters: a SLURM batch script (one task per node, each seeing all of its node's GPUs) and one node alone.

    python -m llama_jax.launch slurm --config configs/llama3_8b.py --nodes 4 --gpus-per-node 8 \\
        [--partition P] [--time HH:MM:SS | D-HH | MINUTES] [--workdir DIR] [--dry-run] [--config.KEY=VALUE ...]
    python -m llama_jax.launch local --config configs/tiny.py [--workdir DIR] [--dry-run] [--config.KEY=VALUE ...]

`slurm` writes slurm/<job name>.sbatch (the `#SBATCH` header from the flags, then the body of launch/slurm.sbatch,
which is the same script with default resources, for `sbatch` by hand) and submits it with `sbatch`; --dry-run
prints the script and the sbatch command instead. In the job, `srun` starts `python -m llama_jax.supervise --
python -m llama_jax.train ...` once per node; llama_jax/parallel/distributed.py sees SLURM's variables and JAX joins
the nodes (the coordinator is the first node, on a port derived from the job id). JAX's SLURM detection would give
each process the single GPU of its local rank; JAX_LOCAL_DEVICE_IDS=0,...,G-1 gives the one process per node all G.
The workdir must be on a filesystem every node mounts (or gs://). SLURM sends SIGTERM 300 s before the time limit
(`--signal=TERM@300`) and on `scancel`; the supervisor passes it on, the trainer checkpoints and exits 75, and
submitting the same command again resumes.

`local` runs the supervised trainer on this machine in one process, which sees every local GPU (jax.devices() lists
them all; set the mesh in the config, e.g. --config.mesh.fsdp=8), with the same environment as the batch script.

What the scripts set for H100 clusters (each only when the variable is not set already; XLA flags of yours in
XLA_FLAGS come after ours, and the last of a repeated flag wins):
- XLA_FLAGS:
  --xla_gpu_enable_latency_hiding_scheduler=true: schedules collectives early so they overlap with compute (the FSDP
    all-gathers and reduce-scatters hide behind the matmuls);
  --xla_gpu_enable_triton_gemm=false: matmuls through cuBLAS, which is at least as fast for the large bf16 GEMMs of
    an LLM and compiles faster;
  --xla_gpu_enable_pipelined_{all_gather,reduce_scatter,all_reduce}=true and
  --xla_gpu_enable_while_loop_double_buffering=true: with the layers under `scan`, the next layer's weights are
    gathered (and the previous layer's gradients reduced) while this layer computes;
  --xla_gpu_{all_gather,reduce_scatter,all_reduce}_combine_threshold_bytes=134217728: merges small collectives into
    128 MiB ones, fewer and closer to NCCL's peak bandwidth.
- XLA_PYTHON_CLIENT_MEM_FRACTION=0.90: JAX preallocates 90% of each GPU (the default is 75%); the rest is for CUDA,
  cuDNN and NCCL buffers. Lower it if NCCL or cuDNN reports out-of-memory at start-up.
- NCCL_DEBUG=WARN: NCCL reports problems once, without the INFO flood (INFO shows the chosen transports and rings:
  set it when checking that InfiniBand/NVLink are used).
Not set, because they depend on the cluster: NCCL_SOCKET_IFNAME (the interface for NCCL's bootstrap, e.g. the
cluster's ethernet), NCCL_IB_HCA (which InfiniBand adapters), NCCL_NVLS_ENABLE (NVLink SHARP on NVSwitch systems,
on by default in recent NCCL), the cloud providers' NCCL network plugins (GPUDirect-TCPX/TCPXO on Google Cloud A3,
EFA on AWS) with their own variables, and CUDA_DEVICE_MAX_CONNECTIONS=1 (helps overlap on Hopper, hurts on
Blackwell). Your cluster's documentation gives those; export them before `sbatch`, which passes the environment on.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

from llama_jax.errors import ConfigError

XLA_FLAGS = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
)
ENV = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90", "NCCL_DEBUG": "WARN"}
# sbatch's --time forms: minutes, minutes:seconds, hours:minutes:seconds, days-hours, days-hours:minutes,
# days-hours:minutes:seconds (and no limit)
_TIME = re.compile(r"(?:(?P<days>[0-9]+)-(?P<dh>[0-9]+)(?::(?P<dm>[0-9]+)(?::(?P<ds>[0-9]+))?)?"
                   r"|(?P<a>[0-9]+)(?::(?P<b>[0-9]+)(?::(?P<c>[0-9]+))?)?)")
_NO_LIMIT = ("unlimited", "infinite")
_SIGTERM_AHEAD_S = 300
_JOB_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_USAGE = "sbatch [--nodes=N --gpus-per-node=G ...] launch/slurm.sbatch CONFIG WORKDIR [--config.KEY=VALUE ...]"


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    config: str
    workdir: str
    nodes: int
    gpus_per_node: int
    job_name: str
    partition: str | None = None
    time: str | None = None
    overrides: tuple[str, ...] = ()
    output: str = "slurm/%x-%j.out"


def _time_limit_s(time: str) -> int | None:
    """Seconds in an sbatch --time value (None: no limit); ConfigError for anything sbatch would not take."""
    if time.lower() in _NO_LIMIT:
        return None
    match = _TIME.fullmatch(time)
    if match is None:
        raise ConfigError(f"--time {time!r} is not a SLURM time limit: MINUTES, HH:MM:SS, D-HH or D-HH:MM:SS, e.g. "
                          "--time 48:00:00 or --time 2-00")
    part = {k: int(v) for k, v in match.groupdict().items() if v is not None}
    if "days" in part:
        return ((part["days"] * 24 + part["dh"]) * 60 + part.get("dm", 0)) * 60 + part.get("ds", 0)
    if "c" in part:  # hours:minutes:seconds
        return (part["a"] * 60 + part["b"]) * 60 + part["c"]
    return part["a"] * 60 + part.get("b", 0)  # minutes[:seconds]


def _check_time(time: str) -> None:
    seconds = _time_limit_s(time)
    if seconds is not None and seconds <= _SIGTERM_AHEAD_S:
        raise ConfigError(f"--time {time!r} is {seconds} s: SLURM sends the run its SIGTERM {_SIGTERM_AHEAD_S} s "
                          "before the limit, so it would checkpoint and stop before training; give a longer limit")


def make_job(*, config: str, nodes: int, gpus_per_node: int, workdir: str | None = None,
             partition: str | None = None, time: str | None = None, job_name: str | None = None,
             overrides: tuple[str, ...] = ()) -> SlurmJob:
    """A validated SlurmJob with absolute paths (the job may start in another directory); ConfigError names the
    first bad input and its fix."""
    config = absolute_config(config)
    if nodes < 1:
        raise ConfigError(f"--nodes {nodes}: give the number of nodes, 1 or more")
    if not 1 <= gpus_per_node <= 16:
        raise ConfigError(f"--gpus-per-node {gpus_per_node}: give the GPUs of one node, 1 to 16 (8 on an H100 node)")
    if time is not None:
        _check_time(time)
    if partition is not None and not partition:
        raise ConfigError("--partition is empty: give one of the partitions `sinfo -s` lists, or leave it out")
    stem = Path(config.split(":")[0]).stem
    name = job_name or f"llama_jax-{stem}"
    if not _JOB_NAME.fullmatch(name):
        raise ConfigError(f"--job-name {name!r}: use letters, digits, '_', '.' and '-' only")
    _check_overrides(overrides)
    return SlurmJob(config=config, workdir=absolute_workdir(workdir, stem), nodes=nodes, gpus_per_node=gpus_per_node,
                    job_name=name, partition=partition, time=time, overrides=overrides)


def absolute_config(config: str) -> str:
    path, colon, argument = config.partition(":")
    if not Path(path).is_file():
        raise ConfigError(f"config file {path} not found: give the path of a Python config, e.g. configs/llama3_8b.py")
    return f"{os.path.abspath(path)}{colon}{argument}"


def absolute_workdir(workdir: str | None, stem: str) -> str:
    """The train CLI's default (runs/<config name>), made absolute; URLs as they are."""
    workdir = workdir or str(Path("runs") / stem)
    return workdir if "://" in workdir else os.path.abspath(os.path.expanduser(workdir))


def _check_overrides(overrides: tuple[str, ...]) -> None:
    for override in overrides:
        if not override.startswith("--config."):
            raise ConfigError(f"unexpected argument {override!r}: only --config.KEY=VALUE overrides are passed to the "
                              "trainer")


def header(job: SlurmJob) -> list[str]:
    lines = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
             f"--gpus-per-node={job.gpus_per_node}", "--exclusive", f"--output={job.output}",
             f"--signal=TERM@{_SIGTERM_AHEAD_S}"]
    lines += [f"--partition={job.partition}"] if job.partition else []
    lines += [f"--time={job.time}"] if job.time else []
    return [f"#SBATCH {line}" for line in lines]


def _exports() -> list[str]:
    flags = "".join(f"{flag} \\\n    " for flag in XLA_FLAGS)  # one per line, continued inside the quotes
    return [f'export XLA_FLAGS="{flags}${{XLA_FLAGS:-}}"',
            *(f"export {name}=${{{name}:-{value}}}" for name, value in ENV.items())]


def body() -> str:
    """The script after its #SBATCH lines: the same for every job (CONFIG, WORKDIR and overrides are arguments)."""
    return "\n".join([
        "set -euo pipefail",
        "if [ $# -lt 2 ]; then",
        f'  echo "usage: {_USAGE}" >&2',
        "  exit 2",
        "fi",
        'CONFIG=$1',
        'WORKDIR=$2',
        "shift 2",
        "",
        "# One process per node, seeing all of the node's GPUs (JAX's SLURM default is one GPU per process).",
        'GPUS=${SLURM_GPUS_ON_NODE:-$(nvidia-smi --list-gpus | wc -l)}',
        'export JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-$(seq -s, 0 $((GPUS - 1)))}',
        "# XLA and NCCL settings for H100 clusters: llama_jax/launch/slurm.py says what each does.",
        *_exports(),
        "",
        "# --kill-on-bad-exit: a node whose supervisor gives up ends the job instead of leaving the others waiting.",
        'srun --kill-on-bad-exit=1 python -m llama_jax.supervise -- \\',
        '    python -m llama_jax.train --config "$CONFIG" --workdir "$WORKDIR" "$@"',
        "",
    ])


def script(job: SlurmJob) -> str:
    return "\n".join(["#!/usr/bin/env bash", *header(job), "", body()])


def template() -> str:
    """launch/slurm.sbatch: the script with default resources, for `sbatch` by hand (a test keeps the file equal)."""
    defaults = SlurmJob(config="CONFIG", workdir="WORKDIR", nodes=2, gpus_per_node=8, job_name="llama_jax",
                        output="%x-%j.out")
    comment = [f"# {_USAGE}",
               "# Flags given to sbatch override the #SBATCH lines below. `python -m llama_jax.launch slurm` writes",
               "# this same script with its flags as the header; llama_jax/launch/slurm.py explains the environment."]
    return "\n".join(["#!/usr/bin/env bash", *comment, *header(defaults), "", body()])


def script_path(job: SlurmJob) -> Path:
    return Path(job.output).parent / f"{job.job_name}.sbatch"


def sbatch_command(job: SlurmJob) -> list[str]:
    return ["sbatch", str(script_path(job)), job.config, job.workdir, *job.overrides]


def local_command(config: str, workdir: str | None, overrides: tuple[str, ...]) -> tuple[list[str], dict[str, str]]:
    """The supervised trainer on this machine, and the environment to add (one process: every local GPU)."""
    config = absolute_config(config)
    _check_overrides(overrides)
    workdir = absolute_workdir(workdir, Path(config.split(":")[0]).stem)
    python = sys.executable
    argv = [python, "-m", "llama_jax.supervise", "--", python, "-m", "llama_jax.train", "--config", config,
            "--workdir", workdir, *overrides]
    given = os.environ.get("XLA_FLAGS", "")
    env = {"XLA_FLAGS": " ".join([*XLA_FLAGS, given]).strip(),
           **{name: os.environ.get(name, value) for name, value in ENV.items()}}
    return argv, env
