"""The only copy is sacred: every destructive step against every witness (agent/safety.py).

Each test reproduces one way the real GigHive (or a real host) takes a witness away: `assets`
emptied by "clear media" or an import, the state directory lost with a rebuilt VM, the pointer
table truncated, MySQL down, a thumbnail renamed into place while it is evicted, a kill or a
power cut between two steps of an eviction, the units running after the way back. Real Azurite,
MariaDB with GigHive's `assets`, real files; the agent through its CLI or its real entry points.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from agent.actions import retry, upload
from agent.pointer import TABLE
from agent.state import StateStore
from tests.integration.agent_harness import Harness, blob_bytes
from tests.integration.test_migrate import blob_snapshot, build_library, db_harness, local_path, pointer_rows
from tests.integration.test_verify_reconcile import add_assets, container, db_exec, state_began_long_ago
from tests.support.media import make_content_addressed, make_thumbnail

__all__ = ["db_harness"]


def evicted_library(h: Harness, media_roots, media_db, **kw) -> dict[str, bytes]:
    files = build_library(media_roots, **kw)
    add_assets(media_db, files)
    h.cli("migrate", "--evict-local", "--no-progress", check=True)
    return files


def evicted_names(files: dict[str, bytes], media_roots) -> list[str]:
    return sorted(n for n in files if not local_path(media_roots, n).exists())


def evicted_media(files: dict[str, bytes], media_roots) -> list[str]:
    """Evicted top-level media files (named by their own sha256, each an `assets` row)."""
    return [n for n in evicted_names(files, media_roots) if n.count("/") == 1]


def assert_every_file_readable(h: Harness, files: dict[str, bytes], media_roots) -> None:
    """The invariant: every wanted file's exact bytes are on disk or in Blob."""
    c = container(h)
    for name, data in files.items():
        path = local_path(media_roots, name)
        have = path.read_bytes() if path.exists() else blob_bytes(c, name)
        assert hashlib.sha256(have).digest() == hashlib.sha256(data).digest(), name


def assert_every_file_local(files: dict[str, bytes], media_roots) -> None:
    """The way back's promise: every file's exact bytes on local disk."""
    for name, data in files.items():
        assert local_path(media_roots, name).read_bytes() == data, name


def records(h: Harness) -> dict[str, object]:
    s = StateStore.open(h.state_dir)
    try:
        return {r.blob_name: r for r in s.records()}
    finally:
        s.close()


# ---- pruning ---------------------------------------------------------------------------------


def test_prune_deletes_nothing_when_assets_is_emptied(db_harness: Harness, media_roots, media_db) -> None:
    """GigHive's "clear media" and its imports TRUNCATE `assets`: every evicted blob then looks
    unreferenced to that table alone. None of them may be deleted."""
    h = db_harness
    files = evicted_library(h, media_roots, media_db)
    assert evicted_names(files, media_roots), "the library must have evicted files for this test to mean anything"
    before = blob_snapshot(h)
    h.cli("reconcile", check=True)  # the agent reads `assets` whole once
    db_exec(media_db, "TRUNCATE TABLE assets")
    p = h.cli("reconcile", "--prune-orphans", "--yes", "--json")
    assert p.returncode == 1, p.stdout + p.stderr
    r = json.loads(p.stdout)
    assert r["orphans_pruned"] == [] and "assets table is empty" in r["prune_refused"], r
    assert "deleted nothing" in p.stderr
    assert blob_snapshot(h) == before
    assert_every_file_readable(h, files, media_roots)


def test_prune_deletes_nothing_when_assets_shrinks_suddenly(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=20, large=0)
    h.cli("reconcile", check=True)
    before = blob_snapshot(h)
    # An import refilling the table: half of it is back so far.
    db_exec(media_db, "DELETE FROM assets WHERE MOD(asset_id, 2) = 0")
    r = h.cli_json("reconcile", "--prune-orphans", "--yes")
    assert "shrank" in r["prune_refused"] and r["orphans_pruned"] == [], r
    assert blob_snapshot(h) == before
    assert_every_file_readable(h, files, media_roots)


def test_prune_never_deletes_what_the_agent_evicted_even_if_its_asset_row_is_gone(
    db_harness: Harness, media_roots, media_db
) -> None:
    """One asset deleted in GigHive, the table otherwise whole: its blob is still the only copy
    the agent made, and the state witness keeps it (deletes get a grace period, not a prune).
    A stranger blob nothing refers to is the only thing pruned."""
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=12, large=0)
    h.cli("reconcile", check=True)
    victim = evicted_media(files, media_roots)[0]
    db_exec(media_db, "DELETE FROM assets WHERE checksum_sha256 = %s", (victim.split("/")[-1].split(".")[0],))
    state_began_long_ago(h)
    stranger = "video/" + "e" * 64 + ".mp4"
    container(h).upload_blob(stranger, b"nothing refers to me")
    r = h.cli_json("reconcile", "--prune-orphans", "--yes")
    assert r["prune_refused"] is None and r["orphans_pruned"] == [stranger], r
    assert victim in blob_snapshot(h)


def test_prune_refuses_without_a_db(harness: Harness, media_roots) -> None:
    build_library(media_roots, small=3, large=0)
    harness.cli("migrate", "--no-progress", check=True)
    container(harness).upload_blob("audio/" + "d" * 64 + ".mp3", b"stranger")
    r = harness.cli_json("reconcile", "--prune-orphans", "--yes")
    assert "no DB is configured" in r["prune_refused"] and r["orphans_pruned"] == []


# ---- the state directory lost --------------------------------------------------------------------


def test_the_way_back_with_the_state_lost_restores_every_file_from_the_container(
    db_harness: Harness, media_roots, media_db
) -> None:
    h = db_harness
    files = evicted_library(h, media_roots, media_db)
    gone = evicted_names(files, media_roots)
    shutil.rmtree(h.state_dir)  # the VM rebuilt; the state directory was not in the backup
    p = h.cli("migrate", "--to-local", "--check", "--json")
    assert p.returncode == 1
    verdict = json.loads(p.stdout)
    assert verdict["safe"] is False and verdict["only_in_blob"] == len(gone), verdict
    r = h.cli_json("migrate", "--to-local", "--no-progress")
    assert r["complete"] is True and r["restored"] == len(gone), r
    assert_every_file_local(files, media_roots)
    assert h.cli("migrate", "--to-local", "--check").returncode == 0
    assert {row[0] for row in pointer_rows(media_db).values()} == {"local"}


def test_the_way_back_with_the_state_lost_and_assets_emptied_still_restores_everything(
    db_harness: Harness, media_roots, media_db
) -> None:
    h = db_harness
    files = evicted_library(h, media_roots, media_db)
    shutil.rmtree(h.state_dir)
    db_exec(media_db, "TRUNCATE TABLE assets")
    db_exec(media_db, f"TRUNCATE TABLE {TABLE}")  # "clear media" empties the agent's table too
    r = h.cli_json("migrate", "--to-local", "--no-progress")
    assert r["complete"] is True, r
    assert_every_file_local(files, media_roots)


def test_the_way_back_never_calls_a_partly_refilled_assets_table_complete(
    db_harness: Harness, media_roots, media_db
) -> None:
    """Found by the long simulation (seed 7000): a TRUNCATE, an import that put back only some rows,
    and a lost state. The table looks whole, yet the agent never saw the other rows go: those
    files are not restored on its word, and local is not called safe while they are only in Blob."""
    h = db_harness
    files = evicted_library(h, media_roots, media_db)
    gone = evicted_media(files, media_roots)
    assert len(gone) >= 2
    shutil.rmtree(h.state_dir)
    db_exec(media_db, "TRUNCATE TABLE assets")
    kept = [n for n in files if n.count("/") == 1 and n not in gone[1:]]
    add_assets(media_db, kept)  # the import brings back the first evicted file's row and local ones
    r = h.cli_json("migrate", "--to-local", "--no-progress")
    assert r["complete"] is False and r["unlisted_count"] >= len(gone) - 1, r
    assert any("--include-unlisted" in reason for reason in r["reasons"]), r
    assert local_path(media_roots, gone[0]).read_bytes() == files[gone[0]]
    p = h.cli("migrate", "--to-local", "--check", "--json")
    assert p.returncode == 1 and json.loads(p.stdout)["unlisted"] >= len(gone) - 1, p.stdout
    r = h.cli_json("migrate", "--to-local", "--include-unlisted", "--no-progress")
    assert r["complete"] is True, r
    assert_every_file_local(files, media_roots)


def test_the_way_back_leaves_a_delete_it_saw_in_blob_and_still_calls_local_safe(
    db_harness: Harness, media_roots, media_db
) -> None:
    h = db_harness
    files = evicted_library(h, media_roots, media_db)
    gone = evicted_media(files, media_roots)
    h.cli("retry", check=True)  # the agent reads `assets` whole and remembers its rows
    sha, ext = gone[0].split("/", 1)[1].split(".")
    db_exec(media_db, f"DELETE FROM assets WHERE checksum_sha256 = '{sha}'")  # GigHive's admin delete
    r = h.cli_json("migrate", "--to-local", "--no-progress")
    assert r["complete"] is True and gone[0] in r["left_in_blob"] and r["unlisted_count"] == 0, json.dumps(r)
    assert not local_path(media_roots, gone[0]).exists()


def test_reconcile_rebuilds_a_lost_state_from_the_container(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    files = evicted_library(h, media_roots, media_db)
    gone = evicted_names(files, media_roots)
    shutil.rmtree(h.state_dir)
    r = h.cli_json("reconcile")
    assert sorted(r["state_rebuilt"]) == gone, r
    rows = records(h)
    assert {n for n, rec in rows.items() if rec.state == "evicted"} == set(gone)
    assert_every_file_readable(h, files, media_roots)


def test_prune_keeps_an_evicted_blob_whose_every_record_was_lost(db_harness: Harness, media_roots, media_db) -> None:
    """Found by the long simulation (seed 21000): the state directory lost, `assets` and the
    pointer table TRUNCATEd, then one new file and a timer run, which filled the new state and both
    tables again with that file alone. Every witness looked whole, none claimed the evicted files,
    and prune deleted their blobs: the only copies. The new state cannot vouch for blobs written
    before it began, so they are kept (and listed), until the operator says the state was lost."""
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=6, large=0)
    gone = evicted_names(files, media_roots)
    assert gone
    shutil.rmtree(h.state_dir)
    db_exec(media_db, "TRUNCATE TABLE assets")
    db_exec(media_db, f"TRUNCATE TABLE {TABLE}")
    path, sha = make_content_addressed(media_roots["audio"], 4000, "mp3", seed=2101)
    add_assets(media_db, [f"audio/{path.name}"])
    h.cli("retry", check=True)
    r = h.cli_json("reconcile", "--prune-orphans", "--yes")
    assert r["orphans_pruned"] == [], r
    assert set(gone) <= set(r["orphans_older_than_state"]), r
    assert all("before the agent's state began" in u["detail"] for u in r["unsafe"] if u["blob_name"] in gone), r
    assert_every_file_readable(h, files, media_roots)
    # The way back does not call local safe while they are only in Blob, and brings them home on
    # the operator's word.
    r = h.cli_json("migrate", "--to-local", "--include-unlisted", "--no-progress")
    assert r["complete"] is True, r
    assert_every_file_local(files, media_roots)


def test_prune_deletes_older_orphans_only_on_the_operators_word(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    add_assets(media_db, build_library(media_roots, small=3, large=0))
    h.cli("migrate", "--no-progress", check=True)
    stranger = "video/" + "c" * 64 + ".mp4"
    container(h).upload_blob(stranger, b"left by a state that was lost")
    r = h.cli_json("reconcile", "--prune-orphans", "--yes")  # the state began minutes ago
    assert r["orphans_pruned"] == [] and r["orphans_older_than_state"] == [stranger], r
    r = h.cli_json("reconcile", "--prune-orphans", "--yes", "--accept-state-lost")
    assert r["orphans_pruned"] == [stranger], r
    assert stranger not in blob_snapshot(h)


def test_truncated_pointer_table_is_written_again_by_the_next_timer_run(
    db_harness: Harness, media_roots, media_db
) -> None:
    h = db_harness
    files = build_library(media_roots, small=6, large=0)
    h.cli("migrate", "--no-progress", check=True)
    before = pointer_rows(media_db)
    assert len(before) == len(files)
    db_exec(media_db, f"TRUNCATE TABLE {TABLE}")
    h.cli("retry", check=True)
    assert pointer_rows(media_db) == before


# ---- the way back holds ----------------------------------------------------------------------------


def test_after_the_way_back_no_run_evicts_or_points_at_blob_until_migrate(
    db_harness: Harness, media_roots, media_db
) -> None:
    h = db_harness
    h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true")
    files = build_library(media_roots, small=6, large=1)
    add_assets(media_db, files)
    h.cli("upload", "--no-watch", check=True)
    assert evicted_names(files, media_roots)
    h.cli("migrate", "--to-local", "--no-progress", check=True)
    assert evicted_names(files, media_roots) == []
    # The path unit and the timer fire again (they were not stopped): nothing is evicted again.
    for _ in range(2):
        h.cli("upload", "--no-watch", check=True)
        h.cli("retry", check=True)
    assert evicted_names(files, media_roots) == []
    assert {row[0] for row in pointer_rows(media_db).values()} == {"local"}
    assert h.cli("migrate", "--to-local", "--check").returncode == 0
    assert h.cli_json("status")["local_hold"]
    # The operator goes forward again: the hold is lifted and eviction resumes.
    h.cli("migrate", "--no-progress", check=True)
    h.cli("retry", check=True)
    assert evicted_names(files, media_roots)
    assert not h.cli_json("status")["local_hold"]


def test_the_hold_survives_a_lost_state_directory(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true")
    files = build_library(media_roots, small=4, large=0)
    add_assets(media_db, files)
    h.cli("upload", "--no-watch", check=True)
    h.cli("migrate", "--to-local", "--no-progress", check=True)
    assert evicted_names(files, media_roots) == []
    # The host is rebuilt, or the state restored from before the way back: the state is gone.
    shutil.rmtree(h.state_dir)
    since = h.cli_json("status")["local_hold"]
    assert since, "the hold was lost with the state directory"
    for _ in range(2):
        h.cli("upload", "--no-watch", check=True)
        h.cli("retry", check=True)
    assert evicted_names(files, media_roots) == []
    assert {row[0] for row in pointer_rows(media_db).values()} == {"local"}
    assert h.cli_json("status")["local_hold"] == since
    # Only the forward migrate lifts it, everywhere.
    h.cli("migrate", "--no-progress", check=True)
    assert not h.cli_json("status")["local_hold"]
    assert not any(p.name == ".gighive-media-agent-local-hold" for p in h.tmp.rglob(".*"))
    h.cli("retry", check=True)
    assert evicted_names(files, media_roots)


def test_a_hold_marker_that_cannot_be_written_stops_the_way_back_before_it_changes_anything(
    db_harness: Harness, media_roots, media_db
) -> None:
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=4, large=0)
    gone = evicted_names(files, media_roots)
    pointers = pointer_rows(media_db)
    # Something in the way of the marker's temporary file (root itself ignores permissions).
    (media_roots["audio"] / ".gighive-media-agent-local-hold.tmp").mkdir()
    p = h.cli("migrate", "--to-local", "--no-progress")
    assert p.returncode == 73, (p.returncode, p.stdout, p.stderr)
    assert "cannot write the local hold's marker" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert evicted_names(files, media_roots) == gone and pointer_rows(media_db) == pointers


# ---- eviction itself ----------------------------------------------------------------------------------


def test_a_thumbnail_renamed_into_place_during_eviction_is_not_deleted(
    db_harness: Harness, media_roots, media_db, monkeypatch
) -> None:
    """GigHive rewrites a thumbnail to a temp name and renames it over the old one. If that lands
    between the agent's check and its unlink, the new bytes must survive."""
    h = db_harness
    _, sha = make_content_addressed(media_roots["video"], 5000, "mp4", seed=91)
    thumb = make_thumbnail(media_roots["video"], sha)
    old = thumb.stat().st_mtime - 3600
    os.utime(thumb, (old, old))
    new_bytes = b"\x89PNG a rewritten thumbnail"
    real_rename = os.rename
    raced = []

    def rename_with_a_race(src, dst, *a, **kw):
        if str(src) == str(thumb) and str(dst).endswith(".gighive-evict") and not raced:
            raced.append(src)
            tmp = str(src) + ".tmp-ingest"
            with open(tmp, "wb") as f:
                f.write(new_bytes)
            real_rename(tmp, src)  # GigHive's atomic rewrite lands first
        return real_rename(src, dst, *a, **kw)

    monkeypatch.setattr(os, "rename", rename_with_a_race)
    upload.run(h.config(DELETE_LOCAL_AFTER_UPLOAD="true", UPLOAD_SETTLE_SECONDS="0"), watch=False)
    monkeypatch.undo()
    assert raced, "the eviction never reached its rename"
    assert thumb.read_bytes() == new_bytes
    assert not list(thumb.parent.glob(".*gighive-evict"))
    rec = records(h)[f"video/thumbnails/{thumb.name}"]
    assert rec.state != "evicted" and rec.local_copy == 1


class Crash(BaseException):
    """A kill at this exact point: nothing after it runs, no handler catches it."""


@pytest.mark.parametrize("where", ["after_rename", "after_unlink"])
def test_an_eviction_cut_short_is_finished_by_the_next_run(db_harness, media_roots, media_db, monkeypatch, where):
    h = db_harness
    path, sha = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=92)
    data = path.read_bytes()
    old = path.stat().st_mtime - 3600
    os.utime(path, (old, old))
    name = f"audio/{path.name}"
    if where == "after_rename":
        real_unlink = os.unlink

        def cut(p, *a, **kw):
            if str(p).endswith(".gighive-evict"):
                raise Crash
            return real_unlink(p, *a, **kw)

        monkeypatch.setattr(os, "unlink", cut)
    else:
        monkeypatch.setattr(StateStore, "finish_eviction", lambda *a, **kw: (_ for _ in ()).throw(Crash()))
    with pytest.raises(Crash):
        upload.run(h.config(DELETE_LOCAL_AFTER_UPLOAD="true"), watch=False)
    monkeypatch.undo()
    assert not path.exists()
    s = StateStore.open(h.state_dir)
    assert [i["blob_name"] for i in s.intents()] == [name]
    s.close()
    retry.run(h.config(DELETE_LOCAL_AFTER_UPLOAD="true"))
    rec = records(h)[name]
    assert (rec.state, rec.local_copy) == ("evicted", 0)
    assert not list(path.parent.glob(".*gighive-evict"))
    assert blob_bytes(container(h), name) == data
    assert pointer_rows(media_db)[name][-1] == 0  # local_copy=0 in the DB too
    s = StateStore.open(h.state_dir)
    assert s.intents() == []
    s.close()


def test_an_eviction_cut_short_is_undone_when_a_witness_is_missing(db_harness, media_roots, media_db, monkeypatch):
    """Killed between the rename and the unlink, and at the next run MySQL is down: the DB
    pointer cannot vouch for the blob, so the file goes back under its name."""
    h = db_harness
    path, _ = make_content_addressed(media_roots["audio"], 3000, "mp3", seed=93)
    data = path.read_bytes()
    old = path.stat().st_mtime - 3600
    os.utime(path, (old, old))
    real_unlink = os.unlink

    def cut(p, *a, **kw):
        if str(p).endswith(".gighive-evict"):
            raise Crash
        return real_unlink(p, *a, **kw)

    monkeypatch.setattr(os, "unlink", cut)
    with pytest.raises(Crash):
        upload.run(h.config(DELETE_LOCAL_AFTER_UPLOAD="true"), watch=False)
    monkeypatch.undo()
    media_db.stop()
    try:
        retry.run(h.config(DELETE_LOCAL_AFTER_UPLOAD="true"))
    finally:
        media_db.start()
    assert path.read_bytes() == data
    assert records(h)[f"audio/{path.name}"].local_copy == 1


def test_mysql_down_means_no_eviction(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    files = build_library(media_roots, small=4, large=0)
    h.cli("migrate", "--no-progress", check=True)  # uploaded, pointers flipped, nothing evicted
    media_db.stop()
    try:
        h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true")
        h.cli("retry", check=True)
        assert evicted_names(files, media_roots) == []
    finally:
        media_db.start()
    h.cli("retry", check=True)
    assert evicted_names(files, media_roots)


def test_a_lost_commit_never_forgets_a_blob(db_harness: Harness, media_roots, media_db) -> None:
    """A power cut took the commits that said "uploaded" and "evicted" (synchronous=NORMAL lets
    the newest transactions go), but the unlink survived: the next run finds the file missing.
    Forgetting the row would leave its blob, the only copy, unclaimed by the agent."""
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=6, large=0)
    victim = evicted_media(files, media_roots)[0]
    s = StateStore.open(h.state_dir)
    s._db.execute(
        "UPDATE files SET state = 'pending', sha256 = NULL, md5 = NULL, etag = NULL, local_copy = 1, "
        "next_attempt_at = 0 WHERE blob_name = ?",
        (victim,),
    )
    s.close()
    h.cli("retry", check=True)
    rec = records(h)[victim]
    assert rec.state == "evicted" and rec.sha256 == victim.split("/")[-1].split(".")[0], rec
    db_exec(media_db, "TRUNCATE TABLE assets")
    r = h.cli_json("reconcile", "--prune-orphans", "--yes")
    assert victim not in r["orphans_pruned"]
    h.cli("migrate", "--to-local", "--no-progress", check=True)
    assert local_path(media_roots, victim).read_bytes() == files[victim]
