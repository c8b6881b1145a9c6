"""Where a stream's bytes come from, and whether they may carry their name's promise.

The two sources are the storage seam's (agent/storage/local.py and agent/storage/azure_blob.py);
the HTTP layer talks to the OpenObject protocol and never asks which one it holds.

A content-addressed name (`<sha256>.<ext>`) promises bytes. A file under that name is not proof
of them: GigHive's zip import and `copy()` write in place under the final name, rsync
`--partial` leaves a cut file there, and bytes rot. So bytes are *verified* only when the agent
has hashed them:
- a local file whose (inode, size, mtime_ns) are still the ones the agent's state recorded with
  a sha256 equal to the name (the upload hashed exactly those bytes, and rejects a file that
  changes while it is read);
- a blob whose `sha256` metadata equals the name (the uploader commits a blob only after
  checking it, and writes that metadata with it).
Everything else is served as what it is, without the promise (docs/streaming.md, "Files that
are not verified").
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from ..errors import StateError
from ..media import MediaFile
from ..state import FileRecord, StateStore
from ..storage import OpenObject, RangeReader, UpstreamError, iter_range
from ..storage.azure_blob import BlobSource
from ..storage.local import LocalSource
from .markers import VerifiedMarkers

__all__ = [
    "BlobSource",
    "Ledger",
    "LocalSource",
    "OpenObject",
    "Opened",
    "RangeReader",
    "Sources",
    "UpstreamError",
    "iter_range",
]

log = logging.getLogger(__name__)


class Opened(NamedTuple):
    obj: OpenObject
    # The bytes are proven to be the ones a content-addressed name promises (see above).
    verified: bool
    # The open local file's fstat (None for a blob): what an unverified file's ETag is made of.
    st: os.stat_result | None = None


class Ledger:
    """The agent's state database (agent/state.py), read-only: which local files it has hashed.

    Opened lazily: the server may start before the first run of the agent creates the database,
    and until then nothing on disk is verified.
    """

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self._store: StateStore | None = None
        self._lock = threading.Lock()
        self._complained = False

    def record(self, blob_name: str) -> FileRecord | None:
        try:
            with self._lock:
                if self._store is None:
                    self._store = StateStore.open_for_lookups(self.state_dir)
                    if self._store is None:
                        return None
                store = self._store
            return store.get(blob_name)
        except StateError as e:
            # Fail safe: no record means no promise; the file is still served, as unverified.
            if not self._complained:
                self._complained = True
                log.warning("cannot read the agent's state; local files are served as unverified: %s", e)
            return None


def vouches_for_local(rec: FileRecord | None, expected_sha256: str, st: os.stat_result) -> bool:
    """The agent hashed exactly this file (same inode, size and mtime) and found its name's sha256."""
    return (
        rec is not None
        and rec.state != "quarantined"
        and rec.sha256 == expected_sha256
        and (rec.inode, rec.size, rec.mtime_ns) == (st.st_ino, st.st_size, st.st_mtime_ns)
    )


def may_have_blob(rec: FileRecord | None) -> bool:
    """The agent uploaded a blob under this name at some point. The row's ETag outlives a local file
    that changes (the scan resets the row to `pending` when a re-import appears), and the blob is
    checked against the name when it is opened."""
    return rec is not None and bool(rec.etag)


@dataclass(frozen=True)
class Sources:
    local: LocalSource
    blob: BlobSource | None
    ledger: Ledger | None = field(default=None)
    # The front's verified-file markers (markers.py); None: none are kept.
    markers: VerifiedMarkers | None = None

    def __post_init__(self) -> None:
        if self.ledger is None:
            object.__setattr__(self, "ledger", Ledger(self.local.config.state_dir))

    def open(self, media: MediaFile) -> Opened | None:
        """A verified copy if there is one, the local file first (sendfile, no Azure cost);
        else whatever copy exists, unverified. Keeps the front's markers in step with what it
        found: a marker for a verified local file, none for a name whose local file is not."""
        opened = self._open(media)
        if self.markers is not None and media.expected_sha256 is not None:
            if opened is not None and opened.verified and opened.st is not None:
                self.markers.vouch(media, opened.st)
            elif opened is not None and opened.st is not None:
                self.markers.withdraw(media, opened.st.st_size)
            elif opened is not None:
                # From Blob: evicted, or a local copy that does not verify (its size was
                # withdrawn in _open). The local file may come back with this size.
                self.markers.withdraw(media, opened.obj.info.size)
        return opened

    def _open(self, media: MediaFile) -> Opened | None:
        expected = media.expected_sha256
        local = self.local.open(media)
        if local is not None:
            assert local.sendfile_fd is not None
            st = os.fstat(local.sendfile_fd)
            if expected is None:
                return Opened(local, False, st)
            assert self.ledger is not None
            rec = self.ledger.record(media.blob_name)
            if vouches_for_local(rec, expected, st):
                return Opened(local, True, st)
            # Not (or no longer) the bytes the agent hashed: being written, cut, corrupt, or new.
            # When the agent uploaded a blob of the name (a re-import of evicted media being
            # written right now), that copy answers instead, if it is verified.
            if self.blob is not None and may_have_blob(rec):
                try:
                    blob = self.blob.open(media)
                except UpstreamError as e:
                    log.info(
                        "unverified local file, and its blob cannot be read (%s); sending the local file unverified",
                        e,
                        extra={"fields": {"blob_name": media.blob_name}},
                    )
                    blob = None
                if blob is not None and (blob.info.sha256 or "").lower() == expected:
                    if self.markers is not None:
                        self.markers.withdraw(media, st.st_size)
                    local.close()
                    return Opened(blob, True)
                if blob is not None:
                    blob.close()
            return Opened(local, False, st)
        if self.blob is None:
            return None
        blob = self.blob.open(media)
        if blob is None:
            return None
        return Opened(blob, expected is not None and (blob.info.sha256 or "").lower() == expected)
