"""The storage seam: local disk and Azure Blob behind one small protocol.

The uploader, the stream server and the migration tools talk to these types, not to the Azure
SDK, so "where do the bytes live" is decided in one place.
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
