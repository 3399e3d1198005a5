"""The gcloud command lines for a TPU slice, and what the answers of `describe` mean: pure functions, so the
dry run, the launcher and the tests all see the same commands."""

from __future__ import annotations

import enum
import json

from llama_jax.launch.tpu_job import TpuJob

GCLOUD = "gcloud"
MEGASCALE_PORT = 8080  # the DCN transport's port between slices
# ssh keep-alives: a preempted VM drops off the network without closing the connection; these end the stream
# within about two minutes instead of never.
_KEEPALIVE = ("--ssh-flag=-oServerAliveInterval=30", "--ssh-flag=-oServerAliveCountMax=4")


class Health(enum.Enum):
    READY = "ready"  # every VM is up: install, start, stream
    PENDING = "pending"  # asked for and coming (queued, provisioning, creating)
    GONE = "gone"  # preempted, suspended, stopped or being deleted: delete it and ask again
    MISSING = "missing"  # no such resource
    FAILED = "failed"  # the request failed (quota, capacity, a bad flag): asking again fails again


_QUEUED = {"ACTIVE": Health.READY, "ACCEPTED": Health.PENDING, "WAITING_FOR_RESOURCES": Health.PENDING,
           "PROVISIONING": Health.PENDING, "CREATING": Health.PENDING, "SUSPENDING": Health.GONE,
           "SUSPENDED": Health.GONE, "DELETING": Health.GONE, "FAILED": Health.FAILED}
_NODE = {"READY": Health.READY, "CREATING": Health.PENDING, "STARTING": Health.PENDING,
         "RESTARTING": Health.PENDING, "REPAIRING": Health.PENDING, "REIMAGING": Health.PENDING,
         "PREEMPTED": Health.GONE, "TERMINATED": Health.GONE, "STOPPED": Health.GONE, "STOPPING": Health.GONE,
         "DELETING": Health.GONE}


def _where(job: TpuJob) -> list[str]:
    return [f"--zone={job.zone}", f"--project={job.project}"]


def create(job: TpuJob) -> list[str]:
    spot = ["--spot"] if job.spot else []
    if not job.queued:
        return [GCLOUD, "compute", "tpus", "tpu-vm", "create", job.name, f"--accelerator-type={job.accelerator}",
                f"--version={job.runtime_version}", *_where(job), *spot]
    nodes = ([f"--node-count={job.num_slices}", f"--node-prefix={job.name}"] if job.multislice
             else [f"--node-id={job.name}"])
    return [GCLOUD, "compute", "tpus", "queued-resources", "create", job.name, *nodes,
            f"--accelerator-type={job.accelerator}", f"--runtime-version={job.runtime_version}", *_where(job), *spot]


def describe(job: TpuJob) -> list[str]:
    kind = "queued-resources" if job.queued else "tpu-vm"
    return [GCLOUD, "compute", "tpus", kind, "describe", job.name, *_where(job), "--format=json"]


def describe_node(job: TpuJob, node: str) -> list[str]:
    return [GCLOUD, "compute", "tpus", "tpu-vm", "describe", node, *_where(job), "--format=json"]


def delete(job: TpuJob) -> list[str]:
    if job.queued:  # --force deletes the queued resource's VMs with it
        return [GCLOUD, "compute", "tpus", "queued-resources", "delete", job.name, *_where(job), "--force", "--quiet"]
    return [GCLOUD, "compute", "tpus", "tpu-vm", "delete", job.name, *_where(job), "--quiet"]


def scp(job: TpuJob, node: str, local: str, remote: str) -> list[str]:
    return [GCLOUD, "compute", "tpus", "tpu-vm", "scp", local, f"{node}:{remote}", "--worker=all", *_where(job),
            "--quiet"]


def ssh(job: TpuJob, node: str, command: str, worker: str = "all", keepalive: bool = False) -> list[str]:
    """--quiet: no prompt (e.g. for a passphrase when gcloud makes this machine's ssh key), since nobody sees it."""
    return [GCLOUD, "compute", "tpus", "tpu-vm", "ssh", node, f"--worker={worker}", *_where(job), "--quiet",
            *(_KEEPALIVE if keepalive else ()), f"--command={command}"]


def health(job: TpuJob, returncode: int, stdout: str, stderr: str) -> Health:
    """What a `describe(job)` answer says; raises ValueError for an answer that is no state (auth, network)."""
    if returncode != 0:
        if "NOT_FOUND" in stderr or "not found" in stderr.lower():
            return Health.MISSING
        raise ValueError(stderr.strip() or f"exit code {returncode}")
    answer = json.loads(stdout)
    if job.queued:
        state = answer.get("state", {}).get("state", "")
        return _QUEUED.get(state, Health.PENDING)
    return _NODE.get(answer.get("state", ""), Health.PENDING)


def failure_detail(stdout: str) -> str:
    """Why a queued resource failed, as its description says (empty when it does not say)."""
    try:
        state = json.loads(stdout).get("state", {})
    except ValueError:
        return ""
    error = state.get("failedData", {}).get("error", {})
    return error.get("message", "") if isinstance(error, dict) else str(error)


def first_worker_ip(stdout: str) -> str:
    """Worker 0's internal address from `describe_node`: the multislice coordinator."""
    return json.loads(stdout)["networkEndpoints"][0]["ipAddress"]


def megascale_env(job: TpuJob, slice_id: int, coordinator_ip: str) -> dict[str, str]:
    """What the TPU runtime (libtpu) and `jax.distributed` read to join slices over the data-center network.

    A multislice queued resource writes the same values into each VM's `tpu-env` metadata, and both read the
    environment first and the metadata second; setting them on the command line makes the launch not depend on that
    and shows them in the log and the dry run."""
    return {"MEGASCALE_COORDINATOR_ADDRESS": f"{coordinator_ip}:{MEGASCALE_PORT}",
            "MEGASCALE_NUM_SLICES": str(job.num_slices), "MEGASCALE_SLICE_ID": str(slice_id),
            "MEGASCALE_PORT": str(MEGASCALE_PORT)}
