"""The storage seam: local disk and Azure Blob behind one small protocol.

The uploader, the stream server and the migration tools talk to these types, not to the Azure
SDK, so "where do the bytes live" is decided in one place. Two implementations: storage/local.py
(the media roots on disk) and storage/azure_blob.py (the container). Both answer `stat` and
`read_range`; for streaming, `open(media)` gives an OpenObject whose `reader(offset, length)`
hands out one range, and which declares its optional features (a file descriptor for sendfile, a
local path nginx may send).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple, Protocol


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object without reading it."""

    name: str
    size: int
    etag: str
    last_modified: datetime | None = None
    content_md5: bytes | None = None
    sha256: str | None = None
    content_type: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


class Listed(NamedTuple):
    """One entry of a container listing, kept small: a migration holds 100,000 of them."""

    size: int
    etag: str
    content_md5: bytes | None
    sha256: str | None
    # When the blob was last written, by the service's clock (seconds since the epoch); None
    # where the source does not say (a HEAD turned into a listing entry).
    last_modified: float | None = None


class ObjectNotFound(Exception):
    """The object does not exist in the store."""


class ObjectChanged(Exception):
    """The object changed between two reads pinned to one version (ETag mismatch)."""


class StoreUnavailable(Exception):
    """The store cannot be reached or refused the request; the message says which and why.

    `outage` is True when the failure is not about one object (network, DNS, TLS, credentials,
    throttling, a missing container): every other request would fail the same way, so callers
    stop sending them instead of spending retries on each file.
    """

    def __init__(self, message: str, outage: bool = True):
        super().__init__(message)
        self.outage = outage


class Store(Protocol):
    def stat(self, name: str) -> ObjectInfo | None: ...

    def read_range(
        self, name: str, offset: int, length: int, etag: str | None = None, chunk_size: int = ...
    ) -> Iterator[bytes]: ...


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
