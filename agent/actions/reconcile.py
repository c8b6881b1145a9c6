"""`gighive-media reconcile`: compare the local roots, the container and the DB, repair what is safe.

Three views of where each media file lives can drift apart: a DB restored from backup, a
pointer edited by hand, a blob deleted in the portal, a state directory lost with a VM. This
command reads all three (plus the agent's own state and GigHive's `assets`) and:

- repairs the safe differences: pointers that do not say what the agent verified are written
  again; files whose blob is missing or different while the local copy is still there are
  queued for upload again (and the DB pointed back at the local copy meanwhile); local files
  the agent never saw are queued;
- lists the unsafe ones: blobs that nothing refers to (orphans: no local file and no `assets`
  row), and pointers or evicted files whose blob is missing or differs (data only a backup
  still has). Orphan blobs are deleted only with --prune-orphans --yes.
"""

from __future__ import annotations

import logging
import os
import time

from ..config import Config, MediaRoot
from ..context import queue_worker
from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from ..inventory import list_roots
from ..media import media_file_for_blob
from ..pointer import Location, PointerUnavailable, asset_key
from ..scan import ScanReport, walk_root
from ..state import POINTER_PENDING, FileRecord
from ..storage import Listed, StoreUnavailable

log = logging.getLogger(__name__)


def run(
    config: Config, roots: tuple[MediaRoot, ...], prune_orphans: bool, dry_run: bool
) -> tuple[dict[str, object], int]:
    started = time.monotonic()
    names = [r.name for r in roots]
    with queue_worker(config, wait_for_lock=True) as worker:
        state, store, db = worker.state, worker.store, worker.pointer_db
        scan = ScanReport()
        local: dict[str, os.stat_result] = {}
        files = []
        for root in roots:
            for mf, st in walk_root(root, scan):
                local[mf.blob_name] = st
                files.append(
                    (
                        mf.blob_name,
                        mf.root.name,
                        str(mf.path),
                        st,
                        min(st.st_mtime, time.time()) + config.settle_seconds,
                    )
                )
        try:
            listing = list_roots(store, names)
        except StoreUnavailable as e:
            return {"error": "unavailable", "message": str(e)}, EXIT_UNAVAILABLE
        try:
            pointers = db.locations() if db is not None else None
            assets = db.asset_keys() if db is not None else None
        except PointerUnavailable as e:
            return {"error": "unavailable", "message": f"DB: {e}"}, EXIT_UNAVAILABLE

        queued_new = 0
        if not dry_run:
            queued_new = state.observe_many(files)["new"]
        else:
            known_names = set(state.brief(names))
            queued_new = sum(1 for f in files if f[0] not in known_names)
        del files
        records = {r.blob_name: r for r in state.records() if r.root in names}

        repairs: list[dict[str, str]] = []
        unsafe: list[dict[str, str]] = []
        requeue: list[str] = []
        to_local: list[str] = []
        reflip: list[FileRecord] = []

        for name, rec in records.items():
            blob = listing.get(name)
            if rec.state not in ("uploaded", "evicted"):
                continue
            matches = blob is not None and _matches(blob, rec)
            if rec.state == "uploaded" and rec.local_copy and name in local:
                if not matches:
                    why = "blob missing" if blob is None else "blob differs from the verified upload"
                    requeue.append(name)
                    repairs.append({"blob_name": name, "repair": "queued for upload again", "reason": why})
                    if pointers is not None and _points_at_blob(pointers.get(name)):
                        to_local.append(name)
                    continue
            elif rec.state == "evicted":
                if not matches:
                    why = "blob missing" if blob is None else "blob differs from the one verified before eviction"
                    unsafe.append(
                        {
                            "blob_name": name,
                            "kind": "evicted_blob_missing" if blob is None else "evicted_blob_differs",
                            "detail": f"{why}; no local copy: only a backup has it",
                        }
                    )
                    continue
            elif not matches:
                continue  # uploaded, local copy gone, blob wrong: the next scan sees the file vanish
            if pointers is not None and not _pointer_right(pointers.get(name), rec, config.container or ""):
                reflip.append(rec)
                have = pointers.get(name)
                repairs.append(
                    {
                        "blob_name": name,
                        "repair": "DB pointer written again",
                        "reason": "no pointer row"
                        if have is None
                        else f"pointer said provider={have.provider} "
                        f"etag={have.etag} local_copy={int(have.local_copy)}",
                    }
                )

        if pointers is not None:
            for path, loc in pointers.items():
                if path.split("/", 1)[0] not in names or not _points_at_blob(loc) or path in listing:
                    continue
                if path in records and records[path].state in ("uploaded", "evicted"):
                    continue  # handled above from the agent's own record
                if path in local:
                    to_local.append(path)
                    repairs.append(
                        {
                            "blob_name": path,
                            "repair": "DB pointer set to local",
                            "reason": "it pointed at a missing blob; the local file is there",
                        }
                    )
                else:
                    unsafe.append(
                        {
                            "blob_name": path,
                            "kind": "pointer_to_missing_blob",
                            "detail": "the DB points at a blob that does not exist, and there is no local copy",
                        }
                    )

        orphans: list[tuple[str, Listed]] = []
        for name, blob in listing.items():
            if name in local:
                continue
            if _referenced(config, name, records.get(name), pointers, assets):
                continue
            orphans.append((name, blob))
        for name, blob in orphans:
            unsafe.append(
                {
                    "blob_name": name,
                    "kind": "orphan_blob",
                    "detail": f"{blob.size} bytes; no local file and nothing in GigHive refers to it",
                }
            )

        pruned: list[str] = []
        pointer_errors: list[str] = []
        if not dry_run:
            if requeue:
                state.requeue(["uploaded"], requeue)
            for name in to_local:
                mf = media_file_for_blob(config, name)
                if mf is not None and db is not None:
                    try:
                        db.record_local(mf)
                    except PointerUnavailable as e:
                        pointer_errors.append(f"{name}: {e}")
            for rec in reflip:
                state.set_pointer(rec.blob_name, POINTER_PENDING)
            if reflip:
                worker.flip_pending_pointers()
            if prune_orphans:
                for name, blob in orphans:
                    try:
                        store.delete(name, etag=blob.etag)
                    except StoreUnavailable as e:
                        pointer_errors.append(f"{name}: not deleted: {e}")
                        continue
                    pruned.append(name)
                    log.warning(
                        "deleted orphan blob %s (%d bytes)", name, blob.size, extra={"fields": {"blob_name": name}}
                    )
                    if name in records:
                        state.forget_restored(name)
                    if db is not None and pointers is not None and name in pointers:
                        try:
                            db.delete_location(name)
                        except PointerUnavailable as e:
                            pointer_errors.append(f"{name}: pointer row not removed: {e}")

    remaining_unsafe = [u for u in unsafe if not (u["kind"] == "orphan_blob" and u["blob_name"] in pruned)]
    result: dict[str, object] = {
        "dry_run": dry_run,
        "local_files": len(local),
        "blobs": len(listing),
        "pointer_rows": len(pointers) if pointers is not None else None,
        "assets_known": assets is not None,
        "queued_new": queued_new,
        "repairs": repairs,
        "repaired": 0 if dry_run else len(repairs),
        "unsafe": remaining_unsafe,
        "orphans": [n for n, _ in orphans],
        "orphans_pruned": pruned,
        "errors": pointer_errors,
        "root_errors": scan.root_errors,
        "duration_s": round(time.monotonic() - started, 3),
    }
    log.info(
        "reconcile: %d local, %d blobs; %d repair(s)%s, %d new file(s) queued, %d unsafe difference(s) "
        "(%d orphan blob(s), %d pruned)",
        len(local),
        len(listing),
        len(repairs),
        " (dry run: not applied)" if dry_run else "",
        queued_new,
        len(remaining_unsafe),
        len(orphans),
        len(pruned),
    )
    if pointer_errors:
        return result, EXIT_UNAVAILABLE
    return result, EXIT_FAILURE if remaining_unsafe or scan.root_errors else EXIT_OK


def _matches(blob: Listed, rec: FileRecord) -> bool:
    if blob.size != rec.size or blob.sha256 != rec.sha256:
        return False
    return blob.content_md5 is None or rec.md5 is None or blob.content_md5.hex() == rec.md5


def _points_at_blob(loc: Location | None) -> bool:
    return loc is not None and loc.provider == "azure_blob"


def _pointer_right(loc: Location | None, rec: FileRecord, container: str) -> bool:
    if loc is None:
        return False
    return (
        loc.provider == "azure_blob"
        and loc.container == container
        and loc.blob_name == rec.blob_name
        and loc.etag == rec.etag
        and loc.size_bytes == rec.size
        and loc.content_sha256 == rec.sha256
        and loc.local_copy == bool(rec.local_copy)
    )


def _referenced(config: Config, name: str, rec: FileRecord | None, pointers, assets) -> bool:
    """Whether anything still needs this blob (it has no local file)."""
    mf = media_file_for_blob(config, name)
    key = asset_key(mf) if mf is not None else None
    if assets is not None and key is not None:
        # GigHive's own table decides: a deleted asset's blob is an orphan even if the agent
        # once uploaded and evicted it.
        return key in assets
    if rec is not None and rec.state in ("uploaded", "evicted"):
        return True
    return pointers is not None and _points_at_blob(pointers.get(name))


def render(result: dict[str, object]) -> str:
    if "error" in result:
        return f"reconcile: {result['message']}"
    lines = [
        f"{result['local_files']} local file(s), {result['blobs']} blob(s)"
        + (f", {result['pointer_rows']} DB pointer row(s)" if result["pointer_rows"] is not None else ", no DB")
        + f"; {result['queued_new']} new file(s) queued"
    ]
    verb = "would repair" if result["dry_run"] else "repaired"
    for r in result["repairs"]:  # type: ignore[union-attr]
        lines.append(f"  {verb}: {r['blob_name']}: {r['repair']} ({r['reason']})")
    for u in result["unsafe"]:  # type: ignore[union-attr]
        lines.append(f"  UNSAFE {u['kind']}: {u['blob_name']}: {u['detail']}")
    for name in result["orphans_pruned"]:  # type: ignore[union-attr]
        lines.append(f"  pruned orphan blob: {name}")
    orphans_left = len(result["orphans"]) - len(result["orphans_pruned"])  # type: ignore[arg-type]
    if orphans_left:
        lines.append(
            f"  {orphans_left} orphan blob(s) kept; `gighive-media reconcile --prune-orphans --yes` deletes them"
        )
    for e in result["errors"]:  # type: ignore[union-attr]
        lines.append(f"  error: {e}")
    if not result["repairs"] and not result["unsafe"]:
        lines.append("  the three views agree")
    return "\n".join(lines)
