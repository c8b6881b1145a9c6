"""GigHive's deletes: soft delete, grace period, purge, and the mass disappearances that are not deletes.

Real files, Azurite, MariaDB with GigHive's `assets`; the agent through its CLI, as the retry timer
runs it. A delete is GigHive's admin delete: the asset row dropped and the local file unlinked.
"""

from __future__ import annotations

import pytest

from agent.pointer import TABLE
from agent.state import StateStore
from tests.integration.agent_harness import Harness
from tests.integration.test_migrate import blob_snapshot, build_library, db_harness, local_path
from tests.integration.test_safety import evicted_library, evicted_media
from tests.integration.test_verify_reconcile import add_assets, db_exec

__all__ = ["db_harness"]


def sha_of(name: str) -> str:
    return name.split("/")[-1].split(".")[0]


def gighive_delete(media_db, media_roots, name: str) -> None:
    """What GigHive's admin delete does: unlink the local file if it is there, drop the row."""
    local_path(media_roots, name).unlink(missing_ok=True)
    db_exec(media_db, "DELETE FROM assets WHERE checksum_sha256 = %s", (sha_of(name),))


def deleted_after_eviction(h: Harness, media_roots, media_db) -> tuple[dict[str, bytes], str]:
    """An evicted library the agent has looked at once, then GigHive's delete of one evicted media
    file: (the library, that file's name)."""
    files = evicted_library(h, media_roots, media_db, small=6, large=0)
    h.cli("retry", check=True)
    victim = evicted_media(files, media_roots)[0]
    gighive_delete(media_db, media_roots, victim)
    return files, victim


def expire_grace(h: Harness) -> None:
    """The grace period passes: every recorded purge time moves to the past (no waiting)."""
    s = StateStore.open(h.state_dir)
    s._db.execute("UPDATE deletions SET purge_after = 0")
    s.close()


def test_a_deleted_asset_is_soft_deleted_then_purged_after_the_grace_period(
    db_harness: Harness, media_roots, media_db
) -> None:
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=8, large=0)
    h.cli("retry", check=True)  # the agent sees `assets` whole once
    victim = evicted_media(files, media_roots)[0]
    gighive_delete(media_db, media_roots, victim)
    h.write_config(PURGE_DELETED_AFTER_DAYS="1")
    r = h.cli_json("retry")
    assert victim in r["soft_deleted"] and r["purged"] == [], r
    assert victim in blob_snapshot(h)  # soft: still in the container, restorable
    status = h.cli_json("status")
    assert status["soft_deleted_count"] >= 1
    assert h.cli_json("retry")["purged"] == []  # the day has not passed
    others = {n for n in blob_snapshot(h) if n != victim and sha_of(victim) not in n}
    expire_grace(h)  # the day passes
    r = h.cli_json("retry")
    assert victim in r["purged"], r
    assert victim not in blob_snapshot(h)
    assert others <= set(blob_snapshot(h))  # nothing else touched


def test_a_reimported_asset_cancels_its_soft_delete(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    files, victim = deleted_after_eviction(h, media_roots, media_db)
    assert victim in h.cli_json("retry")["soft_deleted"]
    add_assets(media_db, [victim])  # a re-import brings the row back
    r = h.cli_json("retry")
    assert victim in r["undeleted"], r
    assert h.cli_json("status")["soft_deleted_count"] == 0


def test_undelete_keeps_a_soft_deleted_blob(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    files, victim = deleted_after_eviction(h, media_roots, media_db)
    h.cli("retry", check=True)
    r = h.cli_json("undelete", victim)
    assert r["undeleted"] == [victim]
    expire_grace(h)
    h.cli("retry", check=True)
    assert victim in blob_snapshot(h)
    p = h.cli("undelete", "video/" + "f" * 64 + ".mp4")
    assert p.returncode == 1 and "not soft-deleted" in p.stdout


def test_mass_disappearances_are_reported_not_deleted(db_harness: Harness, media_roots, media_db) -> None:
    """TRUNCATE (clear media, imports), half the rows gone (an import refilling), MySQL down:
    nothing is soft-deleted and nothing purged; the explicit operator word turns real deletions
    into soft deletes."""
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=20, large=0)
    h.cli("retry", check=True)
    before = blob_snapshot(h)
    db_exec(media_db, "TRUNCATE TABLE assets")
    r = h.cli_json("retry")
    assert r["soft_deleted"] == [] and r["purged"] == [] and "empty" in r["assets_problem"], r
    assert "not trusted now" in h.cli("status").stdout
    add_assets(media_db, files)
    h.cli("retry", check=True)
    gone = evicted_media(files, media_roots)[: len(files) // 2]
    for name in gone:
        gighive_delete(media_db, media_roots, name)
    r = h.cli_json("retry")
    assert r["soft_deleted"] == [] and "shrank" in r["assets_problem"], r
    media_db.stop()
    try:
        r = h.cli_json("retry")
        assert r["soft_deleted"] == [] and r["purged"] == []
    finally:
        media_db.start()
    assert blob_snapshot(h) == before
    # The operator confirms: these were real deletions.
    h.cli("reconcile", "--accept-assets-shrink", check=False)
    soft = {row["blob_name"] for row in h.cli_json("status")["soft_deleted"]}
    assert set(gone) <= soft


def test_a_row_gone_while_the_file_is_still_on_disk_is_not_a_delete(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    files = build_library(media_roots, small=6, large=0)
    add_assets(media_db, files)
    h.cli("migrate", "--no-progress", check=True)  # uploaded, not evicted: every file is local
    h.cli("retry", check=True)
    local = sorted(n for n in files if n.count("/") == 1 and n.endswith((".mp4", ".mp3")))
    assert local and all(local_path(media_roots, n).exists() for n in local)
    db_exec(media_db, "DELETE FROM assets WHERE checksum_sha256 = %s", (sha_of(local[0]),))
    assert h.cli_json("retry")["soft_deleted"] == []


def test_the_way_back_does_not_bring_back_soft_deleted_assets(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    files, victim = deleted_after_eviction(h, media_roots, media_db)
    h.cli("retry", check=True)
    r = h.cli_json("migrate", "--to-local", "--no-progress")
    assert not local_path(media_roots, victim).exists()
    assert r["left_in_blob_count"] >= 1
    for name, data in files.items():
        if sha_of(victim) not in name:
            assert local_path(media_roots, name).read_bytes() == data


# ---- a table GigHive rebuilt is not a list of deletes (the seed-9000 class) ---------------------------


def refill(media_db, files, leave_out: list[str]) -> None:
    """An import: TRUNCATE `assets`, then insert the rows again from what it finds, all but these."""
    db_exec(media_db, "SET FOREIGN_KEY_CHECKS=0")
    db_exec(media_db, "TRUNCATE TABLE assets")
    add_assets(media_db, [n for n in files if n not in leave_out])


def restore_without(media_db, sha: str) -> None:
    """A restore of a dump older than one asset: both tables replaced by rows that keep their ids
    (DELETE and INSERT, as a dump does, so AUTO_INCREMENT stays where it was)."""
    conn = media_db.connect()
    try:
        with conn.cursor() as cur:
            for table in ("assets", TABLE):
                cur.execute(f"SELECT * FROM {table}")
                rows = [r for r in cur.fetchall() if not any(isinstance(v, str) and sha in v for v in r)]
                cur.execute(f"DELETE FROM {table}")
                if rows:
                    cur.executemany(f"INSERT INTO {table} VALUES ({','.join(['%s'] * len(rows[0]))})", rows)
        conn.commit()
    finally:
        conn.close()


def way_back_restores(h: Harness, media_roots, files, victim: str) -> None:
    """`--to-local` brings the file home, byte for byte, and calls local safe."""
    back = h.cli_json("migrate", "--to-local", "--no-progress")
    assert back["complete"] is True and victim not in back["left_in_blob"], back
    assert local_path(media_roots, victim).read_bytes() == files[victim]


def lost_then_restored(h: Harness, media_roots, files, victim: str) -> None:
    """Nothing soft-deleted, the asset listed as lost, and the way back brings it home."""
    r = h.cli_json("retry")
    assert r["soft_deleted"] == [], r
    status = h.cli_json("status")
    assert status["assets_lost_count"] == 1 and status["assets_lost_why"], status
    assert "not taken for deletes" in h.cli("status").stdout
    way_back_restores(h, media_roots, files, victim)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_refill_that_misses_one_evicted_file_is_not_a_delete(
    db_harness: Harness, media_roots, media_db, where
) -> None:
    """TRUNCATE and refill between two looks of the agent, one evicted file's row left out (within the
    shrink tolerance): renumbered rows, or the counter that went back, show the rebuild."""
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=8, large=0)
    h.cli("retry", check=True)  # the agent remembers the whole table, with its ids
    media = [n for n in files if n in evicted_media(files, media_roots)]  # in `assets` insertion order
    victim = {"first": media[0], "middle": media[len(media) // 2], "last": media[-1]}[where]
    refill(media_db, files, [victim])
    lost_then_restored(h, media_roots, files, victim)


def test_rows_lost_while_the_table_was_empty_stay_lost_until_the_operator_confirms(
    db_harness: Harness, media_roots, media_db
) -> None:
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=8, large=0)
    h.cli("retry", check=True)
    victim = evicted_media(files, media_roots)[1]
    db_exec(media_db, "TRUNCATE TABLE assets")
    assert "empty" in h.cli_json("retry")["assets_problem"]  # seen in the act
    add_assets(media_db, [n for n in files if n != victim])
    for _ in range(2):  # however many runs later
        r = h.cli_json("retry")
        assert r["soft_deleted"] == [] and r["assets_problem"] is None, r
    assert h.cli_json("status")["assets_lost_count"] == 1
    # A real delete after the rebuild is still GigHive's delete.
    other = next(n for n in evicted_media(files, media_roots) if n != victim)
    gighive_delete(media_db, media_roots, other)
    assert h.cli_json("retry")["soft_deleted"] == [other]
    # The operator's word makes the lost row a delete too.
    h.cli("reconcile", "--accept-assets-shrink", check=False)
    soft = {row["blob_name"] for row in h.cli_json("status")["soft_deleted"]}
    assert {victim, other} <= soft and h.cli_json("status")["assets_lost_count"] == 0


def test_a_lost_row_that_comes_back_is_wanted_again(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=6, large=0)
    h.cli("retry", check=True)
    victim = evicted_media(files, media_roots)[0]
    refill(media_db, files, [victim])
    h.cli("retry", check=True)
    assert h.cli_json("status")["assets_lost_count"] == 1
    add_assets(media_db, [victim])
    assert h.cli_json("retry")["soft_deleted"] == []
    assert h.cli_json("status")["assets_lost_count"] == 0


@pytest.mark.parametrize("first", ["retry", "to-local", "reconcile"])
def test_a_restored_older_dump_is_seen_by_the_pointer_rows_it_took(
    db_harness: Harness, media_roots, media_db, first
) -> None:
    """A dump restored as dumps are (ids kept, the counter untouched) misses the newest asset. Only the
    agent's own pointer rows, gone from the same database, tell it from a delete: the timer's run
    (pointer audit) and the way back (which runs with the units stopped and the audit on hold)."""
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=8, large=0)
    h.cli("retry", check=True)
    victim = evicted_media(files, media_roots)[-1]
    restore_without(media_db, sha_of(victim))
    if first == "retry":
        lost_then_restored(h, media_roots, files, victim)
        return
    if first == "reconcile":
        # It writes the pointer rows again, which erases the sign: it records the sign first.
        assert victim in {r["blob_name"] for r in h.cli_json("reconcile")["repairs"]}
    way_back_restores(h, media_roots, files, victim)


def test_a_soft_deleted_file_written_again_is_wanted_even_if_its_row_is_lost_again(
    db_harness: Harness, media_roots, media_db
) -> None:
    """Found by the long simulation (seed 12000): GigHive deleted an asset (soft delete recorded),
    the file was uploaded again, its new row was gone again before any run of the agent saw it
    (a TRUNCATE, a restore), and the file was evicted. The stale soft delete then left it out of
    the way back, which called local safe with the file only in Blob (and would have purged it 30
    days later)."""
    h = db_harness
    files, victim = deleted_after_eviction(h, media_roots, media_db)
    assert h.cli_json("retry")["soft_deleted"] == [victim]
    local_path(media_roots, victim).write_bytes(files[victim])  # uploaded again
    h.cli("upload", "--no-watch", check=True)
    assert victim not in {row["blob_name"] for row in h.cli_json("status")["soft_deleted"]}
    db_exec(media_db, "TRUNCATE TABLE assets")  # its new row, and every other, gone again
    h.cli("migrate", "--evict-local", "--no-progress", check=True)
    assert not local_path(media_roots, victim).exists()
    way_back_restores(h, media_roots, files, victim)


def test_a_truncate_and_one_new_file_between_two_looks_is_not_a_delete(
    db_harness: Harness, media_roots, media_db
) -> None:
    """Found by the long simulation (seed 16000): one evicted file, `TRUNCATE assets`, one new
    file, then the timer: the same row count and the same AUTO_INCREMENT as before, and no row in
    common. The new row's reused asset_id shows the reset."""
    h = db_harness
    files = evicted_library(h, media_roots, media_db, small=1, large=0)
    h.cli("retry", check=True)
    victim = evicted_media(files, media_roots)[0]
    rows = [n for n in files if n.count("/") == 1]
    db_exec(media_db, "TRUNCATE TABLE assets")
    newcomers = [n for n in build_library(media_roots, small=1, large=0, seed=77) if n.count("/") == 1]
    add_assets(media_db, newcomers[: len(rows)])  # as many rows as before, none in common
    h.cli("upload", "--no-watch", check=True)
    lost_then_restored(h, media_roots, files, victim)
