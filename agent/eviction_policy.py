"""Which uploaded files may lose their local copy: GigHive still reads local files.

Eviction is safe for the data (agent.safety decides that), but GigHive's own local readers (the
guest stream endpoint, export, ingest with ffprobe and the thumbnail, the AI worker's read-only
mount) break on a file that is gone. So a file keeps its local copy:

- until it is EVICT_MIN_AGE_DAYS old (by its modification time: GigHive ingests and tags a new
  file in its first hours; old media is what fills disks);
- while GigHive still works on it: an `ai_jobs` row queued or running for its asset, or an upload
  job in progress that holds its checksum, or (with a whole `assets` table) no `assets` row yet,
  which means its ingest has not finished (EVICT_WAIT_FOR_GIGHIVE);
- optionally, while its filesystem is below EVICT_ABOVE_DISK_PERCENT used;
- until the time `gighive-media fetch --keep-days` gave it, when it was brought back for a reader.

A reason is returned for a file that must stay; None lets agent.safety decide.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from .config import Config
from .media import media_file_for_blob
from .pointer import PointerDB, PointerUnavailable, asset_key
from .state import FileRecord

log = logging.getLogger(__name__)

# GigHive's job tables change slowly; one look per minute is enough for a policy measured in days.
_BUSY_TTL = 60.0


class EvictionPolicy:
    def __init__(self, config: Config, pointer_db: PointerDB | None, db_lock: threading.Lock):
        self.config = config
        self.pointer_db = pointer_db
        self.db_lock = db_lock
        self._busy: tuple[float, set[str], set[tuple[str, str]] | None] | None = None

    def blocks(self, rec: FileRecord, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        if rec.keep_local_until is not None and rec.keep_local_until > now:
            return "`gighive-media fetch` brought it back for a local reader; kept until " + time.strftime(
                "%Y-%m-%d %H:%M UTC", time.gmtime(rec.keep_local_until)
            )
        min_age = self.config.evict_min_age_days * 86400.0
        if rec.mtime_ns is not None and now - rec.mtime_ns / 1e9 < min_age:
            return f"younger than EVICT_MIN_AGE_DAYS={self.config.evict_min_age_days:g}"
        threshold = self.config.evict_above_disk_percent
        mf = media_file_for_blob(self.config, rec.blob_name)
        if threshold > 0 and mf is not None:
            try:
                st = os.statvfs(mf.root.path)
            except OSError:
                return "its filesystem's usage cannot be read"
            used = 100.0 * (1.0 - st.f_bavail / st.f_blocks) if st.f_blocks else 0.0
            if used <= threshold:
                return f"its filesystem is {used:.0f}% used, not above EVICT_ABOVE_DISK_PERCENT={threshold:g}"
        if self.config.evict_wait_for_gighive and self.pointer_db is not None and mf is not None:
            key = asset_key(mf)
            if key is not None:
                try:
                    busy, assets = self._gighive_view(now)
                except PointerUnavailable as e:
                    return f"cannot ask GigHive whether it still works on it: {e}"
                if key[1] in busy:
                    return "GigHive still works on it (an AI job queued or running, or an upload job in progress)"
                if assets is not None and key not in assets:
                    return "GigHive has no assets row for it yet (ingest not finished)"
        return None

    def _gighive_view(self, now: float) -> tuple[set[str], set[tuple[str, str]] | None]:
        if self._busy is None or now - self._busy[0] > _BUSY_TTL:
            assert self.pointer_db is not None
            with self.db_lock:
                busy = self.pointer_db.busy_checksums()
                assets = self.pointer_db.asset_keys()
            # An empty table says nothing (cleared, or an import refilling it): then only age and
            # jobs decide, never "not in assets".
            self._busy = (now, busy, assets or None)
        return self._busy[1], self._busy[2]
