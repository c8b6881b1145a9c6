"""Network faults between the agent and Azurite, injected by tests/faults/faultproxy.py.

Each test drives the real CLI (`upload --no-watch`, then `retry` runs as the timer would) against
the session Azurite through the proxy, and checks the four promises of the upload path:
it finishes once the fault goes, every blob is byte-identical to its file, no partial blob is ever
visible, and no local file is deleted before its blob is verified and the DB points at it. The
number of requests and attempts is checked against the retry policy.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

from tests.faults.conftest import (
    BlobWatcher,
    assert_blobs_identical,
    pointer_rows,
    records,
    with_mysql,
)
from tests.integration.agent_harness import Harness
from tests.support.media import make_content_addressed

BLOCK = 256 * 1024
SDK_TRIES = 3  # ExponentialRetry(retry_total=2) in agent/storage/azure_blob.py: 1 try + 2 retries
MAX_ATTEMPTS = 8  # RETRY_MAX_ATTEMPTS in the fault_harness fixture


def make_library(roots, seed: int, large: tuple[int, ...], small: tuple[int, ...]) -> dict[str, tuple[Path, bytes]]:
    """Multi-block videos and single-request audio files: blob name -> (path, bytes)."""
    files = {}
    for i, size in enumerate(large):
        path, sha = make_content_addressed(roots["video"], size, "mp4", seed=seed + i)
        files[f"video/{sha}.mp4"] = (path, path.read_bytes())
    for i, size in enumerate(small):
        path, sha = make_content_addressed(roots["audio"], size, "mp3", seed=seed + 100 + i)
        files[f"audio/{sha}.mp3"] = (path, path.read_bytes())
    return files


def requests_allowed(h: Harness, files: dict[str, tuple[Path, bytes]]) -> int:
    """The most HTTP requests the retry policy permits for these files.

    Per attempt a multi-block file sends HEAD, Get Block List, one Put Block per block, Put Block
    List and HEAD; a small file one Put Blob (plus HEAD and an overwriting Put if a blob is there).
    Eviction adds a HEAD. Each request may be tried SDK_TRIES times. Attempts are the failures the
    state recorded against the file, the tries that met an outage (not charged to the file, but
    counted), plus the one that succeeded.
    """
    recs = records(h)
    total = 0
    for name, (_, data) in files.items():
        per_attempt = (-(-len(data) // BLOCK) + 4 if len(data) > BLOCK else 3) + 1
        total += (recs[name].attempts + recs[name].outage_waits + 1) * per_attempt * SDK_TRIES
    return total


def drain(h: Harness, runs: int = 40) -> list[int]:
    """`retry` runs, as the timer would start them, until nothing is pending or failing; exit codes."""
    codes = []
    for _ in range(runs):
        if all(r.state in ("uploaded", "evicted") for r in records(h).values()):
            break
        codes.append(h.cli("retry").returncode)
        time.sleep(0.3)  # let the short backoff (RETRY_MAX_DELAY=1) come due
    return codes


def assert_within_policy(h: Harness) -> None:
    for name, rec in records(h).items():
        assert rec.state in ("uploaded", "evicted"), (name, rec.state, rec.last_error)
        assert rec.attempts < MAX_ATTEMPTS, (name, rec.attempts)


class EvictionMonitor:
    """Polls the local files while the agent runs. When one disappears it records, at that moment,
    whether its blob was complete (size and sha256 metadata) and whether the DB pointed at it."""

    def __init__(self, files: dict[str, tuple[Path, bytes]], container, db) -> None:
        self.files, self.container, self.db = files, container, db
        self.checked: dict[str, tuple[bool, bool]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            # Read stop before the sweep: a deletion that happens before the stop is always swept,
            # however long this thread was starved of CPU on a loaded machine.
            stopping = self._stop.is_set()
            for name, (path, data) in self.files.items():
                if name in self.checked or path.exists():
                    continue
                props = self.container.get_blob_client(name).get_blob_properties()
                blob_ok = props.size == len(data) and props.metadata.get("sha256") == hashlib.sha256(data).hexdigest()
                row = pointer_rows(self.db).get(name)
                db_ok = row is not None and row["provider"] == "azure_blob" and row["etag"] == props.etag
                self.checked[name] = (blob_ok, db_ok)
            if stopping:
                return
            self._stop.wait(0.01)

    def __enter__(self) -> EvictionMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(300)
        assert not self._thread.is_alive(), "the eviction monitor did not finish its last sweep"


def test_connection_resets_mid_body_retry_to_completion_and_delete_only_verified(
    fault_harness, proxy, blob_container, media_roots, media_db, tmp_path
):
    """RSTs in the middle of Put Block / Put Blob bodies, with DELETE_LOCAL_AFTER_UPLOAD and the DB
    pointer on: the SDK retries, the queue backs off, everything ends verified and evicted."""
    h = with_mysql(fault_harness, media_db, tmp_path)
    h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true", UPLOAD_FILE_CONCURRENCY="2", UPLOAD_BLOCK_CONCURRENCY="2")
    files = make_library(media_roots, 700, large=(1_100_000, 1_500_000, 900_000), small=(150_000, 4_000))
    sizes = {n: len(d) for n, (_, d) in files.items()}
    # 20 resets: more than the SDK's 3 tries per request, so some attempts fail and the queue's
    # backoff has to take over, and fewer than the requests needed, so the run cannot avoid them.
    proxy.reset_mid_body(after=100_000, times=20)
    with BlobWatcher(blob_container, sizes) as watcher, EvictionMonitor(files, blob_container, media_db) as mon:
        first = h.cli("upload", "--no-watch")
        assert first.returncode == 0, first.stderr
        codes = drain(h)
    assert set(codes) <= {0}
    assert proxy.requests("reset"), "no reset was injected: the test proved nothing"
    assert watcher.listings > 0 and watcher.bad == []
    assert_blobs_identical(blob_container, {n: d for n, (_, d) in files.items()})
    assert_within_policy(h)
    assert {r.state for r in records(h).values()} == {"evicted"}
    # Every deletion happened with a complete blob and the DB already pointing at it.
    assert set(mon.checked) == set(files)
    assert all(blob_ok and db_ok for blob_ok, db_ok in mon.checked.values()), mon.checked
    rows = pointer_rows(media_db)
    assert {n: (r["provider"], r["local_copy"]) for n, r in rows.items()} == dict.fromkeys(files, ("azure_blob", 0))
    assert len(proxy.requests()) <= requests_allowed(h, files)
    failed_attempts = sum(r.attempts for r in records(h).values())
    print(
        f"\n[faults] resets injected={len(proxy.requests('reset'))} requests={len(proxy.requests())} "
        f"bound={requests_allowed(h, files)} failed attempts={failed_attempts} retry runs={len(codes)} "
        f"listings={watcher.listings} sightings={watcher.sightings}"
    )


def test_bursts_of_500_and_503_are_retried_and_reported(fault_harness, proxy, blob_container, media_roots):
    h = fault_harness
    h.write_config(UPLOAD_FILE_CONCURRENCY="1")
    files = make_library(media_roots, 720, large=(800_000,), small=(20_000, 30_000))
    # 3 errors exhaust the SDK's tries on the first request: the attempt fails and, being a
    # service-wide 5xx, ends the run with the other files held back. The next 4 are eaten by
    # the retry run's requests, which then succeed on their last try or the next attempt.
    proxy.http_errors(7, statuses=(500, 503))
    first = h.cli("upload", "--no-watch", "--json")
    assert first.returncode == 0, first.stderr
    status = h.cli_json("status")
    # A service-wide 5xx is an outage: shown as one, no file charged an attempt.
    assert status["failing"] == [] and status["counts"]["failed"] == 0
    assert status["outage"]["last_error"].startswith(("HTTP 500 InternalError", "HTTP 503 ServerBusy"))
    assert "InternalError" in first.stderr or "ServerBusy" in first.stderr
    codes = drain(h)
    assert set(codes) <= {0}
    assert proxy.errors_left == 0
    assert [s.outcome for s in proxy.requests() if s.outcome != "forwarded"] == [
        "http_500",
        "http_503",
        "http_500",
        "http_503",
        "http_500",
        "http_503",
        "http_500",
    ]
    assert_blobs_identical(blob_container, {n: d for n, (_, d) in files.items()})
    assert_within_policy(h)
    assert len(proxy.requests()) <= requests_allowed(h, files)
    print(f"\n[faults] 5xx injected=7 requests={len(proxy.requests())} bound={requests_allowed(h, files)}")


def test_stalled_link_times_out_then_recovers(fault_harness, proxy, blob_container, media_roots):
    h = fault_harness
    h.write_config(AZURE_NETWORK_TIMEOUT="1", UPLOAD_FILE_CONCURRENCY="1")
    files = make_library(media_roots, 740, large=(600_000,), small=(5_000,))
    proxy.stall()
    first = h.cli("upload", "--no-watch")
    assert first.returncode == 0, first.stderr
    status = h.cli_json("status")
    assert status["counts"]["failed"] == 0 and status["counts"]["pending"] == 2
    assert "timed out" in status["outage"]["last_error"]
    assert {b.name for b in blob_container.list_blobs()} == set()
    assert all(p.exists() for p, _ in files.values())
    proxy.passthrough()
    # The short timeout was for the black hole; a loaded machine's Azurite may take longer than
    # 1 s to answer, and that must not stop the recovery.
    h.write_config(AZURE_NETWORK_TIMEOUT="60")
    assert set(drain(h)) <= {0}
    assert_blobs_identical(blob_container, {n: d for n, (_, d) in files.items()})
    assert_within_policy(h)


def test_refused_connections_then_recovery(fault_harness, proxy, blob_container, media_roots):
    h = fault_harness
    h.write_config(UPLOAD_FILE_CONCURRENCY="1")
    files = make_library(media_roots, 760, large=(700_000,), small=(5_000, 6_000))
    proxy.refuse()
    first = h.cli("upload", "--no-watch")
    assert first.returncode == 0, first.stderr
    assert "Connection refused" in first.stderr
    status = h.cli_json("status")
    assert status["counts"]["failed"] == 0 and status["outage"] is not None
    assert "unreachable" in status["outage"]["last_error"]
    assert "refused" in status["outage"]["last_error"]
    proxy.passthrough()
    assert set(drain(h)) <= {0}
    assert_blobs_identical(blob_container, {n: d for n, (_, d) in files.items()})
    assert_within_policy(h)


def test_trickling_link_shows_no_partial_blob(fault_harness, proxy, blob_container, media_roots):
    """A slow link keeps uploads in flight for seconds while a lister watches the container: only
    whole blobs ever appear (uncommitted blocks are invisible; a Put Blob is atomic)."""
    h = fault_harness
    # The first commit (Put Block List) is held at the proxy until the lister has looked several
    # times: its blocks are all staged then, so the lister surely looks at uncommitted blocks,
    # however fast or slow the machine. The long timeout lets the agent wait for the held answer.
    h.write_config(UPLOAD_FILE_CONCURRENCY="2", AZURE_NETWORK_TIMEOUT="600")
    files = make_library(media_roots, 780, large=(1_200_000, 700_000), small=(200_000, 3_000))
    sizes = {n: len(d) for n, (_, d) in files.items()}
    proxy.trickle(1024 * 1024)
    proxy.hold(comp="blocklist", method="PUT")
    with BlobWatcher(blob_container, sizes) as watcher:
        proc = h.spawn("upload", "--no-watch")
        try:
            while not proxy.held.wait(0.05):
                assert proc.poll() is None, f"the run ended before any commit: {proc.communicate()}"
            looked = watcher.listings
            deadline = time.monotonic() + 300
            while watcher.listings < looked + 3:
                assert time.monotonic() < deadline, "the lister stopped listing"
                time.sleep(0.02)
        finally:
            proxy.release()
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert watcher.bad == []
    assert_blobs_identical(blob_container, {n: d for n, (_, d) in files.items()})
    assert {r.attempts for r in records(h).values()} == {0}


def test_a_service_that_never_recovers_is_an_outage_not_a_dead_file(fault_harness, proxy, blob_container, media_roots):
    """503 on every request: each run costs one file's SDK tries at most, no attempt is charged
    (a weekend outage must not turn the library `dead`), and status shows the outage."""
    h = fault_harness
    h.write_config(RETRY_MAX_ATTEMPTS="3")
    path, _ = make_content_addressed(media_roots["audio"], 10_000, "mp3", seed=800)
    proxy.http_errors(1000, statuses=(503,))
    runs = [h.cli("upload", "--no-watch")] + [h.cli("retry") for _ in range(6)]
    assert all(r.returncode == 0 for r in runs)
    (rec,) = records(h).values()
    assert (rec.state, rec.attempts) == ("pending", 0), rec
    assert "HTTP 503 ServerBusy" in rec.last_error
    status = h.cli_json("status")
    assert "HTTP 503 ServerBusy" in status["outage"]["last_error"]
    # One file, one Put Blob with its SDK retries per run that found it due; backoff may skip runs.
    assert SDK_TRIES <= len(proxy.requests()) <= len(runs) * SDK_TRIES
    assert path.exists()
    assert h.cli("status").returncode == 0


def test_persistent_errors_of_one_file_end_dead_after_exactly_the_allowed_requests(
    fault_harness, proxy, blob_container, media_roots
):
    """A failure that belongs to the file (400 Md5Mismatch: its bytes arrive wrong every time):
    the item goes dead at RETRY_MAX_ATTEMPTS, and not one request more is sent."""
    h = fault_harness
    h.write_config(RETRY_MAX_ATTEMPTS="3")
    path, _ = make_content_addressed(media_roots["audio"], 10_000, "mp3", seed=801)
    proxy.http_errors(1000, statuses=(400,))
    runs = [h.cli("upload", "--no-watch")] + [h.cli("retry") for _ in range(6)]
    for _ in range(20):
        if {r.state for r in records(h).values()} == {"dead"}:
            break
        runs.append(h.cli("retry"))
        time.sleep(0.3)
    assert all(r.returncode == 0 for r in runs)
    (rec,) = records(h).values()
    assert (rec.state, rec.attempts) == ("dead", 3), rec
    assert "HTTP 400 Md5Mismatch" in rec.last_error
    # 3 attempts x 1 Put Blob (a 400 is not retried by the SDK); later runs must not touch a dead item.
    assert len(proxy.requests()) == 3
    assert "giving up on" in "".join(r.stderr for r in runs)
    assert path.exists()
    assert h.cli("status").returncode == 1


def test_link_stalling_mid_upload_then_coming_back(fault_harness, proxy, blob_container, media_roots):
    """The stall lands mid-run (some blocks sent, some in flight). The held requests are delivered
    late when the link comes back, after the client gave up on them: stale Put Blocks and possibly
    a stale commit arrive while the retry uploads again. The end state must still be exact."""
    h = fault_harness
    h.write_config(AZURE_NETWORK_TIMEOUT="1", UPLOAD_FILE_CONCURRENCY="2")
    files = make_library(media_roots, 820, large=(1_500_000, 1_000_000), small=(3_000,))
    proxy.trickle(512 * 1024)
    proc = h.spawn("upload", "--no-watch")
    deadline = time.monotonic() + 60
    while len(proxy.requests()) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    proxy.stall()
    proc.communicate(timeout=120)
    assert proc.returncode == 0
    proxy.passthrough()
    h.write_config(AZURE_NETWORK_TIMEOUT="60")  # the 1 s was for the stall, not for the recovery
    assert set(drain(h)) <= {0}
    assert_blobs_identical(blob_container, {n: d for n, (_, d) in files.items()})
    assert_within_policy(h)
    recs = records(h)
    for name in files:
        props = blob_container.get_blob_client(name).get_blob_properties()
        assert props.etag == recs[name].etag, f"{name}: the blob changed after it was verified"
    assert len(proxy.requests()) <= requests_allowed(h, files)


def test_lost_responses_after_the_service_applied_the_request(fault_harness, proxy, blob_container, media_roots):
    """The request arrives whole and is applied, the answer never comes back: a Put Blob that
    created the blob, a Put Block List that committed it. The retried request then meets its own
    result (409 for the If-None-Match Put Blob, a re-commit for the block list)."""
    h = fault_harness
    h.write_config(UPLOAD_FILE_CONCURRENCY="1")
    small = make_library(media_roots, 900, large=(), small=(40_000,))
    proxy.lose_responses(1, method="PUT")  # a small file goes up in one Put Blob
    first = h.cli("upload", "--no-watch")
    assert first.returncode == 0, first.stderr
    large = make_library(media_roots, 910, large=(1_200_000,), small=())
    proxy.lose_responses(1, comp="blocklist", method="PUT")
    second = h.cli("upload", "--no-watch")
    assert second.returncode == 0, second.stderr
    lost = proxy.requests("lost")
    assert [(s.method, s.comp) for s in lost] == [("PUT", None), ("PUT", "blocklist")]
    assert set(drain(h)) <= {0}
    files = {**small, **large}
    assert_blobs_identical(blob_container, {n: d for n, (_, d) in files.items()})
    assert_within_policy(h)
    recs = records(h)
    for name in files:
        props = blob_container.get_blob_client(name).get_blob_properties()
        assert props.etag == recs[name].etag, f"{name}: the blob changed after it was verified"
    print(
        f"\n[faults] lost responses=2 attempts={[r.attempts for r in recs.values()]} requests={len(proxy.requests())}"
    )
