"""Atomic file writes: a crash leaves either the old file or the new one, never half of one.

A write that fails for a reason outside the program (a full disk, a read-only file system, no
permission) becomes a :class:`~resdense.errors.WriteError` naming the file and the free space
on its disk, after the temporary file is removed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from .errors import WriteError

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Only these say "the disk refused": a write callback may also read (a download), and a network
# error raised there is not about the file.
_DISK_ERRORS = NO_SPACE | {errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
# torch.save reports a short write without errno ("[enforce fail at inline_container.cc:672] .
# unexpected pos 794304 vs 794256"); on a local disk its cause is a full disk or a quota.
_TORCH_SHORT_WRITE = re.compile(r"unexpected pos|failed writing|write failed", re.IGNORECASE)
# safetensors (Rust) names the OS error in its text: "I/O error: No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_space(path: str | os.PathLike) -> Optional[int]:
    """Bytes free for this user on the file system holding ``path`` (its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def write_failure(exc: BaseException, path: str | os.PathLike) -> Optional[WriteError]:
    """``exc`` as a :class:`WriteError` about ``path`` if it is a failed write, else ``None``
    (an exception that is not about the disk is a bug and keeps its traceback)."""
    if isinstance(exc, WriteError):
        return exc
    if isinstance(exc, OSError):
        if exc.errno not in _DISK_ERRORS:
            return None
        code: Optional[int] = exc.errno
        reason = exc.strerror or str(exc) or type(exc).__name__
    elif isinstance(exc, RuntimeError) and _TORCH_SHORT_WRITE.search(str(exc)):
        code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
    elif type(exc).__name__ == "SafetensorError" and (m := _RUST_OS_ERROR.search(str(exc))):
        code = int(m.group(1))
        reason = os.strerror(code)
    else:
        return None
    if code in NO_SPACE:
        reason = f"the disk is full ({reason.lower()})"
    free = free_space(path)
    where = f"; {human_bytes(free)} free on its disk" if free is not None else ""
    return WriteError(f"cannot write {path}: {reason}{where}", code, str(path))


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (not every platform can open a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def readable(fd: int) -> None:
    """Give a mkstemp file (created 0600) the mode an ordinary new file would get under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Create ``path`` by calling ``write(file)`` on a temporary file beside it, then fsync and rename."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        readable(fd)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        failure = write_failure(e, path) if isinstance(e, Exception) else None
        if failure is not None and failure is not e:
            raise failure from None
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())
