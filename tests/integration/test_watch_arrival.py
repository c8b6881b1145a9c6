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

from agent.actions import upload
from agent.state import StateStore
from tests.integration.agent_harness import blob_names
from tests.support.media import make_content_addressed, make_thumbnail, pseudo_random_bytes

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


def write_in_place(root, size: int, seed: int, ext: str) -> str:
    """A content-addressed name written in place, as a copy or a zip import does."""
    data = pseudo_random_bytes(size, seed)
    sha = hashlib.sha256(data).hexdigest()
    (root / f"{sha}.{ext}").write_bytes(data)
    return sha


def test_a_file_renamed_into_a_watched_root_skips_the_settle_wait(harness, blob_container, media_roots, tmp_path):
    h = harness
    h.write_config(UPLOAD_SETTLE_SECONDS=HOUR, UPLOAD_IDLE_EXIT_SECONDS=HOUR)
    proc = h.spawn("upload", "--json")
    try:
        for line in proc.stderr:
            if "watching the media roots" in line:
                break
        else:
            raise AssertionError(f"the run ended (exit {proc.wait()}) without watching")
        in_place = write_in_place(media_roots["audio"], 5_000, seed=950, ext="mp3")
        # Its events come after the in-place file's, so once it is uploaded that one was seen too.
        staged, renamed = make_content_addressed(tmp_path / "staging", 400_000, "mp4", seed=951)
        os.rename(staged, media_roots["video"] / staged.name)
        wait_until(lambda: file_states(h).get(f"video/{renamed}.mp4", ("",))[0] == "uploaded", proc, "the renamed file")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGTERM, (out, err)
    assert json.loads(out)["error"] == "Interrupted"
    assert blob_names(blob_container) == {f"video/{renamed}.mp4"}
    state, error = file_states(h)[f"audio/{in_place}.mp3"]
    assert state == "pending" and "settle" in (error or ""), (state, error)


def test_a_scan_skips_the_wait_only_for_content_addressed_files_changed_after_their_last_write(
    harness, blob_container, media_roots
):
    earlier = time.time() - 1
    # A rename into place or a chmod after the copy: ctime is later than mtime.
    done, done_sha = make_content_addressed(media_roots["video"], 300_000, "mp4", seed=960)
    os.utime(done, (earlier, earlier))
    # The same signal on a name that promises no hash (a thumbnail): nothing checks its bytes.
    thumb = make_thumbnail(media_roots["video"], done_sha)
    os.utime(thumb, (earlier, earlier))
    # Written in place and not touched since: a writer may still be at work.
    writing = write_in_place(media_roots["audio"], 5_000, seed=961, ext="mp3")

    result = upload.run(harness.config(UPLOAD_SETTLE_SECONDS=HOUR), watch=False)

    assert (result["uploaded"], result["deferred"]) == (1, 2), result
    assert blob_names(blob_container) == {f"video/{done_sha}.mp4"}
    states = file_states(harness)
    assert states[f"video/thumbnails/{done_sha}.png"][0] == "pending"
    assert states[f"audio/{writing}.mp3"][0] == "pending"
