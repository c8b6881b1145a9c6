"""GigHive's deletes: soft-delete the blobs of a deleted asset, purge them after a grace period.

GigHive's admin delete unlinks the local file and drops the asset's rows; it never tells the blob.
The agent infers a delete, and only this one, from these facts together (look(), the one place
that decides it, for the timer's runs and for the way back alike):

- it saw the asset's row in `assets` before (the table as last seen whole is kept in the state);
- the row is gone now, while the table is whole (not empty, not suddenly shrunk);
- the table was not rebuilt in between. GigHive rebuilds it more often than it deletes from it
  ("clear media", an import's TRUNCATE and refill, a restored dump), and a refill from what is on
  disk leaves out exactly the evicted files. So a row that vanished in a mass disappearance is
  *lost*, not deleted, and stays lost until it comes back or the operator confirms
  (`reconcile --accept-assets-shrink`). A rebuild is seen as an empty, missing or shrunk table;
  as rows renumbered (`asset_id`), a new row under an id the table had used before, or an
  AUTO_INCREMENT counter that went back, none of which a delete does; or as pointer rows of the
  agent's own table gone from the same database;
- the asset's local file is gone too.

Its blobs (the media file and its thumbnail) are then soft-deleted: recorded with a purge time
(PURGE_DELETED_AFTER_DAYS later), still in the container, and restorable until then with
`gighive-media undelete` or simply by the asset coming back (a re-import). When the time comes the
blob is purged only if every witness still says so (agent.safety's rule for a destructive step):
the asset is still gone from a whole table, no local file has appeared, the agent's record still
names the blob's ETag, and the delete is conditional on that ETag. A mass disappearance never
leads to a purge.

What is left, and said in docs/reliability.md: where the server does not report the table's
AUTO_INCREMENT, a TRUNCATE and a refill, both between two looks, that add no new row and leave out
only the newest rows (every survivor keeps its old id) look exactly like a delete.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from . import safety
from .media import media_file_for_blob
from .pointer import Location, PointerDB, PointerUnavailable, asset_key
from .state import StateStore
from .storage.azure_blob import AzureBlobStore

log = logging.getLogger(__name__)


# Set when a look saw `assets` rebuilt, or the pointer table lose rows (agent.worker's audit):
# the next whole look takes the rows that vanished since the last one as lost, not deleted.
DISTURBED_KEY = "assets_disturbed"
NEXT_ID_KEY = "assets_next_id"


@dataclass
class DeleteReport:
    soft_deleted: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    purged: list[str] = field(default_factory=list)
    assets_problem: str | None = None
    lost: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AssetsLook:
    """What GigHive's `assets` says now, read against what the agent remembers of it."""

    witness: safety.AssetsWitness
    # GigHive deleted these assets: seen in a whole table, gone now, the table not rebuilt.
    deleted: frozenset[tuple[str, str]] = frozenset()
    # These vanished in a mass disappearance: still wanted, as far as anyone can tell, and why.
    lost: dict[tuple[str, str], str] = field(default_factory=dict)
    # Why rows that vanished now count as lost (None: the table was not rebuilt since the last look).
    rebuilt: str | None = None


def look(
    state: StateStore | None, db: PointerDB | None, accept_shrink: bool = False, rebuilt_hint: str | None = None
) -> AssetsLook:
    """Read `assets` and judge what vanished from it since the last whole look. Changes nothing
    (remember() does). `rebuilt_hint`: another witness saw the database rebuilt (the way back's own
    pointer check). Raises PointerUnavailable."""
    witness = safety.assets_witness(db, safety.assets_seen(state), accept_shrink=accept_shrink)
    if state is None:
        return AssetsLook(witness)
    lost = state.assets_lost()
    if witness.keys is None:
        return AssetsLook(witness, lost=lost)
    current = witness.keys
    lost = {k: why for k, why in lost.items() if k not in current}  # back: wanted, and listed again
    seen = state.assets_seen()
    vanished = frozenset(k for k in seen if k not in current)
    if accept_shrink:
        # The operator's word: rows gone, in a mass disappearance or not, were deleted on purpose.
        return AssetsLook(witness, vanished | frozenset(lost))
    rebuilt = state.get_meta(DISTURBED_KEY) or rebuilt_hint or _rebuilt(state, seen, witness)
    if rebuilt is None:
        return AssetsLook(witness, vanished, lost)
    return AssetsLook(witness, frozenset(), {**lost, **dict.fromkeys(vanished, rebuilt)}, rebuilt)


def _rebuilt(state: StateStore, seen: dict[tuple[str, str], int | None], witness: safety.AssetsWitness) -> str | None:
    renumbered = sum(1 for k, i in witness.ids.items() if seen.get(k) is not None and seen[k] != i)
    if renumbered:
        return f"GigHive's assets table was rebuilt: {renumbered} row(s) came back under a new asset_id"
    # AUTO_INCREMENT never hands out an id again, but a TRUNCATE starts it over: a row the agent
    # has not seen, under an id no higher than one it has, was numbered after a reset (seed 16000:
    # TRUNCATE, then one new file, between two looks: same count, same counter).
    known = [i for i in seen.values() if i is not None]
    if known:
        top = max(known)
        reused = sum(1 for k, i in witness.ids.items() if k not in seen and i <= top)
        if reused:
            return (
                f"GigHive's assets table was rebuilt: {reused} new row(s) took an asset_id it had used before "
                "(a TRUNCATE starts the counter over)"
            )
    before = state.get_meta(NEXT_ID_KEY)
    if before and witness.next_id is not None and witness.next_id < int(before):
        return (
            f"GigHive's assets table was rebuilt: its AUTO_INCREMENT went back from {before} to {witness.next_id} "
            "(a TRUNCATE or a restore)"
        )
    return None


def remember(state: StateStore, found: AssetsLook) -> None:
    """Keep what a look learnt: a rebuild seen in the act, or the whole table, its lost rows and ids."""
    witness = found.witness
    if witness.keys is None:
        if state.get_meta(DISTURBED_KEY) is None:
            state.set_meta(DISTURBED_KEY, witness.problem or "GigHive's assets table could not be trusted")
        return
    old_lost = state.assets_lost()
    state.set_assets_lost(
        {k: why for k, why in found.lost.items() if k not in old_lost}, [k for k in old_lost if k not in found.lost]
    )
    state.update_assets_seen(witness.ids)
    if witness.next_id is not None:
        state.set_meta(NEXT_ID_KEY, str(witness.next_id))
    state.delete_meta(DISTURBED_KEY)
    safety.remember_assets(state, witness)


def disturbed(state: StateStore, why: str) -> None:
    """A witness besides `assets` saw the database rebuilt (pointer rows gone). Durable, and
    called before the rows are written again: the rewrite erases the sign, so a power cut that
    kept the rewrite and lost this record would let a restored dump's missing rows pass for
    GigHive's deletes (seed 21001)."""
    if state.get_meta(DISTURBED_KEY) is None:
        state.set_meta(DISTURBED_KEY, why, durable=True)


def blob_etags(pointers: Mapping[str, Location] | None) -> dict[str, str | None] | None:
    """The rows of the agent's pointer table that point at Blob, as pointers_gone() reads them."""
    if pointers is None:
        return None
    return {name: loc.etag for name, loc in pointers.items() if loc.provider == "azure_blob"}


def gone_pointer_rows(done: Mapping[str, str | None], have: Mapping[str, str | None]) -> list[str]:
    """Of the pointer rows the agent wrote (`done`: blob name -> ETag, from the state), those the
    database no longer holds as written (missing, or naming another version)."""
    return [name for name, etag in done.items() if name not in have or have[name] != etag]


def gone_reason(gone: int) -> str:
    return f"{gone} of the agent's pointer rows were gone from the database (cleared or restored)"


def pointers_gone(state: StateStore | None, have: Mapping[str, str | None] | None) -> str | None:
    """Pointer rows the agent wrote that the database no longer holds as written: it was cleared or
    restored since, and `assets` with it. `have`: blob name -> ETag of the rows there now (None:
    the database could not be read)."""
    if state is None or have is None:
        return None
    gone = gone_pointer_rows(state.pointer_done_names(), have)
    return gone_reason(len(gone)) if gone else None


def track(
    config, state: StateStore, store: AzureBlobStore, db: PointerDB | None, accept_shrink: bool = False
) -> DeleteReport:
    """Notice deletes since the last whole look at `assets`, then purge what is due."""
    report = DeleteReport()
    if db is None or not config.is_azure:
        return report
    try:
        found = look(state, db, accept_shrink=accept_shrink)
    except PointerUnavailable as e:
        report.errors.append(f"DB: {e}")
        return report
    report.lost = len(found.lost)
    if found.witness.keys is None:
        # Not a delete of anything: reported (status shows it), and nothing is purged.
        report.assets_problem = found.witness.problem
        state.set_meta("assets_problem", found.witness.problem or "")
        remember(state, found)
        return report
    state.delete_meta("assets_problem")
    if found.rebuilt:
        log.warning(
            "%s; %d asset(s) that vanished from it are not taken for deletes (they stay in Blob and are "
            "restored by the way back) until they come back or `gighive-media reconcile --accept-assets-shrink` "
            "confirms them",
            found.rebuilt,
            len(found.lost),
        )
    current = found.witness.keys
    pending = {r["blob_name"]: (r["file_type"], r["checksum"]) for r in state.deletions()}
    for name, key in pending.items():
        if key in current:
            state.drop_deletion(name)  # re-imported: the asset is wanted again
            report.restored.append(name)
    grace = config.purge_deleted_after_days * 86400.0
    if found.deleted:
        by_asset = _tracked_by_asset(config, state)
        for key in sorted(found.deleted):
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
    remember(state, found)
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
