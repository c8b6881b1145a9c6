"""`gighive-media migrate --to-local`: the way back from Blob to local disk.

Every evicted file is downloaded into its media root and verified against the sha256 recorded
when it was uploaded (agent.restore); then every pointer under the chosen roots is flipped to
`local`, and the agent stops tracking those files. Only when this reports `complete` can the
host switch MEDIA_STORAGE_BACKEND back to `local`: nothing is served from Blob any more.
Blobs are left in the container (deleting them is a separate, deliberate step).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict

from ..config import Config, MediaRoot
from ..context import queue_worker
from ..errors import EXIT_CANTCREAT, EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, AgentError
from ..media import media_file_for_blob
from ..pointer import PointerUnavailable
from ..progress import Progress, human_bytes
from ..restore import RestoreFailed, restore
from ..state import StateStore
from ..storage import StoreUnavailable

log = logging.getLogger(__name__)

# Room left free on a media filesystem after the restore: GigHive keeps writing uploads there.
SPACE_MARGIN = 1024**3


class NotEnoughSpace(AgentError):
    exit_code = EXIT_CANTCREAT


def run(config: Config, roots: tuple[MediaRoot, ...], opts) -> tuple[dict[str, object], int]:
    started = time.monotonic()
    names = [r.name for r in roots]
    if opts.dry_run:
        return plan(config, names, opts.limit), EXIT_OK
    with queue_worker(config, wait_for_lock=True) as worker:
        state, store, db = worker.state, worker.store, worker.pointer_db
        worker.notifier.ready("migrate --to-local")
        records = [r for r in state.records() if r.root in names]
        evicted = [r for r in records if r.state == "evicted"]
        if opts.limit is not None:
            evicted = evicted[: opts.limit]
        in_scope = {r.blob_name for r in evicted}
        _check_space(config, evicted)
        progress = Progress(
            "to-local", len(evicted), sum(r.size or 0 for r in evicted), worker.notifier, interactive=opts.interactive
        )
        restored = downloaded = pointers = 0
        nbytes = 0
        failures: list[dict[str, str]] = []
        outage: str | None = None
        try:
            for rec in evicted:
                mf = media_file_for_blob(config, rec.blob_name)
                if mf is None or rec.sha256 is None or rec.size is None:
                    failures.append({"blob_name": rec.blob_name, "error": "no longer under a configured root"})
                    progress.advance(1, 0, problems=1)
                    continue
                try:
                    result = restore(store, mf, rec.size, rec.sha256, rec.mtime_ns)
                except RestoreFailed as e:
                    failures.append({"blob_name": rec.blob_name, "error": str(e)})
                    log.error("cannot restore %s: %s", rec.blob_name, e, extra={"fields": {"blob_name": rec.blob_name}})
                    progress.advance(1, rec.size, problems=1)
                    continue
                except StoreUnavailable as e:
                    outage = str(e)
                    log.error("Azure Blob is unusable (%s); stopping, run it again later", e)
                    break
                restored += 1
                downloaded += int(result.downloaded)
                nbytes += result.size if result.downloaded else 0
                log.info(
                    "restored %s to %s (%d bytes, sha256 verified)",
                    rec.blob_name,
                    mf.path,
                    rec.size,
                    extra={"fields": {"blob_name": rec.blob_name, "sha256": rec.sha256, "bytes": rec.size}},
                )
                progress.advance(1, rec.size)
        finally:
            progress.close()

        # Every file under the roots now has its local copy (those that failed above keep
        # their state and pointer: Blob stays their only copy). Flip pointers, then forget.
        failed_names = {f["blob_name"] for f in failures}
        for rec in records:
            if outage is not None:
                break
            if rec.blob_name in failed_names or rec.state not in ("uploaded", "evicted"):
                continue
            if rec.state == "evicted" and rec.blob_name not in in_scope:
                continue  # beyond --limit
            mf = media_file_for_blob(config, rec.blob_name)
            if mf is None or not os.path.lexists(mf.path):
                failures.append({"blob_name": rec.blob_name, "error": "local copy missing; pointer left on Blob"})
                continue
            if db is not None:
                try:
                    db.record_local(mf)
                except PointerUnavailable as e:
                    outage = f"DB pointer: {e}"
                    log.error("cannot flip pointers to local (%s); the files are restored, run it again", e)
                    break
                pointers += 1
            state.forget_restored(rec.blob_name)
        remaining = state.counts(names)
        worker.notifier.stopping()

    still_remote = remaining["evicted"]
    by_reason: dict[str, int] = defaultdict(int)
    for f in failures:
        by_reason[f["error"].split(":")[0]] += 1
    result_out: dict[str, object] = {
        "to_local": True,
        "restored": restored,
        "downloaded": downloaded,
        "bytes": nbytes,
        "pointers_flipped_to_local": pointers,
        "failed": len(failures),
        "errors": failures[:50],
        "still_evicted": still_remote,
        "still_tracked": remaining["uploaded"],
        "complete": not failures and outage is None and still_remote == 0 and remaining["uploaded"] == 0,
        "outage": outage,
        "duration_s": round(time.monotonic() - started, 3),
    }
    log.info(
        "migrate --to-local finished: %d restored (%s downloaded), %d pointers flipped to local, %d failed; "
        "%d file(s) still only in Blob",
        restored,
        human_bytes(nbytes),
        pointers,
        len(failures),
        still_remote,
    )
    if outage is not None:
        return result_out, EXIT_UNAVAILABLE
    return result_out, EXIT_OK if result_out["complete"] else EXIT_FAILURE


def plan(config: Config, names: list[str], limit: int | None) -> dict[str, object]:
    """What --to-local would download, and whether it fits; changes nothing."""
    state = StateStore.open_readonly(config.state_dir)
    try:
        evicted = [r for r in state.records(("evicted",)) if r.root in names] if state is not None else []
    finally:
        if state is not None:
            state.close()
    if limit is not None:
        evicted = evicted[:limit]
    per_root: dict[str, dict[str, int]] = {n: {"evicted": 0, "bytes": 0} for n in names}
    for r in evicted:
        per_root[r.root]["evicted"] += 1
        per_root[r.root]["bytes"] += r.size or 0
    space_problem = None
    try:
        _check_space(config, evicted)
    except AgentError as e:
        space_problem = str(e)
    return {
        "to_local": True,
        "dry_run": True,
        "roots": per_root,
        "evicted": len(evicted),
        "bytes": sum(r.size or 0 for r in evicted),
        "space_problem": space_problem,
    }


def _check_space(config: Config, evicted) -> None:
    """Refuse up front rather than fill the disk GigHive writes uploads to, half-way through."""
    need: dict[int, int] = defaultdict(int)
    where: dict[int, str] = {}
    for rec in evicted:
        mf = media_file_for_blob(config, rec.blob_name)
        if mf is None:
            continue
        try:
            dev = os.stat(mf.root.path).st_dev
        except OSError as e:
            raise AgentError(f"media root {mf.root.path}: {e.strerror}") from e
        need[dev] += rec.size or 0
        where[dev] = str(mf.root.path)
    for dev, nbytes in need.items():
        st = os.statvfs(where[dev])
        free = st.f_bavail * st.f_frsize
        if nbytes + SPACE_MARGIN > free:
            raise NotEnoughSpace(
                f"restoring needs {human_bytes(nbytes)} on the filesystem of {where[dev]}, which has "
                f"{human_bytes(free)} free (and {human_bytes(SPACE_MARGIN)} is kept spare); free some space "
                "or restore one root at a time with --root"
            )


def render(result: dict[str, object]) -> str:
    if result.get("dry_run"):
        text = (
            f"would restore {result['evicted']} evicted file(s), {human_bytes(int(result['bytes']))} "  # type: ignore[call-overload]
            "(dry run: nothing was changed)"
        )
        return text + (f"\n  {result['space_problem']}" if result.get("space_problem") else "")
    text = (
        f"restored {result['restored']} file(s) ({human_bytes(int(result['bytes']))} downloaded), "  # type: ignore[call-overload]
        f"{result['pointers_flipped_to_local']} pointer(s) flipped to local, {result['failed']} failed"
    )
    if result["complete"]:
        return text + "; every file is local again: MEDIA_STORAGE_BACKEND=local is now safe"
    return text + f"; {result['still_evicted']} file(s) still only in Blob: NOT safe to switch to local yet"
