"""Where a stream's bytes come from: the local file first, else the blob.

The two sources are the storage seam's (agent/storage/local.py and agent/storage/azure_blob.py);
the HTTP layer talks to the OpenObject protocol and never asks which one it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..media import MediaFile
from ..storage import OpenObject, RangeReader, UpstreamError, iter_range
from ..storage.azure_blob import BlobSource
from ..storage.local import LocalSource

__all__ = ["BlobSource", "LocalSource", "OpenObject", "RangeReader", "Sources", "UpstreamError", "iter_range"]


@dataclass(frozen=True)
class Sources:
    local: LocalSource
    blob: BlobSource | None

    def open(self, media: MediaFile) -> OpenObject | None:
        """The local file while there is one (sendfile, no Azure cost), else the blob."""
        obj: OpenObject | None = self.local.open(media)
        if obj is None and self.blob is not None:
            obj = self.blob.open(media)
        return obj
