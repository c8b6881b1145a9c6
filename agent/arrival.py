"""Whether a file that just appeared in a media root is complete, so it needs no settle wait.

UPLOAD_SETTLE_SECONDS exists for files written in place: a copy, a zip import or an rsync
without a temp file is visible under its final name while it grows, and nothing says when the
writer is done. It costs every new file that long before its upload starts (5 s by default, the
bulk of the trigger latency in docs/benchmarks.md). Two signals say a file is finished without
waiting, and a file that has neither still waits:

- It was renamed into the root (inotify IN_MOVED_TO while `upload` watches): writing to a temp
  name and renaming into place is how a writer says "complete" (GigHive's tus finalize and its
  thumbnails, rsync, `mv` within one filesystem). A move across filesystems is a copy, seen as
  IN_CLOSE_WRITE, and waits.
- Found by a scan (the path unit's first run, before any event): its name is a content
  address (`<sha256>.<ext>` at the top of a content-addressed root) and its metadata changed
  after its last write (ctime > mtime: the rename into place, or the chmod/chown GigHive's
  importers do once the copy is done). A writer still at work sets both times with each write.

Neither signal alone proves the bytes are final, and none has to: the mark is bound to the
file's size, mtime and inode when the signal was seen, so any later write makes it void and
the file waits as before; the transfer rejects a file that changes while it is read; a
content-addressed file must hash to its name or it is quarantined, never uploaded; and only
content-addressed files are ever evicted, so a file uploaded early under any other name keeps
its local copy and is uploaded again when it changes.
"""

from __future__ import annotations

import os
import time

from .media import MediaFile


class Arrivals:
    """Files this run knows to be complete, each bound to the size, mtime and inode it had then."""

    def __init__(self, settle_seconds: float):
        self.settle_seconds = settle_seconds
        self._complete: dict[str, tuple[int, int, int]] = {}

    def observed(self, mf: MediaFile, st: os.stat_result, renamed_in: bool = False) -> float:
        """Note a file seen on disk; returns when it may be read (the queue's not_before)."""
        now = time.time()
        # A future mtime (clock stepped back, skewed NFS server) must not schedule the file days ahead.
        settled_at = min(st.st_mtime, now) + self.settle_seconds
        if settled_at <= now:
            return settled_at  # old enough already: nothing to remember
        if renamed_in or (mf.expected_sha256 is not None and st.st_ctime_ns > st.st_mtime_ns):
            self._complete[mf.blob_name] = _identity(st)
            return now
        return settled_at

    def complete(self, blob_name: str, st: os.stat_result) -> bool:
        """Whether the file is, unchanged, one that arrived complete."""
        return self._complete.get(blob_name) == _identity(st)


def _identity(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)
