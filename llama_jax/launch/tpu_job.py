"""What a TPU launch asks for, checked before any cloud call: a wrong flag should cost a second, not a slice."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from llama_jax.errors import ConfigError

# The TPU software image per family; --runtime-version overrides it.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5p": "v2-alpha-tpuv5",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v6e": "v2-alpha-tpuv6e",
}
_ACCELERATOR = re.compile(r"(?P<family>[a-z0-9]+)-(?P<size>[1-9][0-9]*)")
# Queued-resource ids and node names are Compute Engine names; multislice nodes add "-<slice>".
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?")
# Every family puts at most 8 cores (v2, v3, v4, v5p count TensorCores) or 8 chips (v5litepod, v6e) on one host.
_PER_HOST = 8


@dataclasses.dataclass(frozen=True)
class TpuJob:
    name: str
    accelerator: str
    zone: str
    project: str
    config: str  # relative to `repo`, as the workers see it; may end in ":ARG" for get_config
    workdir: str
    repo: Path  # the checkout copied to every worker
    runtime_version: str
    spot: bool = False
    queued: bool = True
    num_slices: int = 1
    overrides: tuple[str, ...] = ()

    @property
    def multislice(self) -> bool:
        return self.num_slices > 1

    @property
    def nodes(self) -> list[str]:
        """The TPU VM names: one per slice, named as queued resources name them (`<prefix>-<slice>`)."""
        return [f"{self.name}-{index}" for index in range(self.num_slices)] if self.multislice else [self.name]

    @property
    def devices(self) -> int:
        """JAX devices of the whole job: v4 and v5p sizes count TensorCores, two to a chip, which is one device."""
        size = accelerator_size(self.accelerator)
        return (size // 2 if _family(self.accelerator) in ("v4", "v5p") else size) * self.num_slices

    @property
    def multi_host(self) -> bool:
        return self.multislice or accelerator_size(self.accelerator) > _PER_HOST


def accelerator_size(accelerator: str) -> int:
    return int(accelerator.rsplit("-", 1)[1])


def make_job(*, name: str, accelerator: str, zone: str | None, project: str | None, config: str,
             workdir: str | None, repo: Path, runtime_version: str | None = None, spot: bool = False,
             queued: bool = True, num_slices: int = 1, overrides: tuple[str, ...] = (),
             check_workdir: bool = True) -> TpuJob:
    """A validated TpuJob; ConfigError names the first bad input and its fix. `check_workdir=False` for
    --teardown, which needs no config or workdir."""
    if not _NAME.fullmatch(name or ""):
        raise ConfigError(f"--name {name!r} is not a valid TPU name: use lowercase letters, digits and '-', starting "
                          "with a letter, at most 52 characters (e.g. llama-8b)")
    family = _family(accelerator)
    if not zone:
        raise ConfigError("--zone is missing: give the zone of your TPU quota, e.g. --zone us-east5-a")
    if not project:
        raise ConfigError("--project is missing: give your Google Cloud project id, e.g. --project my-project")
    if num_slices < 1:
        raise ConfigError(f"--num-slices {num_slices}: give 1 or more")
    if num_slices > 1 and not queued:
        raise ConfigError("--num-slices > 1 needs a queued resource (it creates the slices together and joins them "
                          "over the data-center network): drop --on-demand")
    job = TpuJob(name=name, accelerator=accelerator, zone=zone, project=project, config=config, workdir=workdir or "",
                 repo=repo, runtime_version=runtime_version or RUNTIME_VERSIONS[family], spot=spot, queued=queued,
                 num_slices=num_slices, overrides=overrides)
    if check_workdir:
        job = dataclasses.replace(job, config=_config_in_repo(config, repo))
        _check_workdir(job)
    for override in overrides:
        if not override.startswith("--config."):
            raise ConfigError(f"unexpected argument {override!r}: only --config.KEY=VALUE overrides are passed to the "
                              "trainer")
    return job


def _family(accelerator: str) -> str:
    match = _ACCELERATOR.fullmatch(accelerator or "")
    if match is None or match["family"] not in RUNTIME_VERSIONS:
        raise ConfigError(f"unknown accelerator type {accelerator!r}: give FAMILY-SIZE with FAMILY one of "
                          f"{', '.join(RUNTIME_VERSIONS)} (e.g. v5p-512, v5litepod-256, v6e-64), as "
                          "`gcloud compute tpus accelerator-types list --zone ZONE` names them")
    return match["family"]


def _config_in_repo(config: str, repo: Path) -> str:
    """The config's path inside the checkout: the workers get the checkout, not this machine's other files."""
    path, colon, argument = config.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} not found: give the path of a Python config, e.g. configs/llama3_8b.py")
    try:
        inside = file.resolve().relative_to(repo.resolve())
    except ValueError:
        raise ConfigError(f"config file {path} is outside the repository {repo}, which is what the workers get: "
                          f"copy it under {repo / 'configs'} and give that path") from None
    return f"{inside.as_posix()}{colon}{argument}"


def _check_workdir(job: TpuJob) -> None:
    if job.multi_host and not job.workdir.startswith("gs://"):
        given = f"--workdir {job.workdir}" if job.workdir else "no --workdir"
        raise ConfigError(f"{given} for {job.accelerator} x {job.num_slices} slice(s), which has several hosts: a "
                          "local directory is not shared between the workers and is lost with the VMs when the "
                          "slice is preempted; give a bucket in the slice's region, e.g. --workdir "
                          f"gs://MY-BUCKET/runs/{job.name}")
    if not job.workdir:
        raise ConfigError(f"--workdir is missing: give gs://MY-BUCKET/runs/{job.name} (a bucket outlives the VM, so a "
                          "preempted run resumes)")
    if not job.workdir.startswith("gs://") and not job.workdir.startswith("/"):
        raise ConfigError(f"--workdir {job.workdir} is relative: on the worker it would lie inside the checkout "
                          "~/llama_jax, which each launch installs afresh, deleting its checkpoints; give an absolute "
                          f"path, e.g. /tmp/runs/{job.name}, or gs://MY-BUCKET/runs/{job.name}")
