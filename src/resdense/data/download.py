"""Files on disk: the cache directory, atomic writes, verified downloads, safe extraction.

Every file this package writes (downloads, decoded image caches, statistics) goes through
:func:`atomic_write`: it is written to a temporary file beside its target, flushed to disk
and renamed, so an interrupted run leaves either the old file or the new one, never half
of one. A download only takes its final name after its MD5 matched the published one.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import shutil
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable

from .._io import atomic_write, atomic_write_bytes, fsync_dir, readable  # noqa: F401  (re-exported)
from ..errors import DataError
from ..limits import MAX_ARCHIVE_MEMBERS, MAX_UNPACKED_BYTES

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """The user cache of resdense: ``$XDG_CACHE_HOME/resdense``, else ``~/.cache/resdense``."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".cache"
    return root / "resdense"


def md5_file(path: str | os.PathLike) -> str:
    """Hex MD5 of a file, read in chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class RemoteFile:
    """A file as published: its name on the mirrors and the MD5 the publisher lists for it."""

    filename: str
    md5: str
    extract: bool = False  # a tar archive to unpack after download


@dataclass(frozen=True)
class Remote:
    """Where a dataset is published: mirrors tried in order, and its files."""

    mirrors: tuple[str, ...]
    files: tuple[RemoteFile, ...]

    def urls(self, filename: str) -> list[str]:
        return [m.rstrip("/") + "/" + filename for m in self.mirrors]


Opener = Callable[..., BinaryIO]


def download_file(url: str, dest: str | os.PathLike, md5: str, *, opener: Opener | None = None,
                  timeout: float = 60.0) -> Path:
    """Fetch ``url`` into ``dest``; the file appears under its name only if its MD5 is ``md5``.

    Network failures raise :class:`OSError` (so a caller can try another mirror); a checksum
    mismatch raises :class:`DataError` naming the file.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    opener = opener or urllib.request.urlopen

    def stream(out: BinaryIO) -> None:
        digest = hashlib.md5(usedforsecurity=False)
        with opener(url, timeout=timeout) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
        got = digest.hexdigest()
        if got != md5.lower():  # raised inside atomic_write: the partial file is removed
            raise DataError(f"downloaded {dest.name} from {url} has MD5 {got}, but the published checksum "
                            f"is {md5}: the mirror or the connection corrupted it; try again later")

    atomic_write(dest, stream)
    return dest


def fetch(remote: Remote, dest_dir: str | os.PathLike, *, dataset: str, opener: Opener | None = None,
          timeout: float = 60.0) -> list[Path]:
    """Download every file of ``remote`` into ``dest_dir`` (skipping ones already there and
    verified), trying the mirrors in order; unpack archives. Returns the downloaded paths."""
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create {dest_dir} to download {dataset} into ({e.strerror}); "
                        f"choose another --data-dir") from None
    paths = []
    for rf in remote.files:
        dest = dest_dir / rf.filename
        if not (dest.is_file() and md5_file(dest) == rf.md5):
            _fetch_one(remote, rf, dest, dataset=dataset, opener=opener, timeout=timeout)
        if rf.extract:
            extract_tar(dest, dest_dir)
        paths.append(dest)
    return paths


def _fetch_one(remote: Remote, rf: RemoteFile, dest: Path, *, dataset: str, opener: Opener | None,
               timeout: float) -> None:
    failures = []
    for url in remote.urls(rf.filename):
        log.info("downloading %s", url)
        try:
            download_file(url, dest, rf.md5, opener=opener, timeout=timeout)
            return
        except (OSError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts, cut connections
            failures.append(f"{url}: {getattr(e, 'reason', None) or e}")
    raise DataError(f"could not download {dataset} file {rf.filename} ({'; '.join(failures)}); check the "
                    f"network, or fetch it yourself into {dest.parent}")


def extract_tar(archive: str | os.PathLike, dest_dir: str | os.PathLike) -> None:
    """Unpack a tar archive into ``dest_dir`` refusing links, devices and paths that escape it.

    The members land in a temporary folder first and are moved into place one top-level
    entry at a time, so a failed extraction leaves nothing half-written under its real name.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest_dir))
    except OSError as e:
        raise DataError(f"cannot unpack {archive} into {dest_dir} ({e.strerror}); unpack it yourself or copy "
                        f"it to a writable --data-dir") from None
    try:
        try:
            with tarfile.open(archive) as tar:
                members, total = 0, 0
                for member in tar:  # streamed: a header bomb stops at the bound, not after listing it all
                    if not (member.isfile() or member.isdir()):
                        raise DataError(f"{archive}: member {member.name} is not a plain file; refusing to unpack it")
                    members, total = members + 1, total + member.size
                    if members > MAX_ARCHIVE_MEMBERS or total > MAX_UNPACKED_BYTES:
                        raise DataError(f"{archive}: holds more than {MAX_ARCHIVE_MEMBERS:,} files or "
                                        f"{MAX_UNPACKED_BYTES:,} bytes, the most resdense unpacks; refusing it")
                # The "data" filter also refuses absolute paths and '..' components.
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{archive}: cannot unpack ({e}); delete it and download it again") from None
        for entry in tmp.iterdir():
            target = dest_dir / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
