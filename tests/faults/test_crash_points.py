"""kill -9 of the uploader at random moments over many multi-block uploads.

One seeded run of TRIALS trials: each trial may add a file (1-3 MiB, 256 KiB blocks), starts
`gighive-media upload --no-watch` with a bandwidth cap so it is mid-upload most of the time, and
SIGKILLs it after a random delay. Kills land during start-up, the scan, block staging, the commit,
the state writes and the DB pointer flip. After one final `retry`, every file must be in Blob,
byte-identical, `uploaded` in the state, and the DB must point at the very blob that was verified.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time

from tests.faults.conftest import pointer_rows, records, with_mysql
from tests.support.media import make_content_addressed

SEED = int(os.environ.get("GIGHIVE_CRASH_SEED", "20261125"))
TRIALS = int(os.environ.get("GIGHIVE_CRASH_TRIALS", "60"))
MIB = 1024 * 1024


def test_kill_9_at_random_points_loses_nothing(harness, blob_container, media_roots, media_db, tmp_path):
    print(f"\n[crash] seed={SEED} trials={TRIALS} (GIGHIVE_CRASH_SEED / GIGHIVE_CRASH_TRIALS to change)")
    rng = random.Random(SEED)
    h = with_mysql(harness, media_db, tmp_path)
    h.write_config(
        UPLOAD_BLOCK_SIZE="256KiB",
        UPLOAD_BLOCK_CONCURRENCY="2",
        UPLOAD_FILE_CONCURRENCY="2",
        UPLOAD_BANDWIDTH_LIMIT="512KiB",
    )
    expected: dict[str, str] = {}  # blob name -> sha256 of the file
    sizes: dict[str, int] = {}
    killed_mid_upload = 0
    kills = 0
    exited_by_itself = 0
    for trial in range(TRIALS):
        backlog = [r for r in records(h).values() if r.state != "uploaded"] if trial else []
        # A new file every other trial, or whenever the queue ran dry, so most kills hit an upload.
        if trial % 2 == 0 or not backlog:
            size = rng.randint(1 * MIB, 3 * MIB) + rng.randint(0, 1000)
            _, sha = make_content_addressed(media_roots["video"], size, "mp4", seed=SEED + trial)
            expected[f"video/{sha}.mp4"] = sha
            sizes[f"video/{sha}.mp4"] = size
        proc = h.spawn("upload", "--no-watch")
        delay = rng.uniform(0.3, 2.3)
        try:
            proc.wait(timeout=delay)
            exited_by_itself += 1
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        _, err = proc.communicate(timeout=30)
        assert proc.returncode in (0, -signal.SIGKILL), f"trial {trial}: exit {proc.returncode}\n{err}"
        if any(r.state == "uploading" for r in records(h).values()):
            killed_mid_upload += 1
        # At every crash point: what is listed is whole (uncommitted blocks are invisible).
        for b in blob_container.list_blobs():
            assert b.size == sizes[b.name], f"trial {trial}: partial blob {b.name} visible ({b.size} bytes)"

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
