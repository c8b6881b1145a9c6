"""`gighive-media reconcile`: compare the local roots, the container and the DB, repair what is safe.

Three views of where each media file lives can drift apart: a DB restored from backup, a
pointer edited by hand, a blob deleted in the portal, a state directory lost with a VM. This
command reads all three (plus the agent's own state and GigHive's `assets`) and:

- repairs the safe differences: pointers that do not say what the agent verified are written
  again; files whose blob is missing or different while the local copy is still there are
  queued for upload again (and the DB pointed back at the local copy meanwhile); local files
  the agent never saw are queued;
- rebuilds lost state: a blob with no local file and no state row that a witness still claims
  (a DB pointer, an `assets` row, or an `assets` table that cannot be trusted) becomes an
  `evicted` row again, from the blob's own metadata, so the way back and the safety rule work;
- lists the unsafe ones: blobs that nothing refers to (orphans: no local file, no state row, no
  DB pointer and no `assets` row), and pointers or evicted files whose blob is missing or
  differs (data only a backup still has). Orphan blobs are deleted only with
  --prune-orphans --yes, and only when every witness could be read and looks whole
  (agent.safety): an empty or suddenly shrunk `assets` table, a lost state or MySQL down
  deletes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from .. import deletes, interrupts, safety
from ..config import Config, MediaRoot
from ..context import queue_worker
from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE
from ..inventory import list_roots
from ..media import media_file_for_blob
from ..pointer import Location, PointerUnavailable
from ..scan import ScanReport, walk_root
from ..state import POINTER_NONE, POINTER_PENDING, FileRecord, Seen
from ..storage import Listed, StoreUnavailable

log = logging.getLogger(__name__)


def run(
    config: Config,
    roots: tuple[MediaRoot, ...],
    prune_orphans: bool,
    dry_run: bool,
    accept_assets_shrink: bool = False,
    accept_state_lost: bool = False,
) -> tuple[dict[str, object], int]:
    started = time.monotonic()
    names = [r.name for r in roots]
    with queue_worker(config, wait_for_lock=True) as worker:
        state, store, db = worker.state, worker.store, worker.pointer_db
        scan = ScanReport()
        # Only whether a name is on disk is asked of the walk later; the three stat fields the
        # state records go with the rows (a whole os.stat_result each was ~800 bytes a file).
        local: set[str] = set()
        files = []
        for root in roots:
            for mf, st in walk_root(root, scan):
                local.add(mf.blob_name)
                files.append(
                    (
                        mf.blob_name,
                        mf.root.name,
                        str(mf.path),
                        Seen.of(st),
                        min(st.st_mtime, time.time()) + config.settle_seconds,
                    )
                )
        try:
            listing = list_roots(store, names)
        except StoreUnavailable as e:
            return {"error": "unavailable", "message": str(e)}, EXIT_UNAVAILABLE
        try:
            pointers = db.locations() if db is not None else None
            gone = deletes.pointers_gone(state, deletes.blob_etags(pointers))
            if gone is not None and not dry_run:
                deletes.disturbed(state, gone)  # before the rows are written again below
            found = deletes.look(state, db, accept_shrink=accept_assets_shrink, rebuilt_hint=gone)
            assets = found.witness
            if assets.keys is not None and found.lost:
                # A row lost when GigHive rebuilt the table still claims its blobs (agent.deletes).
                assets = dataclasses.replace(assets, keys=assets.keys | set(found.lost))
        except PointerUnavailable as e:
            return {"error": "unavailable", "message": f"DB: {e}"}, EXIT_UNAVAILABLE
        # Judged before the rebuild below adds rows: a state that recorded no upload while the
        # container holds blobs was lost, and cannot vouch that a blob is unwanted.
        state_problem = safety.state_witness_problem(state, listing)

        queued_new = 0
        if not dry_run:
            queued_new = state.observe_many(files)["new"]
        else:
            known_names = set(state.brief(names))
            queued_new = sum(1 for f in files if f[0] not in known_names)
        del files
        records = {r.blob_name: r for r in state.records() if r.root in names}

        rebuilt = _rebuild(config, state, listing, records, local, pointers, assets, dry_run)
        if rebuilt and not dry_run:
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
        # Orphans older than the agent's state: no witness claims them, but the state cannot vouch
        # that none ever did (safety.unvouched_orphan). Kept unless the operator says otherwise.
        unvouched: dict[str, str] = {}
        born = state.born()
        for name, blob in listing.items():
            if safety.blob_unclaimed(config, name, records.get(name), pointers, assets, local) is None:
                orphans.append((name, blob))
                why = safety.unvouched_orphan(born, blob)
                if why is not None and not accept_state_lost:
                    unvouched[name] = why
        # Pruning destroys the only copy of what it deletes: every witness must have been read
        # and look whole, or nothing is deleted (the operator is told which one is missing).
        prune_refused = None
        if prune_orphans:
            prune_refused = state_problem or assets.problem
            if db is None:
                prune_refused = "no DB is configured: GigHive's assets table cannot confirm a blob is unwanted"
        for name, blob in orphans:
            detail = f"{blob.size} bytes; no local file and nothing in GigHive refers to it"
            if name in unvouched:
                detail += f"; not pruned: {unvouched[name]} (--accept-state-lost)"
            unsafe.append({"blob_name": name, "kind": "orphan_blob", "detail": detail})

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
            if prune_orphans and prune_refused is None:
                for name, blob in orphans:
                    if name in unvouched:
                        continue
                    # A stop (agent/interrupts.py) lets the deletion in flight finish with its log
                    # line and pointer row, and starts no other.
                    with interrupts.busy():
                        if interrupts.requested():
                            break
                        try:
                            if not safety.delete_orphan(config, store, name, blob.etag):
                                continue  # a file landed under that name meanwhile: not an orphan now
                        except StoreUnavailable as e:
                            pointer_errors.append(f"{name}: not deleted: {e}")
                            continue
                        pruned.append(name)
                        log.warning(
                            "deleted orphan blob %s (%d bytes)", name, blob.size, extra={"fields": {"blob_name": name}}
                        )
                        if db is not None and pointers is not None and name in pointers:
                            try:
                                db.delete_location(name)
                            except PointerUnavailable as e:
                                pointer_errors.append(f"{name}: pointer row not removed: {e}")

        if not dry_run and accept_assets_shrink:
            # The operator's explicit word that the rows are gone on purpose: their blobs are
            # soft-deleted now (purged after the grace period), and the new size is remembered.
            deletes.track(config, state, store, db, accept_shrink=True)
        elif not dry_run and assets.keys is not None:
            safety.remember_assets(state, assets)

    if prune_refused is not None:
        log.error("reconcile --prune-orphans deleted nothing: %s", prune_refused)
    elif prune_orphans and unvouched:
        log.warning(
            "reconcile --prune-orphans kept %d orphan blob(s) written before the agent's state began (e.g. %s): "
            "a lost state may have taken their files' records with it. Restore what is wanted with "
            "`gighive-media migrate --to-local --include-unlisted`, or confirm with --accept-state-lost",
            len(unvouched),
            next(iter(unvouched)),
        )
    remaining_unsafe = [u for u in unsafe if not (u["kind"] == "orphan_blob" and u["blob_name"] in pruned)]
    result: dict[str, object] = {
        "dry_run": dry_run,
        "local_files": len(local),
        "blobs": len(listing),
        "pointer_rows": len(pointers) if pointers is not None else None,
        "assets_known": assets.keys is not None,
        "assets_problem": assets.problem,
        "state_problem": state_problem,
        "state_rebuilt": rebuilt,
        "prune_refused": prune_refused,
        "queued_new": queued_new,
        "repairs": repairs,
        "repaired": 0 if dry_run else len(repairs),
        "unsafe": remaining_unsafe,
        "orphans": [n for n, _ in orphans],
        "orphans_pruned": pruned,
        "orphans_older_than_state": sorted(unvouched),
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
    if prune_refused is not None:
        return result, EXIT_FAILURE
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


def _rebuild(config, state, listing, records, local, pointers, assets, dry_run) -> list[str]:
    """State rows again for blobs that are the only copy of something a witness still claims.

    A blob no witness claims is left out: it is listed as an orphan instead. Without a trusted
    `assets` table every blob counts as claimed (rebuilding too much loses nothing)."""
    rebuilt: list[str] = []
    pointer_state = POINTER_PENDING if pointers is not None else POINTER_NONE
    for name, blob in listing.items():
        if name in records or name in local or not blob.sha256:
            continue
        mf = media_file_for_blob(config, name)
        if mf is None:
            continue
        if mf.expected_sha256 is not None and blob.sha256 != mf.expected_sha256:
            continue  # the blob is not the file its name promises: an orphan for the operator
        claimed = safety.blob_unclaimed(config, name, None, pointers, assets, local)
        if claimed is None:
            continue
        rebuilt.append(name)
        if not dry_run:
            state.adopt_listed(name, mf.root.name, str(mf.path), blob, pointer_state)
    if rebuilt:
        log.warning(
            "%d blob(s) had no record in the agent's state (lost state or a lost commit): %s from the "
            "container's metadata",
            len(rebuilt),
            "would be rebuilt" if dry_run else "rebuilt",
        )
    return rebuilt


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
    rebuilt = result.get("state_rebuilt") or []
    if rebuilt:
        verb_r = "would rebuild" if result["dry_run"] else "rebuilt"
        lines.append(f"  {verb_r} {len(rebuilt)} state row(s) from the container (state lost or a commit lost)")
    if result.get("prune_refused"):
        lines.append(f"  NOTHING PRUNED: {result['prune_refused']}")
    older = result.get("orphans_older_than_state") or []
    if older:
        lines.append(
            f"  {len(older)} orphan blob(s) are older than the agent's state and are never pruned without "
            "--accept-state-lost (a lost state may have taken their files' records with it)"
        )
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
