"""Local disk behind the storage seam: media files under the configured roots, opened without
ever following a symlink, sent from the open file descriptor."""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_mod
from collections.abc import Iterator
from datetime import UTC, datetime

from ..config import Config
from ..media import MediaFile, media_file_for_blob
from . import ObjectChanged, ObjectInfo, ObjectNotFound, RangeReader, UpstreamError, iter_range

log = logging.getLogger(__name__)

_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
# O_NOFOLLOW: a symlink inside a root never leads out of it. O_NONBLOCK: a FIFO with a media
# name cannot hang the open; it is refused by the regular-file check right after.
_OPEN_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# What "this file is not here (as a regular file we may read)" looks like from open().
_ABSENT = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.ENXIO}


class _FileRange:
    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.pos, self.end = fd, offset, offset + length

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), self.end - self.pos)
        if n <= 0:
            return 0
        got = os.preadv(self.fd, [view[:n]], self.pos)
        if not got:
            raise UpstreamError("local file shrank while it was being sent")
        self.pos += got
        return got

    def close(self) -> None:
        pass


class LocalObject:
    origin = "local"

    def __init__(self, fd: int, info: ObjectInfo, path: str):
        self.sendfile_fd: int | None = fd
        self.info = info
        self.local_path: str | None = path

    def reader(self, offset: int, length: int) -> RangeReader:
        assert self.sendfile_fd is not None
        return _FileRange(self.sendfile_fd, offset, length)

    def close(self) -> None:
        if self.sendfile_fd is not None:
            os.close(self.sendfile_fd)
            self.sendfile_fd = None

    def __del__(self) -> None:
        self.close()


class LocalSource:
    """Media files under the configured roots, opened without ever following a symlink.

    The open file descriptor is what gets sent, so a file replaced or deleted while it streams
    (local eviction after upload) still sends the one version the headers described.
    """

    def __init__(self, config: Config):
        self.config = config

    def open(self, media: MediaFile) -> LocalObject | None:
        fds: list[int] = []
        try:
            # The root itself may be a symlink an operator made; everything below it may not.
            fds.append(os.open(media.root.path, _OPEN_DIR))
            for part in media.relpath.parts[:-1]:
                fds.append(os.open(part, _OPEN_DIR | os.O_NOFOLLOW, dir_fd=fds[-1]))
            fd = os.open(media.relpath.parts[-1], _OPEN_FILE, dir_fd=fds[-1])
        except OSError as e:
            if e.errno == errno.EACCES:
                log.warning(
                    "cannot read local media file, falling back to Blob: %s (give the service user "
                    "read access to the media roots)",
                    e,
                    extra={"fields": {"blob_name": media.blob_name}},
                )
            elif e.errno not in _ABSENT:
                log.warning("cannot open local media file: %s", e, extra={"fields": {"blob_name": media.blob_name}})
            return None
        finally:
            for d in fds:
                os.close(d)
        st = os.fstat(fd)
        if not stat_mod.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        info = ObjectInfo(
            name=media.blob_name,
            size=st.st_size,
            # nginx's format (mtime-size in hex), so the ETag is the same whether this server or
            # nginx (X-Accel-Redirect) sends a local file that is not content-addressed.
            etag=f'"{int(st.st_mtime):x}-{st.st_size:x}"',
            last_modified=datetime.fromtimestamp(st.st_mtime, UTC),
            content_type=media.content_type,
        )
        return LocalObject(fd, info, str(media.path))

    # -- the storage seam, for callers that think in blob names ---------------------------------
    def stat(self, name: str) -> ObjectInfo | None:
        media = media_file_for_blob(self.config, name)
        obj = self.open(media) if media else None
        if obj is None:
            return None
        obj.close()
        return obj.info

    def read_range(
        self, name: str, offset: int, length: int, etag: str | None = None, chunk_size: int = 1024 * 1024
    ) -> Iterator[bytes]:
        media = media_file_for_blob(self.config, name)
        obj = self.open(media) if media else None
        if obj is None:
            raise ObjectNotFound(name)
        try:
            if etag and obj.info.etag != etag:
                raise ObjectChanged(name)
            yield from iter_range(obj.reader(offset, min(length, max(0, obj.info.size - offset))), chunk_size)
        finally:
            obj.close()
