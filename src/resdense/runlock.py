"""One writer per run directory: an OS file lock held for the life of the process that works in it.

``RUN/.lock`` is locked with ``flock``; the kernel drops the lock when the process exits, however
it exits (SIGKILL included), so a dead process never leaves a stale lock to clean. The file holds
the owner's process id and host, read back to name the owner when a second process is refused.
The same lock lets several study processes (on one machine, or on several sharing the folder)
cooperate: each takes the runs it can lock and skips the ones another process holds. Across hosts
that needs a filesystem whose ``flock`` is coherent between them (:func:`check_locking`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .errors import ConfigError, UserError

LOCK_FILE = ".lock"
# Where a lock owner runs inside a Slurm job, the job that holds it (an array task as JOB_TASK).
_SLURM_JOB = ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID")


def owner_info() -> dict:
    """What a lock records about its holder: process id, host, start time and Slurm job."""
    info: dict = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    array, task, job = (os.environ.get(k) for k in _SLURM_JOB)
    if array and task:
        info["slurm_job"] = f"{array}_{task}"
    elif job:
        info["slurm_job"] = job
    return info


class RunLockedError(UserError):
    """Another process works in the run directory."""


class RunLock:
    """An exclusive, non-blocking lock on ``run_dir`` (created if missing).

    Use :meth:`acquire` (raises :class:`RunLockedError` naming the owner) or :meth:`try_acquire`
    (returns ``False``), then :meth:`release`, or use it as a context manager.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        # Ours now: record who holds it (read by the processes this lock refuses).
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(owner_info()).encode(), 0)
        self._fd = fd
        return True

    def acquire(self) -> "RunLock":
        if not self.try_acquire():
            raise RunLockedError(f"{self.run_dir} is in use by {describe_owner(self.run_dir)}; wait for it to "
                                 "finish (or stop it), or use another --out")
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        # The file stays: removing it would let a third process lock a new file while a second
        # still waits on the old one's inode.
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def owner(run_dir: str | os.PathLike) -> Optional[dict]:
    """``{"pid": ..., "host": ..., "since": ..., "slurm_job": ...}`` (what :func:`owner_info` wrote) of the process holding ``run_dir``'s lock, or ``None`` if free."""
    lock = RunLock(run_dir)
    if not lock.path.exists():
        return None
    try:
        fd = os.open(lock.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(os.pread(fd, 4096, 0).decode() or "{}") or {"pid": None}
            except (ValueError, UnicodeDecodeError):
                return {"pid": None}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe_owner(run_dir: str | os.PathLike) -> str:
    info = owner(run_dir) or {}
    pid, host = info.get("pid"), info.get("host")
    if pid is None:
        return "another process"
    return f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def check_locking(folder: str | os.PathLike) -> None:
    """Refuse, in one line, a folder where ``flock`` fails or does not exclude a second holder
    (an NFS mount without lock support, a FUSE filesystem that ignores locks): there the run
    locks would not keep two processes out of one run."""
    path = Path(folder) / LOCK_FILE
    first = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    second = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(first, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # another process holds it (writing the report): locks work here
        except OSError as e:
            raise ConfigError(f"file locks do not work in {folder} ({errno.errorcode.get(e.errno, e.errno)}: "
                              f"{e.strerror}); processes sharing a study need flock: see the README, "
                              "'On a cluster' (NFSv4, Lustre with -o flock), or use a local folder") from None
        try:
            fcntl.flock(second, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # the second open file was refused: locks exclude
        raise ConfigError(f"file locks in {folder} do not exclude a second holder; processes sharing a study "
                          "need working flock: see the README, 'On a cluster', or use a local folder")
    finally:
        os.close(second)  # closing a descriptor drops the flock it held
        os.close(first)
