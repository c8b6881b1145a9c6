"""kill -9 of the uploader at random moments over many multi-block uploads.

One seeded run of TRIALS trials: each trial may add a file (1-3 MiB, 256 KiB blocks), starts
`gighive-media upload --no-watch` with a bandwidth cap so it is mid-upload most of the time, and
SIGKILLs it after a random delay, counted from its start or from its first `uploading` row (a
state, so a slow machine cannot turn every kill into one during start-up). Kills land during
start-up, the scan, block staging, the commit, the state writes and the DB pointer flip. After one final `retry`, every file must be in Blob,
byte-identical, `uploaded` in the state, and the DB must point at the very blob that was verified.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field

from tests.faults.conftest import pointer_rows, records, with_mysql
from tests.support.media import make_content_addressed

SEED = int(os.environ.get("GIGHIVE_CRASH_SEED", "20261125"))
TRIALS = int(os.environ.get("GIGHIVE_CRASH_TRIALS", "60"))
MIB = 1024 * 1024


@dataclass
class Trials:
    expected: dict[str, str] = field(default_factory=dict)  # blob name -> sha256 of the file
    sizes: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    exited_by_itself: int = 0
    killed_mid_upload: int = 0  # kills that left a row `uploading`


def started_uploading(h, proc: subprocess.Popen, since: float) -> bool:
    """Wait until this run has set some row `uploading` (True), or has exited first (False)."""
    path = h.state_dir / "state.sqlite3"
    deadline = time.monotonic() + 300
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the run neither started an upload nor ended"
        with contextlib.suppress(sqlite3.Error):
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
            try:
                q = "SELECT 1 FROM files WHERE state = 'uploading' AND updated_at >= ? LIMIT 1"
                if conn.execute(q, (since,)).fetchone():
                    return True
            finally:
                conn.close()
        time.sleep(0.02)
    return False


def run_trials(h, container, roots, rng: random.Random, trials: int, seed: int, after_kill=None) -> Trials:
    t = Trials()
    for trial in range(trials):
        backlog = [r for r in records(h).values() if r.state not in ("uploaded", "evicted")] if trial else []
        # A new file every other trial, or whenever the queue ran dry, so most kills hit an upload.
        if trial % 2 == 0 or not backlog:
            size = rng.randint(1 * MIB, 3 * MIB) + rng.randint(0, 1000)
            _, sha = make_content_addressed(roots["video"], size, "mp4", seed=seed + trial)
            t.expected[f"video/{sha}.mp4"] = sha
            t.sizes[f"video/{sha}.mp4"] = size
        spawned = time.time()
        proc = h.spawn("upload", "--no-watch")
        # A third of the kills are timed from the start (start-up and the scan, whose length
        # depends on the machine); the rest from the moment this run set a row `uploading`, a
        # state, so on a slow machine they still land in the transfer, verify, commit and flip.
        early = rng.random() < 1 / 3
        delay = rng.uniform(0.0, 2.0)
        if early or started_uploading(h, proc, spawned):
            try:
                proc.wait(timeout=delay)
                t.exited_by_itself += 1
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                t.kills += 1
        else:
            t.exited_by_itself += 1
        _, err = proc.communicate(timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), f"trial {trial}: exit {proc.returncode}\n{err}"
        if any(r.state == "uploading" for r in records(h).values()):
            t.killed_mid_upload += 1
        # At every crash point: what is listed is whole (uncommitted blocks are invisible).
        for b in container.list_blobs():
            assert b.size == t.sizes[b.name], f"trial {trial}: partial blob {b.name} visible ({b.size} bytes)"
        if after_kill is not None:
            after_kill(trial, t)
    return t


def crash_config(h) -> None:
    h.write_config(
        UPLOAD_BLOCK_SIZE="256KiB",
        UPLOAD_BLOCK_CONCURRENCY="2",
        UPLOAD_FILE_CONCURRENCY="2",
        UPLOAD_BANDWIDTH_LIMIT="512KiB",
    )


def test_kill_9_at_random_points_loses_nothing(harness, blob_container, media_roots, media_db, tmp_path):
    print(f"\n[crash] seed={SEED} trials={TRIALS} (GIGHIVE_CRASH_SEED / GIGHIVE_CRASH_TRIALS to change)")
    h = with_mysql(harness, media_db, tmp_path)
    crash_config(h)
    t = run_trials(h, blob_container, media_roots, random.Random(SEED), TRIALS, SEED)
    expected, sizes, kills, exited_by_itself, killed_mid_upload = (
        t.expected,
        t.sizes,
        t.kills,
        t.exited_by_itself,
        t.killed_mid_upload,
    )

    h.write_config(UPLOAD_BANDWIDTH_LIMIT="0")
    started = time.monotonic()
    final = h.cli_json("retry")
    final_s = time.monotonic() - started
    assert final["failed"] == 0 and final["dead"] == 0, final

    recs = records(h)
    assert set(recs) == set(expected)
    assert {r.state for r in recs.values()} == {"uploaded"}
    rows = pointer_rows(media_db)
    assert set(rows) == set(expected)
    for name, sha in expected.items():
        blob = blob_container.get_blob_client(name)
        digest = hashlib.sha256()
        for chunk in blob.download_blob().chunks():
            digest.update(chunk)
        assert digest.hexdigest() == sha, f"{name}: the blob's bytes differ from the file"
        props = blob.get_blob_properties()
        assert recs[name].etag == props.etag and recs[name].sha256 == sha
        row = rows[name]
        assert (row["provider"], row["etag"], row["size_bytes"], row["content_sha256"], row["local_copy"]) == (
            "azure_blob",
            props.etag,
            sizes[name],
            sha,
            1,
        )
        assert recs[name].pointer == "done"

    blocks_total = sum(-(-s // (256 * 1024)) for s in sizes.values())
    reused = sum(r.blocks_reused for r in recs.values())
    files_reusing = sum(1 for r in recs.values() if r.blocks_reused)
    print(
        f"[crash] trials={TRIALS} kills={kills} exited_by_itself={exited_by_itself} "
        f"killed_mid_upload(state left 'uploading')={killed_mid_upload} files={len(expected)} "
        f"MiB={sum(sizes.values()) / MIB:.1f} blocks={blocks_total} blocks_reused={reused} "
        f"({100 * reused / blocks_total:.1f}%) files_reusing_blocks={files_reusing} "
        f"final_retry: uploaded={final['uploaded']} already_present={final['already_present']} "
        f"pointers_flipped={final['pointers_flipped']} in {final_s:.1f}s"
    )
    # The test only proves something if kills actually interrupted uploads.
    assert killed_mid_upload >= TRIALS // 4
    assert reused > 0


def test_kill_9_with_delete_after_upload_never_loses_a_file(harness, blob_container, media_roots, media_db, tmp_path):
    """The same with DELETE_LOCAL_AFTER_UPLOAD: kills can also land between the pointer flip, the
    unlink and the state write. A file may only be gone if its verified blob is there."""
    seed, trials = SEED + 1, max(10, TRIALS // 3)
    print(f"\n[crash-evict] seed={seed} trials={trials}")
    h = with_mysql(harness, media_db, tmp_path)
    crash_config(h)
    h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true")
    deleted_at_kill = set()

    def only_verified_files_are_gone(trial: int, t: Trials) -> None:
        rows = pointer_rows(media_db)
        for name in t.expected:
            if (media_roots["root"] / name).exists():
                continue
            deleted_at_kill.add(name)
            blob = blob_container.get_blob_client(name).get_blob_properties()
            assert blob.metadata.get("sha256") == t.expected[name] and blob.size == t.sizes[name], (trial, name)
            assert name in rows and rows[name]["provider"] == "azure_blob", (trial, name, rows.get(name))

    t = run_trials(
        h, blob_container, media_roots, random.Random(seed), trials, seed, after_kill=only_verified_files_are_gone
    )
    h.write_config(UPLOAD_BANDWIDTH_LIMIT="0")
    final = h.cli_json("retry")
    assert final["failed"] == 0 and final["dead"] == 0, final
    recs = records(h)
    assert {r.state for r in recs.values()} == {"evicted"}
    rows = pointer_rows(media_db)
    for name, sha in t.expected.items():
        assert not (media_roots["root"] / name).exists()
        digest = hashlib.sha256()
        for chunk in blob_container.get_blob_client(name).download_blob().chunks():
            digest.update(chunk)
        assert digest.hexdigest() == sha, f"{name}: the blob's bytes differ from the file"
        assert (rows[name]["provider"], rows[name]["local_copy"], rows[name]["content_sha256"]) == (
            "azure_blob",
            0,
            sha,
        )
    print(
        f"[crash-evict] kills={t.kills} killed_mid_upload={t.killed_mid_upload} files={len(t.expected)} "
        f"deleted_during_trials={len(deleted_at_kill)} "
        f"final_retry: uploaded={final['uploaded']} evicted={final['evicted']}"
    )
    assert t.killed_mid_upload >= trials // 4
