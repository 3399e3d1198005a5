"""What runs on the TPU workers, as command lines for `gcloud ... ssh --command`, and how the code gets there.

The code travels as a tarball of this checkout: the files git tracks plus the untracked ones it does not ignore,
with their local edits, so the workers run exactly what is on this machine (no push needed, no credentials on the
VMs). `gcloud compute tpus tpu-vm scp --worker=all` copies it, and `launch/tpu_worker.sh` (inside it) does the rest
on each worker: install, start, stream, status.
"""

from __future__ import annotations

import shlex
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

REMOTE_REPO = "~/llama_jax"
REMOTE_BUNDLE = "llama_jax.tar.gz"  # in the worker's home directory
_WORKER = f"bash {REMOTE_REPO}/launch/tpu_worker.sh"


def bundle_path(name: str) -> str:
    return str(Path(tempfile.gettempdir()) / f"llama_jax-{name}.tar.gz")


def pack(repo: Path, out: str) -> list[str]:
    listing = f"git -C {shlex.quote(str(repo))} ls-files -z --cached --others --exclude-standard"
    archive = f"tar -czf {shlex.quote(out)} -C {shlex.quote(str(repo))} --null --ignore-failed-read -T -"
    return ["bash", "-o", "pipefail", "-c", f"{listing} | {archive}"]


def install() -> str:
    return (f"rm -rf {REMOTE_REPO} && mkdir -p {REMOTE_REPO} && tar -xzf {REMOTE_BUNDLE} -C {REMOTE_REPO} && "
            f"{_WORKER} install")


def start(config: str, workdir: str, overrides: Sequence[str], env: Mapping[str, str] | None = None) -> str:
    assignments = [f"{name}={shlex.quote(value)}" for name, value in (env or {}).items()]
    return " ".join([*assignments, _WORKER, "start", shlex.join([config, workdir, *overrides])])


def stream(from_line: int) -> str:
    return f"{_WORKER} stream {from_line}"


def status() -> str:
    return f"{_WORKER} status"
