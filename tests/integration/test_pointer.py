"""The DB pointer in a real MariaDB: migration, upsert after verification, MySQL outages, crashes."""

from __future__ import annotations

import signal
import time

import pytest

from agent.actions import retry, upload
from agent.pointer import TABLE
from tests.integration.agent_harness import Harness, blob_names
from tests.integration.test_upload import library


@pytest.fixture
def harness(harness, tmp_path, media_db) -> Harness:
    """The base harness plus GigHive's MySQL (MariaDB)."""
    h = harness
    h.settings.update(
        MYSQL_HOST=media_db.host,
        MYSQL_PORT=str(media_db.port),
        MYSQL_DATABASE=media_db.database,
        MYSQL_USER=media_db.user,
        MYSQL_PASSWORD_FILE=str(media_db.password_file(tmp_path / "mysql-password")),
        MYSQL_CONNECT_TIMEOUT="2",
    )
    h.write_config()
    return h


def rows(db) -> dict[str, dict]:
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(
                f"SELECT media_path, file_type, checksum_sha256, object_role, provider, container, blob_name, etag, "
                f"size_bytes, content_md5, content_sha256, local_copy, verified_at FROM {TABLE}"
            )
            cols = [d[0] for d in cur.description]
            return {r[0]: dict(zip(cols, r, strict=True)) for r in cur.fetchall()}
    finally:
        conn.close()


def test_db_migrate_creates_the_table_once(harness, media_db):
    first = harness.cli_json("db-migrate")
    assert first["changes"] == [f"created table {TABLE}"]
    second = harness.cli("db-migrate", check=True)
    assert "up to date" in second.stdout


def test_db_migrate_completes_an_older_table(harness, media_db):
    harness.cli("db-migrate", check=True)
    conn = media_db.admin_connect()
    with conn.cursor() as cur:
        cur.execute(f"ALTER TABLE {media_db.database}.{TABLE} DROP COLUMN verified_at, DROP INDEX ix_provider")
    conn.close()
    result = harness.cli_json("db-migrate")
    assert result["changes"] == ["added column verified_at", "added index ix_provider"]


def test_db_migrate_without_a_database_is_a_config_error(harness):
    harness.write_config(MYSQL_HOST="", MYSQL_USER="", MYSQL_PASSWORD_FILE="")
    proc = harness.cli("db-migrate")
    assert proc.returncode == 78
    assert "MYSQL_HOST" in proc.stderr


def test_db_migrate_with_a_wrong_password_says_so(harness, tmp_path):
    bad = tmp_path / "bad-password"
    bad.write_text("not-the-password")
    bad.chmod(0o600)
    harness.write_config(MYSQL_PASSWORD_FILE=str(bad))
    proc = harness.cli("db-migrate")
    assert proc.returncode == 1
    assert "access denied" in proc.stderr
    assert "not-the-password" not in proc.stderr


def test_verified_upload_flips_the_pointer_and_joins_assets(harness, media_roots, media_db):
    files = library(media_roots)
    harness.cli("db-migrate", check=True)
    video = next(n for n in files if n.startswith("video/") and n.endswith(".mp4"))
    sha = video.split("/")[1].split(".")[0]
    conn = media_db.connect(autocommit=True)
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO assets (checksum_sha256, file_type, file_ext, source_relpath, size_bytes, mime_type) "
            "VALUES (%s, 'video', 'mp4', 'x.mp4', %s, 'video/mp4')",
            (sha, files[video].stat().st_size),
        )
    result = upload.run(harness.config(), watch=False)
    assert result["pointers_flipped"] == 4
    got = rows(media_db)
    assert set(got) == set(files)
    row = got[video]
    assert row["provider"] == "azure_blob"
    assert row["blob_name"] == video
    assert row["object_role"] == "media"
    assert row["local_copy"] == 1
    assert row["verified_at"] is not None
    assert got[f"video/thumbnails/{sha}.png"]["object_role"] == "thumbnail"
    assert got[f"video/thumbnails/{sha}.png"]["checksum_sha256"] == sha
    with conn.cursor() as cur:
        cur.execute(
            f"SELECT a.asset_id, p.provider, p.blob_name FROM assets a JOIN {TABLE} p "
            "ON p.checksum_sha256 = a.checksum_sha256 AND p.file_type = a.file_type AND p.object_role = 'media'"
        )
        joined = cur.fetchall()
    conn.close()
    assert len(joined) == 1 and joined[0][1:] == ("azure_blob", video)


def test_mysql_down_upload_still_counts_and_pointer_flips_later(harness, media_roots, media_db, blob_container):
    files = library(media_roots)
    harness.cli("db-migrate", check=True)
    cfg = harness.config(DELETE_LOCAL_AFTER_UPLOAD="true")
    media_db.stop()
    result = upload.run(cfg, watch=False)
    assert result["uploaded"] == 4
    assert result["pointer_failures"] >= 1
    assert result["evicted"] == 0
    # The blobs are there, but with the DB still pointing at local disk nothing was deleted.
    assert blob_names(blob_container) == set(files)
    assert all(p.exists() for p in files.values())
    status = harness.cli_json("status")
    assert status["pointer"]["pending"] == 4
    assert "unreachable" in status["pointer_pending"][0]["error"]
    media_db.start()
    later = retry.run(cfg)
    assert later["pointers_flipped"] >= 4
    assert later["evicted"] == 4
    assert not any(p.exists() for p in files.values())
    got = rows(media_db)
    assert {r["provider"] for r in got.values()} == {"azure_blob"}
    assert {r["local_copy"] for r in got.values()} == {0}


def pointer_insert_waiting(conn) -> bool:
    """True once some session's pointer INSERT waits on a table lock (seen from `conn`'s user)."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST "
            "WHERE INFO LIKE %s AND STATE LIKE 'Waiting for table%%'",
            (f"INSERT INTO `{TABLE}`%",),
        )
        return cur.fetchone()[0] > 0


def test_kill_9_between_commit_and_db_update_is_repaired(harness, media_roots, media_db, blob_container):
    """The uploader is killed while its pointer write waits on a locked table (blob committed and
    verified, DB not yet updated). The next run flips the pointer without uploading again."""
    files = library(media_roots)
    harness.cli("db-migrate", check=True)
    blocker = media_db.connect(autocommit=True)
    with blocker.cursor() as cur:
        cur.execute(f"LOCK TABLES {TABLE} WRITE")
    proc = harness.spawn("upload", "--no-watch")
    try:
        # Wait for the state, not for a duration: the agent's pointer INSERT is in MariaDB, waiting
        # on the lock (it comes after the verified commit and the `uploaded` state write), then
        # kill it hard. The blocker is the same app user, so it sees the agent's sessions.
        deadline = time.monotonic() + 300
        while not pointer_insert_waiting(blocker):
            assert proc.poll() is None, f"the run ended before its pointer write: {proc.communicate()}"
            assert time.monotonic() < deadline, "the agent never reached its pointer write"
            time.sleep(0.05)
        assert blob_names(blob_container)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        with blocker.cursor() as cur:
            cur.execute("UNLOCK TABLES")
        blocker.close()
    from agent.state import StateStore

    s = StateStore.open(harness.state_dir)
    left = {r.blob_name: (r.state, r.pointer) for r in s.in_state("pending", "uploading", "uploaded")}
    s.close()
    # The kill landed after a verified commit and before any pointer reached the DB.
    assert any(state == "uploaded" for state, _ in left.values())
    assert all(pointer != "done" for _, pointer in left.values())
    etags_before = {b.name: b.etag for b in blob_container.list_blobs()}
    result = harness.cli_json("retry")
    assert result["pointers_flipped"] >= 1
    got = rows(media_db)
    assert set(got) == set(files)
    assert {r["provider"] for r in got.values()} == {"azure_blob"}
    # Blobs committed before the kill were not uploaded again.
    etags_after = {b.name: b.etag for b in blob_container.list_blobs()}
    assert all(etags_after[n] == e for n, e in etags_before.items())
