"""Which new files are read at once instead of after UPLOAD_SETTLE_SECONDS.

The settle time exists for files written in place: a copy, a zip import or an rsync --inplace is
visible under its final name while it grows, and a writer may pause between writes. It costs
every new file that long before its upload starts (5 s by default: almost all of the trigger
latency in docs/benchmarks.md). A new file skips it, for one early try, when something other
than its age says it is complete:

- Its name is a content address (`<sha256>.<ext>` at the top of a content-addressed root, all
  of GigHive's uploads): a half-written file cannot hash to its name, and the transfer checks the
  hash before any blob is committed (agent/transfer.py). If the early try finds it does not
  match, the file is taken as still being written: it waits for the settle time, and only a
  mismatch after that quarantines it.
- It was renamed into the root (inotify IN_MOVED_TO while `upload` watches): writing under a
  temp name and renaming into place is how a writer says "complete" (GigHive's thumbnails, rsync
  without --inplace, `mv` within one filesystem; a move across filesystems is a copy and is seen
  as IN_CLOSE_WRITE). For other names this convention is the guard, together with: the transfer
  rejects a file that changes while it is read; the mark is bound to the size, mtime and inode
  seen when the event is read, so a later write voids the mark; and only content-addressed files are
  ever evicted, so a file taken early under any other name keeps its local copy and is uploaded
  again when it changes. A file written in place under another name still waits the settle time.

The early try is one-shot: a file that turns out incomplete (changed while read, or not yet its
hash) waits as before, so a slow writer costs at most one wasted read, not one per settle period.
"""

from __future__ import annotations

import os
import time

from .media import MediaFile
from .state import Seen


class Arrivals:
    """Files this run may read before they settled, each bound to the size, mtime and inode seen."""

    def __init__(self, settle_seconds: float):
        self.settle_seconds = settle_seconds
        self._early: dict[str, Seen] = {}

    def observed(self, mf: MediaFile, st: os.stat_result, renamed_in: bool = False) -> float:
        """Note a file seen on disk; returns when it may be read (the queue's not_before)."""
        now = time.time()
        # A future mtime (clock stepped back, skewed NFS server) must not schedule the file days ahead.
        settled_at = min(st.st_mtime, now) + self.settle_seconds
        if settled_at <= now:
            return settled_at  # old enough already: nothing to remember
        if renamed_in or mf.expected_sha256 is not None:
            self._early[mf.blob_name] = Seen.of(st)
            return now
        return settled_at

    def take(self, blob_name: str, st: os.stat_result) -> bool:
        """Whether this unsettled file may be read now: the very file that arrived, once."""
        early = self._early.pop(blob_name, None)
        return early is not None and early == Seen.of(st)
