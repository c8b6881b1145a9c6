"""The one rule for every destructive step: the only copy of a media file is never destroyed.

A destructive step is deleting a local file (eviction), deleting a blob (pruning), forgetting a
state row, or declaring "every file is local, switching back is safe". Each happens only when
independent witnesses agree that another verified copy exists:

- the agent's state: the row says the file was uploaded and verified (size, sha256, MD5, ETag);
- the blob's own properties, read from the service now: size, Content-MD5, the sha256 metadata
  and the ETag the upload verified;
- the DB pointer, read back from MySQL now: it points at that blob (skipped only when no DB is
  configured: then the agent's state is the pointer);
- the local file, checked through an open file descriptor, not its path.

A missing witness (MySQL down, the service unreachable, an empty `assets` table, a lost state)
means nothing is destroyed, and the reason is logged and returned. Every path in the agent that
destroys something calls this module; nothing else unlinks media or deletes blobs.

Eviction is made crash- and power-safe by an intent row committed with fsync before the file is
touched, and by renaming the file aside and checking that the renamed inode is the one that was
verified before unlinking it: a file renamed into place meanwhile (a rewritten thumbnail) is never
the one deleted. recover() finishes or undoes whatever a kill or a power cut interrupted.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .errors import CannotWrite
from .media import media_file_for_blob
from .pointer import PointerDB, PointerUnavailable, asset_key
from .state import POINTER_NONE, POINTER_PENDING, FileRecord, StateStore
from .storage import Listed, StoreUnavailable
from .storage.azure_blob import AzureBlobStore

log = logging.getLogger(__name__)

# Set by `migrate --to-local`: from then on nothing evicts and nothing points the DB at Blob,
# until the operator runs the forward `migrate` again.
HOLD_KEY = "local_hold"
HOLD_MARKER = ".gighive-media-agent-local-hold"
# The service is unusable since...: set by the worker, shown by `status`, cleared by a success.
OUTAGE_KEY = "outage"
# How many rows `assets` had when the agent last trusted it (a sudden drop is not deletions).
ASSETS_SEEN_KEY = "assets_seen"
# More than this share of `assets` gone since the last look is a TRUNCATE or an import, not deletes.
ASSETS_SHRINK_LIMIT = 0.05


class OutageDuringCheck(Exception):
    """A witness could not be asked because the service or MySQL is unusable."""


@dataclass
class Witnesses:
    config: Config
    state: StateStore
    store: AzureBlobStore
    pointer_db: PointerDB | None
    db_lock: threading.Lock

    # ---- each witness answers None (agrees) or why not ------------------------------------------

    @staticmethod
    def record(rec: FileRecord | None) -> str | None:
        if rec is None:
            return "the agent has no record of this file"
        if rec.state not in ("uploaded", "evicted") or not rec.sha256 or not rec.etag or rec.size is None:
            return f"the agent's record does not say it was uploaded and verified (state {rec.state})"
        return None

    def blob(self, rec: FileRecord) -> str | None:
        """The blob, read now, is the one the upload verified, proven by the service's own record
        (its committed block list of MD5-checked blocks, or the Content-MD5 a single Put Blob was
        checked against), pinned to the verified ETag. Raises OutageDuringCheck."""
        assert rec.size is not None and rec.sha256 is not None
        try:
            reason = self.store.verify_committed(
                rec.blob_name, rec.size, bytes.fromhex(rec.md5) if rec.md5 else b"", rec.sha256, rec.etag
            )
        except StoreUnavailable as e:
            raise OutageDuringCheck(str(e)) from e
        return f"its blob differs from the verified upload ({reason})" if reason else None

    def pointer(self, rec: FileRecord) -> str | None:
        """The DB, read back now, points at this blob. Raises OutageDuringCheck when MySQL is down."""
        if self.pointer_db is None:
            return None  # no DB configured: the agent's state is the pointer
        try:
            with self.db_lock:
                loc = self.pointer_db.get(rec.blob_name)
        except PointerUnavailable as e:
            raise OutageDuringCheck(f"DB: {e}") from e
        if loc is None:
            return "the DB has no pointer row for it"
        if loc.provider != "azure_blob" or loc.etag != rec.etag or loc.content_sha256 != rec.sha256:
            return f"the DB pointer does not point at the verified blob (provider {loc.provider}, etag {loc.etag})"
        return None

    def all_agree(self, rec: FileRecord | None) -> str | None:
        """None when state, blob and DB pointer all vouch for the blob copy; else the first reason."""
        reason = self.record(rec)
        if reason is not None:
            return reason
        assert rec is not None
        return self.blob(rec) or self.pointer(rec)


def hold_markers(config: Config) -> list[Path]:
    """Where the hold is written besides the state: one file at the top of every media root.

    The state directory can be lost (a rebuilt host, a restore) while the media roots, which hold
    the files the way back restored, survive it: a hold kept only in state.sqlite3 would be gone
    with it, and the next run would evict again. A dot-name keeps scans and uploads away from it.
    """
    seen: dict[str, Path] = {}
    for root in config.roots:
        seen.setdefault(str(root.path), root.path / HOLD_MARKER)
    return list(seen.values())


def held(state: StateStore | None, config: Config) -> str | None:
    """When `migrate --to-local` set the hold (ISO time), else None.

    Either witness is enough: the state's row, or a marker in a media root. A marker that cannot
    be read counts as a hold: a missing witness never lets eviction resume.
    """
    since = state.get_meta(HOLD_KEY) if state is not None else None
    if since is not None:
        return since
    for marker in hold_markers(config):
        try:
            text = marker.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except OSError as e:
            return f"unknown (the hold marker {marker} cannot be read: {e.strerror or e})"
        return text.splitlines()[0] if text else "unknown"
    return None


def set_hold(state: StateStore, config: Config) -> None:
    """Raises CannotWrite (exit 73) when a marker cannot be written: the way back then stops
    before it changes anything, since a hold without its second witness could be lost."""
    since = held(state, config)
    if since is None or since.startswith("unknown"):
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    # The markers first: they are what survives a lost state directory.
    for marker in hold_markers(config):
        try:
            _write_durably(
                marker,
                f"{since}\nSet by `gighive-media migrate --to-local`: nothing is evicted until the forward "
                "`gighive-media migrate` runs again. Do not delete this file by hand.\n",
            )
        except OSError as e:
            raise CannotWrite(
                f"cannot write the local hold's marker {marker}: {e.strerror or e}. `migrate --to-local` needs "
                "to write one file at the top of every media root; run it as the service user (the units' "
                "ReadWritePaths= / the role's delete.conf give it that right) or fix the root's permissions"
            ) from None
    if state.get_meta(HOLD_KEY) != since:
        state.set_meta(HOLD_KEY, since, durable=True)


def release_hold(state: StateStore, config: Config) -> bool:
    was = held(state, config) is not None
    if state.get_meta(HOLD_KEY) is not None:
        state.delete_meta(HOLD_KEY)
    for marker in hold_markers(config):
        try:
            marker.unlink()
        except FileNotFoundError:
            continue
        _fsync_dir(marker.parent)
    return was


def _write_durably(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, text.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


# ---- deleting a local file -------------------------------------------------------------------


@dataclass(frozen=True)
class Eviction:
    evicted: bool
    reason: str | None = None  # why it was kept
    outage: str | None = None  # a witness was unreachable
    requeue: bool = False  # the blob is wrong: upload it again


def evict(w: Witnesses, rec: FileRecord) -> Eviction:
    """Delete the local copy of `rec` if, and only if, every witness agrees the blob holds it."""
    if held(w.state, w.config) is not None:
        return Eviction(False, "`migrate --to-local` set a hold on eviction (run `gighive-media migrate` to lift it)")
    mf = media_file_for_blob(w.config, rec.blob_name)
    if mf is None:
        return Eviction(False, "no configured media root holds it")
    reason = w.record(rec)
    if reason is not None or not rec.local_copy:
        return Eviction(False, reason or "no local copy")
    path = str(mf.path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        fd = None
    except OSError as e:
        return Eviction(False, f"cannot open {path}: {e.strerror}")
    try:
        if fd is not None:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or (st.st_size, st.st_mtime_ns, st.st_ino) != (
                rec.size,
                rec.mtime_ns,
                rec.inode,
            ):
                return Eviction(False, "the local file changed since it was verified")
        try:
            reason = w.blob(rec) or w.pointer(rec)
        except OutageDuringCheck as e:
            return Eviction(False, f"cannot ask every witness: {e}", outage=str(e))
        if reason is not None:
            return Eviction(False, reason, requeue=reason.startswith("its blob"))
        if fd is None:
            # Gone already (GigHive deleted it, or an eviction whose record a crash lost):
            # nothing is destroyed here, the record catches up with the disk.
            w.state.finish_eviction(rec.blob_name, _pointer_after(w))
            return Eviction(True)
        aside = str(Path(path).with_name(f".{Path(path).name}.gighive-evict"))
        if os.path.lexists(aside):
            # Left by an interrupted eviction that could not be confirmed (recover() logged it):
            # renaming over it would destroy that file. The operator decides.
            return Eviction(False, f"{aside} from an earlier interrupted eviction is still there; look at it first")
        w.state.begin_eviction(rec.blob_name, path, aside, st.st_ino)
        try:
            os.rename(path, aside)
        except OSError as e:
            w.state.drop_intent(rec.blob_name)
            return Eviction(
                False, f"cannot move {path} aside: {e.strerror} (eviction needs write access to its directory)"
            )
        moved = os.lstat(aside)
        if (moved.st_dev, moved.st_ino) != (st.st_dev, st.st_ino):
            # Another file was renamed into place between the open and the rename: that one was
            # never verified. Put it back (never over a newer file) and keep everything.
            _put_back(aside, path)
            w.state.drop_intent(rec.blob_name)
            return Eviction(False, "the local file was replaced while it was being evicted")
        os.unlink(aside)
        _fsync_dir(os.path.dirname(path))
        w.state.finish_eviction(rec.blob_name, _pointer_after(w))
        return Eviction(True)
    finally:
        if fd is not None:
            os.close(fd)


def _pointer_after(w: Witnesses) -> str:
    return POINTER_PENDING if w.pointer_db is not None else POINTER_NONE


def _put_back(aside: str, path: str) -> bool:
    """Move a file set aside back under its name; link(2) never replaces a file that appeared."""
    try:
        os.link(aside, path)
    except FileExistsError:
        log.error("%s appeared meanwhile; the earlier file is kept as %s for the operator", path, aside)
        return False
    os.unlink(aside)
    _fsync_dir(os.path.dirname(path))
    return True


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def recover(w: Witnesses) -> int:
    """Finish or undo every eviction a kill or a power cut interrupted; run under the queue lock
    before any other work. Returns how many intents were settled."""
    settled = 0
    for intent in w.state.intents():
        name, path, aside, inode = intent["blob_name"], intent["path"], intent["aside"], intent["inode"]
        try:
            aside_st = os.lstat(aside)
        except FileNotFoundError:
            aside_st = None
        try:
            path_st = os.lstat(path)
        except FileNotFoundError:
            path_st = None
        rec = w.state.get(name)
        if aside_st is None:
            if path_st is not None and path_st.st_ino == inode:
                w.state.drop_intent(name)  # stopped before the rename: nothing happened
            else:
                # The unlink happened; only the record of it was lost. Say so, loudly if the
                # blob no longer vouches for it (nothing can be undone then).
                w.state.finish_eviction(name, _pointer_after(w))
                log.info("an interrupted eviction of %s had completed; recorded now", name)
            settled += 1
            continue
        try:
            reason = w.all_agree(rec) if aside_st.st_ino == inode else "the file set aside is not the verified one"
        except OutageDuringCheck as e:
            reason = f"cannot ask every witness: {e}"
        if reason is None and held(w.state, w.config) is None and path_st is None:
            os.unlink(aside)
            _fsync_dir(os.path.dirname(path))
            w.state.finish_eviction(name, _pointer_after(w))
            log.info("finished an interrupted eviction of %s", name)
        elif path_st is None:
            _put_back(aside, path)
            w.state.drop_intent(name)
            log.warning("undid an interrupted eviction of %s (%s)", name, reason or "a hold or a new file")
        elif reason is None:
            # A new file took the name meanwhile; the verified one set aside is backed by its blob.
            os.unlink(aside)
            w.state.finish_eviction(name, _pointer_after(w))
        else:
            log.error("kept %s beside %s: an interrupted eviction cannot be confirmed (%s)", aside, path, reason)
            continue
        settled += 1
    return settled


# ---- forgetting a state row ------------------------------------------------------------------


def settle_vanished(w: Witnesses, rec: FileRecord) -> str:
    """A queued file is gone from disk. Forget it only if no blob holds it: a power cut can take
    the commit that said "uploaded" (or "evicted") while the unlink survived, and forgetting the
    row would lose the only witness of that blob. Returns 'forgotten', 'adopted' or 'kept'."""
    mf = media_file_for_blob(w.config, rec.blob_name)
    try:
        info = w.store.stat(rec.blob_name)
    except StoreUnavailable as e:
        w.state.defer(rec.blob_name, time.time() + w.config.retry.base_delay, f"file vanished; blob unknown: {e}")
        return "kept"
    expected = mf.expected_sha256 if mf is not None else None
    if info is None or not info.sha256 or (expected is not None and info.sha256 != expected):
        w.state.forget(rec.blob_name)
        return "forgotten"
    w.state.adopt_listed(rec.blob_name, rec.root, rec.path, info, _pointer_after(w))
    log.warning(
        "%s vanished from disk but its blob is there: recorded as evicted (a crash or power cut had lost that record)",
        rec.blob_name,
        extra={"fields": {"blob_name": rec.blob_name}},
    )
    return "adopted"


# ---- the `assets` witness (pruning, the way back) ------------------------------------------------


@dataclass(frozen=True)
class AssetsWitness:
    keys: set[tuple[str, str]] | None  # None: it cannot be trusted to say what is wanted
    problem: str | None
    rows: int
    # Each key's asset_id and the table's next AUTO_INCREMENT: whether it was rebuilt (agent.deletes).
    ids: dict[tuple[str, str], int] = field(default_factory=dict)
    next_id: int | None = None


def assets_seen(state: StateStore | None) -> int:
    return int(state.get_meta(ASSETS_SEEN_KEY) or 0) if state is not None else 0


def assets_witness(db: PointerDB | None, seen: int, accept_shrink: bool = False) -> AssetsWitness:
    """GigHive's `assets`, trusted only when it looks whole. Empty, missing or suddenly shrunk
    (clear media, an import's TRUNCATE, a restore of an old dump) means: it cannot say what is
    wanted, so nothing it leaves out is deleted or left behind. Raises PointerUnavailable."""
    if db is None:
        return AssetsWitness(None, "no DB is configured, so GigHive's assets table cannot be read", 0)
    found = db.asset_rows()
    if found is None:
        return AssetsWitness(None, "GigHive's assets table does not exist", 0)
    ids, next_id = found
    keys = set(ids)
    if not keys:
        return AssetsWitness(
            None,
            "GigHive's assets table is empty (cleared, or an import is refilling it): it cannot say what is wanted",
            0,
        )
    lost = seen - len(keys)
    if lost > max(1, seen * ASSETS_SHRINK_LIMIT) and not accept_shrink:
        return AssetsWitness(
            None,
            f"GigHive's assets table shrank from {seen} to {len(keys)} rows since the agent last read it; "
            "that is a TRUNCATE, an import or a restore rather than deletions. If the rows were deleted on "
            "purpose, confirm with --accept-assets-shrink",
            len(keys),
        )
    return AssetsWitness(keys, None, len(keys), ids, next_id)


def remember_assets(state: StateStore, witness: AssetsWitness) -> None:
    if witness.keys is not None:
        state.set_meta(ASSETS_SEEN_KEY, str(witness.rows))


# ---- deleting a blob -------------------------------------------------------------------------


def purge_deleted(
    config: Config, state: StateStore, store: AzureBlobStore, name: str, key, current
) -> bool | str | None:
    """Purge the blob of an asset GigHive deleted, once its grace period is over (agent.deletes).

    True: purged and forgotten. None: a witness says it is wanted after all (the soft delete is
    cancelled). A string: not purged this time, and why (an outage, another version)."""
    rec = state.get(name)
    mf = media_file_for_blob(config, name)
    if key in current:
        log.info("not purging %s: the asset is back in GigHive", name)
        return None
    if mf is None or os.path.lexists(mf.path):
        log.info("not purging %s: a local file has its name again", name)
        return None
    if rec is None or not rec.etag:
        log.info("not purging %s: the agent has no record of the blob's version", name)
        return None
    try:
        # Conditional on the version the agent recorded: a blob replaced since is not purged.
        store.delete(name, etag=rec.etag)
    except StoreUnavailable as e:
        return str(e)
    state.forget_purged(name)
    log.warning("purged %s: its asset was deleted in GigHive and the grace period is over", name)
    return True


def delete_orphan(config: Config, store: AzureBlobStore, name: str, etag: str) -> bool:
    """Prune one orphan blob (reconcile decided no witness claims it): only the listed version, and
    not if a local file took its name meanwhile. Raises StoreUnavailable."""
    mf = media_file_for_blob(config, name)
    if mf is not None and os.path.lexists(mf.path):
        return False
    store.delete(name, etag=etag)
    return True


def blob_unclaimed(
    config: Config,
    name: str,
    rec: FileRecord | None,
    pointers: dict | None,
    assets: AssetsWitness,
    local_names: Collection[str],
) -> str | None:
    """None when no witness claims the blob (it may be pruned); else who still needs it."""
    if name in local_names:
        return "a local file has this name"
    if rec is not None:
        return f"the agent's state tracks it ({rec.state})"
    if pointers is None:
        return "the DB pointers could not be read"
    loc = pointers.get(name)
    if loc is not None and loc.provider == "azure_blob":
        return "the DB points at it"
    if assets.keys is None:
        return assets.problem or "GigHive's assets table cannot be trusted"
    mf = media_file_for_blob(config, name)
    key = asset_key(mf) if mf is not None else None
    if key is not None and key in assets.keys:
        return "GigHive's assets table has its row"
    if key is None:
        return "it is not a media file or thumbnail of a GigHive asset (never pruned)"
    return None


# The service's clock (a blob's Last-Modified) and the host's (when the state began) disagree a
# little, and a VM's clock jumps after a suspend: a blob counts as written after the state began
# only with this much to spare.
STATE_CLOCK_MARGIN = 3600.0


def unvouched_orphan(born: float | None, blob: Listed) -> str | None:
    """Why the agent's state cannot vouch that nothing wants a blob no witness claims; None when it can.

    Every claim on a blob can be lost at once: the state directory with the host, GigHive's
    `assets` in a "clear media", the pointer table in a restore (seed 21000: all three, then a run
    that filled the new state and the table again with other files). The state knows it never
    tracked a blob only if it already existed when the blob was written; a blob older than the
    state may be the only copy of a file whose every record is gone."""
    if born is None or blob.last_modified is None:
        return "the blob's age, or when the agent's state began, is unknown"
    if blob.last_modified <= born + STATE_CLOCK_MARGIN:
        return (
            f"written {_utc(blob.last_modified)}, before the agent's state began ({_utc(born)}): it may be the "
            "only copy of a file whose records a lost state took with it"
        )
    return None


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def state_witness_problem(state: StateStore, listing: dict[str, Listed]) -> str | None:
    """A state with no uploads while blobs exist was lost or replaced: it cannot vouch for anything."""
    if listing and not any(state.counts().get(s) for s in ("uploaded", "evicted")):
        return (
            "the agent's state records no upload although the container holds blobs (state directory lost "
            "or replaced?); `gighive-media reconcile` rebuilds it first"
        )
    return None


def outage_since(state: StateStore) -> dict | None:
    raw = state.get_meta(OUTAGE_KEY)
    return json.loads(raw) if raw else None


def record_outage(state: StateStore, error: str, next_try: float) -> None:
    now = time.time()
    prior = outage_since(state) or {}
    state.set_meta(
        OUTAGE_KEY,
        json.dumps(
            {
                "since": prior.get("since", now),
                "last_error": error[:500],
                "runs": int(prior.get("runs", 0)) + 1,
                "next_try": next_try,
            }
        ),
    )


def clear_outage(state: StateStore) -> None:
    if outage_since(state) is not None:
        state.delete_meta(OUTAGE_KEY)
        log.info("Azure Blob is usable again; the outage is over")
