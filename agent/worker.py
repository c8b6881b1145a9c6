"""The upload engine: from "a file exists" to "its verified blob is what the DB points at".

The path-triggered `upload`, the timer's `retry` and `migrate` all drive this one class. Per
file the order is fixed and each step is recorded before the next starts:

    scan -> pending -> uploading -> (transfer + verify) -> uploaded -> pointer flipped -> evicted

A local file is deleted only from `uploaded` with the pointer flipped (or with no DB, where the
agent's own state is the pointer), and only if it is still the very file that was verified.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import deletes, interrupts, safety
from .arrival import Arrivals
from .config import Config
from .errors import ContentMismatch, FileRejected, Interrupted, StateError, VerificationFailed
from .eviction_policy import EvictionPolicy
from .media import MediaFile, media_file_for_blob, media_file_for_path, name_problem
from .media_urls import media_file_for_target
from .notify import Notifier
from .pointer import PointerDB, PointerUnavailable, asset_key
from .ratelimit import RateLimiter
from .scan import ScanReport, classify, walk, walk_root
from .state import POINTER_DONE, POINTER_NONE, POINTER_PENDING, FileRecord, StateStore, backoff_delay
from .storage import Listed, StoreUnavailable
from .storage.azure_blob import AzureBlobStore
from .transfer import Transfer, TransferResult

log = logging.getLogger(__name__)

# An mtime this far ahead of our clock is not a writer with a slightly fast clock.
FUTURE_MTIME_SLACK = 60.0


@dataclass
class RunReport:
    uploaded: int = 0
    already_present: int = 0
    failed: int = 0
    dead: int = 0
    quarantined: int = 0
    deferred: int = 0
    vanished: int = 0
    evicted: int = 0
    pointers_flipped: int = 0
    pointer_failures: int = 0
    bytes_uploaded: int = 0
    blocks_reused: int = 0
    held_back: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)

    def add(self, other: RunReport) -> None:
        for name in _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.errors.extend(other.errors)

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


_COUNTERS = tuple(f.name for f in fields(RunReport) if f.name != "errors")


class Worker:
    def __init__(
        self,
        config: Config,
        state: StateStore,
        store: AzureBlobStore,
        pointer_db: PointerDB | None = None,
        notifier: Notifier | None = None,
    ):
        self.config = config
        self.state = state
        self.store = store
        self.pointer_db = pointer_db
        self.notifier = notifier or Notifier()
        limiter = RateLimiter(config.bandwidth_limit) if config.bandwidth_limit else None
        self.stop = threading.Event()
        self.transfer = Transfer(
            store,
            config.block_size,
            config.block_concurrency,
            limiter=limiter,
            readback=config.verify_readback,
            stop=self.stop,
        )
        # PyMySQL connections are not thread-safe; pointer writes are short, so one lock will do.
        self._db_lock = threading.Lock()
        self._progress_lock = threading.Lock()
        self.totals = RunReport()
        # Set by the first failure that says the store itself is unusable. The rest of the run
        # then leaves its files as they are, for the retry timer, instead of each one waiting
        # through its own timeouts and retries against a dead endpoint.
        self.outage: str | None = None
        # What a container listing said is stored under each name (migrate sets it): lets the
        # transfer skip files already in Blob without asking the service about each one.
        self.listing: dict[str, Listed] | None = None
        self.witnesses = safety.Witnesses(config, state, store, pointer_db, self._db_lock)
        self.policy = EvictionPolicy(config, pointer_db, self._db_lock)
        # `migrate --to-local` ran: no eviction, no pointer to Blob. Only a run holding the queue
        # lock changes it, so it cannot change under this run except through this object.
        self.hold = safety.held(state, config)
        self._outage_cleared = False
        self.arrivals = Arrivals(config.settle_seconds)

    def recover(self) -> int:
        """Settle what a killed run left half-done: interrupted evictions first (agent.safety)."""
        return safety.recover(self.witnesses)

    # ---- finding work ----------------------------------------------------------------------

    def scan(self) -> ScanReport:
        """Full scan of every root: the safety net for events inotify missed (NFS, overflow, downtime)."""
        report = ScanReport()
        known = self.state.snapshot()

        def unknown():
            for mf, st in walk(self.config, report):
                if known.get(mf.blob_name) != (st.st_size, st.st_mtime_ns, st.st_ino):
                    yield mf.blob_name, mf.root.name, str(mf.path), st, self.arrivals.observed(mf, st)

        # Recorded a few thousand files per transaction: a library of small files found at once
        # (a first run, a restore) would otherwise commit one row at a time.
        verdicts = self.state.observe_many(unknown(), on_changed=self._log_changed)
        report.new += verdicts["new"]
        report.changed += verdicts["changed"]
        for where, problem in report.root_errors.items():
            log.error("media root %s: %s", where, problem, extra={"fields": {"root": where}})
        # Files under an unreadable root never reach the queue, so only this record lets
        # `status` show that part of the library is not being mirrored.
        self.state.set_meta("root_errors", json.dumps(report.root_errors))
        return report

    def scan_dir(self, directory: Path) -> ScanReport:
        report = ScanReport()
        mf = media_file_for_path(self.config, directory / "x")
        if mf is not None:
            for found, st in walk_root(mf.root, report, start=directory):
                self._observe(found, st, report, None)
        return report

    def enqueue_path(self, path: Path, renamed_in: bool = False) -> bool:
        """A file an inotify event named (renamed_in: IN_MOVED_TO); True if it became (or stayed) queued."""
        mf = media_file_for_path(self.config, path)
        if mf is None or name_problem(mf.relpath):
            return False
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        kind = classify(st.st_mode)
        if kind:
            log.warning("skipping %s: %s", path, kind, extra={"fields": {"path": str(path)}})
            return False
        report = ScanReport()
        self._observe(mf, st, report, None, renamed_in)
        return bool(report.new or report.changed)

    def _observe(self, mf: MediaFile, st: os.stat_result, report: ScanReport, known, renamed_in: bool = False) -> None:
        if known is not None and known.get(mf.blob_name) == (st.st_size, st.st_mtime_ns, st.st_ino):
            return
        not_before = self.arrivals.observed(mf, st, renamed_in)
        verdict = self.state.observe(mf.blob_name, mf.root.name, str(mf.path), st, not_before)
        if verdict == "new":
            report.new += 1
        elif verdict == "changed":
            report.changed += 1
            self._log_changed(mf.blob_name)

    @staticmethod
    def _log_changed(blob_name: str) -> None:
        log.info("file changed on disk, queued again: %s", blob_name, extra={"fields": {"blob_name": blob_name}})

    # ---- doing work ------------------------------------------------------------------------

    def run_due(
        self,
        include_failed: bool = True,
        limit: int | None = None,
        roots: Collection[str] | None = None,
        on_result: Callable[[FileRecord, RunReport], None] | None = None,
    ) -> RunReport:
        """Process every due item (optionally only under `roots`, at most `limit`), file_concurrency at a time."""
        due = self.state.due(time.time(), self.config.retry.max_delay, include_failed=include_failed)
        if roots is not None:
            due = [r for r in due if r.root in roots]
        if limit is not None:
            due = due[:limit]
        report = RunReport()
        if not due:
            return report
        # Each file thread takes the next record itself and adds its result to the run's report:
        # no future, waiter or condition per file, which on small files cost more CPU than the
        # bookkeeping they carried. A thread takes a record only when it is free, so a stop
        # leaves the rest untouched (each is then held back at once, see process()).
        records = iter(due)
        take = threading.Lock()
        failure: list[BaseException] = []
        notify = on_result is None and self.notifier.enabled

        def work() -> None:
            while not failure:
                with take:
                    rec = next(records, None)
                if rec is None:
                    return
                try:
                    result = self.process(rec)
                    with self._progress_lock:
                        report.add(result)
                        if notify:
                            self._status(report)
                        if on_result is not None:
                            on_result(rec, result)
                except BaseException as e:  # a state-database failure: the run stops
                    failure.append(e)
                    self.stop.set()
                    return

        threads = [
            threading.Thread(target=work, name=f"file-{i}", daemon=True)
            for i in range(min(self.config.file_concurrency, len(due)))
        ]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        except BaseException:
            # A KeyboardInterrupt where no stop handler is installed: start no more files, and
            # stop the ones in flight between two blocks.
            self.stop.set()
            failure.append(KeyboardInterrupt())
            if interrupts.requested():
                interrupts.finish()
            for t in threads:
                t.join()
            raise
        if interrupts.requested():
            # SIGINT/SIGTERM: the files left were held back; the stopper records the ones in
            # flight and leaves. Joining threads that may sit in a socket read would not be prompt,
            # and closing the state under them (unwinding) would fail their last writes.
            interrupts.finish()
        with self._progress_lock:
            self.totals.add(report)
        if failure:
            raise failure[0]
        return report

    def _status(self, run: RunReport) -> None:
        """The STATUS line: this process's totals so far (earlier runs' and this one's)."""
        t = self.totals
        self.notifier.status(
            f"uploaded {t.uploaded + t.already_present + run.uploaded + run.already_present}, "
            f"failed {t.failed + t.dead + run.failed + run.dead}, "
            f"quarantined {t.quarantined + run.quarantined}, {t.bytes_uploaded + run.bytes_uploaded} bytes sent"
        )

    def process(self, rec: FileRecord) -> RunReport:
        report = RunReport()
        if self.outage is not None or self.stop.is_set():
            report.held_back += 1
            return report
        mf = media_file_for_blob(self.config, rec.blob_name)
        fields = {"blob_name": rec.blob_name, "attempt": rec.attempts + 1}
        if mf is None:
            self._fail(rec, "no configured media root holds this file any more", report, fields)
            return report
        try:
            st = os.lstat(mf.path)
        except FileNotFoundError:
            self._vanished(rec, report, fields)
            return report
        except OSError as e:
            self._fail(rec, f"cannot stat {mf.path}: {e.strerror}", report, fields)
            return report
        settled_at = st.st_mtime + self.config.settle_seconds
        early = False
        if st.st_mtime > time.time() + FUTURE_MTIME_SLACK:
            # Its age says nothing then, and waiting for the clock to catch up could take days; a
            # file still being written is caught anyway: the upload rejects one that changes while read.
            log.warning(
                "%s has a modification time %.0f s in the future (clock stepped back?); not waiting for it to settle",
                rec.blob_name,
                st.st_mtime - time.time(),
                extra={"fields": fields},
            )
        elif settled_at > time.time() and not (early := self.arrivals.take(rec.blob_name, st)):
            self.state.defer(rec.blob_name, settled_at, "waiting for the file to settle (recently modified)")
            report.deferred += 1
            return report

        self.state.mark_uploading(rec.blob_name)
        try:
            listed = self.listing.get(rec.blob_name) if self.listing is not None else None
            result = self.transfer.upload(mf, listed)
        except ContentMismatch as e:
            if early:  # read before it settled (agent/arrival.py): it may still be being written
                self.state.defer(rec.blob_name, settled_at, "does not match its name yet; waiting for it to settle")
                report.deferred += 1
                return report
            self.state.mark_quarantined(rec.blob_name, f"local corruption: {e}", sha256=e.actual)
            report.quarantined += 1
            report.errors.append({"blob_name": rec.blob_name, "error": str(e)})
            log.error(
                "quarantined %s: %s; not uploaded, the file is left as it is",
                rec.blob_name,
                e,
                extra={"fields": {**fields, "sha256": e.actual}},
            )
            return report
        except Interrupted:
            self.state.defer(rec.blob_name, 0, "interrupted by a stopping run; resumes on the next one")
            report.held_back += 1
            return report
        except FileRejected as e:
            self.state.defer(rec.blob_name, time.time() + max(1.0, self.config.settle_seconds), str(e))
            report.deferred += 1
            log.info("deferred %s: %s", rec.blob_name, e, extra={"fields": fields})
            return report
        except FileNotFoundError:
            self._vanished(rec, report, fields)
            return report
        except StoreUnavailable as e:
            if e.outage:
                self._outage(rec, str(e), report)
            else:
                self._fail(rec, str(e), report, fields)
            return report
        except (VerificationFailed, OSError) as e:
            text = str(e) if not isinstance(e, OSError) else f"cannot read {mf.path}: {e.strerror or e}"
            self._fail(rec, text, report, fields)
            return report
        except StateError:
            raise
        except Exception as e:  # a bug: record it against the file, keep the run going
            log.exception("unexpected error uploading %s", rec.blob_name, extra={"fields": fields})
            self._fail(rec, f"internal error: {type(e).__name__}: {e}", report, fields)
            return report

        self._record_success(mf, rec, result, report, fields)
        return report

    def _vanished(self, rec: FileRecord, report: RunReport, fields: dict) -> None:
        try:
            verdict = safety.settle_vanished(self.witnesses, rec)
        except StoreUnavailable as e:  # pragma: no cover - settle_vanished handles it
            verdict = f"kept ({e})"
        report.vanished += 1
        log.info("file vanished before upload: %s (%s)", rec.blob_name, verdict, extra={"fields": fields})

    def _outage(self, rec: FileRecord, error: str, report: RunReport) -> None:
        """The service is unusable: the file waits with its attempts untouched, and the whole
        queue backs off (runs of an outage, not attempts of a file, drive the delay)."""
        with self._progress_lock:
            first = self.outage is None
            if first:
                self.outage = error
        if first:
            prior = safety.outage_since(self.state) or {}
            next_try = time.time() + backoff_delay(int(prior.get("runs", 0)) + 1, self.config.retry)
            safety.record_outage(self.state, error, next_try)
            self.state.postpone_due(next_try)
            log.error(
                "Azure Blob is unusable (%s); the remaining files stay local and queued, next try in %.0f s",
                error,
                next_try - time.time(),
            )
        outage = safety.outage_since(self.state) or {}
        self.state.wait_out_outage(rec.blob_name, error, float(outage.get("next_try", time.time())))
        report.held_back += 1
        report.errors.append({"blob_name": rec.blob_name, "error": f"outage: {error}"})

    def _fail(self, rec: FileRecord, error: str, report: RunReport, fields: dict) -> None:
        new_state = self.state.mark_failed(rec.blob_name, error, self.config.retry)
        report.errors.append({"blob_name": rec.blob_name, "error": error})
        if new_state == "dead":
            report.dead += 1
            log.error(
                "giving up on %s after %d attempts: %s (see `gighive-media status`; "
                "`gighive-media requeue` retries it)",
                rec.blob_name,
                rec.attempts + 1,
                error,
                extra={"fields": fields},
            )
        else:
            report.failed += 1
            log.warning("upload of %s failed, will retry: %s", rec.blob_name, error, extra={"fields": fields})

    def _record_success(
        self, mf: MediaFile, rec: FileRecord, result: TransferResult, report: RunReport, fields: dict
    ) -> None:
        now = time.time()
        if not self._outage_cleared:
            self._outage_cleared = True
            safety.clear_outage(self.state)
        pointer = POINTER_PENDING if self.pointer_db is not None else POINTER_NONE
        undeleted = self.state.mark_uploaded(
            rec.blob_name,
            size=result.size,
            mtime_ns=result.mtime_ns,
            inode=result.inode,
            sha256=result.sha256,
            md5=result.md5.hex(),
            etag=result.etag,
            verified_at=now,
            pointer=pointer,
            blocks_reused=result.blocks_reused,
            asset=asset_key(mf),
        )
        if undeleted:
            log.info(
                "%s is on disk again: the soft delete of its asset is cancelled",
                rec.blob_name,
                extra={"fields": fields},
            )
        if result.already_present:
            report.already_present += 1
        else:
            report.uploaded += 1
            report.bytes_uploaded += result.size
        report.blocks_reused += result.blocks_reused
        log.info(
            "%s %s (%d bytes, %.2f s%s)",
            "verified existing blob" if result.already_present else "uploaded and verified",
            rec.blob_name,
            result.size,
            result.seconds,
            f", {result.blocks_reused} of {result.blocks_total} blocks reused" if result.blocks_reused else "",
            extra={
                "fields": {
                    **fields,
                    "sha256": result.sha256,
                    "bytes": result.size,
                    "duration_s": f"{result.seconds:.3f}",
                    "etag": result.etag,
                }
            },
        )
        if self.pointer_db is not None:
            self._flip_pointer(rec.blob_name, report)
        if self.config.delete_local:
            self._evict(rec.blob_name, report)

    # ---- DB pointer and local eviction ------------------------------------------------------

    def _flip_pointer(self, blob_name: str, report: RunReport) -> bool:
        rec = self.state.get(blob_name)
        mf = media_file_for_blob(self.config, blob_name)
        if rec is None or mf is None or self.pointer_db is None or rec.sha256 is None:
            return False
        if self.hold is not None:
            return False  # after `migrate --to-local` the DB keeps pointing at the local files
        try:
            with self._db_lock:
                self.pointer_db.record_blob(
                    mf,
                    container=self.config.container or "",
                    etag=rec.etag or "",
                    size=rec.size or 0,
                    md5_hex=rec.md5 or "",
                    sha256=rec.sha256,
                    uploaded_at=rec.uploaded_at or time.time(),
                    verified_at=rec.verified_at or time.time(),
                    local_copy=bool(rec.local_copy),
                )
        except PointerUnavailable as e:
            self.state.set_pointer(blob_name, POINTER_PENDING, str(e))
            report.pointer_failures += 1
            log.warning(
                "blob %s is uploaded, but the DB pointer could not be updated (will retry): %s",
                blob_name,
                e,
                extra={"fields": {"blob_name": blob_name}},
            )
            return False
        self.state.set_pointer(blob_name, POINTER_DONE)
        report.pointers_flipped += 1
        return True

    def flip_pending_pointers(self) -> RunReport:
        report = RunReport()
        if self.pointer_db is None or self.hold is not None:
            return report
        for rec in self.state.pointer_pending():
            if not self._flip_pointer(rec.blob_name, report):
                break  # MySQL is down: the rest would fail the same way
        return report

    def _evict(self, blob_name: str, report: RunReport) -> None:
        rec = self.state.get(blob_name)
        if rec is None or rec.state != "uploaded" or not rec.local_copy or self.hold is not None:
            return
        if rec.pointer not in (POINTER_DONE, POINTER_NONE) or (
            rec.pointer == POINTER_NONE and self.pointer_db is not None
        ):
            return  # the DB does not point at the blob yet: the local copy is still the truth
        if self.outage is not None:
            return
        if media_file_for_target(self.config, "/" + blob_name) is None:
            # Only names the stream server answers (`<sha256>.<ext>`, `thumbnails/<sha256>.png` in
            # content-addressed roots) can be served from Blob; deleting any other file would
            # make it unreachable through the site, so its local copy stays.
            log.debug("keeping local copy of %s: not a URL the stream server serves", blob_name)
            return
        fields = {"blob_name": blob_name, "sha256": rec.sha256}
        waiting = self.policy.blocks(rec)
        if waiting is not None:
            log.debug("keeping local copy of %s for now: %s", blob_name, waiting, extra={"fields": fields})
            return
        outcome = safety.evict(self.witnesses, rec)
        if outcome.outage is not None:
            self.outage = outcome.outage
        if not outcome.evicted:
            if outcome.requeue:
                log.error("not deleting %s: %s; queued again", rec.path, outcome.reason, extra={"fields": fields})
                self.state.requeue(["uploaded"], [blob_name])
            else:
                log.warning("not deleting %s: %s", rec.path, outcome.reason, extra={"fields": fields})
            return
        report.evicted += 1
        log.info("deleted local copy of %s; it is served from Blob now", blob_name, extra={"fields": fields})
        if self.pointer_db is not None:
            self._flip_pointer(blob_name, report)

    def evict_ready(self, roots: Collection[str] | None = None) -> RunReport:
        report = RunReport()
        if not self.config.delete_local:
            return report
        for rec in self.state.eviction_candidates():
            if roots is None or rec.root in roots:
                self._evict(rec.blob_name, report)
        return report

    def housekeeping(self, roots: Collection[str] | None = None, audit: bool = True) -> RunReport:
        """Pointer flips that failed earlier, then evictions that were waiting for them
        (only under `roots` when given: `migrate --root audio --evict-local` leaves video alone).

        `audit` also compares the whole pointer table with the state (rows a TRUNCATE or a restore
        took). The timer's runs do it; a path-triggered upload does not, so a slow or locked table
        never holds up the upload of a new file."""
        if audit:
            self.audit_pointers()
        report = self.flip_pending_pointers()
        report.add(self.evict_ready(roots))
        return report

    def audit_pointers(self) -> int:
        """Rows the agent wrote that are gone from MySQL (GigHive's "clear media" TRUNCATEs every
        table in media_db, a restore brings an old dump) are written again from the state."""
        if self.pointer_db is None or self.hold is not None:
            return 0
        done = self.state.pointer_done_names()
        try:
            with self._db_lock:
                if self.pointer_db.count_blob_pointers() == len(done):
                    return 0
                have = self.pointer_db.blob_pointer_etags()
        except PointerUnavailable:
            return 0  # the flips that follow report MySQL's state
        lost = deletes.gone_pointer_rows(done, have)
        if not lost:
            return 0
        # What took them (clear media, a restore) took GigHive's own rows too: what vanished from
        # `assets` since the last look is lost, not deleted (agent.deletes). Recorded first: the
        # rewrite below erases the sign.
        deletes.disturbed(self.state, deletes.gone_reason(len(lost)))
        for name in lost:
            self.state.set_pointer(name, POINTER_PENDING, "the DB row was lost (table truncated or restored)")
        log.warning("%d DB pointer row(s) were missing or stale; writing them again", len(lost))
        return len(lost)


def process_paths(worker: Worker, paths: Iterable[Path]) -> int:
    return sum(1 for p in paths if worker.enqueue_path(p))
