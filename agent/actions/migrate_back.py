"""`gighive-media migrate --to-local`: the way back from Blob to local disk.

What must come back is read from every witness, not only the agent's state (which a rebuilt
host or a restore can lose): the container listing with each blob's own metadata, the agent's
state, the DB pointers and GigHive's `assets`. A blob with no local file comes back when any of
them claims it (an `evicted` row, a pointer to Blob, an `assets` row); when `assets` cannot be
trusted (empty, missing, suddenly shrunk) every such blob comes back, because restoring too
much loses nothing. Only a blob whose delete the agent saw stays in Blob alone: it remembered the
asset's row, and the row is gone from a whole table (or the delete is already recorded, agent.deletes).
A blob that a whole-looking table leaves out, but whose row the agent never saw go (the state was
lost, or an import refilled a TRUNCATEd table only in part), is "unlisted": it is not restored
unless the operator says so (`--include-unlisted`), and while it is there local is not safe.

Each file is downloaded and verified (agent.restore), pointers are flipped to `local`, and a
durable hold is set first: from then on no run evicts or points the DB at Blob again until the
operator runs the forward `migrate`. The command refuses while the systemd triggers are active.
`--check` answers, changing nothing, whether switching MEDIA_STORAGE_BACKEND to local is safe.
Blobs are left in the container (deleting them is a separate, deliberate step).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import deletes, safety
from ..config import Config, MediaRoot
from ..context import queue_worker
from ..errors import EXIT_CANTCREAT, EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, AgentError
from ..inventory import list_roots
from ..media import media_file_for_blob
from ..pointer import Location, PointerDB, PointerUnavailable, asset_key
from ..progress import Progress, human_bytes
from ..restore import RestoreFailed, restore
from ..state import FileRecord, StateStore
from ..storage import Listed, StoreUnavailable
from ..storage.azure_blob import AzureBlobStore

log = logging.getLogger(__name__)

# Room left free on a media filesystem after the restore: GigHive keeps writing uploads there.
SPACE_MARGIN = 1024**3

# The units that start runs on their own; one of them could evict again right after a restore.
TRIGGER_UNITS = ("gighive-media-upload.path", "gighive-media-retry.timer")
AGENT_SERVICES = ("gighive-media-upload.service", "gighive-media-retry.service")


class NotEnoughSpace(AgentError):
    exit_code = EXIT_CANTCREAT


class UnitsActive(AgentError):
    exit_code = EXIT_FAILURE


# The claim of a file whose asset has its row in GigHive's `assets`: checked again as it comes back.
CLAIMED_BY_ROW = "GigHive's assets table"


@dataclass(frozen=True)
class Wanted:
    """A blob whose file must be on disk before local is safe."""

    name: str
    size: int
    sha256: str
    mtime_ns: int | None
    why: str  # which witness claims it


@dataclass
class Survey:
    """Every witness read once: what still lives only in Blob, and what was left there on purpose."""

    missing: list[Wanted] = field(default_factory=list)  # claimed, no local file
    differs: list[str] = field(default_factory=list)  # a local file that is not the blob's content
    left_in_blob: list[str] = field(default_factory=list)  # GigHive deleted the asset, and the agent saw it go
    unlisted: list[str] = field(default_factory=list)  # no `assets` row, but no delete was ever seen either
    unverifiable: list[str] = field(default_factory=list)  # a blob whose metadata cannot prove its content
    pointers_to_blob: list[str] = field(default_factory=list)  # DB rows that still say azure_blob
    assets_problem: str | None = None
    hashed: int = 0


def survey(
    config: Config,
    names: list[str],
    store: AzureBlobStore,
    state: StateStore | None,
    db: PointerDB | None,
    include_unlisted: bool = False,
) -> Survey:
    """Raises StoreUnavailable / PointerUnavailable when a witness cannot be read."""
    listing = list_roots(store, names)
    records: dict[str, FileRecord] = {}
    if state is not None:
        records = {r.blob_name: r for r in state.records() if r.root in names}
    pointers: dict[str, Location] | None = db.locations() if db is not None else None
    # The timer's runs notice deletes the same way (agent.deletes), but the units are stopped now,
    # and the hold keeps the pointer audit from seeing a cleared or restored database: so look here.
    found = deletes.look(state, db, rebuilt_hint=deletes.pointers_gone(state, deletes.blob_etags(pointers)))
    assets = found.witness
    out = Survey(assets_problem=assets.problem)
    # Soft-deleted blobs of assets GigHive deleted (agent.deletes) do not come back.
    deleted = {r["blob_name"] for r in state.deletions()} if state is not None else set()

    candidates: set[str] = set(listing)
    candidates.update(n for n, r in records.items() if r.state in ("uploaded", "evicted"))
    if pointers is not None:
        candidates.update(n for n, loc in pointers.items() if loc.provider == "azure_blob" and n.split("/")[0] in names)
    for name in sorted(candidates):
        mf = media_file_for_blob(config, name)
        if mf is None:
            continue
        blob, rec = listing.get(name), records.get(name)
        loc = pointers.get(name) if pointers is not None else None
        if loc is not None and loc.provider == "azure_blob":
            out.pointers_to_blob.append(name)
        why = _claimed_by(rec, loc, found, mf)
        try:
            st = os.stat(mf.path, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is not None:
            if blob is not None and not _local_matches(mf.path, st, blob, rec, out):
                out.differs.append(name)
            continue
        if name in deleted:
            out.left_in_blob.append(name)
            continue
        if why is None:
            if asset_key(mf) in found.deleted:
                out.left_in_blob.append(name)
                continue
            if not include_unlisted:
                out.unlisted.append(name)
                continue
            why = "the operator (--include-unlisted): GigHive's assets table has no row for it"
        sha, size = _expected(rec, blob, mf.expected_sha256)
        if sha is None or size is None:
            out.unverifiable.append(name)
            continue
        out.missing.append(Wanted(name, size, sha, rec.mtime_ns if rec is not None else None, why))
    return out


def _row_still_there(db: PointerDB | None, mf) -> Callable[[], bool] | None:
    """Asked as the file comes back: does GigHive still have its asset? When MySQL cannot say, the
    file comes back (restoring too much loses nothing)."""
    key = asset_key(mf)
    if db is None or key is None:
        return None

    def ask() -> bool:
        try:
            return db.has_asset(key)
        except PointerUnavailable:
            return True

    return ask


def _claimed_by(rec: FileRecord | None, loc: Location | None, found: deletes.AssetsLook, mf) -> str | None:
    """Which witness wants this file back on disk, or None when GigHive's table leaves it out.

    A whole `assets` table without the asset's row, with its local file gone, is GigHive's delete
    only when agent.deletes says so; a row lost when the table was rebuilt still claims its file.
    A table that cannot be trusted says nothing, and then every other witness counts."""

    assets = found.witness
    key = asset_key(mf)
    if key is not None and key in found.lost:
        return f"GigHive's assets table before it was rebuilt ({found.lost[key]})"
    if assets.keys is not None and key is not None:
        return CLAIMED_BY_ROW if key in assets.keys else None
    if rec is not None and rec.state in ("uploaded", "evicted"):
        return f"the agent's state ({rec.state})"
    if loc is not None and loc.provider == "azure_blob":
        return "the DB pointer"
    if assets.keys is None:
        return f"every blob, because {assets.problem}"
    return "not a GigHive asset's file: kept to be safe"


def _expected(rec: FileRecord | None, blob: Listed | None, from_name: str | None) -> tuple[str | None, int | None]:
    """The content the restored file must have: the verified upload's record, else the blob's own
    metadata, and never anything that contradicts the sha256 in the file's name."""
    if rec is not None and rec.sha256 and rec.size is not None and rec.state in ("uploaded", "evicted"):
        sha, size = rec.sha256, rec.size
    elif blob is not None and blob.sha256:
        sha, size = blob.sha256, blob.size
    else:
        return None, None
    if from_name is not None and sha != from_name:
        return None, None
    return sha, size


def _local_matches(path, st: os.stat_result, blob: Listed, rec: FileRecord | None, out: Survey) -> bool:
    """The local file holds the blob's content: vouched for by the state's verified record of this
    very inode, else hashed now (only files no record vouches for, so a rebuilt host pays once)."""
    if st.st_size != blob.size:
        return False
    if (
        rec is not None
        and rec.sha256 == blob.sha256
        and (rec.size, rec.mtime_ns, rec.inode) == (st.st_size, st.st_mtime_ns, st.st_ino)
    ):
        return True
    if not blob.sha256:
        return True  # nothing to compare with; the sizes agree and the blob is not the only copy
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while data := f.read(4 * 1024 * 1024):
            h.update(data)
    out.hashed += 1
    return h.hexdigest() == blob.sha256


def active_units() -> list[str]:
    """Agent units that are active on this host (none without systemd as init)."""
    systemctl = shutil.which("systemctl")
    if not os.path.isdir("/run/systemd/system") or systemctl is None:
        return []
    units = [*TRIGGER_UNITS, *AGENT_SERVICES]
    proc = subprocess.run([systemctl, "is-active", *units], capture_output=True, text=True, timeout=30, check=False)
    states = proc.stdout.split()
    return [u for u, s in zip(units, states, strict=False) if s in ("active", "activating", "reloading")]


def _refuse_while_units_active() -> None:
    busy = [u for u in active_units() if u.endswith((".path", ".timer"))]
    if busy:
        raise UnitsActive(
            f"{', '.join(busy)} {'is' if len(busy) == 1 else 'are'} active and would upload and evict again "
            "right after the restore. Stop them first: "
            f"`systemctl disable --now {' '.join(TRIGGER_UNITS)}` (the Ansible role does this when "
            "media_storage_backend is set to local), then run `gighive-media migrate --to-local` again"
        )


def run(config: Config, roots: tuple[MediaRoot, ...], opts) -> tuple[dict[str, object], int]:
    names = [r.name for r in roots]
    if getattr(opts, "check", False):
        return check(config, names)
    if opts.dry_run:
        return plan(config, names, opts.limit)
    _refuse_while_units_active()
    started = time.monotonic()
    with queue_worker(config, wait_for_lock=True) as worker:
        state, store, db = worker.state, worker.store, worker.pointer_db
        # Durable before the first byte moves: whatever happens next, no run evicts again.
        safety.set_hold(state, config)
        worker.hold = safety.held(state, config)
        worker.notifier.ready("migrate --to-local")
        try:
            found = survey(config, names, store, state, db, opts.include_unlisted)
        except StoreUnavailable as e:
            return {"to_local": True, "error": "unavailable", "message": str(e)}, EXIT_UNAVAILABLE
        except PointerUnavailable as e:
            return {"to_local": True, "error": "unavailable", "message": f"DB: {e}"}, EXIT_UNAVAILABLE
        wanted = found.missing[: opts.limit] if opts.limit is not None else found.missing
        _check_space(config, wanted)
        progress = Progress(
            "to-local", len(wanted), sum(w.size for w in wanted), worker.notifier, interactive=opts.interactive
        )
        restored = downloaded = 0
        nbytes = 0
        withdrawn: list[str] = []
        failures: list[dict[str, str]] = [
            {"blob_name": n, "error": "blob metadata cannot prove its content; not restored"}
            for n in found.unverifiable
        ]
        failures += [
            {"blob_name": n, "error": "local file differs from its blob; left as it is"} for n in found.differs
        ]
        outage: str | None = None
        try:
            for w in wanted:
                mf = media_file_for_blob(config, w.name)
                assert mf is not None  # survey() only lists names under configured roots
                try:
                    still = _row_still_there(db, mf) if w.why == CLAIMED_BY_ROW else None
                    result = restore(store, mf, w.size, w.sha256, w.mtime_ns, still)
                except RestoreFailed as e:
                    failures.append({"blob_name": w.name, "error": str(e)})
                    log.error("cannot restore %s: %s", w.name, e, extra={"fields": {"blob_name": w.name}})
                    progress.advance(1, w.size, problems=1)
                    continue
                except StoreUnavailable as e:
                    outage = str(e)
                    log.error("Azure Blob is unusable (%s); stopping, run it again later", e)
                    break
                if result.withdrawn:
                    # GigHive's delete, seen as it happened: recorded like any delete the agent
                    # infers, so the verdict counts it as one, and the file stays in Blob only.
                    key = asset_key(mf)
                    if key is not None:
                        grace = config.purge_deleted_after_days * 86400.0
                        state.add_deletion(w.name, key[0], key[1], time.time() + grace)
                    withdrawn.append(w.name)
                    log.warning(
                        "not restored %s: GigHive deleted its asset while it came back; left in Blob",
                        w.name,
                        extra={"fields": {"blob_name": w.name}},
                    )
                    progress.advance(1, w.size)
                    continue
                restored += 1
                downloaded += int(result.downloaded)
                nbytes += result.size if result.downloaded else 0
                log.info(
                    "restored %s to %s (%d bytes, sha256 verified; claimed by %s)",
                    w.name,
                    mf.path,
                    w.size,
                    w.why,
                    extra={"fields": {"blob_name": w.name, "sha256": w.sha256, "bytes": w.size}},
                )
                progress.advance(1, w.size)
        finally:
            progress.close()

        pointers = 0
        if outage is None:
            pointers, outage = _settle_local(config, names, state, db, skip=set(found.differs))
        worker.notifier.stopping()

    verdict, code = check(config, names) if outage is None else ({"safe": False, "reasons": [outage]}, 69)
    result_out: dict[str, object] = {
        "to_local": True,
        "restored": restored,
        "downloaded": downloaded,
        "bytes": nbytes,
        "pointers_flipped_to_local": pointers,
        "failed": len(failures),
        "errors": failures[:50],
        "left_in_blob": (found.left_in_blob + withdrawn)[:50],
        "left_in_blob_count": len(found.left_in_blob) + len(withdrawn),
        "deleted_meanwhile": withdrawn[:50],
        "unlisted": found.unlisted[:50],
        "unlisted_count": len(found.unlisted),
        "still_only_in_blob": len(found.missing) - restored - len(withdrawn),
        "complete": bool(verdict.get("safe")) and not failures and outage is None,
        "safe": bool(verdict.get("safe")),
        "reasons": verdict.get("reasons", []),
        "outage": outage,
        "hold": True,
        "duration_s": round(time.monotonic() - started, 3),
    }
    log.info(
        "migrate --to-local finished: %d restored (%s downloaded), %d pointers flipped to local, %d failed; %s",
        restored,
        human_bytes(nbytes),
        pointers,
        len(failures),
        "switching to local is safe" if result_out["complete"] else "NOT safe to switch to local yet",
    )
    if outage is not None or code == EXIT_UNAVAILABLE:
        return result_out, EXIT_UNAVAILABLE
    return result_out, EXIT_OK if result_out["complete"] else EXIT_FAILURE


def _settle_local(
    config: Config, names: list[str], state: StateStore, db: PointerDB | None, skip: set[str]
) -> tuple[int, str | None]:
    """Every file under the roots that is on disk now: DB pointer to local, state row forgotten
    (the local copy is the verified copy now; the blob stays in the container). A local file
    that differs from its blob (`skip`) keeps its pointer and its record: the blob is the good copy."""
    flipped = 0
    locations = {}
    if db is not None:
        try:
            locations = db.locations()
        except PointerUnavailable as e:
            return 0, f"DB pointer: {e}"
    paths = set(locations) | {r.blob_name for r in state.records() if r.root in names}
    for name in sorted(paths - skip):
        if name.split("/", 1)[0] not in names:
            continue
        mf = media_file_for_blob(config, name)
        if mf is None or not os.path.lexists(mf.path):
            continue
        loc = locations.get(name)
        if db is not None and loc is not None and (loc.provider != "local" or not loc.local_copy):
            try:
                db.record_local(mf)
            except PointerUnavailable as e:
                return flipped, f"DB pointer: {e}"
            flipped += 1
        rec = state.get(name)
        if rec is not None and rec.state in ("uploaded", "evicted"):
            state.forget_restored(name)
    return flipped, None


def check(config: Config, names: list[str]) -> tuple[dict[str, object], int]:
    """Whether MEDIA_STORAGE_BACKEND=local is safe now, from every witness; changes nothing."""
    reasons: list[str] = []
    busy = [u for u in active_units() if u.endswith((".path", ".timer"))]
    if busy:
        reasons.append(f"{', '.join(busy)} still active: a run could evict again (stop and disable them first)")
    state = StateStore.open_readonly(config.state_dir)
    db = PointerDB(config.mysql) if config.mysql else None
    try:
        store = AzureBlobStore(config)
        try:
            found = survey(config, names, store, state, db)
        except StoreUnavailable as e:
            return {"safe": False, "reasons": [f"cannot list the container: {e}"]}, EXIT_UNAVAILABLE
        except PointerUnavailable as e:
            return {"safe": False, "reasons": [f"cannot read the DB: {e}"]}, EXIT_UNAVAILABLE
        hold = safety.held(state, config)
    finally:
        if state is not None:
            state.close()
        if db is not None:
            db.close()
    if found.missing:
        examples = ", ".join(w.name for w in found.missing[:3])
        reasons.append(f"{len(found.missing)} file(s) exist only in Blob (e.g. {examples}): run migrate --to-local")
    if found.unlisted:
        reasons.append(
            f"{len(found.unlisted)} file(s) exist only in Blob and GigHive's assets table has no row for them, "
            f"but the agent never saw them deleted (e.g. {', '.join(found.unlisted[:3])}); the state may have "
            "been lost, or an import refilled a cleared table only in part. Restore them with "
            "`gighive-media migrate --to-local --include-unlisted` (delete them in GigHive afterwards if "
            "they really are gone)"
        )
    if found.unverifiable:
        reasons.append(f"{len(found.unverifiable)} blob(s) without a local file cannot be verified (no sha256)")
    if found.differs:
        reasons.append(f"{len(found.differs)} local file(s) differ from their blob (e.g. {found.differs[0]})")
    # The row of an asset GigHive deleted still says azure_blob (GigHive never touches our table);
    # nothing reads it, and its blob stays until the purge, which drops the row too.
    left = set(found.left_in_blob)
    pointing = [n for n in found.pointers_to_blob if n not in left]
    if pointing and not found.missing:
        reasons.append(f"{len(pointing)} DB pointer(s) still say azure_blob: run migrate --to-local to flip them")
    result: dict[str, object] = {
        "to_local": True,
        "check": True,
        "safe": not reasons,
        "reasons": reasons,
        "only_in_blob": len(found.missing),
        "left_in_blob": len(found.left_in_blob),
        "unlisted": len(found.unlisted),
        "assets_problem": found.assets_problem,
        "hold": hold,
        "local_files_hashed": found.hashed,
    }
    return result, EXIT_OK if not reasons else EXIT_FAILURE


def plan(config: Config, names: list[str], limit: int | None) -> tuple[dict[str, object], int]:
    """What --to-local would download, and whether it fits; changes nothing."""
    state = StateStore.open_readonly(config.state_dir)
    db = PointerDB(config.mysql) if config.mysql else None
    try:
        found = survey(config, names, AzureBlobStore(config), state, db)
    except StoreUnavailable as e:
        return {"to_local": True, "dry_run": True, "error": "unavailable", "message": str(e)}, EXIT_UNAVAILABLE
    except PointerUnavailable as e:
        return {"to_local": True, "dry_run": True, "error": "unavailable", "message": f"DB: {e}"}, EXIT_UNAVAILABLE
    finally:
        if state is not None:
            state.close()
        if db is not None:
            db.close()
    wanted = found.missing[:limit] if limit is not None else found.missing
    per_root: dict[str, dict[str, int]] = {n: {"evicted": 0, "bytes": 0} for n in names}
    for w in wanted:
        root = w.name.split("/", 1)[0]
        per_root[root]["evicted"] += 1
        per_root[root]["bytes"] += w.size
    space_problem = None
    try:
        _check_space(config, wanted)
    except AgentError as e:
        space_problem = str(e)
    return {
        "to_local": True,
        "dry_run": True,
        "roots": per_root,
        "evicted": len(wanted),
        "bytes": sum(w.size for w in wanted),
        "left_in_blob": len(found.left_in_blob),
        "unlisted": len(found.unlisted),
        "unverifiable": len(found.unverifiable),
        "assets_problem": found.assets_problem,
        "space_problem": space_problem,
    }, EXIT_OK


def _check_space(config: Config, wanted: list[Wanted]) -> None:
    """Refuse up front rather than fill the disk GigHive writes uploads to, half-way through."""
    need: dict[int, int] = defaultdict(int)
    where: dict[int, str] = {}
    for w in wanted:
        mf = media_file_for_blob(config, w.name)
        if mf is None:
            continue
        try:
            dev = os.stat(mf.root.path).st_dev
        except OSError as e:
            raise AgentError(f"media root {mf.root.path}: {e.strerror}") from e
        need[dev] += w.size
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
    if "error" in result:
        return f"migrate --to-local: {result.get('message')}"
    if result.get("check"):
        if result["safe"]:
            return "every file is on local disk, verified: switching MEDIA_STORAGE_BACKEND to local is safe"
        return "NOT safe to switch to local:\n" + "\n".join(f"  - {r}" for r in result["reasons"])  # type: ignore[union-attr]
    if result.get("dry_run"):
        text = (
            f"would restore {result['evicted']} file(s) that exist only in Blob, "
            f"{human_bytes(int(result['bytes']))} (dry run: nothing was changed)"  # type: ignore[call-overload]
        )
        if result.get("assets_problem"):
            text += f"\n  every blob without a local file counts: {result['assets_problem']}"
        return text + (f"\n  {result['space_problem']}" if result.get("space_problem") else "")
    text = (
        f"restored {result['restored']} file(s) ({human_bytes(int(result['bytes']))} downloaded), "  # type: ignore[call-overload]
        f"{result['pointers_flipped_to_local']} pointer(s) flipped to local, {result['failed']} failed; "
        "eviction is on hold until `gighive-media migrate` is run again"
    )
    if result.get("left_in_blob_count"):
        text += f"\n  {result['left_in_blob_count']} blob(s) left in Blob: GigHive deleted their assets"
    if result.get("unlisted_count"):
        text += (
            f"\n  {result['unlisted_count']} blob(s) not restored: no assets row, but no delete seen either "
            "(--include-unlisted restores them)"
        )
    if result["complete"]:
        return text + "\nevery file is local again: MEDIA_STORAGE_BACKEND=local is now safe"
    reasons = "\n".join(f"  - {r}" for r in result.get("reasons") or [])  # type: ignore[union-attr]
    return text + "\nNOT safe to switch to local yet:\n" + reasons
