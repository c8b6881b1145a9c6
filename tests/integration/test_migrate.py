"""`gighive-media migrate` against Azurite, MariaDB and a real library on disk.

The library mixes small files (one Put Blob), multi-block files (256 KiB blocks), thumbnails
and a file that is not content-addressed, because each takes a different path through the
transfer and through eviction.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from agent.pointer import TABLE
from agent.safety import HOLD_MARKER
from tests.integration.agent_harness import Harness, blob_bytes, container_client
from tests.support.media import make_content_addressed, make_thumbnail


@pytest.fixture
def db_harness(harness: Harness, tmp_path: Path, media_db) -> Harness:
    harness.settings.update(
        MYSQL_HOST=media_db.host,
        MYSQL_PORT=str(media_db.port),
        MYSQL_DATABASE=media_db.database,
        MYSQL_USER=media_db.user,
        MYSQL_PASSWORD_FILE=str(media_db.password_file(tmp_path / "mysql-password")),
        MYSQL_CONNECT_TIMEOUT="2",
    )
    harness.write_config()
    harness.cli("db-migrate", check=True)
    return harness


def build_library(
    roots: dict[str, Path], small: int = 12, large: int = 3, seed: int = 1, large_kib: tuple[int, int] = (600, 1400)
) -> dict[str, bytes]:
    """blob name -> bytes of every file written."""
    files: dict[str, bytes] = {}
    rng = random.Random(seed)
    for i in range(small):
        root = "audio" if i % 3 == 0 else "video"
        path, sha = make_content_addressed(
            roots[root], rng.randint(1, 64 * 1024), "mp3" if root == "audio" else "mp4", seed * 1000 + i
        )
        files[f"{root}/{path.name}"] = path.read_bytes()
        if root == "video" and i % 4 == 1:
            thumb = make_thumbnail(roots["video"], sha)
            files[f"video/thumbnails/{thumb.name}"] = thumb.read_bytes()
    for i in range(large):
        path, _ = make_content_addressed(
            roots["video"], rng.randint(large_kib[0] * 1024, large_kib[1] * 1024), "mp4", seed * 1000 + 500 + i
        )
        files[f"video/{path.name}"] = path.read_bytes()
    notes = roots["audio"] / "README.txt"
    notes.write_bytes(b"not content-addressed\n")
    files["audio/README.txt"] = notes.read_bytes()
    old = time.time() - 3600
    for name in files:
        os.utime(local_path(roots, name), (old, old))
    return files


def local_path(roots: dict[str, Path], blob_name: str) -> Path:
    root, rel = blob_name.split("/", 1)
    return roots[root] / rel


def disk_snapshot(roots: dict[str, Path]) -> dict[str, tuple]:
    """Every entry under the media roots with what a write would change."""
    out = {}
    for root in ("audio", "video"):
        for dirpath, dirnames, filenames in os.walk(roots[root]):
            for n in dirnames + filenames:
                p = Path(dirpath) / n
                st = p.lstat()
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
                out[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns, st.st_ino, digest)
    return out


def content_tree(roots: dict[str, Path]) -> dict[str, tuple[str, int]]:
    """relative path -> (sha256, mtime_ns) of every file: what "byte-identical library" means."""
    out = {}
    for root in ("audio", "video"):
        for p in roots[root].rglob("*"):
            # The way back's hold marker is the agent's, not the library's (agent.safety.hold_markers).
            if p.is_file() and p.name != HOLD_MARKER:
                out[f"{root}/{p.relative_to(roots[root]).as_posix()}"] = (
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                    p.stat().st_mtime_ns,
                )
    return out


def blob_snapshot(h: Harness) -> dict[str, str]:
    c = container_client(h.settings["AZURE_STORAGE_CONNECTION_STRING"], h.settings["AZURE_STORAGE_CONTAINER_NAME"])
    return {b.name: b.etag for b in c.list_blobs()}


def state_rows(h: Harness) -> list[tuple]:
    path = h.state_dir / "state.sqlite3"
    if not path.exists():
        return []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT * FROM files ORDER BY blob_name").fetchall()
    finally:
        conn.close()


def pointer_rows(db) -> dict[str, tuple]:
    conn = db.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT media_path, provider, etag, size_bytes, content_sha256, local_copy FROM {TABLE}")
            return {r[0]: r[1:] for r in cur.fetchall()}
    finally:
        conn.close()


def assert_blobs_equal_library(h: Harness, files: dict[str, bytes]) -> None:
    c = container_client(h.settings["AZURE_STORAGE_CONNECTION_STRING"], h.settings["AZURE_STORAGE_CONTAINER_NAME"])
    names = {b.name for b in c.list_blobs()}
    assert names == set(files), f"extra: {names - set(files)}, missing: {set(files) - names}"
    for name, data in files.items():
        assert blob_bytes(c, name) == data, name


# ---- dry run ---------------------------------------------------------------------------------


def test_dry_run_reports_the_plan_and_changes_nothing(db_harness: Harness, media_roots, media_db) -> None:
    h = db_harness
    files = build_library(media_roots)
    h.cli("migrate", "--root", "audio", "--no-progress", check=True)
    audio = [n for n in files if n.startswith("audio/")]
    video = [n for n in files if n.startswith("video/")]

    before = (disk_snapshot(media_roots), blob_snapshot(h), pointer_rows(media_db), state_rows(h))
    plan = h.cli_json("migrate", "--dry-run", "--bwlimit", "1M")
    after = (disk_snapshot(media_roots), blob_snapshot(h), pointer_rows(media_db), state_rows(h))
    assert before == after

    assert plan["dry_run"] is True
    assert plan["roots"]["audio"]["in_blob_verified"] == len(audio)
    assert plan["roots"]["video"]["to_upload"] == len(video)
    assert plan["total"]["files"] == len(files)
    video_bytes = sum(len(files[n]) for n in video)
    assert plan["roots"]["video"]["to_upload_bytes"] == video_bytes
    assert plan["bytes_to_send"] == video_bytes
    assert plan["estimated_seconds"] == pytest.approx(video_bytes / (1024 * 1024), abs=0.1)

    text = h.cli("migrate", "--dry-run", check=True).stdout
    assert "dry run: nothing was changed" in text and "at the bandwidth limit" not in text


def test_dry_run_with_no_state_sees_what_another_host_uploaded(harness: Harness, media_roots, tmp_path) -> None:
    files = build_library(media_roots)
    harness.cli("migrate", "--no-progress", check=True)
    harness.write_config(GIGHIVE_MEDIA_STATE_DIR=str(tmp_path / "fresh-state"))
    plan = harness.cli_json("migrate", "--dry-run")
    assert plan["total"]["in_blob_to_check"] == len(files)
    assert plan["bytes_to_send"] == 0
    assert not (tmp_path / "fresh-state" / "state.sqlite3").exists()


def test_dry_run_trusts_the_state_and_looks_up_only_what_it_cannot_know(harness: Harness, media_roots) -> None:
    files = build_library(media_roots)
    harness.cli("migrate", "--no-progress", check=True)
    new, _ = make_content_addressed(media_roots["audio"], 5000, "mp3", 424242)
    old = time.time() - 3600
    os.utime(new, (old, old))
    plan = harness.cli_json("migrate", "--dry-run")
    # Every file the agent uploaded and verified, unchanged on disk, is vouched for by its state
    # (after a sample of them matched the container); only the new one is looked up, by a HEAD.
    assert plan["vouched_by_state"] == len(files) and plan["state_doubt"] is None, plan
    assert (plan["looked_up"], plan["lookup"], plan["blobs_listed"]) == (1, "properties", 0), plan
    assert plan["total"]["in_blob_verified"] == len(files)
    assert (plan["total"]["to_upload"], plan["bytes_to_send"]) == (1, 5000)

    # A file rewritten in place is no longer vouched for: it is looked up and found to differ.
    rewritten = next(n for n in files if n.startswith("video/") and "/thumbnails/" not in n)
    local_path(media_roots, rewritten).write_bytes(b"changed")
    plan = harness.cli_json("migrate", "--dry-run")
    assert plan["vouched_by_state"] == len(files) - 1 and plan["looked_up"] == 2, plan
    assert plan["total"]["in_blob_differs"] == 1 and plan["total"]["to_upload"] == 1, plan


def test_dry_run_does_not_trust_a_state_the_container_contradicts(harness: Harness, media_roots) -> None:
    files = build_library(media_roots)
    harness.cli("migrate", "--no-progress", check=True)
    # The container was emptied behind the agent's back (or the config now names another one):
    # the state's records no longer say what is in Blob, and the sample shows it.
    c = container_client(
        harness.settings["AZURE_STORAGE_CONNECTION_STRING"], harness.settings["AZURE_STORAGE_CONTAINER_NAME"]
    )
    for b in list(c.list_blobs()):
        c.delete_blob(b.name)
    plan = harness.cli_json("migrate", "--dry-run")
    assert plan["state_doubt"] and plan["vouched_by_state"] == 0, plan
    assert plan["looked_up"] == len(files)
    assert plan["total"]["to_upload"] == len(files) and plan["total"]["in_blob_verified"] == 0, plan
    assert plan["bytes_to_send"] == sum(len(b) for b in files.values())


def test_dry_run_lists_the_container_when_many_files_are_unknown(
    harness: Harness, media_roots, tmp_path, monkeypatch
) -> None:
    """Past _PROBE_AT_MOST files no record vouches for, one listing replaces a HEAD each (here the
    threshold is lowered so a small library takes that path, as a lost state of 100,000 files does)."""
    from agent.actions import migrate

    files = build_library(media_roots)
    harness.cli("migrate", "--no-progress", check=True)
    monkeypatch.setattr(migrate, "_PROBE_AT_MOST", 2)
    config = harness.config(GIGHIVE_MEDIA_STATE_DIR=str(tmp_path / "lost-state"))
    plan = migrate.plan(config, config.roots, migrate.Options(dry_run=True))
    assert (plan["lookup"], plan["vouched_by_state"], plan["blobs_listed"]) == ("listing", 0, len(files)), plan
    assert plan["total"]["in_blob_to_check"] == len(files) and plan["bytes_to_send"] == 0, plan


# ---- the move --------------------------------------------------------------------------------


def test_migrate_uploads_flips_pointers_and_a_rerun_sends_nothing(
    db_harness: Harness, media_roots, media_db, tmp_path
) -> None:
    h = db_harness
    files = build_library(media_roots)
    first = h.cli_json("migrate")
    assert first["uploaded"] == len(files) and first["complete"] is True, first
    assert first["bytes"] == sum(len(b) for b in files.values())
    assert_blobs_equal_library(h, files)
    ptr = pointer_rows(media_db)
    assert set(ptr) == set(files) and all(r[0] == "azure_blob" and r[4] == 1 for r in ptr.values())

    again = h.cli_json("migrate")
    assert (again["uploaded"], again["skipped"], again["bytes"]) == (0, len(files), 0)

    # The state is lost (a rebuilt VM): the files are hashed and compared with the listing, not sent.
    etags = blob_snapshot(h)
    h.write_config(GIGHIVE_MEDIA_STATE_DIR=str(tmp_path / "new-state"))
    rebuilt = h.cli_json("migrate")
    assert (rebuilt["uploaded"], rebuilt["already_in_blob"], rebuilt["bytes"]) == (0, len(files), 0), rebuilt
    assert blob_snapshot(h) == etags


def test_a_migration_with_many_unverified_files_lists_once_and_sends_none_already_there(
    harness: Harness, media_roots, tmp_path, monkeypatch
) -> None:
    """Past _PROBE_AT_MOST files the state has not verified, migrate lists the container once and
    keeps what it says of those files: a file already there is hashed and compared, not sent,
    without even a conditional Put Blob (here the threshold is lowered so a small library takes
    that path, as a lost state of 100,000 files does). Files the state verified are not listed."""
    from agent.actions import migrate
    from agent.storage.azure_blob import AzureBlobStore

    files = build_library(media_roots)
    harness.cli("migrate", "--no-progress", check=True)
    etags = blob_snapshot(harness)
    monkeypatch.setattr(migrate, "_PROBE_AT_MOST", 2)
    calls: dict[str, list] = {"put": [], "list": []}
    real_put, real_list = AzureBlobStore.put, AzureBlobStore.list_entries

    def put(self, name, *args, **kwargs):
        calls["put"].append(name)
        return real_put(self, name, *args, **kwargs)

    def list_entries(self, prefix="", *args, **kwargs):
        calls["list"].append(prefix)
        return real_list(self, prefix, *args, **kwargs)

    monkeypatch.setattr(AzureBlobStore, "put", put)
    monkeypatch.setattr(AzureBlobStore, "list_entries", list_entries)

    config = harness.config(GIGHIVE_MEDIA_STATE_DIR=str(tmp_path / "lost-state"))
    result, code = migrate.migrate(config, config.roots, migrate.Options(interactive=False))
    assert code == 0 and (result["uploaded"], result["already_in_blob"]) == (0, len(files)), result
    assert calls["list"] and calls["put"] == [], calls
    assert blob_snapshot(harness) == etags

    # Now the state verified every file: a run with nothing to do asks the container nothing.
    calls["list"].clear()
    result, code = migrate.migrate(config, config.roots, migrate.Options(interactive=False))
    assert code == 0 and result["unchanged_since_earlier_run"] == len(files), result
    assert calls == {"put": [], "list": []}, calls


def test_root_and_limit_bound_the_run(harness: Harness, media_roots) -> None:
    files = build_library(media_roots)
    audio = [n for n in files if n.startswith("audio/")]
    r = harness.cli_json("migrate", "--root", "audio", "--limit", "2", "--concurrency", "1")
    assert r["uploaded"] == 2 and r["remaining"] == len(audio) - 2 and r["complete"] is False
    assert set(blob_snapshot(harness)) <= set(audio)
    r = harness.cli_json("migrate", "--root", "audio")
    assert r["uploaded"] == len(audio) - 2 and r["complete"] is True


def test_bad_options_are_refused_with_a_reason(harness: Harness) -> None:
    p = harness.cli("migrate", "--root", "podcasts")
    assert p.returncode == 2 and "--root podcasts: not a configured media root (configured: audio, video)" in p.stderr
    p = harness.cli("migrate", "--bwlimit", "fast")
    assert p.returncode == 2 and "'fast' is not a size" in p.stderr
    p = harness.cli("migrate", "--concurrency", "0")
    assert p.returncode == 2 and "must be at least 1" in p.stderr
    p = harness.cli("migrate", "--to-local", "--evict-local")
    assert p.returncode == 2 and "contradict" in p.stderr


def test_a_corrupted_local_file_is_quarantined_and_not_uploaded(harness: Harness, media_roots) -> None:
    files = build_library(media_roots, small=4, large=0)
    bad_name = next(n for n in files if n.startswith("video/") and "thumbnails" not in n)
    path = local_path(media_roots, bad_name)
    path.write_bytes(b"bit rot" + path.read_bytes()[7:])
    r = harness.cli_json("migrate")
    assert r["quarantined"] == 1 and r["complete"] is False
    assert bad_name not in blob_snapshot(harness)
    assert path.exists()
    assert harness.cli("migrate").returncode == 1


def test_evict_local_then_to_local_gives_back_a_byte_identical_library(
    db_harness: Harness, media_roots, media_db
) -> None:
    h = db_harness
    files = build_library(media_roots)
    original = content_tree(media_roots)
    # audio/README.txt is not a URL the site serves, so it is uploaded but never evicted.
    kept = {"audio/README.txt"}
    evictable = [n for n in files if n not in kept]
    r = h.cli_json("migrate", "--evict-local")
    assert r["evicted"] == len(evictable) and r["complete"], r
    assert set(content_tree(media_roots)) == kept
    ptr = pointer_rows(media_db)
    assert all(v[0] == "azure_blob" and v[4] == (1 if n in kept else 0) for n, v in ptr.items())
    assert h.cli_json("status")["counts"]["evicted"] == len(evictable)

    plan = h.cli_json("migrate", "--to-local", "--dry-run")
    assert plan["evicted"] == len(evictable) and plan["bytes"] == sum(len(files[n]) for n in evictable)
    assert set(content_tree(media_roots)) == kept

    back = h.cli_json("migrate", "--to-local")
    assert back["complete"] is True and back["restored"] == len(evictable), back
    assert content_tree(media_roots) == original
    for name in files:
        assert oct(local_path(media_roots, name).stat().st_mode & 0o777) == oct(0o644)
    assert all(v[0] == "local" and v[4] == 1 for v in pointer_rows(media_db).values())
    assert h.cli_json("status")["counts"]["evicted"] == 0
    # Nothing left to do: a second run restores nothing and still says complete.
    again = h.cli_json("migrate", "--to-local")
    assert again["complete"] is True and again["restored"] == 0


def test_to_local_refuses_a_blob_that_is_not_the_recorded_file(harness: Harness, media_roots) -> None:
    files = build_library(media_roots, small=3, large=0)
    harness.cli("migrate", "--evict-local", check=True)
    victim = sorted(n for n in files if n != "audio/README.txt")[0]
    c = container_client(
        harness.settings["AZURE_STORAGE_CONNECTION_STRING"], harness.settings["AZURE_STORAGE_CONTAINER_NAME"]
    )
    c.get_blob_client(victim).upload_blob(b"something else", overwrite=True)
    r = harness.cli_json("migrate", "--to-local")
    assert r["complete"] is False and r["failed"] == 1
    assert r["errors"][0]["blob_name"] == victim and "is not the recorded file" in r["errors"][0]["error"]
    assert not local_path(media_roots, victim).exists()
    assert harness.cli_json("status")["counts"]["evicted"] == 1  # still tracked: Blob is its only copy
    leftovers = [p for p in media_roots["root"].rglob(".*") if p.name != HOLD_MARKER]  # the hold is meant to stay
    assert not leftovers, leftovers


def test_kill_at_random_points_always_resumes_to_the_exact_library(db_harness: Harness, media_roots, media_db) -> None:
    """20 interruptions (SIGKILL, and SIGINT as a Ctrl-C) at seeded random points, then one run
    to the end: the container must hold exactly the library, byte for byte.

    The points are states, not delays, so a loaded machine moves them nowhere: at once (start-up),
    once this run is uploading a file, and right after it finished one (commit, state write,
    pointer flip). Whenever little is left to
    send, a new video joins the library, so every run has seconds of rate-limited work ahead and
    each kill lands mid-run."""
    h = db_harness
    seed = 20261125
    rng = random.Random(seed)
    files = build_library(media_roots, small=24, large=6, seed=7, large_kib=(1024, 2048))
    hang_guard = 120  # seconds; a SIGINT stops the run in about one (bench/interrupt_bench.py)
    kills = 0
    mid_run = 0  # kills that landed while files were still to do
    for round_ in range(20):
        rows = state_rows(h)
        uploaded = {row[0] for row in rows if row[8] == "uploaded"}
        # At 128 KiB/s, 2 MiB still to send is 16 s of work: more than any wait below needs.
        if sum(len(data) for name, data in files.items() if name not in uploaded) < 2 * 1024 * 1024:
            path, _ = make_content_addressed(media_roots["video"], 1536 * 1024 + round_, "mp4", seed=9000 + round_)
            old = time.time() - 3600
            os.utime(path, (old, old))
            files[f"video/{path.name}"] = path.read_bytes()
        point = rng.choice(("start", "uploading", "uploading", "finished"))
        sig = signal.SIGINT if rng.random() < 0.25 else signal.SIGKILL
        since = time.time()
        proc = h.spawn("migrate", "--bwlimit", "128K", "--concurrency", "3", "--no-progress")
        reached = _wait_for_point(h, proc, point, since, hang_guard)
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=hang_guard)
        except Exception:
            proc.kill()
            raise
        kills += 1
        if sig == signal.SIGINT and reached:
            # Before its handler is installed (interpreter start-up) a SIGINT kills Python outright.
            allowed = (130, -signal.SIGINT) if point == "start" else (130,)
            assert proc.returncode in allowed, f"exit {proc.returncode} after SIGINT at {point}\n{err[-3000:]}"
        done = sum(1 for row in state_rows(h) if row[8] == "uploaded")
        mid_run += reached and done < len(files)
        print(f"kill {kills}: {sig.name} at {point}, {done}/{len(files)} uploaded")
        # Whatever the moment, no local file is ever lost.
        assert all(local_path(media_roots, n).exists() for n in files)
    assert kills == 20
    assert mid_run >= 10, f"only {mid_run} of 20 kills interrupted a migration in progress"
    final = h.cli_json("migrate", timeout=300)
    assert final["complete"] is True, final
    assert_blobs_equal_library(h, files)
    counts = h.cli_json("status")["counts"]
    assert counts["uploaded"] == len(files) and sum(counts.values()) == len(files), counts
    ptr = pointer_rows(media_db)
    for name, data in files.items():
        provider, _etag, size, sha, local_copy = ptr[name]
        assert (provider, size, sha, local_copy) == ("azure_blob", len(data), hashlib.sha256(data).hexdigest(), 1)


def _wait_for_point(h: Harness, proc, point: str, since: float, guard: float) -> bool:
    """Wait until this run (rows it wrote after `since`) is at `point`; False if it exited first.

    Only this run's writes count: a row a killed run left `uploading` says nothing about the next."""
    deadline = time.monotonic() + guard
    wanted = {"uploading": "uploading", "finished": "uploaded"}.get(point)
    while wanted is not None:
        rows = state_rows_or_none(h) or []
        # row[8] is the state, row[-1] updated_at (the agent's time.time()).
        if any(row[8] == wanted and row[-1] >= since for row in rows):
            return True
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, f"the run never reached {point!r} in {guard} s"
        time.sleep(0.01)
    return True


def state_rows_or_none(h: Harness) -> list[tuple] | None:
    """state_rows, or None while the agent holds the database in a way a reader cannot open yet."""
    try:
        return state_rows(h)
    except sqlite3.OperationalError:
        return None


# ---- progress ----------------------------------------------------------------------------------


def test_migrate_on_a_terminal_draws_a_bar_with_files_bytes_rate_and_eta(harness: Harness, media_roots) -> None:
    """Run under a real pseudo-terminal, as an operator over SSH would."""
    import fcntl
    import pty
    import struct
    import subprocess
    import sys
    import termios

    files = build_library(media_roots, small=6, large=2)
    primary, secondary = pty.openpty()
    # A fresh pty is 0x0; a real terminal has a size, and the bar is drawn to fit it.
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
    env.pop("JOURNAL_STREAM", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "--config", str(harness.config_path), "migrate", "--bwlimit", "1M"],
        stdin=secondary,
        stdout=secondary,
        stderr=secondary,
        env=env,
    )
    os.close(secondary)
    out = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    assert proc.wait(timeout=120) == 0
    os.close(primary)
    text = out.decode(errors="replace")
    assert f"{len(files)}/{len(files)} files" in text
    assert "migrate:" in text and "B/s" in text and "<" in text  # tqdm's "elapsed<remaining" ETA
    assert f"uploaded {len(files)}, skipped 0" in text


def test_migrate_under_systemd_sends_status_and_journal_progress_lines(harness: Harness, media_roots, tmp_path) -> None:
    import socket

    files = build_library(media_roots, small=6, large=2)
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.5)
    try:
        # Not a terminal (as under systemd): STATUS datagrams, and a journal line per interval.
        proc = harness.cli(
            "migrate", "--bwlimit", "1M", env={"NOTIFY_SOCKET": path, "GIGHIVE_MEDIA_PROGRESS_INTERVAL": "0.5"}
        )
        messages = []
        while True:
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr
    assert messages[0].startswith("READY=1")
    statuses = [m for m in messages if m.startswith("STATUS=migrate:")]
    assert statuses and statuses[-1].startswith(f"STATUS=migrate: {len(files)}/{len(files)} files")
    progress_lines = [line for line in proc.stderr.splitlines() if " migrate: " in line and "ETA" in line]
    assert progress_lines, proc.stderr
    assert "\r" not in proc.stderr  # no bar drawn into the journal


def test_evict_local_under_one_root_leaves_the_other_root_alone(harness: Harness, media_roots) -> None:
    files = build_library(media_roots, small=6, large=0)
    harness.cli("migrate", check=True)
    r = harness.cli_json("migrate", "--root", "audio", "--evict-local")
    audio = [n for n in files if n.startswith("audio/") and n != "audio/README.txt"]
    assert r["evicted"] == len(audio), r
    assert all(local_path(media_roots, n).exists() for n in files if n.startswith("video/"))
    assert local_path(media_roots, "audio/README.txt").exists()  # not a URL the site serves: kept
