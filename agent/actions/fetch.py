"""`gighive-media fetch`: bring chosen evicted files back to disk for a GigHive reader that needs them.

GigHive's guest stream endpoint, export, manifest import, ingest and the AI worker read local files
only (docs/operations.md lists them). `fetch NAME...` downloads each named file from Blob, verified
against the sha256 its name carries (and the agent's record, or the blob's own metadata), into
place with the mode GigHive uses and, when started with sudo, the media directory's owner and group
(uid 33); the setgid media directories give the group in any case. The file then stays local for
`--keep-days` before the eviction policy may take it again. A name that is not in Blob, or whose
blob does not match its name, fails with the reason and writes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from .. import interrupts
from ..config import Config
from ..context import queue_worker
from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from ..media import MediaFile, media_file_for_blob, media_file_for_path
from ..restore import RestoreFailed, restore
from ..state import POINTER_NONE, POINTER_PENDING
from ..storage import StoreUnavailable

log = logging.getLogger(__name__)


def resolve(config: Config, item: str) -> MediaFile | None:
    """A blob name (`video/<sha>.mp4`), a URL path (`/video/<sha>.mp4`) or a local path."""
    if item.startswith("/") and not item.startswith(("/audio/", "/video/")):
        return media_file_for_path(config, Path(item))
    return media_file_for_blob(config, item.lstrip("/"))


def run(config: Config, items: list[str], keep_days: float) -> tuple[dict[str, object], int]:
    fetched: list[str] = []
    already: list[str] = []
    failures: list[dict[str, str]] = []
    keep_until = time.time() + keep_days * 86400.0
    with queue_worker(config, wait_for_lock=True) as worker:
        state, store = worker.state, worker.store
        for item in items:
            mf = resolve(config, item)
            if mf is None:
                failures.append({"item": item, "error": "not a file under a configured media root"})
                continue
            rec = state.get(mf.blob_name)
            if os.path.lexists(mf.path):
                already.append(mf.blob_name)
                if rec is not None and rec.state in ("uploaded", "evicted"):
                    _keep(worker, mf, keep_until)
                continue
            try:
                info = store.stat(mf.blob_name)
            except StoreUnavailable as e:
                return _result(fetched, already, failures, f"Azure Blob: {e}"), EXIT_UNAVAILABLE
            problem = _mismatch(mf, info, rec)
            if problem is not None:
                failures.append({"item": item, "error": problem})
                log.error("not fetched %s: %s", mf.blob_name, problem, extra={"fields": {"blob_name": mf.blob_name}})
                continue
            assert info is not None and info.sha256 is not None
            # The download and its record are one unit for a stop (agent/interrupts.py): a file
            # placed on disk gets its row within the grace, or the download gives up between two
            # chunks and leaves nothing under the real name.
            with interrupts.busy():
                if interrupts.requested():
                    break
                try:
                    restore(store, mf, info.size, info.sha256, rec.mtime_ns if rec is not None else None)
                except RestoreFailed as e:
                    failures.append({"item": item, "error": str(e)})
                    continue
                except StoreUnavailable as e:
                    return _result(fetched, already, failures, f"Azure Blob: {e}"), EXIT_UNAVAILABLE
                if rec is None:
                    state.adopt_listed(
                        mf.blob_name,
                        mf.root.name,
                        str(mf.path),
                        info,
                        POINTER_PENDING if worker.pointer_db is not None else POINTER_NONE,
                        local=os.stat(mf.path),
                    )
                _keep(worker, mf, keep_until)
            fetched.append(mf.blob_name)
            log.info(
                "fetched %s to %s (%d bytes, sha256 verified), kept local for %g day(s)",
                mf.blob_name,
                mf.path,
                info.size,
                keep_days,
                extra={"fields": {"blob_name": mf.blob_name, "sha256": info.sha256, "bytes": info.size}},
            )
        worker.flip_pending_pointers()
    return _result(fetched, already, failures, None), EXIT_FAILURE if failures else EXIT_OK


def _mismatch(mf: MediaFile, info, rec) -> str | None:
    if info is None:
        return f"{mf.blob_name} is not in Blob (and not on disk): nothing to fetch"
    if not info.sha256:
        return f"blob {mf.blob_name} carries no sha256 metadata: its content cannot be verified"
    expected = mf.expected_sha256
    if expected is not None and info.sha256 != expected:
        return f"blob {mf.blob_name} holds sha256 {info.sha256}, not the {expected} its name promises"
    if rec is not None and rec.sha256 and rec.state in ("uploaded", "evicted") and rec.sha256 != info.sha256:
        return f"blob {mf.blob_name} differs from the file the agent uploaded (sha256 {rec.sha256})"
    return None


def _keep(worker, mf: MediaFile, keep_until: float) -> None:
    """Local copy recorded (so the DB says local_copy=1) and kept from the eviction policy."""
    st = os.stat(mf.path)
    pointer = POINTER_PENDING if worker.pointer_db is not None else POINTER_NONE
    worker.state.mark_fetched(mf.blob_name, st, keep_until, pointer)


def _result(fetched, already, failures, outage) -> dict[str, object]:
    return {
        "fetched": fetched,
        "already_local": already,
        "failed": failures,
        "outage": outage,
    }


def render(result: dict[str, object]) -> str:
    lines = [f"fetched {len(result['fetched'])} file(s), {len(result['already_local'])} already on disk"]  # type: ignore[arg-type]
    for f in result["failed"]:  # type: ignore[union-attr]
        lines.append(f"  FAILED {f['item']}: {f['error']}")
    if result.get("outage"):
        lines.append(f"  stopped: {result['outage']}")
    return "\n".join(lines)
