"""The upload path end to end against a real Azurite, real files and (where named) a real MariaDB."""

from __future__ import annotations

import hashlib
import os
import time

from agent.actions import retry, upload
from agent.state import StateStore
from agent.watch import RootWatcher
from tests.integration.agent_harness import (
    Harness,
    blob_bytes,
    blob_names,
    container_client,
)
from tests.support.media import make_content_addressed, make_thumbnail, pseudo_random_bytes


def library(roots, large: int = 1_300_000):
    """Two audio files, one multi-block video and its thumbnail."""
    a1, s1 = make_content_addressed(roots["audio"], 5_000, "mp3", seed=1)
    a2, s2 = make_content_addressed(roots["audio"], 300_000, "m4a", seed=2)
    v, sv = make_content_addressed(roots["video"], large, "mp4", seed=3)
    t = make_thumbnail(roots["video"], sv)
    return {
        f"audio/{s1}.mp3": a1,
        f"audio/{s2}.m4a": a2,
        f"video/{sv}.mp4": v,
        f"video/thumbnails/{sv}.png": t,
    }


def states(h: Harness) -> dict[str, str]:
    s = StateStore.open(h.state_dir)
    try:
        return {
            r.blob_name: r.state
            for r in s.in_state(*(["pending", "uploading", "uploaded", "failed", "dead", "quarantined", "evicted"]))
        }
    finally:
        s.close()


def test_uploads_every_file_verified_and_byte_identical(harness, blob_container, media_roots):
    files = library(media_roots)
    result = upload.run(harness.config(), watch=False)
    assert result["uploaded"] == 4
    assert result["failed"] == 0 and result["quarantined"] == 0
    assert blob_names(blob_container) == set(files)
    for name, path in files.items():
        data = path.read_bytes()
        assert blob_bytes(blob_container, name) == data
        props = blob_container.get_blob_client(name).get_blob_properties()
        assert bytes(props.content_settings.content_md5) == hashlib.md5(data).digest()  # noqa: S324
        assert props.metadata["sha256"] == hashlib.sha256(data).hexdigest()
    ctypes = {n: blob_container.get_blob_client(n).get_blob_properties().content_settings.content_type for n in files}
    assert sorted(ctypes.values()) == ["audio/mp4", "audio/mpeg", "image/png", "video/mp4"]
    assert set(states(harness).values()) == {"uploaded"}
    # Nothing local was touched: delete-after-upload is off by default.
    assert all(p.exists() for p in files.values())


def test_multi_block_upload_uses_deterministic_blocks(harness, blob_container, media_roots):
    path, sha = make_content_addressed(media_roots["video"], 1_000_000, "mp4", seed=9)
    upload.run(harness.config(), watch=False)
    committed, _ = blob_container.get_blob_client(f"video/{sha}.mp4").get_block_list("committed")
    # 256 KiB blocks: four blocks, ids = index + MD5 of the block's bytes.
    assert len(committed) == 4
    data = path.read_bytes()
    for i, block in enumerate(committed):
        chunk = data[i * 262144 : (i + 1) * 262144]
        assert block.id == f"{i:06d}-{hashlib.md5(chunk).hexdigest()}"  # noqa: S324


def test_second_run_uploads_nothing(harness, blob_container, media_roots):
    library(media_roots)
    upload.run(harness.config(), watch=False)
    etags = {b.name: b.etag for b in blob_container.list_blobs()}
    again = upload.run(harness.config(), watch=False)
    assert again["uploaded"] == 0 and again["scan"]["new"] == 0
    assert {b.name: b.etag for b in blob_container.list_blobs()} == etags


def test_content_already_in_blob_is_not_uploaded_again(harness, blob_container, media_roots):
    """Lost state (new host, wiped state dir): the blobs are recognised by size and sha256."""
    library(media_roots)
    upload.run(harness.config(), watch=False)
    etags = {b.name: b.etag for b in blob_container.list_blobs()}
    for p in harness.state_dir.iterdir():
        p.unlink()
    result = upload.run(harness.config(), watch=False)
    assert result["uploaded"] == 0
    assert result["already_present"] == 4
    assert {b.name: b.etag for b in blob_container.list_blobs()} == etags


def test_stale_blob_with_other_content_is_replaced(harness, blob_container, media_roots):
    t = make_thumbnail(media_roots["video"], "c" * 64)
    blob_container.upload_blob(f"video/thumbnails/{'c' * 64}.png", b"old thumbnail")
    result = upload.run(harness.config(), watch=False)
    assert result["uploaded"] == 1
    assert blob_bytes(blob_container, f"video/thumbnails/{'c' * 64}.png") == t.read_bytes()


def test_file_whose_hash_differs_from_its_name_is_quarantined(harness, blob_container, media_roots):
    good, _ = make_content_addressed(media_roots["audio"], 10_000, "mp3", seed=4)
    bad = media_roots["audio"] / f"{'d' * 64}.mp3"
    bad.write_bytes(b"these bytes do not hash to dddd...")
    big_bad = media_roots["video"] / f"{'e' * 64}.mp4"
    big_bad.write_bytes(os.urandom(700_000))
    before = {p: p.read_bytes() for p in (bad, big_bad)}
    result = upload.run(harness.config(), watch=False)
    assert result["quarantined"] == 2
    assert result["uploaded"] == 1
    names = blob_names(blob_container)
    assert f"audio/{'d' * 64}.mp3" not in names
    assert f"video/{'e' * 64}.mp4" not in names
    # Never "fixed": the corrupt files are left exactly as they were.
    assert {p: p.read_bytes() for p in before} == before
    status = harness.cli_json("status")
    attention = {i["blob_name"]: i for i in status["attention"]}
    assert attention[f"audio/{'d' * 64}.mp3"]["state"] == "quarantined"
    assert "local corruption" in attention[f"audio/{'d' * 64}.mp3"]["last_error"]


def test_symlinks_fifos_hidden_and_temporary_files_are_not_uploaded(harness, blob_container, media_roots, tmp_path):
    secret = tmp_path / "outside.txt"
    secret.write_text("not media")
    (media_roots["audio"] / f"{'f' * 64}.mp3").symlink_to(secret)
    os.mkfifo(media_roots["audio"] / "pipe.mp3")
    (media_roots["audio"] / ".hidden.mp3").write_bytes(b"x")
    (media_roots["video"] / "upload.mp4.part").write_bytes(b"x")
    (media_roots["video"] / ".git").mkdir()
    (media_roots["video"] / ".git" / "x.mp4").write_bytes(b"x")
    ok, sha = make_content_addressed(media_roots["audio"], 1000, "mp3", seed=5)
    result = upload.run(harness.config(), watch=False)
    assert blob_names(blob_container) == {f"audio/{sha}.mp3"}
    skipped = {os.path.basename(s["path"]): s["reason"] for s in result["scan"]["skipped"]}
    assert "symbolic link" in skipped[f"{'f' * 64}.mp3"]
    assert "FIFO" in skipped["pipe.mp3"]
    assert set(states(harness)) == {f"audio/{sha}.mp3"}


def test_file_changing_during_upload_is_not_committed_and_is_retried(harness, blob_container, media_roots, monkeypatch):
    """A writer appends while the agent reads: nothing is committed, the file is deferred, then
    uploaded whole once it is stable."""
    thumb = media_roots["video"] / "thumbnails" / f"{'1' * 64}.png"
    thumb.write_bytes(os.urandom(900_000))
    cfg = harness.config()
    from agent.storage.azure_blob import AzureBlobStore

    original = AzureBlobStore.stage_block
    calls = []

    def stage_and_grow(self, name, block_id, data, md5):
        calls.append(block_id)
        if len(calls) == 1:
            with open(thumb, "ab") as f:  # a real concurrent append to the real file
                f.write(b"more bytes arriving")
        return original(self, name, block_id, data, md5)

    monkeypatch.setattr(AzureBlobStore, "stage_block", stage_and_grow)
    first = upload.run(cfg, watch=False)
    monkeypatch.undo()
    assert first["deferred"] == 1 and first["uploaded"] == 0
    assert blob_names(blob_container) == set()
    second = upload.run(cfg, watch=False)
    assert second["uploaded"] == 1
    assert blob_bytes(blob_container, f"video/thumbnails/{'1' * 64}.png") == thumb.read_bytes()


def test_restarted_upload_reuses_staged_blocks(harness, blob_container, media_roots, monkeypatch):
    path, sha = make_content_addressed(media_roots["video"], 2_000_000, "mp4", seed=6)
    cfg = harness.config(UPLOAD_BLOCK_CONCURRENCY="1")
    from agent.storage.azure_blob import AzureBlobStore

    original = AzureBlobStore.stage_block
    sent = []

    def stage_then_fail(self, name, block_id, data, md5):
        if len(sent) == 3:
            raise ConnectionResetError("link dropped")
        sent.append(block_id)
        return original(self, name, block_id, data, md5)

    monkeypatch.setattr(AzureBlobStore, "stage_block", stage_then_fail)
    first = upload.run(cfg, watch=False)
    monkeypatch.undo()
    assert first["failed"] == 1
    assert blob_names(blob_container) == set()  # uncommitted blocks are invisible
    second = retry.run(cfg)
    assert second["uploaded"] == 1
    assert second["blocks_reused"] == 3
    assert blob_bytes(blob_container, f"video/{sha}.mp4") == path.read_bytes()


def test_azurite_down_during_upload_keeps_the_file_and_retry_uploads_it(private_harness, media_roots, monkeypatch):
    h, az = private_harness
    cfg = h.config()
    path, sha = make_content_addressed(media_roots["video"], 1_500_000, "mp4", seed=7)
    from agent.storage.azure_blob import AzureBlobStore

    original = AzureBlobStore.stage_block
    killed = []

    def stage_and_kill(self, name, block_id, data, md5):
        if not killed:
            killed.append(True)
            az.kill()  # the service dies mid-upload, SIGKILL
        return original(self, name, block_id, data, md5)

    monkeypatch.setattr(AzureBlobStore, "stage_block", stage_and_kill)
    first = upload.run(cfg, watch=False)
    monkeypatch.undo()
    # An outage is not the file's failure: it waits, queued, with its attempts untouched.
    assert (first["failed"], first["dead"], first["held_back"]) == (0, 0, 1)
    assert first["outage"] and "unreachable" in first["outage"]
    assert path.exists()
    status = h.cli_json("status")
    assert status["counts"]["pending"] == 1 and status["counts"]["failed"] == 0
    assert "unreachable" in status["outage"]["last_error"]
    assert "OUTAGE: Azure Blob unusable since" in h.cli("status").stdout
    (rec,) = [r for r in _records(h) if r.blob_name == f"video/{sha}.mp4"]
    assert rec.attempts == 0
    az.start()
    # Azure keeps its containers through an outage; Azurite loses unflushed metadata on SIGKILL.
    if not container_client(az.connection_string, "media").exists():
        container_client(az.connection_string, "media").create_container()
    second = retry.run(cfg)
    assert second["uploaded"] == 1
    assert blob_bytes(container_client(az.connection_string, "media"), f"video/{sha}.mp4") == path.read_bytes()
    assert h.cli_json("status")["outage"] is None  # a success ends the outage


def test_an_outage_of_many_runs_never_makes_a_file_dead(private_harness, media_roots):
    """A weekend VPN outage: every timer run finds Azure unreachable. The queue backs off, no
    file is charged an attempt, and once the link is back everything uploads."""
    h, az = private_harness
    h.write_config(RETRY_MAX_ATTEMPTS="2")
    files = [make_content_addressed(media_roots["audio"], 1000 + i, "mp3", seed=80 + i)[0] for i in range(3)]
    az.stop()
    assert h.cli("upload", "--no-watch").returncode == 0
    for _ in range(4):
        assert h.cli("retry").returncode == 0
    status = h.cli_json("status")
    assert status["counts"]["dead"] == 0 and status["counts"]["pending"] == 3, status["counts"]
    assert status["outage"]["runs"] >= 2
    assert {r.attempts for r in _records(h)} == {0}
    assert h.cli("status").returncode == 0  # an outage is not an item needing attention
    az.start()
    # Azure keeps its containers through an outage; a stopped Azurite may lose unflushed metadata.
    if not container_client(az.connection_string, "media").exists():
        container_client(az.connection_string, "media").create_container()
    out = h.cli_json("migrate", "--no-progress")
    assert out["uploaded"] == 3, out
    assert all(p.exists() for p in files)


def test_repeated_failures_go_dead_and_requeue_brings_them_back(private_harness, media_roots):
    """A failure that belongs to the file (its blob is leased by someone else, 412) uses up its
    attempts; requeue brings it back once the cause is gone."""
    h, az = private_harness
    h.write_config(RETRY_MAX_ATTEMPTS="2")
    path, sha = make_content_addressed(media_roots["audio"], 1000, "mp3", seed=8)
    blob = container_client(az.connection_string, "media").get_blob_client(f"audio/{sha}.mp3")
    blob.upload_blob(b"someone else's stale bytes", overwrite=True)
    lease = blob.acquire_lease(lease_duration=-1)
    assert h.cli("upload", "--no-watch").returncode == 0  # failures are recorded, not fatal
    assert h.cli("retry").returncode == 0
    status = h.cli("status")
    assert status.returncode == 1  # an item needs attention
    assert "[dead]" in status.stdout
    lease.break_lease(lease_break_period=0)
    assert "requeued 1" in h.cli("requeue", check=True).stdout
    assert h.cli_json("retry")["uploaded"] == 1
    assert h.cli("status").returncode == 0
    assert blob_bytes(container_client(az.connection_string, "media"), f"audio/{sha}.mp3") == path.read_bytes()


def _records(h):
    s = StateStore.open(h.state_dir)
    try:
        return s.records()
    finally:
        s.close()


def test_crash_mid_upload_is_repaired_by_the_next_run(harness, blob_container, media_roots):
    """State says `uploading` (a process died after the commit, before recording it): the next run
    recognises the committed blob instead of uploading again."""
    files = library(media_roots)
    cfg = harness.config()
    upload.run(cfg, watch=False)
    etags = {b.name: b.etag for b in blob_container.list_blobs()}
    s = StateStore.open(harness.state_dir)
    s._db.execute("UPDATE files SET state = 'uploading', sha256 = NULL, etag = NULL")
    s.close()
    result = retry.run(cfg)
    assert result["already_present"] == len(files)
    assert result["uploaded"] == 0
    assert {b.name: b.etag for b in blob_container.list_blobs()} == etags
    assert set(states(harness).values()) == {"uploaded"}


def test_delete_local_without_db_evicts_only_after_verification(harness, blob_container, media_roots):
    files = library(media_roots)
    result = upload.run(harness.config(DELETE_LOCAL_AFTER_UPLOAD="true"), watch=False)
    assert result["evicted"] == 4
    assert not any(p.exists() for p in files.values())
    assert blob_names(blob_container) == set(files)
    assert set(states(harness).values()) == {"evicted"}


def test_file_that_changed_after_verification_is_not_deleted(harness, blob_container, media_roots):
    thumb = make_thumbnail(media_roots["video"], "2" * 64)
    cfg = harness.config()
    upload.run(cfg, watch=False)
    thumb.write_bytes(b"regenerated thumbnail")  # same name, new content, after the verified upload
    from agent.context import queue_worker

    with queue_worker(harness.config(DELETE_LOCAL_AFTER_UPLOAD="true"), wait_for_lock=False) as w:
        assert w.evict_ready().evicted == 0
    assert thumb.exists()


def test_watch_mode_uploads_files_that_arrive_while_running(harness, blob_container, media_roots, monkeypatch):
    cfg = harness.config(UPLOAD_IDLE_EXIT_SECONDS="4")
    arrived = []
    original_read = RootWatcher.read

    def read_after_arrival(self, timeout_s):
        # The file lands once the run is surely watching (its first read), however slow the
        # machine: a thread sleeping a second could wake after the idle exit.
        if not arrived:
            arrived.append(make_content_addressed(media_roots["audio"], 2000, "mp3", seed=11))
        return original_read(self, timeout_s)

    monkeypatch.setattr(RootWatcher, "read", read_after_arrival)
    result = upload.run(cfg, watch=True)
    _, sha = arrived[0]
    assert f"audio/{sha}.mp3" in blob_names(blob_container)
    assert result["uploaded"] == 1


def test_two_uploaders_never_upload_the_same_file_twice(harness, blob_container, media_roots):
    for i in range(12):
        make_content_addressed(media_roots["audio"], 40_000, "mp3", seed=100 + i)
    harness.write_config(UPLOAD_IDLE_EXIT_SECONDS="0")
    procs = [harness.spawn("upload", "--no-watch", "--json") for _ in range(2)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        import json

        outputs.append(json.loads(out))
    assert sum(o["uploaded"] for o in outputs) == 12
    assert sum(o["already_present"] for o in outputs) == 0
    assert len(blob_names(blob_container)) == 12


def test_retry_steps_aside_while_an_upload_holds_the_queue(harness, media_roots):
    from agent.lock import QueueLock

    harness.config()
    lock = QueueLock(harness.state_dir)
    lock.acquire()
    try:
        result = harness.cli_json("retry")
    finally:
        lock.release()
    assert "skipped" in result


def test_local_backend_does_nothing(harness, blob_container, media_roots):
    library(media_roots)
    harness.write_config(MEDIA_STORAGE_BACKEND="local")
    proc = harness.cli("upload", "--no-watch")
    assert proc.returncode == 0
    assert "nothing to upload" in proc.stderr
    assert blob_names(blob_container) == set()


def test_bandwidth_cap_limits_the_rate(harness, blob_container, media_roots):
    """The cap is honoured in aggregate: 600 KiB at 256 KiB/s cannot finish in under ~1.3 s.
    (A lower bound follows from the token bucket; no upper timing bound is asserted.)"""
    make_content_addressed(media_roots["video"], 600 * 1024, "mp4", seed=12)
    cfg = harness.config(UPLOAD_BANDWIDTH_LIMIT="256KiB")
    started = time.monotonic()
    upload.run(cfg, watch=False)
    assert time.monotonic() - started >= (600 - 256) / 256 * 0.95


def test_an_outage_costs_no_attempt_and_stops_the_run(private_harness, media_roots):
    """With Azure unreachable the first failure stops the run: every file is held back, still
    queued and still local, with no attempt charged to any of them."""
    h, az = private_harness
    cfg = h.config(UPLOAD_FILE_CONCURRENCY="1")
    for i in range(5):
        make_content_addressed(media_roots["audio"], 3000, "mp3", seed=400 + i)
    az.stop()
    result = upload.run(cfg, watch=True, idle_exit=30)  # must not sit watching during an outage
    assert result["failed"] == 0
    assert result["held_back"] == 5
    assert "unreachable" in result["outage"]
    assert sorted(states(h).values()) == ["pending"] * 5
    assert {r.attempts for r in _records(h)} == {0}
    az.start()
    assert retry.run(cfg)["uploaded"] == 5


def test_recently_modified_file_waits_to_settle(harness, blob_container, media_roots):
    # Written in place under a name that promises no hash: nothing says it is complete yet (a
    # content address or a rename into place does: agent/arrival.py, tests/integration/test_watch_arrival.py).
    (media_roots["thumbnails"] / f"{'5' * 64}.png").write_bytes(pseudo_random_bytes(3000, seed=500))
    result = upload.run(harness.config(UPLOAD_SETTLE_SECONDS="600"), watch=False)
    assert result["deferred"] == 1 and result["uploaded"] == 0
    assert blob_names(blob_container) == set()
    assert set(states(harness).values()) == {"pending"}


def test_memory_stays_bounded_by_blocks_not_file_size(harness, blob_container, media_roots):
    """A 256 MiB file with 4 MiB blocks, 2 in flight: the uploader's peak RSS stays far below the
    file size (a buffering bug would hold the whole file)."""
    import sys

    from tests.support.rusage import measure

    path, sha = make_content_addressed(media_roots["video"], 256 * 1024 * 1024, "mp4", seed=501)
    harness.write_config(UPLOAD_BLOCK_SIZE="4MiB", UPLOAD_BLOCK_CONCURRENCY="2")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_"))}
    # Through a small launcher: this child's own peak, not pytest's or an earlier child's.
    u = measure(
        [sys.executable, "-m", "agent", "--config", str(harness.config_path), "upload", "--no-watch"],
        env,
        harness.tmp / "upload.log",
        timeout=300,
    )
    assert u.exit == 0, (harness.tmp / "upload.log").read_text()[-3000:]
    assert u.maxrss_kib < 150 * 1024, f"peak RSS {u.maxrss_kib} KiB"
    props = blob_container.get_blob_client(f"video/{sha}.mp4").get_blob_properties()
    assert props.size == path.stat().st_size
