"""GigHive's deletes: soft-delete the blobs of a deleted asset, purge them after a grace period.

GigHive's admin delete unlinks the local file and drops the asset's rows; it never tells the blob.
The agent infers a delete, and only this one, from three facts together:

- it saw the asset's row in `assets` before (the table as last seen whole is kept in the state);
- the row is gone now, while the table is whole (not empty, not suddenly shrunk: an import's
  TRUNCATE, "clear media" or a restored dump are mass disappearances, reported, never deletes);
- the asset's local file is gone too.

Its blobs (the media file and its thumbnail) are then soft-deleted: recorded with a purge time
(PURGE_DELETED_AFTER_DAYS later), still in the container, and restorable until then with
`gighive-media undelete` or simply by the asset coming back (a re-import). When the time comes the
blob is purged only if every witness still says so (agent.safety's rule for a destructive step):
the asset is still gone from a whole table, no local file has appeared, the agent's record still
names the blob's ETag, and the delete is conditional on that ETag. A mass disappearance never
leads to a purge; after one, `reconcile --accept-assets-shrink` is the operator's explicit word.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from . import safety
from .media import media_file_for_blob
from .pointer import PointerDB, PointerUnavailable, asset_key
from .state import StateStore
from .storage.azure_blob import AzureBlobStore

log = logging.getLogger(__name__)


@dataclass
class DeleteReport:
    soft_deleted: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    assets_problem: str | None = None
    errors: list[str] = field(default_factory=list)


def track(
    config, state: StateStore, store: AzureBlobStore, db: PointerDB | None, accept_shrink: bool = False
) -> DeleteReport:
    """Notice deletes since the last whole look at `assets`, then purge what is due."""
    report = DeleteReport()
    if db is None or not config.is_azure:
        return report
    try:
        witness = safety.assets_witness(db, safety.assets_seen(state), accept_shrink=accept_shrink)
    except PointerUnavailable as e:
        report.errors.append(f"DB: {e}")
        return report
    if witness.keys is None:
        # Not a delete of anything: reported (status shows it), and nothing is purged.
        report.assets_problem = witness.problem
        state.set_meta("assets_problem", witness.problem or "")
        return report
    state.delete_meta("assets_problem")
    current = witness.keys
    seen = state.assets_seen()
    pending = {r["blob_name"]: (r["file_type"], r["checksum"]) for r in state.deletions()}
    for name, key in pending.items():
        if key in current:
            state.drop_deletion(name)  # re-imported: the asset is wanted again
            report.restored.append(name)
    grace = config.purge_deleted_after_days * 86400.0
    if seen:
        by_asset = _tracked_by_asset(config, state)
        for key in sorted(seen - current):
            names = by_asset.get(key, [])
            if any(_local_exists(config, n) for n in names):
                continue  # its file is still on disk: not GigHive's delete (an import moving things)
            for name in names:
                if name not in pending:
                    state.add_deletion(name, key[0], key[1], time.time() + grace)
                    report.soft_deleted.append(name)
    if report.soft_deleted:
        log.warning(
            "%d blob(s) of asset(s) deleted in GigHive are soft-deleted: purged in %g day(s) unless restored "
            "(`gighive-media undelete NAME`)",
            len(report.soft_deleted),
            config.purge_deleted_after_days,
        )
    state.replace_assets_seen(current)
    safety.remember_assets(state, witness)
    if config.purge_deleted_after_days > 0 and safety.held(state, config) is None:
        _purge_due(config, state, store, db, current, report)
    return report


def _tracked_by_asset(config, state: StateStore) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for rec in state.records(("uploaded", "evicted")):
        mf = media_file_for_blob(config, rec.blob_name)
        key = asset_key(mf) if mf is not None else None
        if key is not None:
            out.setdefault(key, []).append(rec.blob_name)
    return out


def _local_exists(config, name: str) -> bool:
    mf = media_file_for_blob(config, name)
    return mf is not None and os.path.lexists(mf.path)


def _purge_due(config, state: StateStore, store: AzureBlobStore, db: PointerDB, current, report: DeleteReport) -> None:
    now = time.time()
    for row in state.deletions():
        if row["purge_after"] > now:
            break
        name, key = row["blob_name"], (row["file_type"], row["checksum"])
        outcome = safety.purge_deleted(config, state, store, name, key, current)
        if outcome is None:
            state.drop_deletion(name)
            report.restored.append(name)
            continue
        if outcome is not True:
            report.errors.append(f"{name}: not purged: {outcome}")
            continue
        try:
            db.delete_location(name)
        except PointerUnavailable as e:
            report.errors.append(f"{name}: pointer row not removed: {e}")
        report.purged.append(name)


def undelete(state: StateStore, names: list[str]) -> list[str]:
    """Cancel soft deletes: those blobs are kept (and tracked) as before."""
    return [n for n in names if state.drop_deletion(n)]
