"""Putting an evicted file back on local disk, verified, without ever exposing a partial file.

The bytes go to a hidden temporary file in the target directory (the scanner and GigHive ignore
dot-files), are hashed on the way, fsynced, checked against the size and sha256 recorded when
the file was uploaded, and only then linked into place under the real name. link(2) refuses to
replace a file that appeared meanwhile, so a newer local file is never overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from . import interrupts
from .errors import Interrupted
from .media import MediaFile
from .privileges import chown_like
from .storage.azure_blob import AzureBlobStore


class RestoreFailed(Exception):
    """The blob cannot be put back as the recorded file (missing, different, or no room)."""


@dataclass(frozen=True)
class Restored:
    size: int
    sha256: str
    downloaded: bool  # False when a verified copy was already in place
    # GigHive deleted the file while it came back: not put in place (or taken away again).
    withdrawn: bool = False


def sha256_of(path: str, chunk: int = 4 * 1024 * 1024) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        while data := f.read(chunk):
            h.update(data)
            size += len(data)
    return size, h.hexdigest()


# A stop gives a restore in flight a short grace: to finish its link and clean-up, or to give up
# between two chunks (and remove its temporary file).
@interrupts.busy()
def restore(
    store: AzureBlobStore,
    mf: MediaFile,
    size: int,
    sha256: str,
    mtime_ns: int | None,
    still_wanted: Callable[[], bool] | None = None,
) -> Restored:
    """`still_wanted`: asked once the bytes are verified, before and after they go in place. A
    download takes a while, and GigHive may delete the file meanwhile: its admin delete unlinks
    the local file only if it is there, so a copy put in place after that would bring back what
    the operator deleted. A copy the agent itself just put in place is taken away again (same
    inode); the blob it came from is untouched."""
    expected = mf.expected_sha256
    if expected is not None and expected != sha256:
        raise RestoreFailed(f"the recorded sha256 {sha256} differs from the one in the name {expected}")
    target = mf.path
    # One fixed name per file (the queue lock keeps other runs out): what a stopped or killed run
    # left behind is removed by the next one instead of staying hidden forever.
    tmp = target.parent / f".{target.name}.gighive-restore"
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        os.unlink(tmp)
    if os.path.lexists(target):
        # An earlier run placed it and was stopped before recording that, or someone copied
        # it back by hand: accept it only if it is the recorded file.
        have = sha256_of(str(target))
        if have != (size, sha256):
            raise RestoreFailed(
                f"{target} exists with other content ({have[0]} bytes, sha256 {have[1]}); not overwritten"
            )
        return Restored(size, sha256, downloaded=False)
    info = store.stat(mf.blob_name)
    if info is None:
        raise RestoreFailed(f"blob {mf.blob_name} is missing; the file cannot be restored from Blob")
    if info.size != size or (info.sha256 is not None and info.sha256 != sha256):
        raise RestoreFailed(
            f"blob {mf.blob_name} is not the recorded file (size {info.size} vs {size}, "
            f"sha256 {info.sha256} vs {sha256})"
        )
    directory = target.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        h = hashlib.sha256()
        written = 0
        with os.fdopen(fd, "wb", buffering=0) as out:
            for chunk in store.read_range(mf.blob_name, 0, size, etag=info.etag):
                if interrupts.requested():
                    raise Interrupted(f"stopped after {written} of {size} bytes of {mf.blob_name}")
                h.update(chunk)
                out.write(chunk)
                written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
            if (written, h.hexdigest()) != (size, sha256):
                raise RestoreFailed(
                    f"downloaded {written} bytes with sha256 {h.hexdigest()}, expected {size} bytes with {sha256}"
                )
            # GigHive's web server reads media as another user; the agent's umask must not hide it.
            os.fchmod(out.fileno(), 0o644)
            _match_directory_owner(out.fileno(), directory)
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        if still_wanted is not None and not still_wanted():
            return Restored(size, sha256, downloaded=True, withdrawn=True)
        try:
            os.link(tmp, target)
        except FileExistsError:
            have = sha256_of(str(target))
            if have != (size, sha256):
                raise RestoreFailed(f"{target} appeared meanwhile with other content; not overwritten") from None
        if still_wanted is not None and not still_wanted():
            ours = os.lstat(tmp).st_ino
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(target).st_ino == ours:
                    os.unlink(target)
            _fsync_dir(directory)
            return Restored(size, sha256, downloaded=True, withdrawn=True)
        _fsync_dir(directory)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise RestoreFailed(f"no space left on the device holding {directory}") from e
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return Restored(size, sha256, downloaded=True)


def _match_directory_owner(fd: int, directory) -> None:
    """Give the file the media directory's owner (GigHive's www-data), as the file had before it
    was evicted, where that is possible (see agent.privileges); a setgid directory gives the group
    anyway, and the mode makes it readable to GigHive whoever owns it."""
    chown_like(fd, directory)


def _fsync_dir(directory) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
