"""Eviction GigHive can live with, and `fetch` for its local readers (issue: GigHive's own readers).

Real files, Azurite (through the strict gate), MariaDB with GigHive's `assets`, `ai_jobs`,
`upload_jobs` and `upload_job_files`; the agent through its CLI.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from tests.integration.agent_harness import Harness
from tests.integration.test_migrate import db_harness, local_path
from tests.integration.test_safety import records
from tests.integration.test_verify_reconcile import add_assets, container, db_exec
from tests.support.media import make_content_addressed

__all__ = ["db_harness"]

DAY = 86400


def aged(path, days: float) -> None:
    t = time.time() - days * DAY
    os.utime(path, (t, t))


def library(media_roots, n: int, days_old: float, seed: int) -> dict[str, bytes]:
    files = {}
    for i in range(n):
        path, _ = make_content_addressed(media_roots["video"], 2000 + i, "mp4", seed=seed + i)
        aged(path, days_old)
        files[f"video/{path.name}"] = path.read_bytes()
    return files


def asset_id(db, name: str) -> int:
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT asset_id FROM assets WHERE checksum_sha256 = %s", (name.split("/")[-1].split(".")[0],))
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def on_disk(files, media_roots) -> set[str]:
    return {n for n in files if local_path(media_roots, n).exists()}


def test_only_files_older_than_the_minimum_age_are_evicted(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true", EVICT_MIN_AGE_DAYS="7")
    old = library(media_roots, 2, days_old=30, seed=300)
    new = library(media_roots, 2, days_old=1, seed=310)
    add_assets(media_db, {**old, **new})
    h.cli("upload", "--no-watch", check=True)
    assert on_disk(old, media_roots) == set()
    assert on_disk(new, media_roots) == set(new)
    assert {records(h)[n].state for n in new} == {"uploaded"}


def test_no_eviction_while_gighive_still_works_on_the_file(db_harness: Harness, media_roots, media_db) -> None:
    """An AI job queued or running for the asset, an upload job in progress holding its checksum,
    or (with a whole `assets` table) no `assets` row yet: GigHive still reads the local file."""
    h = db_harness
    h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true", EVICT_MIN_AGE_DAYS="0")
    files = library(media_roots, 4, days_old=10, seed=320)
    names = sorted(files)
    ai_queued, ai_running, importing, not_ingested = names
    add_assets(media_db, [ai_queued, ai_running, importing])
    for name, status in ((ai_queued, "queued"), (ai_running, "running")):
        db_exec(
            media_db,
            "INSERT INTO ai_jobs (job_type, target_type, target_id, status) VALUES ('categorize_video','asset',%s,%s)",
            (asset_id(media_db, name), status),
        )
    db_exec(media_db, "INSERT INTO upload_jobs (job_id, status, started_at) VALUES ('j1', 'in_progress', NOW())")
    db_exec(
        media_db,
        "INSERT INTO upload_job_files (job_id, checksum_sha256, source_relpath, file_type) VALUES ('j1', %s, 'x', 'video')",
        (importing.split("/")[-1].split(".")[0],),
    )
    h.cli("upload", "--no-watch", check=True)
    assert on_disk(files, media_roots) == set(files)
    assert {records(h)[n].state for n in files} == {"uploaded"}
    # GigHive finishes: the jobs are done, the import completes, ingest writes the assets row.
    db_exec(media_db, "UPDATE ai_jobs SET status = 'done'")
    db_exec(media_db, "UPDATE upload_jobs SET status = 'completed'")
    add_assets(media_db, [not_ingested])
    h.cli("retry", check=True)
    assert on_disk(files, media_roots) == set()


def test_eviction_waits_for_the_disk_usage_threshold(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    files = library(media_roots, 2, days_old=10, seed=330)
    add_assets(media_db, files)
    st = os.statvfs(media_roots["video"])
    used = 100.0 * (1.0 - st.f_bavail / st.f_blocks)
    h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true", EVICT_MIN_AGE_DAYS="0", EVICT_ABOVE_DISK_PERCENT="99")
    if used < 99:
        h.cli("upload", "--no-watch", check=True)
        assert on_disk(files, media_roots) == set(files)
    h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true", EVICT_MIN_AGE_DAYS="0", EVICT_ABOVE_DISK_PERCENT="0")
    h.cli("retry", check=True)
    assert on_disk(files, media_roots) == set()


def test_fetch_brings_evicted_files_back_verified_and_keeps_them(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true", EVICT_MIN_AGE_DAYS="0")
    files = library(media_roots, 3, days_old=10, seed=340)
    add_assets(media_db, files)
    h.cli("upload", "--no-watch", check=True)
    assert on_disk(files, media_roots) == set()
    name = sorted(files)[0]
    path = local_path(media_roots, name)
    # The same file asked for three ways: blob name, URL path, local path.
    r = h.cli_json("fetch", name, "/" + sorted(files)[1], str(local_path(media_roots, sorted(files)[2])))
    assert sorted(r["fetched"]) == sorted(files) and r["failed"] == [], r
    for n, data in files.items():
        assert local_path(media_roots, n).read_bytes() == data
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    # Kept: the next timer runs, with deletion on, leave them alone.
    h.cli("retry", check=True)
    assert on_disk(files, media_roots) == set(files)
    rec = records(h)[name]
    assert rec.state == "uploaded" and rec.local_copy == 1 and rec.keep_local_until > time.time() + 6 * DAY
    # With --keep-days 0 the policy may take it again.
    h.cli("fetch", "--keep-days", "0", name, check=True)
    h.cli("retry", check=True)
    assert not path.exists()


def test_fetch_of_a_name_not_in_blob_or_not_matching_fails_and_writes_nothing(
    db_harness: Harness, media_roots, media_db
) -> None:
    h = db_harness
    before = sorted(p.name for p in media_roots["video"].iterdir())
    missing = "video/" + "a" * 64 + ".mp4"
    forged_sha = hashlib.sha256(b"the real content").hexdigest()
    forged = f"video/{forged_sha}.mp4"
    container(h).upload_blob(forged, b"other content", metadata={"sha256": hashlib.sha256(b"other").hexdigest()})
    p = h.cli("fetch", "--json", missing, forged, "video/../../etc/passwd")
    assert p.returncode == 1
    r = json.loads(p.stdout)
    errors = {f["item"]: f["error"] for f in r["failed"]}
    assert "is not in Blob" in errors[missing]
    assert "not the" in errors[forged] and "its name promises" in errors[forged]
    assert "not a file under a configured media root" in errors["video/../../etc/passwd"]
    assert r["fetched"] == []
    assert sorted(p.name for p in media_roots["video"].iterdir()) == before  # not even a temp file
