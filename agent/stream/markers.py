"""Markers that let Apache send a verified local file itself (docs/streaming.md, "Front first").

Apache cannot read the agent's state, and ap_expr has `filesize()` but no mtime function (Debian
12's apache2 answers "Function 'filemod' does not exist"). So for every local file the server has
verified (sources.py: the agent's state vouches for exactly this inode, size and mtime), the
server leaves two empty files in STREAM_VERIFIED_DIR/<root>/ (empty files on tmpfs cost an inode,
no data page):

- the identity `<name>."<inode>-<size>-<mtime µs>"`, in hex: Apache's own strong ETag of exactly
  that file (`FileETag INode MTime Size`). Apache puts the name's promise (sha256 ETag, fixed
  date, immutable) on an answer from disk only when the identity of the ETag it computed for the
  file it is sending exists (a weak ETag, `W/"..."`, for a file changed in the last second, never
  matches);
- the gate `<name>.<size>`: Apache's rewrite sends the request from disk only when the gate for
  the file's current size exists; otherwise the server answers, and verifies, and leaves markers.

The identity is written before the gate and the gate removed first, each by one atomic create or
unlink, so a reader never sees a gate without its identity from this writer. A stale marker is
harmless: an identity names one exact inode, size and mtime; a gate only sends the request to
disk, where the identity decides. The server removes a name's gate when the file does not verify
or is gone (it then answers from Blob), and `sweep()` removes markers whose file changed or went,
at start, every STREAM_VERIFIED_SWEEP_SECONDS while the server runs, and whenever the count
reaches STREAM_VERIFIED_MARKERS_MAX (then, if still needed, the oldest half). The server is the
only writer; nothing else needs to remove them.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from pathlib import Path

from ..media import MediaFile

log = logging.getLogger(__name__)

# A file changed less than this long ago (or in the future) gets no markers yet.
FRESH_SECONDS = 2.0

_GATE_RE = re.compile(r"^(?P<name>[0-9a-f]{64}\.[A-Za-z0-9]{1,10})\.(?P<size>[0-9]+)$")
_IDENTITY_RE = re.compile(r'^(?P<name>[0-9a-f]{64}\.[A-Za-z0-9]{1,10})\.(?P<etag>"[0-9a-f]+-[0-9a-f]+-[0-9a-f]+")$')


def apache_etag(st: os.stat_result) -> str:
    """Apache's strong ETag for a file with `FileETag INode MTime Size` (ap_make_etag: hex inode,
    size and mtime in microseconds). The server sends the same for a file it has not verified, so
    both sides agree on what that file is."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns // 1000:x}"'


class VerifiedMarkers:
    """The marker directory, written only by the stream server."""

    def __init__(self, directory: Path, limit: int, roots: dict[str, Path]):
        self.directory = directory
        self.limit = limit
        self.roots = roots
        self._lock = threading.Lock()
        self._sweeping = threading.Lock()
        self._count = 0
        self._broken = False

    # ---- the two things the server does ------------------------------------------------------
    def vouch(self, media: MediaFile, st: os.stat_result) -> None:
        """This local file (open, with this fstat) is verified: Apache may send it itself."""
        if not time.time() - st.st_mtime >= FRESH_SECONDS:
            # Apache makes the ETag of a file changed in the last second weak (ap_make_etag), and
            # a weak ETag never matches an identity: Apache would send the file without the promise.
            # The server keeps answering such a file (with the promise) until it has settled.
            return
        d = self._root_dir(media)
        if d is None:
            return
        base = media.relpath.name
        created = self._create(d / f"{base}.{apache_etag(st)}")
        created += self._create(d / f"{base}.{st.st_size}")
        if created:
            with self._lock:
                self._count += created
                full = self._count >= self.limit
            if full:
                self.sweep(trim=True)

    def withdraw(self, media: MediaFile, size: int) -> None:
        """A file of this name and size is not (or no longer) verified on disk: the server answers."""
        d = self._root_dir(media, create=False)
        if d is not None:
            self._unlink(d / f"{media.relpath.name}.{size}")

    # ---- bounds and stale markers ------------------------------------------------------------
    def keep_sweeping(self, interval: float, stop: threading.Event | None = None) -> threading.Thread:
        """Sweep now and then every `interval` seconds, in a daemon thread, for as long as the
        server runs: a file rewritten in place at the same size loses its gate within one
        interval, so the server answers it again (and vouches again once the agent has hashed it)."""

        stopped = stop or threading.Event()

        def loop() -> None:
            while True:
                try:
                    self.sweep()
                except Exception:  # noqa: BLE001 - a failed sweep must not end the server
                    log.exception("sweeping the verified-file markers failed")
                if stopped.wait(interval):
                    return

        t = threading.Thread(target=loop, name="marker-sweep", daemon=True)
        t.start()
        return t

    def sweep(self, trim: bool = False) -> int:
        """Remove every marker whose file is gone or changed; with `trim`, and still at the limit,
        also the oldest half. Returns the number of markers left. One sweep at a time."""
        if not self._sweeping.acquire(blocking=False):
            return self._count
        try:
            left = 0
            keep: list[tuple[int, Path, Path]] = []  # (gate mtime, gate, identity)
            for root, media_dir in self.roots.items():
                d = self.directory / root
                try:
                    names = os.listdir(d)
                except FileNotFoundError:
                    continue
                except OSError as e:
                    log.warning("cannot list the verified-file markers in %s: %s", d, e)
                    continue
                current: dict[str, tuple[str, str] | None] = {}
                for entry in names:
                    m = _GATE_RE.match(entry) or _IDENTITY_RE.match(entry)
                    name = m.group("name") if m else None
                    if name is None:
                        self._unlink(d / entry)  # not ours (a left-over temporary, a stray file)
                        continue
                    if name not in current:
                        try:
                            st = os.stat(media_dir / name, follow_symlinks=False)
                            current[name] = (f"{name}.{st.st_size}", f"{name}.{apache_etag(st)}")
                        except OSError:
                            current[name] = None
                    valid = current[name]
                    if valid is None or entry not in valid:
                        self._unlink(d / entry)
                        continue
                    left += 1
                for valid in current.values():
                    if valid is None:
                        continue
                    gate, identity = d / valid[0], d / valid[1]
                    try:
                        gate_mtime = gate.stat().st_mtime_ns
                    except FileNotFoundError:
                        continue  # an identity alone sends nothing to disk (and may be a vouch under way)
                    if not identity.exists():
                        # The file was rewritten at the same size: without its gate the server answers
                        # the next request, and leaves new markers once the agent has verified it.
                        self._unlink(gate)
                        left -= 1
                        continue
                    keep.append((gate_mtime, gate, identity))
            if trim and left >= self.limit:
                keep.sort()
                for _mtime, gate, identity in keep[: len(keep) // 2 + 1]:
                    self._unlink(gate)
                    self._unlink(identity)
                    left -= 2
            with self._lock:
                self._count = max(left, 0)
            return self._count
        finally:
            self._sweeping.release()

    # ---- files -------------------------------------------------------------------------------
    def _root_dir(self, media: MediaFile, create: bool = True) -> Path | None:
        if self._broken or media.expected_sha256 is None:
            return None
        d = self.directory / media.root.name
        if create and not d.is_dir():
            try:
                d.mkdir(exist_ok=True)
                # The service's UMask=0077 would hide it from Apache (www-data): markers are no secret.
                d.chmod(0o755)
            except OSError as e:
                self._give_up(e)
                return None
        return d

    def _create(self, path: Path) -> int:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            return 0
        except OSError as e:
            self._give_up(e)
            return 0
        try:
            os.fchmod(fd, 0o644)  # readable by Apache despite the service's umask
        finally:
            os.close(fd)
        return 1

    def _unlink(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("cannot remove the verified-file marker %s: %s", path, e)
            return
        with self._lock:
            self._count = max(self._count - 1, 0)

    def _give_up(self, e: OSError) -> None:
        # Fail safe: without markers Apache sends every request to the server, which still answers
        # correctly. Said once, not per request.
        if not self._broken:
            self._broken = True
            hint = " (read-only or missing; see STREAM_VERIFIED_DIR)" if e.errno in (errno.EROFS, errno.ENOENT) else ""
            log.warning("cannot write verified-file markers in %s%s: %s", self.directory, hint, e)
