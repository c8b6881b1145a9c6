"""SIGINT (Ctrl-C) and SIGTERM (`systemctl stop`) end `migrate`, `upload`, `retry` and
`migrate --to-local` promptly, with exit code 130 or 143, and lose nothing: the next run resumes.

Each case puts the agent where a stop used to wait (a rate-limit wait, a slow link, a single Put
Blob of a small file, a request that hangs, the SDK's retry sleeps, a download, an idle watch),
against the session Azurite through tests/faults/faultproxy.py, and signals it once it is there:
the test waits for states (a row `uploading`, a request seen by the proxy, a temporary file on
disk), never for durations. Only the exit code and the end state are asserted; the time from the
signal to the exit is printed, and bounded only by a generous hang guard (HANG_GUARD_S): the
machine is shared, and the 1 s figure comes from bench/interrupt_bench.py (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient, ContainerClient

from tests.faults.conftest import proxied_connection_string
from tests.faults.faultproxy import FaultProxy
from tests.integration.agent_harness import Harness, connection_string_settings
from tests.support.media import make_content_addressed, make_media_roots

# A stop must take well under a second (the benchmark's figure); the test only catches a hang.
HANG_GUARD_S = 20.0
# How long the agent may take to get where the case signals it (start-up on a loaded machine).
REACH_S = 120.0
KIB = 1024


class HoldingProxy(FaultProxy):
    """A fault proxy that can hold its injected error answers after the first `hold_after`, until
    `release` is set: the SDK's tries cannot run out (and the run end by itself) before the test
    has sent its signal."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.hold_after: int | None = None
        self.release = threading.Event()
        self.errors_sent = 0
        self._count_lock = threading.Lock()

    def _error_response(self, status: int, method: str) -> bytes:  # type: ignore[override]
        with self._count_lock:
            self.errors_sent += 1
            n = self.errors_sent
        if self.hold_after is not None and n > self.hold_after:
            self.release.wait(REACH_S)
        return FaultProxy._error_response(status, method)

    def reset(self) -> None:
        self.release.set()
        self.hold_after = None
        self.passthrough()


@dataclass
class Setup:
    h: Harness
    proxy: HoldingProxy
    container: ContainerClient
    roots: dict[str, Path]


@dataclass
class Outcome:
    code: int
    seconds: float  # from the signal to the process being gone
    stderr: str


def make_setup(azurite, tmp: Path, container: ContainerClient) -> Iterator[Setup]:
    """The agent reaching `container` through a fresh proxy; the default 30 s network timeout, so a
    hanging request would hold a stop that waits for it."""
    proxy = HoldingProxy(azurite.host, azurite.port).start()
    try:
        roots = make_media_roots(tmp / "media")
        h = Harness(tmp, roots)
        h.settings = connection_string_settings(
            proxied_connection_string(proxy.port), container.container_name, roots, h.state_dir
        )
        h.write_config()
        yield Setup(h, proxy, container, roots)
    finally:
        proxy.release.set()
        proxy.close()


@pytest.fixture
def setup(azurite, blob_container, tmp_path) -> Iterator[Setup]:
    yield from make_setup(azurite, tmp_path, blob_container)


# ---- libraries ---------------------------------------------------------------------------------


def age(paths: list[Path]) -> None:
    old = time.time() - 3600
    for p in paths:
        os.utime(p, (old, old))


def multi_block_library(roots: dict[str, Path], n: int = 3, size: int = 1024 * KIB, seed: int = 1) -> dict[str, bytes]:
    """Videos of several 256 KiB blocks (the harness's UPLOAD_BLOCK_SIZE)."""
    files = {}
    for i in range(n):
        path, sha = make_content_addressed(roots["video"], size + i, "mp4", seed=seed + i)
        files[f"video/{sha}.mp4"] = path.read_bytes()
    age([roots["video"] / n.split("/", 1)[1] for n in files])
    return files


def small_library(roots: dict[str, Path], n: int = 4, size: int = 160 * KIB, seed: int = 50) -> dict[str, bytes]:
    """Audio files smaller than one block: each goes up in a single Put Blob."""
    files = {}
    for i in range(n):
        path, sha = make_content_addressed(roots["audio"], size + i, "mp3", seed=seed + i)
        files[f"audio/{sha}.mp3"] = path.read_bytes()
    age([roots["audio"] / n.split("/", 1)[1] for n in files])
    return files


# ---- observing the agent -----------------------------------------------------------------------


def rows(h: Harness) -> dict[str, tuple[str, str | None, float]]:
    """blob name -> (state, last_error, next_attempt_at), read without writing anything."""
    path = h.state_dir / "state.sqlite3"
    if not path.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        try:
            return {
                r[0]: (r[1], r[2], r[3])
                for r in conn.execute("SELECT blob_name, state, last_error, next_attempt_at FROM files")
            }
        finally:
            conn.close()
    except sqlite3.OperationalError:  # the agent is creating it
        return {}


def wait_until(proc: subprocess.Popen, what: str, ready: Callable[[], bool]) -> None:
    """Poll until `ready()`; fails (and stops the agent) if the agent exits or never gets there."""
    deadline = time.monotonic() + REACH_S
    while not ready():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the agent exited ({proc.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            proc.communicate()
            raise AssertionError(f"the agent never got to {what} within {REACH_S} s")
        time.sleep(0.01)


def stop(proc: subprocess.Popen, sig: signal.Signals, after: Callable[[], None] | None = None) -> Outcome:
    """Send `sig` (then call `after`); the exit code, the time until the process was gone, and
    its stderr."""
    started = time.monotonic()
    proc.send_signal(sig)
    if after is not None:
        after()
    try:
        _, err = proc.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"still running {HANG_GUARD_S} s after {sig.name}:\n{err[-3000:]}") from None
    return Outcome(proc.returncode, time.monotonic() - started, err)


def request_seen(proxy: FaultProxy, method: str, comp: str | None, under: str) -> Callable[[], bool]:
    return lambda: any(s.method == method and s.comp == comp and f"/{under}/" in s.path for s in proxy.requests())


def any_uploading(h: Harness) -> Callable[[], bool]:
    return lambda: any(state == "uploading" for state, _, _ in rows(h).values())


# ---- what must hold after a stop ---------------------------------------------------------------


def assert_stopped_safely(s: Setup, out: Outcome, sig: signal.Signals, files: dict[str, bytes]) -> None:
    assert out.code == 128 + sig, f"exit {out.code} after {sig.name}:\n{out.stderr[-3000:]}"
    assert f"interrupted by {sig.name}" in out.stderr, out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "internal error" not in out.stderr, out.stderr[-3000:]
    now = time.time()
    for name, (state, error, next_at) in rows(s.h).items():
        # Nothing is left marked as being worked on; what was not finished is due at once.
        assert state in ("pending", "uploaded", "failed", "evicted"), (name, state, error)
        if state == "pending":
            assert next_at <= now, (name, error, next_at)
    # Every local file is still there, and no blob is visible that is not whole.
    for name, data in files.items():
        root, rel = name.split("/", 1)
        path = s.roots[root] / rel
        if path.exists():
            assert path.read_bytes() == data, name
    for b in s.container.list_blobs():
        assert b.name in files and b.size == len(files[b.name]), (b.name, b.size)


def assert_library_in_blob(s: Setup, files: dict[str, bytes]) -> None:
    assert {b.name for b in s.container.list_blobs()} == set(files)
    for name, data in files.items():
        assert s.container.get_blob_client(name).download_blob().readall() == data, name


def resume(s: Setup, files: dict[str, bytes], *args: str) -> None:
    """The next run, on a healthy link, finishes the work."""
    s.proxy.reset()
    result = s.h.cli_json(*args, timeout=300)
    if args[0] == "migrate":
        assert result.get("complete") is True, result
    states = {state for state, _, _ in rows(s.h).values()}
    assert states <= {"uploaded"} and len(rows(s.h)) == len(files), rows(s.h)
    assert_library_in_blob(s, files)


# ---- the cases (shared with bench/interrupt_bench.py) ------------------------------------------


def case_rate_limit(s: Setup, sig: signal.Signals = signal.SIGINT) -> tuple[Outcome, dict[str, bytes]]:
    """`migrate --bwlimit 128K`: the run spends its time in rate-limit waits."""
    files = multi_block_library(s.roots)
    proc = s.h.spawn("migrate", "--bwlimit", "128K", "--concurrency", "2", "--no-progress")
    wait_until(proc, "a file being uploaded", any_uploading(s.h))
    return stop(proc, sig), files


def case_slow_link(s: Setup, sig: signal.Signals = signal.SIGTERM) -> tuple[Outcome, dict[str, bytes]]:
    """A 64 KiB/s link: a Put Block of 256 KiB takes seconds on the wire."""
    files = multi_block_library(s.roots)
    s.proxy.trickle(64 * KIB)
    proc = s.h.spawn("migrate", "--concurrency", "2", "--no-progress")
    wait_until(proc, "a Put Block on the wire", request_seen(s.proxy, "PUT", "block", "video"))
    return stop(proc, sig), files


def case_small_files(s: Setup, sig: signal.Signals = signal.SIGINT) -> tuple[Outcome, dict[str, bytes]]:
    """Files smaller than a block on a slow link: one Put Blob each, no block boundary to stop at."""
    files = small_library(s.roots)
    s.proxy.trickle(32 * KIB)
    proc = s.h.spawn("migrate", "--concurrency", "2", "--no-progress")
    wait_until(proc, "a Put Blob on the wire", request_seen(s.proxy, "PUT", None, "audio"))
    return stop(proc, sig), files


def case_hung_request(s: Setup, sig: signal.Signals = signal.SIGTERM) -> tuple[Outcome, dict[str, bytes]]:
    """A request that hangs mid-body (the link went silent): it would wait out the 30 s timeout."""
    files = multi_block_library(s.roots)
    s.proxy.trickle(64 * KIB)
    proc = s.h.spawn("migrate", "--concurrency", "2", "--no-progress")
    wait_until(proc, "a Put Block on the wire", request_seen(s.proxy, "PUT", "block", "video"))
    s.proxy.stall()
    return stop(proc, sig), files


def _sdk_retrying(s: Setup, proc: subprocess.Popen, sig: signal.Signals) -> Outcome:
    wait_until(proc, "a file being uploaded", any_uploading(s.h))
    # Every request answers 503 from now on; the third answer waits for the test, so the SDK is
    # still retrying (sleeping between tries, or in a try) whenever the signal lands.
    s.proxy.hold_after = 2
    s.proxy.http_errors(1000, (503,))
    wait_until(proc, "the SDK retrying a 503", lambda: s.proxy.errors_sent >= 1)
    try:
        # Released once the signal is sent: from then on the SDK's tries run their natural course.
        return stop(proc, sig, after=s.proxy.release.set)
    finally:
        s.proxy.release.set()


def case_sdk_retrying(s: Setup, sig: signal.Signals = signal.SIGINT) -> tuple[Outcome, dict[str, bytes]]:
    files = multi_block_library(s.roots)
    proc = s.h.spawn("migrate", "--bwlimit", "128K", "--concurrency", "2", "--no-progress")
    return _sdk_retrying(s, proc, sig), files


def case_upload_slow_link(s: Setup, sig: signal.Signals = signal.SIGTERM) -> tuple[Outcome, dict[str, bytes]]:
    """`upload`, as the path unit starts it, stopped by `systemctl stop` on a slow link."""
    files = multi_block_library(s.roots) | small_library(s.roots)
    s.proxy.trickle(64 * KIB)
    proc = s.h.spawn("upload", "--no-watch")
    wait_until(proc, "an upload on the wire", lambda: any(r.method == "PUT" for r in s.proxy.requests()))
    return stop(proc, sig), files


def case_upload_idle(s: Setup, sig: signal.Signals = signal.SIGTERM) -> tuple[Outcome, dict[str, bytes]]:
    """`upload` watching the roots with nothing to do (the path unit's run between two files)."""
    files = small_library(s.roots, n=1)
    s.h.write_config(UPLOAD_IDLE_EXIT_SECONDS="600")
    proc = s.h.spawn("upload")
    wait_until(proc, "the file uploaded", lambda: {st for st, _, _ in rows(s.h).values()} == {"uploaded"})
    return stop(proc, sig), files


def case_retry_sdk_retrying(s: Setup, sig: signal.Signals = signal.SIGINT) -> tuple[Outcome, dict[str, bytes]]:
    """`retry`, as the timer starts it, while the SDK retries."""
    files = multi_block_library(s.roots)
    s.h.write_config(UPLOAD_BANDWIDTH_LIMIT="128KiB")
    proc = s.h.spawn("retry")
    return _sdk_retrying(s, proc, sig), files


def restore_temp_files(s: Setup) -> list[Path]:
    return [p for root in ("audio", "video") for p in s.roots[root].glob(".*.gighive-restore*")]


def case_to_local(s: Setup, sig: signal.Signals = signal.SIGINT) -> tuple[Outcome, dict[str, bytes]]:
    """`migrate --to-local` downloading evicted files over a slow link."""
    files = multi_block_library(s.roots, n=2)
    s.h.cli("migrate", "--evict-local", "--no-progress", check=True)
    assert {st for st, _, _ in rows(s.h).values()} == {"evicted"}
    s.proxy.trickle(64 * KIB)
    proc = s.h.spawn("migrate", "--to-local", "--no-progress")
    wait_until(proc, "a download under way", lambda: bool(restore_temp_files(s)))
    return stop(proc, sig), files


# ---- the tests ---------------------------------------------------------------------------------


def _report(name: str, out: Outcome) -> None:
    print(f"\n[interrupt] {name}: exit {out.code} {out.seconds:.2f} s after the signal")


@pytest.mark.parametrize(
    "case",
    [case_rate_limit, case_slow_link, case_small_files, case_hung_request, case_sdk_retrying],
    ids=lambda c: c.__name__.removeprefix("case_"),
)
def test_migrate_stops_promptly_and_the_next_run_resumes(setup: Setup, case) -> None:
    out, files = case(setup)
    _report(case.__name__, out)
    assert_stopped_safely(setup, out, signal.SIGINT if out.code == 130 else signal.SIGTERM, files)
    resume(setup, files, "migrate")


@pytest.mark.parametrize(
    ("case", "sig"),
    [(case_upload_slow_link, signal.SIGTERM), (case_retry_sdk_retrying, signal.SIGINT)],
    ids=["upload_sigterm_slow_link", "retry_sigint_sdk_retrying"],
)
def test_upload_and_retry_stop_promptly_and_retry_resumes(setup: Setup, case, sig) -> None:
    out, files = case(setup)
    _report(case.__name__, out)
    assert_stopped_safely(setup, out, sig, files)
    resume(setup, files, "retry")


def test_upload_watching_idle_stops_on_sigterm(setup: Setup) -> None:
    out, files = case_upload_idle(setup)
    _report("upload idle", out)
    assert_stopped_safely(setup, out, signal.SIGTERM, files)
    assert_library_in_blob(setup, files)


def test_to_local_stops_mid_download_and_the_next_run_restores_every_file(setup: Setup) -> None:
    out, files = case_to_local(setup)
    _report("to-local", out)
    assert out.code == 130, out.stderr[-3000:]
    assert "interrupted by SIGINT" in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]
    # No half-downloaded file under a real name: each file is either absent or whole.
    for name, data in files.items():
        root, rel = name.split("/", 1)
        path = setup.roots[root] / rel
        assert not path.exists() or path.read_bytes() == data, name
    setup.proxy.reset()
    result = setup.h.cli_json("migrate", "--to-local", timeout=300)
    assert result["complete"] is True, result
    for name, data in files.items():
        root, rel = name.split("/", 1)
        assert (setup.roots[root] / rel).read_bytes() == data, name
    # What the stopped run left half-written was removed by the next one.
    assert restore_temp_files(setup) == []


def test_json_output_says_interrupted(setup: Setup) -> None:
    multi_block_library(setup.roots, n=1)
    proc = setup.h.spawn("migrate", "--bwlimit", "128K", "--json")
    wait_until(proc, "a file being uploaded", any_uploading(setup.h))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 130, err[-3000:]
    assert json.loads(out) == {
        "error": "Interrupted",
        "message": "stopped by SIGINT; run it again to continue",
        "exit_code": 130,
    }


def fresh_container(azurite) -> ContainerClient:
    """For the benchmark: a new container in `azurite` per try."""
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    return service.create_container(f"intr-{uuid.uuid4().hex[:20]}")


# ---- the long-running checks: verify, reconcile, fetch -----------------------------------------


def state_table(h: Harness) -> list[tuple]:
    """Every column of every row: what a command that changes nothing must leave as it was."""
    conn = sqlite3.connect(f"file:{h.state_dir / 'state.sqlite3'}?mode=ro", uri=True, timeout=10)
    try:
        return conn.execute("SELECT * FROM files ORDER BY blob_name").fetchall()
    finally:
        conn.close()


def hold_every_request(s: Setup) -> Callable[[], bool]:
    """From now on no request gets an answer until the test releases the proxy (a link gone
    silent): the agent sits in a socket read. Returns "the agent is waiting for an answer"."""
    s.proxy.hold_after = 0
    s.proxy.http_errors(1000, (503,))
    return lambda: s.proxy.errors_sent >= 1


def uploaded_library(s: Setup, *migrate_args: str) -> dict[str, bytes]:
    files = multi_block_library(s.roots, n=2) | small_library(s.roots, n=2)
    s.h.cli("migrate", "--no-progress", *migrate_args, check=True, timeout=300)
    return files


def case_verify_held(s: Setup, sig: signal.Signals = signal.SIGINT) -> tuple[Outcome, dict[str, bytes]]:
    """`verify --all` while its requests get no answer (each would wait out the network timeout,
    and the thread pool used to wait for every one of them)."""
    files = uploaded_library(s)
    waiting = hold_every_request(s)
    proc = s.h.spawn("verify", "--all", "--no-progress")
    wait_until(proc, "a request of verify held", waiting)
    return stop(proc, sig), files


def case_verify_readback_slow_link(s: Setup, sig: signal.Signals = signal.SIGTERM) -> tuple[Outcome, dict[str, bytes]]:
    """`verify --all --readback` downloading blobs over a slow link."""
    files = uploaded_library(s)
    s.proxy.trickle(64 * KIB)
    proc = s.h.spawn("verify", "--all", "--readback", "--no-progress")
    wait_until(proc, "a download of verify on the wire", request_seen(s.proxy, "GET", None, "video"))
    return stop(proc, sig), files


def case_reconcile_held(
    s: Setup, sig: signal.Signals = signal.SIGINT, before: list[list[tuple]] | None = None
) -> tuple[Outcome, dict[str, bytes]]:
    """`reconcile` holding the queue lock while the container listing gets no answer (`before`
    receives the state as it was when reconcile started)."""
    files = uploaded_library(s)
    if before is not None:
        before.append(state_table(s.h))
    waiting = hold_every_request(s)
    proc = s.h.spawn("reconcile")
    wait_until(proc, "a request of reconcile held", waiting)
    return stop(proc, sig), files


def case_fetch_slow_link(s: Setup, sig: signal.Signals = signal.SIGINT) -> tuple[Outcome, dict[str, bytes]]:
    """`fetch` of evicted files over a slow link."""
    files = multi_block_library(s.roots, n=2)
    s.h.cli("migrate", "--evict-local", "--no-progress", check=True, timeout=300)
    assert {st for st, _, _ in rows(s.h).values()} == {"evicted"}
    s.proxy.trickle(64 * KIB)
    proc = s.h.spawn("fetch", *files)
    wait_until(proc, "a download of fetch under way", lambda: bool(restore_temp_files(s)))
    return stop(proc, sig), files


@pytest.mark.parametrize("case", [case_verify_held, case_verify_readback_slow_link], ids=["held", "readback_slow"])
def test_verify_stops_promptly_and_changes_nothing(setup: Setup, case) -> None:
    out, files = case(setup)
    _report(case.__name__, out)
    sig = signal.SIGINT if out.code == 130 else signal.SIGTERM
    assert_stopped_safely(setup, out, sig, files)
    # The stop is the only outcome: no verdict was printed as if the run had finished.
    assert "verify finished" not in out.stderr, out.stderr[-3000:]
    setup.proxy.reset()
    before = state_table(setup.h)
    result = setup.h.cli_json("verify", "--all", "--readback", timeout=300)
    assert result["counts"]["ok"] == len(files), result
    assert state_table(setup.h) == before


def test_reconcile_stops_promptly_releases_the_queue_and_changes_nothing(setup: Setup) -> None:
    before: list[list[tuple]] = []
    out, files = case_reconcile_held(setup, signal.SIGINT, before)
    _report("reconcile held", out)
    assert_stopped_safely(setup, out, signal.SIGINT, files)
    assert state_table(setup.h) == before[0]
    # The queue lock went with the process: the next run gets it at once and finds nothing to do.
    setup.proxy.reset()
    done = setup.h.cli("reconcile", "--json", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["repairs"] == [] and result["unsafe"] == [], result


def test_fetch_stops_mid_download_and_the_next_run_fetches_every_file(setup: Setup) -> None:
    out, files = case_fetch_slow_link(setup)
    _report("fetch slow link", out)
    assert_stopped_safely(setup, out, signal.SIGINT, files)
    # No half-downloaded file under a real name: each is absent or whole (assert_stopped_safely).
    setup.proxy.reset()
    done = setup.h.cli("fetch", *files, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, data in files.items():
        root, rel = name.split("/", 1)
        assert (setup.roots[root] / rel).read_bytes() == data, name
    assert restore_temp_files(setup) == []
    assert {st for st, _, _ in rows(setup.h).values()} == {"uploaded"}


def test_verify_json_output_says_interrupted(setup: Setup) -> None:
    uploaded_library(setup)
    waiting = hold_every_request(setup)
    proc = setup.h.spawn("verify", "--all", "--json")
    wait_until(proc, "a request of verify held", waiting)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=HANG_GUARD_S)
    assert proc.returncode == 143, err[-3000:]
    assert json.loads(out) == {
        "error": "Interrupted",
        "message": "stopped by SIGTERM; run it again to continue",
        "exit_code": 143,
    }
