"""The run directory: a local path or an object-store URL (gs://bucket/run), and the lock that keeps it to one run.

Every file the trainer writes goes through `etils.epath`, which Orbax uses too, so a pod can write its checkpoints
and logs straight to a bucket: no part of the run assumes a local filesystem. Buckets have no `flock`, so a remote
workdir is held by a lease instead: a small `.lock` object its holder rewrites every `LEASE_REFRESH_S` seconds; a
lease older than `LEASE_EXPIRY_S` belongs to a run that died, and the next run takes it over.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid

from etils import epath

from llama_jax.errors import CheckpointError

LEASE_REFRESH_S = 30.0
LEASE_EXPIRY_S = 120.0


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """A URL as it is; a local path expanded and made absolute (the checkpoints record where they are)."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def _in_use(workdir: epath.Path, holder: str) -> CheckpointError:
    return CheckpointError(f"{workdir} is in use by a running job ({holder}): wait for it to finish, stop it, or use "
                           "another --workdir")


class _FileLock:
    """`flock` on WORKDIR/.lock: the operating system drops it when the holder dies, even by SIGKILL, so a crashed
    run never leaves a stale lock behind."""

    def __init__(self, workdir: epath.Path):
        self._file = open(workdir / ".lock", "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "another process"
            self._file.close()
            raise _in_use(workdir, holder) from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"pid {os.getpid()} on {socket.gethostname()}")
        self._file.flush()

    def release(self) -> None:
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()


class _Lease:
    """A lease on WORKDIR/.lock for object stores, refreshed by a daemon thread while the run lives."""

    def __init__(self, workdir: epath.Path):
        self.path = workdir / ".lock"
        self._owner = {"id": uuid.uuid4().hex, "holder": f"pid {os.getpid()} on {socket.gethostname()}"}
        held = self._read()
        if held and held["id"] != self._owner["id"] and time.time() - held["time"] < LEASE_EXPIRY_S:
            raise _in_use(workdir, held["holder"])
        self._write()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, name="workdir-lease", daemon=True)
        self._thread.start()

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def _write(self) -> None:
        self.path.write_text(json.dumps({**self._owner, "time": time.time()}))

    def _refresh(self) -> None:
        while not self._stop.wait(LEASE_REFRESH_S):
            self._write()

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def lock(workdir: epath.Path) -> _FileLock | _Lease:
    """Holds `workdir` for this run, or raises CheckpointError naming the run that holds it."""
    return _Lease(workdir) if is_remote(workdir) else _FileLock(workdir)
