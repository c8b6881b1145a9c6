"""Which new files skip UPLOAD_SETTLE_SECONDS (agent/arrival.py; issue 15, part 6).

The settle time here is an hour: a file that waits for it is never uploaded during the test, so
every check is about which files wait, never about how long anything took.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from agent.actions import upload
from agent.state import StateStore
from tests.integration.agent_harness import blob_names
from tests.support.media import pseudo_random_bytes

HOUR = "3600"


def file_states(h) -> dict[str, tuple[str, str | None]]:
    s = StateStore.open(h.state_dir)
    try:
        return {
            r.blob_name: (r.state, r.last_error)
            for r in s.in_state("pending", "uploading", "uploaded", "failed", "dead", "quarantined")
        }
    finally:
        s.close()


def wait_until(predicate, proc: subprocess.Popen, what: str) -> None:
    """Wait for a state the run must reach; fail if the run ends first. The bound only ends a
    broken test; nothing here depends on how fast the machine is."""
    deadline = time.monotonic() + 300
    while not predicate():
        assert time.monotonic() < deadline, f"never saw {what}"
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.05)


def content_addressed_in_place(root: Path, size: int, seed: int, ext: str) -> str:
    """A content-addressed name written in place, as a copy or a zip import does; returns the sha256."""
    data = pseudo_random_bytes(size, seed)
    sha = hashlib.sha256(data).hexdigest()
    (root / f"{sha}.{ext}").write_bytes(data)
    return sha


def thumbnail_bytes(seed: int) -> tuple[str, bytes]:
    """A thumbnail's name (the video's sha256, not its own) and some bytes: no name check applies."""
    return hashlib.sha256(f"video {seed}".encode()).hexdigest(), pseudo_random_bytes(2_000, seed)


def test_renamed_files_and_content_addresses_skip_the_settle_wait_while_watching(
    harness, blob_container, media_roots, tmp_path
):
    h = harness
    h.write_config(UPLOAD_SETTLE_SECONDS=HOUR, UPLOAD_IDLE_EXIT_SECONDS=HOUR)
    thumbs = media_roots["thumbnails"]
    proc = h.spawn("upload", "--json")
    try:
        for line in proc.stderr:
            if "watching the media roots" in line:
                break
        else:
            raise AssertionError(f"the run ended (exit {proc.wait()}) without watching")
        # Written in place under a name that promises no hash: it waits.
        waiting, data = thumbnail_bytes(970)
        (thumbs / f"{waiting}.png").write_bytes(data)
        # Written in place, but its name is its hash: read at once, the hash proves it complete.
        in_place = content_addressed_in_place(media_roots["audio"], 5_000, seed=971, ext="mp3")
        # Renamed into place under a name that promises no hash: complete by the rename.
        renamed, data = thumbnail_bytes(972)
        staged = tmp_path / "staging" / f"{renamed}.png"
        staged.parent.mkdir()
        staged.write_bytes(data)
        os.rename(staged, thumbs / staged.name)
        # Events come in order: once the last file is uploaded, the first one was seen too.
        done = {f"audio/{in_place}.mp3", f"video/thumbnails/{renamed}.png"}
        wait_until(
            lambda: {n for n, (state, _) in file_states(h).items() if state == "uploaded"} == done,
            proc,
            "both files uploaded",
        )
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert json.loads(out)["error"] == "Interrupted"
    assert blob_names(blob_container) == done
    state, error = file_states(h)[f"video/thumbnails/{waiting}.png"]
    assert state == "pending" and "settle" in (error or ""), (state, error)


def test_a_content_addressed_file_not_matching_its_name_yet_waits_and_is_quarantined_only_once_settled(
    harness, blob_container, media_roots
):
    complete = content_addressed_in_place(media_roots["video"], 300_000, seed=980, ext="mp4")
    # Its first half, under the name of the whole: a copy still at work (or stopped for good).
    whole = pseudo_random_bytes(600_000, seed=981)
    partial = hashlib.sha256(whole).hexdigest()
    (media_roots["video"] / f"{partial}.mp4").write_bytes(whole[:300_000])
    waiting, data = thumbnail_bytes(982)
    (media_roots["thumbnails"] / f"{waiting}.png").write_bytes(data)

    result = upload.run(harness.config(UPLOAD_SETTLE_SECONDS=HOUR), watch=False)

    assert (result["uploaded"], result["deferred"], result["quarantined"]) == (1, 2, 0), result
    assert blob_names(blob_container) == {f"video/{complete}.mp4"}
    states = file_states(harness)
    assert states[f"video/thumbnails/{waiting}.png"][0] == "pending"
    state, error = states[f"video/{partial}.mp4"]
    assert state == "pending" and "does not match its name yet" in (error or ""), (state, error)

    # Once settled, a file that still does not match its name is what it always was: corrupt.
    two_hours_ago = time.time() - 7200
    for path in (media_roots["video"] / f"{partial}.mp4", media_roots["thumbnails"] / f"{waiting}.png"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    result = upload.run(harness.config(UPLOAD_SETTLE_SECONDS=HOUR), watch=False)
    assert result["quarantined"] == 1 and result["uploaded"] == 1, result
    assert file_states(harness)[f"video/{partial}.mp4"][0] == "quarantined"
    assert blob_names(blob_container) == {f"video/{complete}.mp4", f"video/thumbnails/{waiting}.png"}
    assert (media_roots["video"] / f"{partial}.mp4").read_bytes() == whole[:300_000], "left as it is"
