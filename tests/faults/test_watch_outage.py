"""An outage met while `upload` watches the roots ends the run at once (issue 15, part 5).

The run used to notice its own outage only when its next inotify read returned: under systemd it
logged "Azure Blob is unusable" and then sat out the idle time before exiting. Here the idle time
and the outage's backoff are an hour, so a run that goes back to reading would outlive the test,
and the run must exit on the outage alone, with no further file event to wake it.
"""

from __future__ import annotations

import json
import os
import subprocess

from agent import safety
from agent.state import StateStore
from tests.faults.conftest import records
from tests.support.media import make_content_addressed

HOUR = "3600"


def wait_for_line(proc: subprocess.Popen, needle: str) -> list[str]:
    """Read the run's stderr until a line holds needle; returns the lines read."""
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"the run ended before logging {needle!r}:\n{''.join(lines)}")


def test_an_outage_while_watching_ends_the_run_without_another_event(fault_harness, proxy, media_roots, tmp_path):
    h = fault_harness
    h.write_config(
        UPLOAD_IDLE_EXIT_SECONDS=HOUR,
        RETRY_BASE_DELAY=HOUR,
        RETRY_MAX_DELAY=HOUR,
        UPLOAD_FILE_CONCURRENCY="1",
    )
    proc = h.spawn("upload", "--json")
    try:
        wait_for_line(proc, "watching the media roots")
        # Azure goes away, then one file arrives the way GigHive's finalize lands it (a rename).
        proxy.refuse()
        path, sha = make_content_addressed(tmp_path / "staging", 300_000, "mp4", seed=900)
        landed = media_roots["video"] / path.name
        os.rename(path, landed)
        # The failure bound only: the run ends on the outage itself, well inside it.
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err  # an outage is recorded for the retry timer, not a failed unit
    summary = json.loads(out)
    assert summary["outage"] and "unreachable" in summary["outage"], summary
    assert summary["held_back"] == 1 and summary["failed"] == 0, summary
    assert "Azure Blob is unusable" in err, err
    # Issue 11's outage semantics hold: no attempt charged, the outage recorded, the file postponed.
    (rec,) = records(h).values()
    assert (rec.blob_name, rec.state, rec.attempts) == (f"video/{sha}.mp4", "pending", 0), rec
    state = StateStore.open(h.state_dir)
    try:
        outage = safety.outage_since(state)
    finally:
        state.close()
    assert outage is not None and outage["runs"] == 1, outage
    assert rec.next_attempt_at >= outage["next_try"] - 1, (rec, outage)
    assert landed.read_bytes() and landed.exists(), "the only copy stays local"
