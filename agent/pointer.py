"""The DB pointer: where each media file lives, in GigHive's MySQL.

GigHive's `assets` table has no column for the storage location (the URL is computed from
file_type and checksum_sha256), so the agent keeps its own table, joinable to `assets` on
(checksum_sha256, file_type), and created the way GigHive's db_migrations role works:
look in information_schema, then create or alter, idempotently.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass

import pymysql

from .config import MysqlConfig
from .media import SHA256_NAME_RE, MediaFile

TABLE = "media_storage_locations"

# Columns in creation order; db-migrate adds any that an older table lacks.
COLUMNS: dict[str, str] = {
    "id": "BIGINT UNSIGNED NOT NULL AUTO_INCREMENT",
    "media_path": "VARCHAR(512) NOT NULL COMMENT 'URL path without leading slash, e.g. video/<sha256>.mp4'",
    "file_type": "VARCHAR(32) NOT NULL COMMENT 'media root: audio | video, as assets.file_type'",
    "checksum_sha256": "CHAR(64) NULL COMMENT 'sha256 in the file name; joins assets.checksum_sha256'",
    "object_role": "ENUM('media','thumbnail','other') NOT NULL DEFAULT 'media'",
    "provider": "ENUM('local','azure_blob') NOT NULL DEFAULT 'local'",
    "container": "VARCHAR(63) NULL",
    "blob_name": "VARCHAR(1024) NULL",
    "etag": "VARCHAR(128) NULL",
    "size_bytes": "BIGINT UNSIGNED NULL",
    "content_md5": "CHAR(32) NULL COMMENT 'hex MD5 of the content, as stored in Content-MD5'",
    "content_sha256": "CHAR(64) NULL COMMENT 'sha256 of the bytes (for thumbnails differs from checksum_sha256)'",
    "uploaded_at": "DATETIME(3) NULL",
    "verified_at": "DATETIME(3) NULL",
    "local_copy": "TINYINT(1) NOT NULL DEFAULT 1 COMMENT '1 while the file is also on local disk'",
    "updated_at": "TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3) ON UPDATE CURRENT_TIMESTAMP(3)",
}
INDEXES: dict[str, str] = {
    "uq_media_path": "UNIQUE KEY uq_media_path (media_path)",
    "ix_asset": "KEY ix_asset (checksum_sha256, file_type)",
    "ix_provider": "KEY ix_provider (provider, local_copy)",
}


class PointerUnavailable(Exception):
    """MySQL cannot be reached or refused the statement."""


# Slots: reconcile and the way back hold one per pointer row (~1 KiB each with a __dict__).
@dataclass(frozen=True, slots=True)
class Location:
    media_path: str
    provider: str
    container: str | None
    blob_name: str | None
    etag: str | None
    size_bytes: int | None
    content_md5: str | None
    content_sha256: str | None
    local_copy: bool


def _role(mf: MediaFile) -> tuple[str, str | None]:
    m = SHA256_NAME_RE.match(mf.relpath.name)
    if len(mf.relpath.parts) == 1:
        return ("media" if m else "other"), (m.group("sha") if m else None)
    if mf.relpath.parts[0] == "thumbnails" and m:
        return "thumbnail", m.group("sha")
    return "other", None


def asset_key(mf: MediaFile) -> tuple[str, str] | None:
    """(file_type, checksum_sha256) of the GigHive asset a media file or thumbnail belongs to."""
    role, checksum = _role(mf)
    return (mf.root.name, checksum) if role in ("media", "thumbnail") and checksum else None


class PointerDB:
    def __init__(self, cfg: MysqlConfig):
        self.cfg = cfg
        self._conn: pymysql.connections.Connection | None = None

    def _connect(self) -> pymysql.connections.Connection:
        if self._conn is not None and self._conn.open:
            return self._conn
        try:
            self._conn = pymysql.connect(
                host=self.cfg.host,
                port=self.cfg.port,
                user=self.cfg.user,
                password=self.cfg.password.reveal() if self.cfg.password else "",
                database=self.cfg.database,
                connect_timeout=self.cfg.connect_timeout,
                read_timeout=30,
                write_timeout=30,
                autocommit=True,
                charset="utf8mb4",
            )
        except pymysql.MySQLError as e:
            raise PointerUnavailable(_describe(e, self.cfg)) from None
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(pymysql.MySQLError):
                self._conn.close()
            self._conn = None

    def _execute(self, sql: str, args: tuple = ()) -> list[tuple]:
        for attempt in (1, 2):
            conn = self._connect()
            try:
                with conn.cursor() as cur:
                    cur.execute(sql, args)
                    return list(cur.fetchall())
            except (pymysql.OperationalError, pymysql.InterfaceError) as e:
                # A server restart kills the kept connection; reconnect once before giving up.
                self.close()
                if attempt == 2:
                    raise PointerUnavailable(_describe(e, self.cfg)) from None
            except pymysql.MySQLError as e:
                raise PointerUnavailable(_describe(e, self.cfg)) from None
        raise AssertionError("unreachable")

    # ---- schema ---------------------------------------------------------------------------

    def migrate(self) -> list[str]:
        """Create or complete the table; returns what was changed (empty when up to date)."""
        changes: list[str] = []
        exists = self._execute(
            "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = %s",
            (self.cfg.database, TABLE),
        )[0][0]
        if not exists:
            cols = ",\n  ".join(f"`{name}` {ddl}" for name, ddl in COLUMNS.items())
            idx = ",\n  ".join(INDEXES.values())
            self._execute(
                f"CREATE TABLE `{TABLE}` (\n  {cols},\n  PRIMARY KEY (`id`),\n  {idx}\n) "
                "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin "
                "COMMENT='gighive-media-agent: storage location of each media file'"
            )
            return [f"created table {TABLE}"]
        have = {
            r[0]
            for r in self._execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
                (self.cfg.database, TABLE),
            )
        }
        previous = None
        for name, ddl in COLUMNS.items():
            if name not in have:
                where = f" AFTER `{previous}`" if previous else " FIRST"
                self._execute(f"ALTER TABLE `{TABLE}` ADD COLUMN `{name}` {ddl}{where}")
                changes.append(f"added column {name}")
            previous = name
        have_idx = {
            r[0]
            for r in self._execute(
                "SELECT DISTINCT index_name FROM information_schema.statistics "
                "WHERE table_schema = %s AND table_name = %s",
                (self.cfg.database, TABLE),
            )
        }
        for name, ddl in INDEXES.items():
            if name not in have_idx:
                self._execute(f"ALTER TABLE `{TABLE}` ADD {ddl}")
                changes.append(f"added index {name}")
        return changes

    def table_exists(self) -> bool:
        return bool(
            self._execute(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = %s",
                (self.cfg.database, TABLE),
            )[0][0]
        )

    # ---- rows -----------------------------------------------------------------------------

    def record_blob(
        self,
        mf: MediaFile,
        *,
        container: str,
        etag: str,
        size: int,
        md5_hex: str,
        sha256: str,
        uploaded_at: float,
        verified_at: float,
        local_copy: bool,
    ) -> None:
        """Flip the pointer to azure_blob (upsert), once the blob is verified."""
        role, checksum = _role(mf)
        self._execute(
            f"INSERT INTO `{TABLE}` (media_path, file_type, checksum_sha256, object_role, provider, container, "
            "blob_name, etag, size_bytes, content_md5, content_sha256, uploaded_at, verified_at, local_copy) "
            "VALUES (%s,%s,%s,%s,'azure_blob',%s,%s,%s,%s,%s,%s,%s,%s,%s) "
            "ON DUPLICATE KEY UPDATE file_type=VALUES(file_type), checksum_sha256=VALUES(checksum_sha256), "
            "object_role=VALUES(object_role), provider='azure_blob', container=VALUES(container), "
            "blob_name=VALUES(blob_name), etag=VALUES(etag), size_bytes=VALUES(size_bytes), "
            "content_md5=VALUES(content_md5), content_sha256=VALUES(content_sha256), "
            "uploaded_at=VALUES(uploaded_at), verified_at=VALUES(verified_at), local_copy=VALUES(local_copy)",
            (
                mf.blob_name,
                mf.root.name,
                checksum,
                role,
                container,
                mf.blob_name,
                etag,
                size,
                md5_hex,
                sha256,
                _ts(uploaded_at),
                _ts(verified_at),
                int(local_copy),
            ),
        )

    def record_local(self, mf: MediaFile) -> None:
        """Flip the pointer back to local disk (`migrate --to-local`). The blob columns keep
        describing the copy that stays in the container, for an operator who looks."""
        role, checksum = _role(mf)
        self._execute(
            f"INSERT INTO `{TABLE}` (media_path, file_type, checksum_sha256, object_role, provider, local_copy) "
            "VALUES (%s,%s,%s,%s,'local',1) ON DUPLICATE KEY UPDATE provider='local', local_copy=1",
            (mf.blob_name, mf.root.name, checksum, role),
        )

    def locations(self) -> dict[str, Location]:
        """Every pointer row by media path (reconcile compares them with Blob and the disk)."""
        rows = self._execute(f"SELECT {_LOCATION_COLUMNS} FROM `{TABLE}`")
        return {r[0]: _location(r) for r in rows}

    def count_blob_pointers(self) -> int:
        return int(self._execute(f"SELECT COUNT(*) FROM `{TABLE}` WHERE provider = 'azure_blob'")[0][0])

    def blob_pointer_etags(self) -> dict[str, str | None]:
        return {
            r[0]: r[1] for r in self._execute(f"SELECT media_path, etag FROM `{TABLE}` WHERE provider = 'azure_blob'")
        }

    def delete_location(self, media_path: str) -> None:
        self._execute(f"DELETE FROM `{TABLE}` WHERE media_path = %s", (media_path,))

    def _has_assets_table(self) -> bool:
        return bool(
            self._execute(
                "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = %s AND table_name = 'assets'",
                (self.cfg.database,),
            )[0][0]
        )

    def asset_keys(self) -> set[tuple[str, str]] | None:
        """(file_type, checksum_sha256) of every row in GigHive's `assets`, or None without that table.

        A blob belongs to an asset when its name carries the asset's type and hash: the media
        file itself (`video/<sha>.mp4`) and its thumbnail (`video/thumbnails/<sha>.png`).
        """
        if not self._has_assets_table():
            return None
        return {(str(r[0]), str(r[1]).lower()) for r in self._execute("SELECT file_type, checksum_sha256 FROM assets")}

    def has_asset(self, key: tuple[str, str]) -> bool:
        """GigHive's `assets` has a row for this (file_type, checksum_sha256) right now."""
        return bool(
            self._execute(
                "SELECT COUNT(*) FROM assets WHERE file_type = %s AND checksum_sha256 = %s", (key[0], key[1])
            )[0][0]
        )

    def asset_rows(self) -> tuple[dict[tuple[str, str], int], int | None] | None:
        """Every asset's key with its `asset_id` (the lowest, when tenants share a file), and the
        table's next AUTO_INCREMENT value; None without the table.

        The ids are not keys (a TRUNCATE reuses them), but they are a witness that the table was
        rebuilt: GigHive's admin delete removes rows and leaves every other row's id and the
        counter alone, while a TRUNCATE and refill, or a DROP and a restore, renumber rows or move
        the counter back (agent.deletes)."""
        if not self._has_assets_table():
            return None
        ids: dict[tuple[str, str], int] = {}
        for file_type, checksum, asset_id in self._execute("SELECT file_type, checksum_sha256, asset_id FROM assets"):
            key = (str(file_type), str(checksum).lower())
            ids[key] = min(int(asset_id), ids.get(key, int(asset_id)))
        return ids, self._next_asset_id()

    def _next_asset_id(self) -> int | None:
        # MySQL 8 answers information_schema's AUTO_INCREMENT from a cache (for a day by default)
        # unless the session asks for live figures; MariaDB has no such variable and is always live.
        if "mariadb" not in str(self._execute("SELECT VERSION()")[0][0]).lower():
            with contextlib.suppress(PointerUnavailable):
                self._execute("SET SESSION information_schema_stats_expiry = 0")
        rows = self._execute(
            "SELECT AUTO_INCREMENT FROM information_schema.tables WHERE table_schema = %s AND table_name = 'assets'",
            (self.cfg.database,),
        )
        return int(rows[0][0]) if rows and rows[0][0] is not None else None

    def busy_checksums(self) -> set[str]:
        """sha256 of every asset GigHive is still working on: an `ai_jobs` row queued or running
        for it, or an upload job in progress that holds it (tables absent: nothing is busy)."""
        have = {
            str(r[0]).lower()
            for r in self._execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s "
                "AND table_name IN ('ai_jobs', 'upload_jobs', 'upload_job_files', 'assets')",
                (self.cfg.database,),
            )
        }
        busy: set[str] = set()
        if {"ai_jobs", "assets"} <= have:
            busy |= {
                str(r[0]).lower()
                for r in self._execute(
                    "SELECT a.checksum_sha256 FROM ai_jobs j JOIN assets a ON a.asset_id = j.target_id "
                    "WHERE j.target_type = 'asset' AND j.status IN ('queued', 'running') "
                    "AND a.checksum_sha256 IS NOT NULL"
                )
            }
        if {"upload_jobs", "upload_job_files"} <= have:
            busy |= {
                str(r[0]).lower()
                for r in self._execute(
                    "SELECT f.checksum_sha256 FROM upload_job_files f JOIN upload_jobs u ON u.job_id = f.job_id "
                    "WHERE u.status = 'in_progress'"
                )
            }
        return busy

    def set_local_copy(self, media_path: str, local_copy: bool) -> None:
        self._execute(f"UPDATE `{TABLE}` SET local_copy = %s WHERE media_path = %s", (int(local_copy), media_path))

    def get(self, media_path: str) -> Location | None:
        rows = self._execute(
            f"SELECT {_LOCATION_COLUMNS} FROM `{TABLE}` WHERE media_path = %s",
            (media_path,),
        )
        if not rows:
            return None
        return _location(rows[0])


# What a Location is read from, in the order _location takes the columns.
_LOCATION_COLUMNS = (
    "media_path, provider, container, blob_name, etag, size_bytes, content_md5, content_sha256, local_copy"
)


def _location(r: tuple) -> Location:
    """A row of _LOCATION_COLUMNS as a Location."""
    # blob_name is media_path for every row the agent writes: one string for both, not two
    # (reconcile and the way back hold one Location per row).
    return Location(r[0], r[1], r[2], r[0] if r[3] == r[0] else r[3], r[4], r[5], r[6], r[7], bool(r[8]))


def _ts(epoch: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(epoch, tz=dt.UTC).replace(tzinfo=None)


def _describe(e: Exception, cfg: MysqlConfig) -> str:
    args = getattr(e, "args", ())
    code = args[0] if args and isinstance(args[0], int) else None
    text = str(args[1]) if len(args) > 1 else str(e)
    where = f"MySQL {cfg.user}@{cfg.host}:{cfg.port}/{cfg.database}"
    if code == 1045:
        return f"{where}: access denied (check MYSQL_USER and the password file)"
    if code == 1049:
        return f"{where}: database does not exist"
    if code in (2003, 2013, 2006):
        return f"{where}: unreachable ({text[:200]})"
    if code == 1146:
        return f"{where}: table {TABLE} is missing; run `gighive-media db-migrate`"
    return f"{where}: error {code}: {text[:200]}"
