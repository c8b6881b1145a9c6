"""Where the bytes come from: local disk and Azure Blob behind one small protocol.

Both sources implement the storage seam (`stat`, `read_range`), and the streaming extension the
HTTP layer uses: `open(media)` returns an object with its `info` and a `reader(offset, length)`
that hands out the bytes of one range. The local object also declares its optional feature,
a file descriptor for zero-copy sendfile. The HTTP layer never asks which source it holds.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat as stat_mod
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import requests
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)

from ..config import Config
from ..media import MediaFile, media_file_for_blob
from ..storage import ObjectChanged, ObjectInfo, ObjectNotFound, StoreUnavailable, azure_sdk_private
from ..storage.azure_blob import SHA256_METADATA_KEY, AzureBlobStore, _describe, _network_reason
from .settings import StreamSettings

log = logging.getLogger(__name__)


class UpstreamError(StoreUnavailable):
    """Azure could not answer: `timeout` tells a gateway timeout (504) from a failure (502)."""

    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


class RangeReader(Protocol):
    def readinto(self, view: memoryview) -> int:
        """Fill `view` with the next bytes of the range (up to its length); 0 once the range is
        complete. Raises UpstreamError. The caller owns the buffer, so a stream costs one
        buffer of memory however long it runs."""
        ...

    def close(self) -> None: ...


def iter_range(reader: RangeReader, chunk_size: int) -> Iterator[bytes]:
    """The storage seam's read_range shape (an iterator of bytes) on top of a RangeReader."""
    buf = bytearray(chunk_size)
    view = memoryview(buf)
    try:
        while n := reader.readinto(view):
            yield bytes(view[:n])
    finally:
        reader.close()


class OpenObject(Protocol):
    info: ObjectInfo
    origin: str  # "local" or "blob", for logs and the STATUS line only
    sendfile_fd: int | None  # optional feature: a file to hand to sendfile(2)
    local_path: str | None  # optional feature: a local file nginx may send (X-Accel-Redirect)

    def reader(self, offset: int, length: int) -> RangeReader: ...

    def close(self) -> None: ...


# ---- local disk ----------------------------------------------------------------------------

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


# ---- Azure Blob ----------------------------------------------------------------------------


def _is_timeout(e: BaseException) -> bool:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, TimeoutError | socket.timeout | requests.Timeout):
            return True
        if "timed out" in str(cur).lower() or "timeout" in type(cur).__name__.lower():
            return True
        cur = getattr(cur, "inner_exception", None) or cur.__cause__ or cur.__context__
    return False


def _upstream_error(e: BaseException) -> UpstreamError:
    if isinstance(e, HttpResponseError | ClientAuthenticationError | ServiceRequestError | ServiceResponseError):
        text = _describe(e)  # type: ignore[arg-type]
    elif isinstance(e, requests.RequestException):
        text = f"Azure Blob unreachable: {_network_reason(str(e))}"
    else:
        text = f"Azure Blob read failed: {type(e).__name__}: {str(e)[:300]}"
    return UpstreamError(text, timeout=_is_timeout(e))


# Exceptions a read from an open Azure response can raise when the connection breaks.
_READ_ERRORS: tuple[type[BaseException], ...] = (OSError, requests.RequestException)
try:  # urllib3's own hierarchy does not derive from OSError
    import urllib3.exceptions

    _READ_ERRORS += (urllib3.exceptions.HTTPError,)
except ImportError:  # pragma: no cover
    pass
try:
    import http.client

    _READ_ERRORS += (http.client.HTTPException,)
except ImportError:  # pragma: no cover
    pass


class _StatCache:
    """Blob properties by name, for a short time, bounded in size (LRU)."""

    def __init__(self, ttl: float, entries: int):
        self.ttl, self.entries = ttl, entries
        self._items: OrderedDict[str, tuple[float, ObjectInfo]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str) -> ObjectInfo | None:
        if self.ttl <= 0:
            return None
        with self._lock:
            item = self._items.get(name)
            if item is None:
                return None
            if item[0] < time.monotonic():
                del self._items[name]
                return None
            self._items.move_to_end(name)
            return item[1]

    def put(self, info: ObjectInfo) -> None:
        if self.ttl <= 0 or self.entries <= 0:
            return
        with self._lock:
            self._items[info.name] = (time.monotonic() + self.ttl, info)
            self._items.move_to_end(info.name)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def forget(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)


class _BlobRange:
    """One range of one blob version, streamed from a single Azure GET.

    Reading a response as it arrives (instead of the SDK's downloader, which holds whole 4 MiB
    chunks in memory and opens a request per chunk) keeps memory per stream at one buffer and
    the throughput of one long GET. A broken connection is resumed where it stopped, pinned to
    the same ETag; a closed reader closes its connection, so Azure stops sending at once.
    """

    def __init__(self, source: BlobSource, name: str, offset: int, length: int, etag: str):
        self.source, self.name, self.etag = source, name, etag
        self.pos, self.end = offset, offset + length
        self.resumes_left = source.settings.upstream_retries
        self._response: Any = None
        self._body: Any = None
        self._open()

    def _open(self) -> None:
        self._response = self.source._download(self.name, self.pos, self.end - self.pos, self.etag)
        # http.client's response under urllib3's: its readinto() fills our buffer straight from
        # the socket. urllib3's own read() would allocate and copy every chunk twice, which at
        # 200 streams is most of the process's memory and a good part of its CPU.
        self._body = azure_sdk_private.body_reader(self._response)

    def readinto(self, view: memoryview) -> int:
        n = min(len(view), self.end - self.pos)
        if n <= 0:
            return 0
        while True:
            try:
                if self._response is None:
                    self._open()
                if self._body is not None:
                    got = self._body.readinto(view[:n])
                else:  # pragma: no cover - only if urllib3 changes its internals
                    data = self._response.raw.read(n, decode_content=False)
                    got = len(data)
                    view[:got] = data
                if not got:
                    raise UpstreamError(f"Azure ended the response {self.end - self.pos} bytes early")
                self.pos += got
                if self.pos >= self.end:
                    self._finish()
                return got
            except (ObjectChanged, ObjectNotFound):
                raise
            except (UpstreamError, *_READ_ERRORS) as e:
                self._drop()
                if self.resumes_left <= 0:
                    if isinstance(e, UpstreamError):
                        raise
                    raise _upstream_error(e) from e
                self.resumes_left -= 1
                log.warning(
                    "Azure read broke off, resuming at byte %d: %s",
                    self.pos,
                    e,
                    extra={"fields": {"blob_name": self.name}},
                )

    def _finish(self) -> None:
        """The whole body was read: give the connection back to the pool for the next request."""
        response, self._response, self._body = self._response, None, None
        if response is not None:
            if azure_sdk_private.body_finished(response):
                response.raw.release_conn()
            else:
                response.close()

    def _drop(self) -> None:
        response, self._response, self._body = self._response, None, None
        if response is not None:
            # close() (not release) discards the connection: unread data must not be reused.
            # Closing a broken connection may fail; it is gone either way.
            with contextlib.suppress(Exception):
                response.close()

    def close(self) -> None:
        self._drop()


class BlobObject:
    origin = "blob"
    sendfile_fd: int | None = None
    local_path: str | None = None

    def __init__(self, source: BlobSource, info: ObjectInfo):
        self.source, self.info = source, info

    def reader(self, offset: int, length: int) -> RangeReader:
        return _BlobRange(self.source, self.info.name, offset, length, self.info.etag)

    def close(self) -> None:
        pass


class BlobSource:
    """The private container, read through the agent's AzureBlobStore (auth, endpoint, CA, pool)."""

    def __init__(self, config: Config, settings: StreamSettings, store: AzureBlobStore | None = None):
        self.config = config
        self.settings = settings
        # One pooled connection per concurrent stream, or connections would be opened and
        # thrown away on every request once more streams run than the pool holds.
        self.store = store or AzureBlobStore(config, pool_size=settings.max_connections + 8, interactive=True)
        self.cache = _StatCache(settings.stat_cache_seconds, settings.stat_cache_entries)
        # Per request: a stream must fail fast (and say so) rather than sit in the SDK's backoff.
        self._request_options = {
            "retry_total": settings.upstream_retries,
            "connection_timeout": settings.upstream_timeout,
            "read_timeout": settings.upstream_timeout,
        }

    def forget(self, name: str) -> None:
        self.cache.forget(name)

    def stat(self, name: str) -> ObjectInfo | None:
        cached = self.cache.get(name)
        if cached is not None:
            return cached
        try:
            props = self.store.blob(name).get_blob_properties(**self._request_options)
        except ResourceNotFoundError as e:
            if getattr(e, "error_code", None) == "ContainerNotFound":
                raise _upstream_error(e) from e
            return None
        except (HttpResponseError, ClientAuthenticationError, ServiceRequestError, ServiceResponseError) as e:
            raise _upstream_error(e) from e
        except requests.RequestException as e:
            raise _upstream_error(e) from e
        info = ObjectInfo(
            name=name,
            size=props.size,
            etag=props.etag,
            last_modified=props.last_modified,
            sha256=(props.metadata or {}).get(SHA256_METADATA_KEY),
            content_type=props.content_settings.content_type,
            metadata=dict(props.metadata or {}),
        )
        self.cache.put(info)
        return info

    def open(self, media: MediaFile) -> BlobObject | None:
        info = self.stat(media.blob_name)
        return BlobObject(self, info) if info is not None else None

    def _download(self, name: str, offset: int, length: int, etag: str) -> Any:
        """A streaming ranged GET pinned with If-Match; returns the requests.Response.

        The SDK's public downloader buffers whole chunks, so this calls the operation the
        downloader itself calls (same pipeline: auth, retries, timeouts) and keeps the response
        unread; see agent/storage/azure_sdk_private.py and its contract test.
        """
        try:
            response = azure_sdk_private.download(self.store.blob(name), offset, length, etag, **self._request_options)
        except ResourceNotFoundError as e:
            self.forget(name)
            raise ObjectNotFound(name) from e
        except HttpResponseError as e:
            if e.status_code == 412:
                self.forget(name)
                raise ObjectChanged(name) from e
            raise _upstream_error(e) from e
        except (ClientAuthenticationError, ServiceRequestError, ServiceResponseError, requests.RequestException) as e:
            raise _upstream_error(e) from e
        return response

    # -- the storage seam ----------------------------------------------------------------------
    def read_range(
        self, name: str, offset: int, length: int, etag: str | None = None, chunk_size: int = 1024 * 1024
    ) -> Iterator[bytes]:
        if etag is None:
            info = self.stat(name)
            if info is None:
                raise ObjectNotFound(name)
            etag = info.etag
        if length <= 0:
            return
        yield from iter_range(_BlobRange(self, name, offset, length, etag), chunk_size)


@dataclass(frozen=True)
class Sources:
    local: LocalSource
    blob: BlobSource | None
