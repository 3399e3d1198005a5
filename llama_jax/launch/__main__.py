"""Command line: `python -m llama_jax.launch {tpu,slurm,local} ...` (see llama_jax/launch/__init__.py).

Exit codes: the run's own (the supervisor's: 0 finished, 2 a configuration/data/checkpoint error, ...); 2 for a bad
flag, before anything runs; 1 when a cloud or cluster command failed (the message quotes it); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llama_jax.errors import ConfigError
from llama_jax.exit_codes import CONFIG as EXIT_CONFIG
from llama_jax.launch import gcloud, preflight, slurm, tpu, tpu_job
from llama_jax.launch.executor import LaunchError, SubprocessExecutor, shell_line

REPO = Path(__file__).resolve().parents[2]
_NO_CHECK = ("launch without first checking the config, its overrides and mesh against the job's devices "
             "(preflight.py), e.g. when the config reads files only the cluster sees")
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llama_jax.launch", allow_abbrev=False,
                                     description="Start llama_jax training on TPU pods, SLURM GPU clusters or this "
                                                 "machine. Extra --config.KEY=VALUE arguments go to the trainer.")
    commands = parser.add_subparsers(dest="command", required=True)

    pod = commands.add_parser("tpu", allow_abbrev=False, help="a Cloud TPU slice through gcloud")
    pod.add_argument("--config", help="Python config file inside this repository")
    pod.add_argument("--name", required=True, help="queued resource / TPU VM name (multislice: NAME-0, NAME-1, ...)")
    pod.add_argument("--accelerator", help="TPU type, e.g. v5p-512, v5litepod-256, v6e-64")
    pod.add_argument("--zone", help="e.g. us-east5-a")
    pod.add_argument("--project", help="Google Cloud project id")
    pod.add_argument("--workdir", help="gs://BUCKET/PATH (required with several hosts)")
    pod.add_argument("--spot", action="store_true", help="Spot capacity: cheaper, preemptible")
    pod.add_argument("--runtime-version", help="TPU software image (default: by accelerator family)")
    kind = pod.add_mutually_exclusive_group()
    kind.add_argument("--queued", dest="queued", action="store_true", default=True,
                      help="ask through a queued resource (default)")
    kind.add_argument("--on-demand", dest="queued", action="store_false", help="`gcloud compute tpus tpu-vm create`")
    pod.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (multislice; queued only)")
    pod.add_argument("--poll-seconds", type=float, default=30.0, help="how often the slice's state is read")
    pod.add_argument("--dry-run", action="store_true", help="print the commands, one per line, and run none")
    pod.add_argument("--teardown", action="store_true", help="delete the slice (and its queued resource)")
    pod.add_argument("--no-check", action="store_true", help=_NO_CHECK)

    cluster = commands.add_parser("slurm", allow_abbrev=False, help="a SLURM batch job, one task per node")
    cluster.add_argument("--config", required=True, help="Python config file")
    cluster.add_argument("--nodes", type=int, required=True)
    cluster.add_argument("--gpus-per-node", type=int, required=True)
    cluster.add_argument("--partition")
    cluster.add_argument("--time", help="time limit as sbatch takes it: HH:MM:SS, D-HH[:MM[:SS]] or MINUTES")
    cluster.add_argument("--workdir", help="on a filesystem every node mounts, or gs:// (default runs/<config>)")
    cluster.add_argument("--job-name", help="default llama_jax-<config>")
    cluster.add_argument("--gpu", choices=("h100", "h200"), help="the nodes' GPUs, for the memory check")
    cluster.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command only")
    cluster.add_argument("--no-check", action="store_true", help=_NO_CHECK)

    here = commands.add_parser("local", allow_abbrev=False, help="this machine: one process, every local GPU")
    here.add_argument("--config", required=True, help="Python config file")
    here.add_argument("--workdir", help="default runs/<config>")
    here.add_argument("--dry-run", action="store_true", help="print the command only")
    return parser


def main(argv: list[str] | None = None) -> int:
    args, overrides = _parser().parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        run = {"tpu": _tpu, "slurm": _slurm, "local": _local}[args.command]
        return run(args, tuple(overrides))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    except LaunchError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


def _tpu(args: argparse.Namespace, overrides: tuple[str, ...]) -> int:
    if not args.teardown and not args.config:
        raise ConfigError("--config is missing: give the Python config file to train, e.g. configs/llama3_8b.py")
    if not (REPO / "setup.py").is_file() or not (REPO / "launch" / "tpu_worker.sh").is_file():
        raise ConfigError(f"{REPO} is not a llama_jax source checkout (no setup.py or launch/tpu_worker.sh): the TPU "
                          "launcher copies the checkout to the workers; install with `pip install -e .` from one")
    job = tpu_job.make_job(name=args.name, accelerator=args.accelerator, zone=args.zone, project=args.project,
                           config=args.config or "", workdir=args.workdir, repo=REPO,
                           runtime_version=args.runtime_version, spot=args.spot, queued=args.queued,
                           num_slices=args.num_slices, overrides=overrides, check_workdir=not args.teardown)
    if args.poll_seconds <= 0:
        raise ConfigError(f"--poll-seconds {args.poll_seconds}: give a positive number of seconds")
    if not args.teardown and not args.no_check:
        print(preflight.check(args.config, overrides, devices=job.devices,
                              accelerator=args.accelerator.rsplit("-", 1)[0]), file=sys.stderr)
    if args.dry_run:
        tpu.print_plan([gcloud.delete(job)] if args.teardown else tpu.plan(job))
        return 0
    launcher = tpu.TpuLauncher(job, SubprocessExecutor(), poll_seconds=args.poll_seconds)
    if args.teardown:
        return launcher.teardown()
    try:
        return launcher.launch()
    except KeyboardInterrupt:
        print(f"launch: stopped; whatever runs on slice {job.name} goes on: run the same command to follow it again, "
              "or add --teardown to delete the slice", file=sys.stderr)
        return EXIT_INTERRUPTED


def _slurm(args: argparse.Namespace, overrides: tuple[str, ...]) -> int:
    job = slurm.make_job(config=args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                         workdir=args.workdir, partition=args.partition, time=args.time, job_name=args.job_name,
                         overrides=overrides)
    if not args.no_check:
        print(preflight.check(args.config, overrides, devices=job.nodes * job.gpus_per_node, accelerator=args.gpu),
              file=sys.stderr)
    command = slurm.sbatch_command(job)
    if args.dry_run:
        print(slurm.script(job), end="")
        print(shell_line(command))
        return 0
    path = slurm.script_path(job)
    path.parent.mkdir(parents=True, exist_ok=True)  # also where SLURM writes the job's output, which it needs
    path.write_text(slurm.script(job))
    answer = SubprocessExecutor().run(command)
    print(answer.stdout, end="")
    if answer.returncode != 0:
        raise LaunchError(f"sbatch failed (exit code {answer.returncode}): {answer.stderr.strip()}")
    return 0


def _local(args: argparse.Namespace, overrides: tuple[str, ...]) -> int:
    argv, env = slurm.local_command(args.config, args.workdir, overrides)
    if args.dry_run:
        print(shell_line(argv, env))
        return 0
    sys.stdout.flush()
    os.execve(argv[0], argv, {**os.environ, **env})  # the supervisor takes this process over, signals included


if __name__ == "__main__":
    sys.exit(main())
