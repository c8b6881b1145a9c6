"""`gighive-media migrate`: move an existing local library to Blob (or, with --to-local, back).

The forward move is the upload path's own work (scan, verified transfer, pointer flip, optional
eviction) applied to the whole library at once. Files the state has not verified are looked
up in one listing of the container up front (when there are many), so files already in Blob
are hashed locally and compared instead of sent again. Everything is
recorded in the state database as it happens, so an interrupted run (Ctrl-C, kill, reboot)
simply continues when started again.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .. import safety
from ..config import Config, MediaRoot
from ..context import queue_worker
from ..errors import EXIT_FAILURE, EXIT_OK, EXIT_UNAVAILABLE, AgentError, Unavailable
from ..inventory import iter_listed, prefixes_for
from ..media import SHA256_NAME_RE, MediaFile
from ..progress import Progress, human_bytes, human_duration
from ..scan import ScanReport, walk_root
from ..state import Seen, StateStore
from ..storage import Listed, StoreUnavailable
from ..storage.azure_blob import AzureBlobStore
from ..worker import RunReport

log = logging.getLogger(__name__)


class UsageError(AgentError):
    exit_code = 2


@dataclass(frozen=True)
class Options:
    dry_run: bool = False
    to_local: bool = False
    check: bool = False  # with to_local: is switching the backend to local safe? (changes nothing)
    include_unlisted: bool = False  # with to_local: also restore blobs no assets row claims (see migrate_back)
    roots: tuple[str, ...] = ()
    limit: int | None = None
    concurrency: int | None = None
    bwlimit: int | None = None
    evict_local: bool = False
    interactive: bool | None = None  # None: a progress bar when stderr is a terminal


def select_roots(config: Config, names: tuple[str, ...]) -> tuple[MediaRoot, ...]:
    if not names:
        return config.roots
    unknown = [n for n in names if config.root_named(n) is None]
    if unknown:
        raise UsageError(
            f"--root {', '.join(unknown)}: not a configured media root "
            f"(configured: {', '.join(r.name for r in config.roots)})"
        )
    return tuple(r for r in config.roots if r.name in names)


def effective_config(config: Config, opts: Options) -> Config:
    changes: dict[str, object] = {}
    if opts.concurrency is not None:
        changes["file_concurrency"] = opts.concurrency
    if opts.bwlimit is not None:
        changes["bandwidth_limit"] = opts.bwlimit
    if opts.evict_local:
        # The operator asks for the local copies to go now: the policy's age and disk threshold
        # are for automatic eviction. GigHive's own work on a file still keeps it (and the
        # safety rule always applies).
        changes.update(delete_local=True, evict_min_age_days=0.0, evict_above_disk_percent=0.0)
    return dataclasses.replace(config, **changes) if changes else config


def run(config: Config, opts: Options) -> tuple[dict[str, object], int]:
    config = effective_config(config, opts)
    roots = select_roots(config, opts.roots)
    if opts.to_local:
        from . import migrate_back

        return migrate_back.run(config, roots, opts)
    if opts.dry_run:
        return plan(config, roots, opts), EXIT_OK
    return migrate(config, roots, opts)


def _walk(roots: tuple[MediaRoot, ...], report: ScanReport) -> Iterator[tuple[MediaFile, object]]:
    for root in roots:
        yield from walk_root(root, report)


# ---- dry run --------------------------------------------------------------------------------


def plan(config: Config, roots: tuple[MediaRoot, ...], opts: Options) -> dict[str, object]:
    """What a migration would do, from the disk, the agent's state and the container; changes nothing.

    The state vouches for every file it recorded as uploaded and verified whose size, mtime and
    inode are unchanged: those are not looked up again, unless a random sample of them shows the
    state and the container disagree (state lost, rebuilt from elsewhere, container replaced),
    in which case everything is listed as it would be without a state. Only the files no
    record vouches for are looked up: one HEAD each when they are few, a listing otherwise.
    `migrate` assumes the same (it does not send a verified, unchanged file again); a blob
    deleted behind the agent's back is found by `reconcile` and `verify`, not by a plan.
    """
    started = time.monotonic()
    scan = ScanReport()
    # Plain tuples, not MediaFile and stat objects: a 100,000-file library must plan in well
    # under 200 MiB, and these cost about a fifth as much per file.
    local = {
        mf.blob_name: (st.st_size, st.st_mtime_ns, st.st_ino, mf.root.content_addressed)
        for mf, st in _walk(roots, scan)
    }
    scanned = time.monotonic()
    state = StateStore.open_readonly(config.state_dir)
    try:
        known = state.brief([r.name for r in roots]) if state is not None else {}
    finally:
        if state is not None:
            state.close()
    vouched: set[str] = set()
    for name, (size, mtime_ns, inode, _ca) in local.items():
        rec = known.get(name)
        if rec is not None and (rec[1], rec[2], rec[3]) == (size, mtime_ns, inode) and _vouches(rec):
            vouched.add(name)

    def bucket_of(name: str, blob: Listed | None) -> str:
        size, mtime_ns, inode, content_addressed = local[name][:4]
        rec = known.get(name)
        same_file = rec is not None and (rec[1], rec[2], rec[3]) == (size, mtime_ns, inode)
        if same_file and rec[0] == "quarantined":
            return "quarantined"
        if same_file and rec[0] == "dead":
            return "dead"
        if name in vouched or (
            same_file and rec[0] in ("uploaded", "evicted") and blob is not None and _etag(blob.etag) == _etag(rec[4])
        ):
            return "in_blob_verified"
        if blob is None:
            return "to_upload"
        promised = _name_sha(name.split("/", 1)[1]) if content_addressed else None
        if blob.size == size and blob.sha256 and blob.sha256 == (promised or blob.sha256):
            return "in_blob_to_check"
        return "in_blob_differs"

    store = AzureBlobStore(config)
    listed_count = 0
    try:
        doubt = _sample_problem(store, known, vouched, config.file_concurrency)
        if doubt is not None:
            log.warning("the agent's state and the container disagree (%s): listing every file", doubt)
            vouched.clear()
        unknown = [name for name in local if name not in vouched]
        if len(unknown) > _PROBE_AT_MOST:
            lookup = "listing"
            listing = iter_listed(store, prefixes_for(unknown), keep=local.__contains__)
        else:
            lookup = "properties" if unknown else "none"
            listing = iter(_probe(store, unknown, config.file_concurrency).items())
        del unknown
        # Each entry is judged as it arrives and only its verdict kept, beside the file's own
        # tuple (the key stays the local name): the listing itself is never held whole.
        for name, blob in listing:
            listed_count += 1
            if (entry := local.get(name)) is not None:
                local[name] = (*entry[:4], bucket_of(name, blob))
    except StoreUnavailable as e:
        raise Unavailable(f"cannot read the container, so the plan cannot say what is already in Blob: {e}") from e
    listed = time.monotonic()

    per_root: dict[str, dict[str, int]] = {r.name: _empty_plan() for r in roots}
    for name, entry in local.items():
        p = per_root[name.split("/", 1)[0]]
        size = entry[0]
        p["files"] += 1
        p["bytes"] += size
        bucket = entry[4] if len(entry) > 4 else bucket_of(name, None)
        p[bucket] += 1
        p[f"{bucket}_bytes"] += size
    for name, rec in known.items():
        if rec[0] == "evicted":
            root = name.split("/", 1)[0]
            if root in per_root:
                per_root[root]["evicted"] += 1
                per_root[root]["evicted_bytes"] += rec[1] or 0

    total = _empty_plan()
    for p in per_root.values():
        for k, v in p.items():
            total[k] += v
    send = total["to_upload_bytes"] + total["in_blob_differs_bytes"]
    rate = config.bandwidth_limit or None
    return {
        "dry_run": True,
        "roots": per_root,
        "total": total,
        "bytes_to_send": send,
        "bandwidth_limit_bytes_per_s": rate,
        "estimated_seconds": round(send / rate, 1) if rate else None,
        "estimate_note": None
        if rate
        else "no bandwidth limit configured (UPLOAD_BANDWIDTH_LIMIT or --bwlimit); time depends on the link",
        "limit": opts.limit,
        "file_concurrency": config.file_concurrency,
        # How the plan knows what is in Blob: `vouched_by_state` files the agent's own state
        # recorded as uploaded and verified (unchanged on disk), `looked_up` the rest, by
        # `lookup` ("none", "properties": a HEAD each, "listing"); `state_doubt` says why the
        # state was not trusted this time.
        "vouched_by_state": len(vouched),
        "looked_up": len(local) - len(vouched),
        "lookup": lookup,
        "state_doubt": doubt,
        "blobs_listed": listed_count,
        "skipped": scan.as_dict()["skipped"],
        "root_errors": scan.root_errors,
        "scan_seconds": round(scanned - started, 3),
        "listing_seconds": round(listed - scanned, 3),
    }


# Up to this many files the state cannot vouch for are looked up one HEAD each (8 at a time);
# more are listed. A listing page holds 5,000 names but covers whole prefixes, so for a few new
# files in a large library, HEADs read far less.
_PROBE_AT_MOST = 256
# Records checked against the container before the state is trusted: enough to see a state that
# belongs to another container or was lost and rebuilt wrongly, not to find single blobs deleted
# behind the agent's back (`verify` and `reconcile` look at every one).
_TRUST_SAMPLE = 16


def _vouches(rec: tuple) -> bool:
    """Whether a state row alone answers: verified in Blob (with the ETag it was verified at),
    or parked by the agent (quarantined, dead) whatever the container holds."""
    state, etag = rec[0], rec[4]
    return (state in ("uploaded", "evicted") and bool(etag)) or state in ("quarantined", "dead")


def _etag(value: str | None) -> str:
    # A HEAD answers the ETag quoted, a listing may not: compare the opaque value itself.
    return (value or "").strip('"')


def _sample_problem(store: AzureBlobStore, known: dict[str, tuple], vouched: set[str], parallel: int) -> str | None:
    """Why the state cannot be trusted for this container, from a random sample of its verified
    records (their blobs must exist with the recorded ETag), or None."""
    verified = [n for n in vouched if known[n][0] in ("uploaded", "evicted")]
    if not verified:
        return None
    sample = random.sample(verified, min(_TRUST_SAMPLE, len(verified)))
    found = _probe(store, sample, parallel)
    for name in sample:
        blob = found.get(name)
        if blob is None:
            return f"{name} is recorded as verified in Blob but the container does not have it"
        if _etag(blob.etag) != _etag(known[name][4]):
            return f"{name} is in the container with another ETag than the one recorded at its verification"
    return None


def _probe(store: AzureBlobStore, names: list[str], parallel: int) -> dict[str, Listed]:
    """name -> Listed for those of `names` that exist, one HEAD each."""
    if not names:
        return {}

    def stat(name: str) -> tuple[str, Listed | None]:
        info = store.stat(name)
        return name, (Listed(info.size, info.etag, info.content_md5, info.sha256) if info is not None else None)

    with ThreadPoolExecutor(max(1, min(parallel, len(names))), thread_name_prefix="probe") as pool:
        return {name: blob for name, blob in pool.map(stat, names) if blob is not None}


def _name_sha(rel: str) -> str | None:
    """The sha256 a top-level content-addressed name promises (as MediaFile.expected_sha256)."""
    m = SHA256_NAME_RE.match(rel) if "/" not in rel else None
    return m.group("sha") if m else None


def _empty_plan() -> dict[str, int]:
    keys = ("files", "to_upload", "in_blob_verified", "in_blob_to_check", "in_blob_differs", "quarantined", "dead")
    out: dict[str, int] = {}
    for k in keys:
        out[k] = 0
        out[f"{k}_bytes" if k != "files" else "bytes"] = 0
    out["evicted"] = 0
    out["evicted_bytes"] = 0
    return out


def render_plan(result: dict[str, object]) -> str:
    lines = ["migration plan (dry run: nothing was changed)"]
    roots = result["roots"]
    assert isinstance(roots, dict)
    for name, p in [*roots.items(), ("total", result["total"])]:
        assert isinstance(p, dict)
        lines.append(
            f"  {name:<8} {p['files']:>8} files {human_bytes(p['bytes']):>10} | to upload {p['to_upload']} "
            f"({human_bytes(p['to_upload_bytes'])}) | in Blob: verified {p['in_blob_verified']}, "
            f"to check {p['in_blob_to_check']}, differs {p['in_blob_differs']} | quarantined {p['quarantined']}, "
            f"dead {p['dead']}, evicted {p['evicted']}"
        )
    est = result.get("estimated_seconds")
    lines.append(
        f"  to send: {human_bytes(int(result['bytes_to_send']))}; estimated time: "  # type: ignore[arg-type]
        + (f"{human_duration(float(est))} at the bandwidth limit" if est is not None else str(result["estimate_note"]))
    )
    if "vouched_by_state" in result:
        how = {"none": "", "properties": " (one HEAD each)", "listing": " (container listing)"}
        lines.append(
            f"  what is in Blob: {result['vouched_by_state']} file(s) vouched for by the agent's state "
            f"(verified uploads, unchanged on disk; a sample checked against the container), "
            f"{result['looked_up']} looked up{how.get(str(result['lookup']), '')}"
        )
        if result.get("state_doubt"):
            lines.append(f"  the state was not trusted: {result['state_doubt']}")
    for where, problem in dict(result.get("root_errors") or {}).items():  # type: ignore[call-overload]
        lines.append(f"  root {where}: {problem}")
    return "\n".join(lines)


# ---- the move -------------------------------------------------------------------------------


def migrate(config: Config, roots: tuple[MediaRoot, ...], opts: Options) -> tuple[dict[str, object], int]:
    started = time.monotonic()
    names = [r.name for r in roots]
    with queue_worker(config, wait_for_lock=True) as worker:
        if safety.release_hold(worker.state, config):
            # The operator moves forward again after a `--to-local`: eviction and pointer flips resume.
            worker.hold = None
            log.info("the eviction hold set by `migrate --to-local` is lifted")
        worker.notifier.ready("migrate: scanning media roots")
        scan = ScanReport()
        walked = [
            (
                mf.blob_name,
                mf.root.name,
                str(mf.path),
                Seen.of(st),
                min(st.st_mtime, time.time()) + config.settle_seconds,
            )
            for mf, st in _walk(roots, scan)
        ]
        for where, problem in scan.root_errors.items():
            log.error("media root %s: %s", where, problem, extra={"fields": {"root": where}})
        # What a listing says is kept only for the files this run may send (new, changed, not
        # yet verified), so a file already there is not sent again: the state answers for the
        # rest, as for the dry run. Up to _PROBE_AT_MOST of them, no listing: each upload's own
        # conditional Put Blob finds what is there.
        done = worker.state.snapshot(("uploaded", "evicted"))
        wanted = {n for n, _r, _p, seen, _t in walked if done.get(n) != seen}
        del done
        try:
            if len(wanted) > _PROBE_AT_MOST:
                worker.listing = dict(iter_listed(worker.store, prefixes_for(wanted), keep=wanted.__contains__))
        except StoreUnavailable as e:
            log.error("cannot list the container; nothing was uploaded: %s", e)
            return {"error": "unavailable", "message": str(e), "uploaded": 0}, EXIT_UNAVAILABLE
        verdicts = worker.state.observe_many(walked)
        del walked
        worker.state.retry_now(names)
        counts = worker.state.counts(names)
        done_before = counts["uploaded"] + counts["evicted"]
        due = [r for r in worker.state.due(time.time(), config.retry.max_delay) if r.root in names]
        if opts.limit is not None:
            due = due[: opts.limit]
        log.info(
            "migrating %d file(s) (%s) under %s; %d already in Blob from earlier runs",
            len(due),
            human_bytes(sum(r.size or 0 for r in due)),
            ", ".join(names),
            done_before,
        )
        progress = Progress(
            "migrate",
            len(due),
            sum(r.size or 0 for r in due),
            worker.notifier,
            interactive=opts.interactive,
        )
        del due
        report = RunReport()
        try:
            report.add(worker.housekeeping(names))
            report.add(
                worker.run_due(
                    include_failed=True,
                    limit=opts.limit,
                    roots=names,
                    on_result=lambda rec, r: progress.advance(
                        1, rec.size or 0, problems=r.failed + r.dead + r.quarantined
                    ),
                )
            )
            report.add(worker.housekeeping(names))
        finally:
            progress.close()
        worker.listing = None
        after = worker.state.counts(names)
        worker.notifier.stopping()
    return _summary(report, scan, verdicts, done_before, after, started, worker.outage, opts)


def _summary(report, scan, verdicts, done_before, after, started, outage, opts) -> tuple[dict[str, object], int]:
    remaining = after["pending"] + after["failed"]
    result: dict[str, object] = {
        "uploaded": report.uploaded,
        "skipped": report.already_present + done_before,
        "already_in_blob": report.already_present,
        "unchanged_since_earlier_run": done_before,
        "failed": report.failed + report.dead,
        "dead": after["dead"],
        "quarantined": after["quarantined"],
        "evicted": report.evicted,
        "pointers_flipped": report.pointers_flipped,
        "pointer_failures": report.pointer_failures,
        "bytes": report.bytes_uploaded,
        "duration_s": round(time.monotonic() - started, 3),
        "remaining": remaining,
        "complete": remaining == 0 and after["dead"] == 0 and after["quarantined"] == 0,
        "scan": {"files": scan.files, **verdicts, "skipped": len(scan.skipped), "root_errors": scan.root_errors},
        "blocks_reused": report.blocks_reused,
        "outage": outage,
        "errors": report.errors[:50],
        "limit": opts.limit,
        "state_counts": after,
    }
    log.info(
        "migrate finished: %d uploaded, %d skipped (already in Blob), %d failed, %d quarantined, %s sent in %s; "
        "%d remaining",
        report.uploaded,
        result["skipped"],
        result["failed"],
        result["quarantined"],
        human_bytes(report.bytes_uploaded),
        human_duration(float(result["duration_s"])),  # type: ignore[arg-type]
        remaining,
        extra={"fields": {"uploaded": report.uploaded, "bytes": report.bytes_uploaded, "remaining": remaining}},
    )
    if outage:
        return result, EXIT_UNAVAILABLE
    if result["failed"] or result["dead"] or result["quarantined"] or scan.root_errors:
        return result, EXIT_FAILURE
    return result, EXIT_OK


def render(result: dict[str, object]) -> str:
    if result.get("dry_run"):
        return render_plan(result)
    if "error" in result:
        return f"migrate: {result.get('message')}"
    return (
        f"uploaded {result['uploaded']}, skipped {result['skipped']} (already in Blob), failed {result['failed']}, "
        f"quarantined {result['quarantined']}, evicted {result['evicted']}, {human_bytes(int(result['bytes']))} "  # type: ignore[call-overload]
        f"sent in {human_duration(float(result['duration_s']))}; {result['remaining']} remaining"  # type: ignore[arg-type]
        + ("" if result.get("complete") else " (run it again, or see `gighive-media status`)")
    )
