"""The agent's own record of every media file: a SQLite database (WAL) in the state directory.

Every transition is one small transaction, so a crash at any moment leaves either the old or the
new state. The only state that means "a process was working on this" is `uploading`; the next
run, holding the queue lock, knows nobody else is and puts such rows back to `pending`.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields
from pathlib import Path
from typing import NamedTuple, Protocol, TypeVar

from .config import RetryPolicy
from .errors import StateError

T = TypeVar("T")

STATES = ("pending", "uploading", "uploaded", "failed", "dead", "quarantined", "evicted")
POINTER_NONE, POINTER_PENDING, POINTER_DONE = "none", "pending", "done"
BORN_KEY = "state_born"

_SCHEMA_VERSION = 3
_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    blob_name       TEXT PRIMARY KEY,
    root            TEXT NOT NULL,
    path            TEXT NOT NULL,
    size            INTEGER,
    mtime_ns        INTEGER,
    inode           INTEGER,
    sha256          TEXT,
    md5             TEXT,
    state           TEXT NOT NULL CHECK (state IN ('pending','uploading','uploaded','failed',
                                                    'dead','quarantined','evicted')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error      TEXT,
    etag            TEXT,
    uploaded_at     REAL,
    verified_at     REAL,
    pointer         TEXT NOT NULL DEFAULT 'none' CHECK (pointer IN ('none','pending','done')),
    pointer_error   TEXT,
    local_copy      INTEGER NOT NULL DEFAULT 1,
    blocks_reused   INTEGER NOT NULL DEFAULT 0,
    outage_waits    INTEGER NOT NULL DEFAULT 0,
    keep_local_until REAL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_state ON files (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS files_by_pointer ON files (pointer);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- A destructive step in progress (agent.safety): written, and fsynced, before the step starts, so
-- the next run can finish or undo whatever a kill or a power cut interrupted.
-- GigHive's `assets` as last seen whole (agent.deletes): an asset gone from a whole table,
-- with its local file gone too, was deleted in GigHive.
CREATE TABLE IF NOT EXISTS assets_seen (
    file_type   TEXT NOT NULL,
    checksum    TEXT NOT NULL,
    asset_id    INTEGER,
    PRIMARY KEY (file_type, checksum)
);
-- Assets whose rows vanished in a mass disappearance (a TRUNCATE, "clear media", a restore):
-- never taken for GigHive's deletes until they come back or the operator confirms (agent.deletes).
CREATE TABLE IF NOT EXISTS assets_lost (
    file_type   TEXT NOT NULL,
    checksum    TEXT NOT NULL,
    lost_at     REAL NOT NULL,
    why         TEXT NOT NULL,
    PRIMARY KEY (file_type, checksum)
);
-- Blobs of deleted assets, soft-deleted: purged after the grace period unless restored.
CREATE TABLE IF NOT EXISTS deletions (
    blob_name       TEXT PRIMARY KEY,
    file_type       TEXT NOT NULL,
    checksum        TEXT NOT NULL,
    seen_deleted_at REAL NOT NULL,
    purge_after     REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS intents (
    blob_name   TEXT PRIMARY KEY,
    action      TEXT NOT NULL CHECK (action IN ('evict')),
    path        TEXT NOT NULL,
    aside       TEXT NOT NULL,
    inode       INTEGER NOT NULL,
    created_at  REAL NOT NULL
);
"""


# slots: a per-instance __dict__ would be most of a record's ~1.3 KiB, and verify, reconcile and
# the way back hold one per file (100,000 for a large library).
@dataclass(frozen=True, slots=True)
class FileRecord:
    blob_name: str
    root: str
    path: str
    size: int | None
    mtime_ns: int | None
    inode: int | None
    sha256: str | None
    md5: str | None
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    etag: str | None
    uploaded_at: float | None
    verified_at: float | None
    pointer: str
    pointer_error: str | None
    local_copy: int
    blocks_reused: int
    created_at: float
    updated_at: float
    # Tries that met an outage (not the file's fault, so not counted in `attempts`).
    outage_waits: int = 0
    # `fetch` brought it back for a GigHive reader: no eviction before this time.
    keep_local_until: float | None = None

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def backoff_delay(attempts: int, policy: RetryPolicy, rng: random.Random | None = None) -> float:
    """Delay before attempt number attempts+1: exponential, capped, with jitter.

    The jitter keeps the lower half of the window ("equal jitter"), so a burst of failures
    spreads out without any retry coming sooner than half the policy's delay.
    """
    exp = policy.base_delay * (2 ** max(0, attempts - 1))
    delay = min(policy.max_delay, exp)
    return delay * (0.5 + 0.5 * (rng or random).random())


class StatLike(Protocol):
    """What observe() reads of a file's stat: an os.stat_result, or just these three fields."""

    st_size: int
    st_mtime_ns: int
    st_ino: int


class Seen(NamedTuple):
    """A StatLike that holds only those three fields: a whole os.stat_result per file is most of
    what a 100,000-file walk would hold until the state has recorded it."""

    st_size: int
    st_mtime_ns: int
    st_ino: int

    @classmethod
    def of(cls, st: StatLike) -> Seen:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


class Uploaded(NamedTuple):
    """What verify compares of an uploaded file: a FileRecord's checked fields only, since it
    holds one per file (half the memory of whole records at 100,000 files)."""

    blob_name: str
    size: int | None
    mtime_ns: int | None
    inode: int | None
    sha256: str | None
    md5: str | None
    local_copy: int


class StateStore:
    def __init__(self, path: Path, readonly: bool = False):
        self.path = path
        self._lock = threading.RLock()
        if readonly:
            # Query-only (`status`, `migrate --dry-run`, `verify`): SQLite refuses any write, so a
            # command that promises to change nothing cannot.
            self._db = _connect_readonly(path)
            return
        try:
            path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            # File paths and errors are nobody else's business, whatever the umask (systemd's
            # StateDirectory= is 0750, a shell's umask is often 022); SQLite gives its -wal and
            # -shm files the database's mode.
            with contextlib.suppress(FileExistsError):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process; a power cut may lose the newest
            # transactions. That is acceptable for every transition except the ones a destructive
            # step depends on: those commit through durable() (synchronous=FULL), whose fsync of
            # the WAL also makes every earlier commit (the "uploaded" record among them) durable.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=30000")
            self._db.executescript(_SCHEMA)
            # Schema 1 (before outages stopped counting as attempts, before `fetch`) lacks these.
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(files)")}
            if "outage_waits" not in columns:
                self._db.execute("ALTER TABLE files ADD COLUMN outage_waits INTEGER NOT NULL DEFAULT 0")
            if "keep_local_until" not in columns:
                self._db.execute("ALTER TABLE files ADD COLUMN keep_local_until REAL")
            # Schema 2 remembered `assets` rows without their ids.
            if "asset_id" not in {r[1] for r in self._db.execute("PRAGMA table_info(assets_seen)")}:
                self._db.execute("ALTER TABLE assets_seen ADD COLUMN asset_id INTEGER")
            self._db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(_SCHEMA_VERSION),))
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),)
            )
            # When this state began (agent.safety.unvouched_orphan): a blob written before it may
            # be the only copy of a file whose record a lost state took with it. A state from
            # before this was kept dates from its oldest row.
            self._db.execute(
                "INSERT OR IGNORE INTO meta (key, value) "
                "SELECT ?, CAST(COALESCE(MIN(created_at), ?) AS TEXT) FROM files",
                (BORN_KEY, time.time()),
            )
        except sqlite3.Error as e:
            raise StateError(f"cannot open state database {path}: {e}") from e
        except OSError as e:
            raise StateError(f"cannot create state directory {path.parent}: {e.strerror}") from e

    @classmethod
    def open(cls, state_dir: Path) -> StateStore:
        return cls(state_dir / "state.sqlite3")

    @classmethod
    def open_existing(cls, state_dir: Path) -> StateStore | None:
        """Read-write, but None instead of creating a database no run has made yet."""
        path = state_dir / "state.sqlite3"
        return cls(path) if path.exists() else None

    @classmethod
    def open_for_lookups(cls, state_dir: Path) -> StateStore | None:
        """Read-only for a long-running reader that must see every new commit (the stream
        server, which runs as the agent's user): unlike open_readonly() it never falls back to an
        immutable snapshot. None until a run has created the database."""
        path = state_dir / "state.sqlite3"
        if not path.exists():
            return None
        from urllib.parse import quote

        store = cls.__new__(cls)
        store.path, store._lock = path, threading.RLock()
        try:
            # mode=rw never creates the file; query_only refuses every write on this connection.
            db = sqlite3.connect(
                f"file:{quote(str(path))}?mode=rw", uri=True, timeout=30, check_same_thread=False, isolation_level=None
            )
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA query_only=ON")
            db.execute("SELECT 1 FROM files LIMIT 1").fetchall()
        except sqlite3.Error as e:
            raise StateError(f"cannot read state database {path}: {e}") from e
        store._db = db
        return store

    @classmethod
    def open_readonly(cls, state_dir: Path) -> StateStore | None:
        """For commands that only look (`status`, dry runs): None when no run has created it yet."""
        path = state_dir / "state.sqlite3"
        if not path.exists():
            return None
        return cls(path, readonly=True)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                yield self._db
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as e:
                self._rollback()
                # A full disk or a read-only mount is an operator problem with a clear fix.
                raise StateError(f"state database {self.path}: {e}") from e
            except BaseException:
                self._rollback()
                raise

    @contextmanager
    def durable(self) -> Iterator[sqlite3.Connection]:
        """A transaction that is on stable storage when it returns (WAL fsynced at commit).

        Used for what must survive a power cut: the intent written before a local file is
        deleted, and the record that it was. synchronous can only change outside a transaction.
        """
        with self._lock:
            try:
                self._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as e:
                raise StateError(f"state database {self.path}: {e}") from e
            try:
                with self._tx() as db:
                    yield db
            finally:
                with suppress(sqlite3.Error):
                    self._db.execute("PRAGMA synchronous=NORMAL")

    def _rollback(self) -> None:
        with suppress(sqlite3.Error):
            self._db.execute("ROLLBACK")

    def _query(self, sql: str, args: Iterable[object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            try:
                return self._db.execute(sql, tuple(args)).fetchall()
            except sqlite3.Error as e:
                raise StateError(f"state database {self.path}: {e}") from e

    def _records(self, sql: str, args: Iterable[object] = ()) -> list[FileRecord]:
        return self._rows_as(lambda r: FileRecord(**r), sql, args)

    def _rows_as(self, make: Callable[[sqlite3.Row], T], sql: str, args: Iterable[object] = ()) -> list[T]:
        """make(row) for every row of a query, built a batch of rows at a time: all sqlite3.Rows
        of a 100,000-row answer at once would double what the objects made of them cost."""
        out: list[T] = []
        with self._lock:
            try:
                cursor = self._db.execute(sql, tuple(args))
                while rows := cursor.fetchmany(2000):
                    out.extend(make(r) for r in rows)
            except sqlite3.Error as e:
                raise StateError(f"state database {self.path}: {e}") from e
        return out

    # ---- reading -------------------------------------------------------------------------

    def get(self, blob_name: str) -> FileRecord | None:
        rows = self._query("SELECT * FROM files WHERE blob_name = ?", (blob_name,))
        return FileRecord(**rows[0]) if rows else None

    def snapshot(self, states: Collection[str] | None = None) -> dict[str, tuple[int | None, int | None, int | None]]:
        """blob_name -> (size, mtime_ns, inode) of every row (or those in `states`): lets a full
        scan write only what changed."""
        sql, args = "SELECT blob_name, size, mtime_ns, inode FROM files", ()
        if states is not None:
            args = tuple(states)
            sql += f" WHERE state IN ({','.join('?' * len(args))})"
        return {r[0]: (r[1], r[2], r[3]) for r in self._query(sql, args)}

    def brief(self, roots: Collection[str] | None = None) -> dict[str, tuple]:
        """blob_name -> (state, size, mtime_ns, inode, etag): what a dry run or a reconciliation
        needs from every row, small enough to hold for 100,000 files (read a batch at a time, the
        state names shared rather than one string per row)."""
        sql, args = "SELECT blob_name, state, size, mtime_ns, inode, etag FROM files", ()
        if roots is not None:
            args = tuple(roots)
            sql += f" WHERE root IN ({','.join('?' * len(args))})"
        names = {s: s for s in STATES}
        return dict(self._rows_as(lambda r: (r[0], (names.get(r[1], r[1]), r[2], r[3], r[4], r[5])), sql, args))

    def counts(self, roots: Collection[str] | None = None) -> dict[str, int]:
        sql, args = "SELECT state, COUNT(*) AS n FROM files", ()
        if roots is not None:
            args = tuple(roots)
            sql += f" WHERE root IN ({','.join('?' * len(args))})"
        counts = dict.fromkeys(STATES, 0)
        for row in self._query(sql + " GROUP BY state", args):
            counts[row["state"]] = row["n"]
        return counts

    def pointer_counts(self) -> dict[str, int]:
        return {r["pointer"]: r["n"] for r in self._query("SELECT pointer, COUNT(*) AS n FROM files GROUP BY pointer")}

    def in_state(self, *states: str, limit: int | None = None) -> list[FileRecord]:
        marks = ",".join("?" * len(states))
        sql = f"SELECT * FROM files WHERE state IN ({marks}) ORDER BY updated_at"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        return self._records(sql, states)

    def uploads(self, roots: Collection[str]) -> list[Uploaded]:
        """Every file under `roots` recorded as uploaded and verified (local or evicted), in
        blob-name order."""
        roots = tuple(roots)
        if not roots:
            return []
        return self._rows_as(
            lambda r: Uploaded(*r),
            "SELECT blob_name, size, mtime_ns, inode, sha256, md5, local_copy FROM files "
            f"WHERE state IN ('uploaded', 'evicted') AND root IN ({','.join('?' * len(roots))}) ORDER BY blob_name",
            roots,
        )

    def records(self, states: Iterable[str] | None = None, root: str | None = None) -> list[FileRecord]:
        """Every row (optionally in these states, under this root), in blob-name order."""
        sql = "SELECT * FROM files WHERE 1=1"
        args: list[object] = []
        if states is not None:
            states = tuple(states)
            sql += f" AND state IN ({','.join('?' * len(states))})"
            args += states
        if root is not None:
            sql += " AND root = ?"
            args.append(root)
        return self._records(sql + " ORDER BY blob_name", args)

    def due(self, now: float, max_delay: float, include_failed: bool = True) -> list[FileRecord]:
        """Work whose time has come.

        A next_attempt_at further ahead than the longest possible backoff can only come from a
        clock that jumped backwards; such rows count as due rather than waiting for days.
        """
        states = ("pending", "failed") if include_failed else ("pending",)
        marks = ",".join("?" * len(states))
        return self._records(
            f"SELECT * FROM files WHERE state IN ({marks}) AND (next_attempt_at <= ? OR next_attempt_at > ?) "
            "ORDER BY next_attempt_at, blob_name",
            (*states, now, now + max_delay * 1.5 + 60),
        )

    def next_due_time(self) -> float | None:
        rows = self._query("SELECT MIN(next_attempt_at) AS t FROM files WHERE state IN ('pending','failed')")
        return rows[0]["t"] if rows else None

    def pointer_done_names(self) -> dict[str, str]:
        """blob_name -> etag of every row whose DB pointer the agent wrote."""
        return {r[0]: r[1] for r in self._query("SELECT blob_name, etag FROM files WHERE pointer = 'done'")}

    def pointer_pending(self) -> list[FileRecord]:
        return self._records("SELECT * FROM files WHERE pointer = 'pending'")

    def eviction_candidates(self) -> list[FileRecord]:
        return self._records(
            "SELECT * FROM files WHERE state = 'uploaded' AND local_copy = 1 AND pointer IN ('none','done')"
        )

    # ---- transitions ---------------------------------------------------------------------

    def recover_interrupted(self) -> int:
        """Rows left `uploading` by a process that died; only called under the queue lock."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE files SET state = 'pending', next_attempt_at = 0, updated_at = ?, "
                "last_error = COALESCE(last_error, 'interrupted by a crash or restart') WHERE state = 'uploading'",
                (time.time(),),
            )
            return cur.rowcount

    def observe(self, blob_name: str, root: str, path: str, st: StatLike, not_before: float) -> str:
        """Record a file seen on disk. Returns 'new', 'changed' or 'known'.

        A known file whose size, mtime or inode changed is reconsidered from scratch: its old
        verdict (uploaded, quarantined, dead) was about other bytes.
        """
        with self._tx() as db:
            return self._observe(db, time.time(), blob_name, root, path, st, not_before)

    def observe_many(
        self,
        items: Iterable[tuple[str, str, str, StatLike, float]],
        batch: int = 2000,
        on_changed: Callable[[str], None] | None = None,
    ) -> dict:
        """observe() for many files, a few thousand per transaction: a 100,000-file migration
        would otherwise spend most of its enqueueing time committing one row at a time.
        `on_changed(blob_name)` is called for each file found changed, after its batch committed."""
        verdicts = {"new": 0, "changed": 0, "known": 0}
        chunk: list[tuple[str, str, str, StatLike, float]] = []

        def flush() -> None:
            changed = []
            with self._tx() as db:
                now = time.time()
                for item in chunk:
                    verdict = self._observe(db, now, *item)
                    verdicts[verdict] += 1
                    if verdict == "changed":
                        changed.append(item[0])
            chunk.clear()
            if on_changed is not None:
                for name in changed:
                    on_changed(name)

        for item in items:
            chunk.append(item)
            if len(chunk) >= batch:
                flush()
        if chunk:
            flush()
        return verdicts

    @staticmethod
    def _observe(
        db: sqlite3.Connection, now: float, blob_name: str, root: str, path: str, st: StatLike, not_before: float
    ) -> str:
        row = db.execute("SELECT state, size, mtime_ns, inode FROM files WHERE blob_name = ?", (blob_name,)).fetchone()
        if row is None:
            db.execute(
                "INSERT INTO files (blob_name, root, path, size, mtime_ns, inode, state, next_attempt_at, "
                "created_at, updated_at) VALUES (?,?,?,?,?,?, 'pending', ?, ?, ?)",
                (blob_name, root, path, st.st_size, st.st_mtime_ns, st.st_ino, not_before, now, now),
            )
            return "new"
        if (row["size"], row["mtime_ns"], row["inode"]) == (st.st_size, st.st_mtime_ns, st.st_ino):
            return "known"
        if row["state"] == "uploading":
            return "known"
        db.execute(
            "UPDATE files SET path = ?, size = ?, mtime_ns = ?, inode = ?, sha256 = NULL, md5 = NULL, "
            "state = 'pending', attempts = 0, next_attempt_at = ?, last_error = NULL, local_copy = 1, "
            "updated_at = ? WHERE blob_name = ?",
            (path, st.st_size, st.st_mtime_ns, st.st_ino, not_before, now, blob_name),
        )
        return "changed"

    def defer(self, blob_name: str, until: float, reason: str) -> None:
        """Not a failure: the file is still being written, try again shortly."""
        with self._tx() as db:
            db.execute(
                "UPDATE files SET state = 'pending', next_attempt_at = ?, last_error = ?, updated_at = ? "
                "WHERE blob_name = ?",
                (until, reason, time.time(), blob_name),
            )

    def mark_uploading(self, blob_name: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE files SET state = 'uploading', updated_at = ? WHERE blob_name = ?", (time.time(), blob_name)
            )

    def mark_uploaded(
        self,
        blob_name: str,
        *,
        size: int,
        mtime_ns: int,
        inode: int,
        sha256: str,
        md5: str,
        etag: str,
        verified_at: float,
        pointer: str,
        blocks_reused: int,
        asset: tuple[str, str] | None = None,
    ) -> int:
        """Returns how many soft deletes of the file's asset (`asset`: its `assets` key) this
        cancelled: GigHive wrote the file again, so the asset is wanted (agent.deletes). In the
        same transaction, so that no kill leaves a re-uploaded file, later evicted, whose blob a
        stale soft delete would leave out of the way back and purge."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "UPDATE files SET state = 'uploaded', size = ?, mtime_ns = ?, inode = ?, sha256 = ?, md5 = ?, "
                "etag = ?, uploaded_at = ?, verified_at = ?, pointer = ?, pointer_error = NULL, last_error = NULL, "
                "local_copy = 1, blocks_reused = ?, next_attempt_at = 0, updated_at = ? WHERE blob_name = ?",
                (size, mtime_ns, inode, sha256, md5, etag, now, verified_at, pointer, blocks_reused, now, blob_name),
            )
            if asset is None:
                return db.execute("DELETE FROM deletions WHERE blob_name = ?", (blob_name,)).rowcount
            return db.execute(
                "DELETE FROM deletions WHERE blob_name = ? OR (file_type = ? AND checksum = ?)",
                (blob_name, asset[0], asset[1]),
            ).rowcount

    def mark_failed(self, blob_name: str, error: str, policy: RetryPolicy, rng: random.Random | None = None) -> str:
        """Count a failed attempt that belongs to this file; returns the new state ('failed' or 'dead').

        A failure of the service itself (an outage) is not the file's: see wait_out_outage()."""
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT attempts FROM files WHERE blob_name = ?", (blob_name,)).fetchone()
            attempts = (row["attempts"] if row else 0) + 1
            state = "dead" if attempts >= policy.max_attempts else "failed"
            next_at = now + backoff_delay(attempts, policy, rng) if state == "failed" else 0
            db.execute(
                "UPDATE files SET state = ?, attempts = ?, next_attempt_at = ?, last_error = ?, updated_at = ? "
                "WHERE blob_name = ?",
                (state, attempts, next_at, error[:2000], now, blob_name),
            )
            return state

    def wait_out_outage(self, blob_name: str, error: str, until: float) -> None:
        """The service was unusable while this file was tried: due again at `until`, and its
        attempts untouched, so a weekend outage never turns a file `dead`."""
        with self._tx() as db:
            db.execute(
                "UPDATE files SET state = CASE WHEN state = 'uploading' THEN 'pending' ELSE state END, "
                "outage_waits = outage_waits + 1, next_attempt_at = ?, last_error = ?, updated_at = ? "
                "WHERE blob_name = ?",
                (until, f"Azure Blob unusable: {error}"[:2000], time.time(), blob_name),
            )

    def postpone_due(self, until: float) -> int:
        """Every queued file waits for the outage's next try instead of one request per file."""
        with self._tx() as db:
            return db.execute(
                "UPDATE files SET next_attempt_at = ?, updated_at = ? "
                "WHERE state IN ('pending','failed') AND next_attempt_at < ?",
                (until, time.time(), until),
            ).rowcount

    def mark_quarantined(self, blob_name: str, error: str, sha256: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE files SET state = 'quarantined', sha256 = COALESCE(?, sha256), last_error = ?, "
                "updated_at = ? WHERE blob_name = ?",
                (sha256, error[:2000], time.time(), blob_name),
            )

    def set_pointer(self, blob_name: str, pointer: str, error: str | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE files SET pointer = ?, pointer_error = ?, updated_at = ? WHERE blob_name = ?",
                (pointer, error[:2000] if error else None, time.time(), blob_name),
            )

    # ---- destructive steps (agent.safety is the only caller) --------------------------------

    def begin_eviction(self, blob_name: str, path: str, aside: str, inode: int) -> None:
        with self.durable() as db:
            db.execute(
                "INSERT OR REPLACE INTO intents (blob_name, action, path, aside, inode, created_at) "
                "VALUES (?, 'evict', ?, ?, ?, ?)",
                (blob_name, path, aside, inode, time.time()),
            )

    def finish_eviction(self, blob_name: str, pointer: str) -> None:
        """The local copy is gone: record it (durably) and drop the intent in one transaction."""
        with self.durable() as db:
            db.execute(
                "UPDATE files SET state = 'evicted', local_copy = 0, pointer = ?, updated_at = ? WHERE blob_name = ?",
                (pointer, time.time(), blob_name),
            )
            db.execute("DELETE FROM intents WHERE blob_name = ?", (blob_name,))

    def drop_intent(self, blob_name: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM intents WHERE blob_name = ?", (blob_name,))

    def intents(self) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM intents ORDER BY created_at")

    def adopt_listed(
        self, blob_name: str, root: str, path: str, blob, pointer: str, local: os.stat_result | None = None
    ) -> None:
        """adopt_blob() from what the container says of the blob: a listing entry or its properties
        (agent.storage's Listed and BlobInfo both carry size, etag, content_md5 and sha256)."""
        self.adopt_blob(
            blob_name,
            root,
            path,
            size=blob.size,
            sha256=blob.sha256,
            md5=blob.content_md5.hex() if blob.content_md5 else None,
            etag=blob.etag,
            pointer=pointer,
            local=local,
        )

    def adopt_blob(
        self,
        blob_name: str,
        root: str,
        path: str,
        *,
        size: int,
        sha256: str,
        md5: str | None,
        etag: str,
        pointer: str,
        local: os.stat_result | None = None,
    ) -> None:
        """A row rebuilt from the container (state lost, or a commit a power cut took): the blob
        is a verified copy, and without `local` it is the only one, so the row says `evicted`."""
        now = time.time()
        state, local_copy = ("uploaded", 1) if local is not None else ("evicted", 0)
        with self.durable() as db:
            db.execute(
                "INSERT INTO files (blob_name, root, path, size, mtime_ns, inode, sha256, md5, state, etag, "
                "uploaded_at, verified_at, pointer, local_copy, created_at, updated_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (blob_name) DO UPDATE SET "
                "size = excluded.size, mtime_ns = excluded.mtime_ns, inode = excluded.inode, "
                "sha256 = excluded.sha256, md5 = excluded.md5, state = excluded.state, etag = excluded.etag, "
                "verified_at = excluded.verified_at, pointer = excluded.pointer, local_copy = excluded.local_copy, "
                "attempts = 0, last_error = NULL, updated_at = excluded.updated_at",
                (
                    blob_name,
                    root,
                    path,
                    size,
                    local.st_mtime_ns if local is not None else None,
                    local.st_ino if local is not None else None,
                    sha256,
                    md5,
                    state,
                    etag,
                    now,
                    now,
                    pointer,
                    local_copy,
                    now,
                    now,
                ),
            )

    def mark_fetched(self, blob_name: str, st: os.stat_result, keep_until: float, pointer: str) -> None:
        """`fetch` put the verified file back: it has a local copy again, kept until `keep_until`."""
        with self._tx() as db:
            db.execute(
                "UPDATE files SET state = 'uploaded', local_copy = 1, size = ?, mtime_ns = ?, inode = ?, "
                "keep_local_until = ?, pointer = ?, updated_at = ? WHERE blob_name = ?",
                (st.st_size, st.st_mtime_ns, st.st_ino, keep_until, pointer, time.time(), blob_name),
            )

    # ---- GigHive's deletes (agent.deletes is the only caller) --------------------------------

    def assets_seen(self) -> dict[tuple[str, str], int | None]:
        """`assets` as last seen whole: each key with its asset_id (None: remembered before ids were)."""
        # A read-only look at a schema-2 database (no run has upgraded it yet) has no ids.
        has_ids = any(r[1] == "asset_id" for r in self._query("PRAGMA table_info(assets_seen)"))
        column = "asset_id" if has_ids else "NULL"
        return {(r[0], r[1]): r[2] for r in self._query(f"SELECT file_type, checksum, {column} FROM assets_seen")}

    def update_assets_seen(self, ids: dict[tuple[str, str], int]) -> None:
        """Remember a whole look at `assets`, writing only what changed since the last one."""
        old = self.assets_seen()
        gone = [k for k in old if k not in ids]
        changed = [(k[0], k[1], i) for k, i in ids.items() if k not in old or old[k] != i]
        if not gone and not changed:
            return
        with self._tx() as db:
            db.executemany("DELETE FROM assets_seen WHERE file_type = ? AND checksum = ?", gone)
            db.executemany(
                "INSERT OR REPLACE INTO assets_seen (file_type, checksum, asset_id) VALUES (?, ?, ?)", changed
            )

    def assets_lost(self) -> dict[tuple[str, str], str]:
        if not self._query("SELECT 1 FROM sqlite_master WHERE name = 'assets_lost'"):
            return {}  # a read-only look at a schema-2 database
        return {(r[0], r[1]): r[2] for r in self._query("SELECT file_type, checksum, why FROM assets_lost")}

    def set_assets_lost(self, add: dict[tuple[str, str], str], drop: Collection[tuple[str, str]]) -> None:
        if not add and not drop:
            return
        now = time.time()
        with self._tx() as db:
            db.executemany("DELETE FROM assets_lost WHERE file_type = ? AND checksum = ?", list(drop))
            db.executemany(
                "INSERT OR IGNORE INTO assets_lost (file_type, checksum, lost_at, why) VALUES (?, ?, ?, ?)",
                [(k[0], k[1], now, why) for k, why in add.items()],
            )

    def deletions(self) -> list[sqlite3.Row]:
        return self._query("SELECT * FROM deletions ORDER BY purge_after, blob_name")

    def add_deletion(self, blob_name: str, file_type: str, checksum: str, purge_after: float) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT OR IGNORE INTO deletions (blob_name, file_type, checksum, seen_deleted_at, purge_after) "
                "VALUES (?, ?, ?, ?, ?)",
                (blob_name, file_type, checksum, time.time(), purge_after),
            )

    def drop_deletion(self, blob_name: str) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM deletions WHERE blob_name = ?", (blob_name,)).rowcount

    def forget_purged(self, blob_name: str) -> None:
        """The deleted asset's blob is gone for good: so is every record of it."""
        with self.durable() as db:
            db.execute("DELETE FROM files WHERE blob_name = ?", (blob_name,))
            db.execute("DELETE FROM deletions WHERE blob_name = ?", (blob_name,))

    def forget(self, blob_name: str) -> None:
        """The file vanished before it was uploaded: nothing to keep track of. Callers go
        through agent.safety, which first makes sure no blob holds it (a lost commit)."""
        with self._tx() as db:
            db.execute("DELETE FROM files WHERE blob_name = ? AND state IN ('pending','failed')", (blob_name,))

    def retry_now(self, roots: Collection[str]) -> int:
        """Failed items under these roots become due at once (an operator-run migration does not
        wait out the backoff the timer would)."""
        roots = tuple(roots)
        with self._tx() as db:
            return db.execute(
                f"UPDATE files SET next_attempt_at = 0, updated_at = ? WHERE state IN ('failed','pending') "
                f"AND root IN ({','.join('?' * len(roots))})",
                (time.time(), *roots),
            ).rowcount

    def forget_restored(self, blob_name: str) -> None:
        """`migrate --to-local` put the file back and the DB points at it: the agent no longer
        tracks it. Were the azure backend used again, the next scan finds it as a new file,
        sees its blob already there, and only verifies it."""
        with self._tx() as db:
            db.execute("DELETE FROM files WHERE blob_name = ?", (blob_name,))

    def requeue(self, states: Iterable[str], blob_names: Iterable[str] = ()) -> int:
        states = tuple(states)
        names = tuple(blob_names)
        marks = ",".join("?" * len(states))
        sql = (
            f"UPDATE files SET state = 'pending', attempts = 0, next_attempt_at = 0, updated_at = ? "
            f"WHERE state IN ({marks})"
        )
        args: list[object] = [time.time(), *states]
        if names:
            sql += f" AND blob_name IN ({','.join('?' * len(names))})"
            args += names
        with self._tx() as db:
            return db.execute(sql, args).rowcount

    def set_meta(self, key: str, value: str, durable: bool = False) -> None:
        with self.durable() if durable else self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def delete_meta(self, key: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM meta WHERE key = ?", (key,))

    def get_meta(self, key: str) -> str | None:
        rows = self._query("SELECT value FROM meta WHERE key = ?", (key,))
        return rows[0]["value"] if rows else None

    def born(self) -> float | None:
        """When this state database began (None: a read-only look at one that never recorded it)."""
        value = self.get_meta(BORN_KEY)
        return float(value) if value else None


def _connect_readonly(path: Path) -> sqlite3.Connection:
    """A connection that writes nothing, so `status` works when the state directory is full or
    read-only: exactly when the operator needs it.

    mode=ro still has to create the WAL index (-shm) next to the database; where that fails (a
    read-only mount, a full disk, a user without write access) immutable=1 reads the file as it
    is: a snapshot that may miss the newest transactions, which is fine for a status report.
    """
    from urllib.parse import quote

    last: sqlite3.Error | None = None
    for flags in ("mode=ro", "mode=ro&immutable=1"):
        try:
            db = sqlite3.connect(f"file:{quote(str(path))}?{flags}", uri=True, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("SELECT 1 FROM files LIMIT 1").fetchall()
            return db
        except sqlite3.Error as e:
            last = e
    raise StateError(f"cannot read state database {path}: {last}")
