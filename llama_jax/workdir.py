"""The run directory: a local path or an object-store URL (gs://bucket/run), and the lock that keeps it to one run.

Every file the trainer writes goes through `etils.epath`, which Orbax uses too, so a pod can write its checkpoints
and logs straight to a bucket: no part of the run assumes a local filesystem. Buckets have no `flock`, so a remote
workdir is held by a lease instead: a small `.lock` object its holder rewrites every `LEASE_REFRESH_S` seconds; a
lease older than `LEASE_EXPIRY_S` belongs to a run that died, and the next run takes it over.

The same paths carry the checkpoints a run is converted, averaged or sampled from, so the readers and writers of
checkpoint files (convert.py and its formats) use the helpers here where a library wants a local file: `read_array`
reads one tensor's bytes with a single ranged read (no download of the file around it), `local_copy` brings a few
small files or one object to a temporary directory, and `local_output` lets a writer that needs a local filesystem
(random-access writes, libraries that take file names) write to a temporary directory that is uploaded afterwards.
For a local path each of them is the plain local operation, so local runs behave exactly as without them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from etils import epath

from llama_jax.errors import CheckpointError, ConfigError, DataError

LEASE_REFRESH_S = 30.0
LEASE_EXPIRY_S = 120.0


def is_remote(path: str | os.PathLike) -> bool:
    return "://" in os.fspath(path)


def resolve(path: str | os.PathLike) -> epath.Path:
    """A URL as it is; a local path expanded and made absolute (the checkpoints record where they are)."""
    text = os.fspath(path)
    return epath.Path(text if is_remote(text) else os.path.abspath(os.path.expanduser(text)))


def as_path(path: str | os.PathLike) -> Path | epath.Path:
    """An `epath.Path` for a URL, the local path as a `pathlib.Path` otherwise (relative stays relative)."""
    return epath.Path(path) if is_remote(path) else Path(path).expanduser()


def not_a_file(path: Path | epath.Path) -> str:
    """Why a path a user named as a file is none, for their error message: a directory given by mistake is told
    apart from a missing file."""
    return "is a directory" if path.is_dir() else "does not exist"


def read_utf8(path: Path | epath.Path, fix: str) -> str:
    """A text file a user named. One that is not UTF-8 (a binary file given by mistake) is a `DataError` naming the
    file and `fix`, where Python's decoding error names neither."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): {fix}") from None


def check_writable(path: str | os.PathLike, flag: str, *, directory: bool) -> None:
    """Refuses an output that cannot be written before a command does its work, naming the flag to change, where
    the OS error would come at the end, after the hours of conversion or sampling, from deep inside a writer and
    naming only a temporary file. Nothing is left behind. A URL is checked by writing and deleting one empty object
    where the output goes: a bucket's absence or permissions show only when writing."""
    if is_remote(path):
        _check_remote_writable(os.fspath(path), flag, directory=directory)
        return
    path = Path(path).expanduser().absolute()
    if path.exists() and path.is_dir() != directory:
        problem = "it is a directory" if path.is_dir() else "it is a file"
    else:
        ancestor = path if path.is_dir() else path.parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            problem = f"{ancestor} is a file"
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            problem = f"this user cannot write in {ancestor}"
        else:
            return
    what = "a directory" if directory else "a file"
    raise ConfigError(f"{flag} {path} cannot be written ({problem}): give {what} path where this user can write")


def store_error(error: Exception) -> str:
    """An OS or object-store error in one line. gcsfs puts the request's URL on the first line of an HTTP error
    ('Forbidden: https://...upload...?name=run%2F.lock') and the store's reason (which permission this account lacks)
    on the next: the reason replaces the URL."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    status, _, rest = str(error).partition("\n")
    label, _, url = status.partition(": ")
    reason = " ".join(rest.split())
    return f"{label}: {reason}" if reason and "://" in url else status


def _check_remote_writable(url: str, flag: str, *, directory: bool) -> None:
    folder = epath.Path(url) if directory else epath.Path(url).parent
    probe = folder / f".llama_jax-write-check-{uuid.uuid4().hex}"
    try:
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 (the store's clients raise OSErrors and their own HTTP errors alike)
        scheme, _, rest = url.partition("://")
        if isinstance(e, FileNotFoundError):
            problem = f"there is no bucket {scheme}://{rest.split('/', 1)[0]}"
        else:
            problem = f"writing a test object there failed: {type(e).__name__}: {store_error(e)}"
        raise ConfigError(f"{flag} {url} cannot be written ({problem}): give a bucket path this account may write to, "
                          "or a local path") from None


_COPY_CHUNK_BYTES = 64 * 2**20  # one request's worth when streaming to or from an object store


def read_array(path: str | os.PathLike, dtype: np.dtype, count: int, offset: int) -> np.ndarray:
    """`count` items of `dtype` from byte `offset` of a file, in one read: `np.fromfile` for a local file (nothing
    mapped), one ranged read of an object. Memory holds the array (and, for an object, one copy of its bytes)."""
    if not is_remote(path):
        return np.fromfile(path, dtype, count=count, offset=offset)
    out = np.empty(count, dtype)
    view, filled = memoryview(out.view(np.uint8)), 0
    with epath.Path(path).open("rb") as f:
        f.seek(offset)
        while filled < len(view):
            read = f.readinto(view[filled:])
            if not read:
                raise CheckpointError(f"{path} ends before byte {offset + len(view)}, where a tensor ends: the object "
                                      "is truncated; upload it again")
            filled += read
    return out


def write_array(file, array: np.ndarray) -> None:
    """Writes `array`'s bytes to the open `file` in chunks, so that no object-store client buffers more than one."""
    data = array.reshape(-1).view(np.uint8)
    for start in range(0, data.size, _COPY_CHUNK_BYTES):
        file.write(data[start:start + _COPY_CHUNK_BYTES])


def write_whole(path: str | os.PathLike, content: str | bytes) -> None:
    """Replaces the file at `path` by `content` so that a reader, or a process killed mid-write, sees the old content
    or the new, never a part: a local file is written beside and renamed into place; an object store's write is whole
    already."""
    if is_remote(path):
        epath.Path(path).write_bytes(content if isinstance(content, bytes) else content.encode())
        return
    path = Path(path)
    partial = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        if isinstance(content, bytes):
            partial.write_bytes(content)
        else:
            partial.write_text(content)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log such as WORKDIR/metrics.jsonl; none when it does not exist."""
    path = as_path(path)
    return parse_jsonl(path.read_text(), path) if path.exists() else []


def parse_jsonl(text: str, path: str | os.PathLike) -> list[dict]:
    """The records of `text`, read from `path`. A last line that is not JSON is what a process killed mid-write (or
    a full disk) leaves: it is left out, as never logged. A bad line before the last is damage that no writer of
    ours makes, and is refused by name."""
    lines = [line for line in text.splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise CheckpointError(f"{os.fspath(path)} line {number} is not JSON ({line[:60]!r}): the file was "
                                      "edited or damaged; fix or delete that line") from None
    return records


def _copy_file(src: Path | epath.Path, dst: Path | epath.Path) -> None:
    """A file's bytes from `src` to `dst` (either side local or remote), streamed in chunks."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with src.open("rb") as reader, dst.open("wb") as writer:
        while chunk := reader.read(_COPY_CHUNK_BYTES):
            writer.write(chunk)


def _files_under(directory: Path | epath.Path) -> Iterator[Path | epath.Path]:
    """Every file below `directory`, by listing each directory (recursive globs are refused on buckets)."""
    for child in sorted(directory.iterdir()):
        if child.is_dir():
            yield from _files_under(child)
        else:
            yield child


@contextlib.contextmanager
def local_copy(path: str | os.PathLike, names: Iterable[str] | None = None) -> Iterator[Path]:
    """`path` as a local path: itself when it is local; a remote object, or directory, downloaded to a temporary
    directory removed when the block ends. With `names` (paths relative to a directory) only those of them that
    exist are copied: the small files beside a checkpoint's weights, for readers that take a local path."""
    if not is_remote(path):
        yield Path(path).expanduser()
        return
    remote = epath.Path(path)
    if not remote.exists():
        raise CheckpointError(f"{remote} does not exist: check the bucket and path (gsutil ls {remote.parent})")
    with tempfile.TemporaryDirectory(prefix="llama_jax-") as tmp:
        local = Path(tmp) / remote.name
        if remote.is_file():
            _copy_file(remote, local)
        else:
            local.mkdir()
            wanted = [remote / name for name in names] if names is not None else _files_under(remote)
            for file in wanted:
                if names is None or file.is_file():
                    _copy_file(file, local / os.path.relpath(os.fspath(file), os.fspath(remote)))
        yield local


@contextlib.contextmanager
def local_output(path: str | os.PathLike, *, last: Sequence[str] = ()) -> Iterator[Path]:
    """A local directory to write what belongs in the directory `path`: `path` itself (created) when local; for a
    remote one a temporary directory whose files are uploaded into `path` once the block has succeeded (nothing is
    uploaded after an error). `last` names files (relative paths) uploaded after all others: a checkpoint's marker
    of completeness, so that a reader never takes a half-uploaded one for whole. Disk holds the whole output."""
    if not is_remote(path):
        local = Path(path).expanduser()
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    remote = epath.Path(path)
    with tempfile.TemporaryDirectory(prefix="llama_jax-") as tmp:
        yield Path(tmp)
        files = sorted(_files_under(Path(tmp)), key=lambda file: os.path.relpath(file, tmp) in last)
        for file in files:
            _copy_file(file, remote / os.path.relpath(file, tmp))


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
    """A lease on WORKDIR/.lock for object stores, refreshed by a daemon thread while the run lives. A lease is
    taken over when it expires, or at once when its holder was a process of this machine that no longer runs: a run
    killed (SIGKILL, out of memory, the watchdog's exit) never releases it, and its supervisor restarts it here
    sooner than the lease expires (the restart was refused, and the supervisor gave up)."""

    def __init__(self, workdir: epath.Path):
        self.path = workdir / ".lock"
        self._owner = {"id": uuid.uuid4().hex, "holder": f"pid {os.getpid()} on {socket.gethostname()}",
                       "pid": os.getpid(), "machine": _machine_id()}
        held = self._read()
        if held and held["id"] != self._owner["id"] and time.time() - held["time"] < LEASE_EXPIRY_S \
                and not _died_here(held):
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


def _machine_id() -> str | None:
    """Where this process's pid means this process: this boot of the machine (Linux's boot id; pids repeat across
    boots, host names across containers) and this pid namespace (containers on one machine share its boot id)."""
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _died_here(held: dict) -> bool:
    """Whether a lease's holder was a process of this machine, since its boot, that no longer runs."""
    if _machine_id() is None or held.get("machine") != _machine_id() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def lock(workdir: epath.Path) -> _FileLock | _Lease:
    """Holds `workdir` for this run, or raises CheckpointError naming the run that holds it."""
    return _Lease(workdir) if is_remote(workdir) else _FileLock(workdir)
