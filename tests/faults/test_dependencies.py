"""Dependencies going away under the real CLI: MySQL, the state directory, the media root, the
clock and the credential. Each must give a clear error in the log and in `status --json`, lose
nothing, and recover once the fault goes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests
from azure.storage.blob import BlobServiceClient

from agent.state import StateStore
from tests.faults.conftest import assert_blobs_identical, pointer_rows, records, with_mysql
from tests.integration.agent_harness import REPO, Harness, connection_string_settings
from tests.support.media import make_content_addressed, make_media_roots


def library(roots, seed: int, n: int = 3, size: int = 600_000) -> dict[str, tuple[Path, bytes]]:
    files = {}
    for i in range(n):
        path, sha = make_content_addressed(roots["video"], size + i * 1000, "mp4", seed=seed + i)
        files[f"video/{sha}.mp4"] = (path, path.read_bytes())
    return files


# ---- MySQL ---------------------------------------------------------------------------------------


def test_mysql_stopped_mid_run_keeps_files_until_the_pointer_flips(
    harness, blob_container, media_roots, media_db, tmp_path
):
    h = with_mysql(harness, media_db, tmp_path)
    # About 14 s of uploading at this rate, one file at a time.
    h.write_config(DELETE_LOCAL_AFTER_UPLOAD="true", UPLOAD_FILE_CONCURRENCY="1", UPLOAD_BANDWIDTH_LIMIT="256KiB")
    files = library(media_roots, 800, n=6)
    # The agent is frozen (SIGSTOP) as soon as the first pointer row exists, and thawed only once
    # MySQL is fully down: how long MariaDB takes to shut down on a loaded machine cannot let the
    # run finish first. Only the poll's own latency races the next file (seconds away).
    proc = h.spawn("upload", "--no-watch", "--json")
    try:
        while not pointer_rows(media_db):
            assert proc.poll() is None, f"the run ended before any pointer was written: {proc.communicate()}"
            time.sleep(0.02)
        proc.send_signal(signal.SIGSTOP)
        media_db.stop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    result = json.loads(out)
    # Where the thaw finds the agent decides which step meets MySQL first: the next file's pointer
    # flip (recorded as pending), or the first file's eviction, whose witness check cannot reach
    # the DB: an outage, which ends the run with the rest held back. Either way nothing is deleted
    # without its pointer; what follows checks that.
    if result["pointer_failures"]:
        assert "the DB pointer could not be updated" in err and "unreachable" in err
    else:
        assert "unreachable" in (result["outage"] or "") and result["held_back"] >= 1, result
    status = h.cli_json("status")
    pending = status["pointer_pending"]
    assert len(pending) == result["pointer_failures"] and all("unreachable" in p["error"] for p in pending)
    media_db.start()
    # The DB as the outage left it (only the agent writes these rows): every file already deleted
    # must have been pointed at its verified blob before it went. Files that were not are still
    # the truth and must still be on disk.
    rows = pointer_rows(media_db)
    recs = records(h)
    deleted = [name for name, (path, _) in files.items() if not path.exists()]
    for name in deleted:
        assert name in rows, f"{name} deleted before the DB pointed at its blob"
        assert (rows[name]["provider"], rows[name]["etag"]) == ("azure_blob", recs[name].etag)
    assert len(deleted) < len(files), "MySQL was stopped too late to test anything"
    again = h.cli_json("retry")
    assert again["pointers_flipped"] >= len(pending)
    assert {r.state for r in records(h).values()} == {"evicted"}
    assert all(not p.exists() for p, _ in files.values())
    rows = pointer_rows(media_db)
    assert {n: (r["provider"], r["local_copy"]) for n, r in rows.items()} == dict.fromkeys(files, ("azure_blob", 0))
    assert_blobs_identical(blob_container, {n: d for n, (_, d) in files.items()})
    print(
        f"\n[deps] mysql stopped after the first flip: {len(deleted)} of {len(files)} deleted during the outage, "
        f"{len(pending)} pointer update(s) pending, all flipped after restart"
    )


# ---- state directory -----------------------------------------------------------------------------


@contextlib.contextmanager
def mounted(argv_mount: list[list[str]], target: Path):
    """Run mount commands; skip the test if this machine does not allow mounting."""
    for argv in argv_mount:
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            subprocess.run(["umount", str(target)], capture_output=True, check=False)
            pytest.skip(f"cannot mount here ({' '.join(argv)}: {proc.stderr.strip()}); needs root and CAP_SYS_ADMIN")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)


def test_state_directory_full_exits_73_and_loses_nothing(harness, blob_container, media_roots, tmp_path):
    h = harness
    state = h.state_dir
    state.mkdir()
    with mounted([["mount", "-t", "tmpfs", "-o", "size=1m,mode=0750", "tmpfs", str(state)]], state):
        first = library(media_roots, 820, n=1)
        h.cli("upload", "--no-watch", check=True)
        with contextlib.suppress(OSError), open(state / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        more = library(media_roots, 830, n=2)
        proc = h.cli("upload", "--no-watch")
        assert proc.returncode == 73, proc.stderr
        assert "state database" in proc.stderr and "full" in proc.stderr
        status = h.cli_json("status")
        assert "is full" in status["state_dir_problem"], status
        assert status["counts"]["uploaded"] == 1  # status still reads the state: it writes nothing
        assert all(p.exists() for p, _ in {**first, **more}.values())
        (state / "filler").unlink()
        h.cli("upload", "--no-watch", check=True)
        assert {r.state for r in records(h).values()} == {"uploaded"}
        assert_blobs_identical(blob_container, {n: d for n, (_, d) in {**first, **more}.items()})


def test_state_directory_read_only_exits_73_and_loses_nothing(harness, blob_container, media_roots):
    h = harness
    first = library(media_roots, 840, n=1)
    h.cli("upload", "--no-watch", check=True)
    more = library(media_roots, 850, n=1)
    state = h.state_dir
    with mounted([["mount", "--bind", str(state), str(state)], ["mount", "-o", "remount,bind,ro", str(state)]], state):
        proc = h.cli("upload", "--no-watch")
        assert proc.returncode == 73, proc.stderr
        assert "Read-only file system" in proc.stderr
        status = h.cli_json("status")
        assert "not writable" in status["state_dir_problem"], status
        assert status["counts"]["uploaded"] == 1
    assert all(p.exists() for p, _ in {**first, **more}.values())
    h.cli("upload", "--no-watch", check=True)
    assert {r.state for r in records(h).values()} == {"uploaded"}
    assert_blobs_identical(blob_container, {n: d for n, (_, d) in {**first, **more}.items()})


# ---- media root unreadable ---------------------------------------------------------------------


def test_unreadable_media_root_and_file_are_reported_and_retried(azurite, blob_container):
    """The agent runs as an unprivileged user (root would read anything); the audio root is mode
    000 and one video file is mode 000."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to run the CLI as nobody")
    base = Path(tempfile.mkdtemp(prefix="gighive-unreadable-"))
    try:
        base.chmod(0o755)
        roots = make_media_roots(base / "media")
        h = Harness(base, roots)
        h.settings = connection_string_settings(
            azurite.connection_string, blob_container.container_name, roots, h.state_dir
        )
        h.settings.update(RETRY_BASE_DELAY="0", RETRY_MAX_DELAY="0")
        h.write_config()
        audio_path, audio_sha = make_content_addressed(roots["audio"], 4000, "mp3", seed=860)
        ok_path, ok_sha = make_content_addressed(roots["video"], 300_000, "mp4", seed=861)
        locked_path, locked_sha = make_content_addressed(roots["video"], 400_000, "mp4", seed=862)
        expected = {f"audio/{audio_sha}.mp3": audio_path, f"video/{ok_sha}.mp4": ok_path}
        expected[f"video/{locked_sha}.mp4"] = locked_path
        for p in (base, h.state_dir if h.state_dir.exists() else None):
            if p is not None:
                os.chown(p, 65534, 65534)
        h.state_dir.mkdir(exist_ok=True)
        os.chown(h.state_dir, 65534, 65534)
        os.chown(h.config_path, 65534, 65534)
        for d in (roots["root"], roots["audio"], roots["video"], roots["thumbnails"]):
            os.chown(d, 65534, 65534)
        for p in expected.values():
            os.chown(p, 65534, 65534)
        roots["audio"].chmod(0o000)
        locked_path.chmod(0o000)

        def as_nobody(*args: str) -> subprocess.CompletedProcess:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
            env.pop("JOURNAL_STREAM", None)
            argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "agent"]
            return subprocess.run(
                [*argv, "--config", str(h.config_path), *args],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=REPO,
                env=env,
            )

        proc = as_nobody("upload", "--no-watch", "--json")
        assert proc.returncode == 0, proc.stderr
        assert "media root audio" in proc.stderr and "permission denied" in proc.stderr
        assert "permission denied" in proc.stderr.split("media root audio", 1)[1]
        status = json.loads(as_nobody("status", "--json").stdout)
        assert "audio" in json.dumps(status.get("root_errors")), status
        failing = {f["blob_name"]: f for f in status["failing"]}
        assert "permission denied" in failing[f"video/{locked_sha}.mp4"]["last_error"]
        names = {b.name for b in blob_container.list_blobs()}
        assert names == {f"video/{ok_sha}.mp4"}
        roots["audio"].chmod(0o755)
        locked_path.chmod(0o644)
        again = as_nobody("retry", "--json")
        assert again.returncode == 0, again.stderr
        status = json.loads(as_nobody("status", "--json").stdout)
        assert not status.get("root_errors"), status
        assert status["counts"]["uploaded"] == 3
        assert_blobs_identical(blob_container, {n: p.read_bytes() for n, p in expected.items()})
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(base)], check=False)
        shutil.rmtree(base, ignore_errors=True)


# ---- clock jumps ---------------------------------------------------------------------------------


def test_clock_jumps_do_not_strand_retries(private_harness, media_roots):
    """A failure scheduled under one clock must not wait for days under another: rows whose next
    attempt lies beyond the longest backoff count as due; rows inside their backoff do not."""
    h, az = private_harness
    h.write_config(RETRY_BASE_DELAY="60", RETRY_MAX_DELAY="3600", UPLOAD_FILE_CONCURRENCY="1")
    files = library(media_roots, 870, n=3, size=5_000)
    az.stop()
    h.cli("upload", "--no-watch", check=True)
    az.start()
    names = sorted(files)
    now = time.time()
    s = StateStore.open(h.state_dir)
    try:
        # names[2] is half an hour into a backoff that may last up to 1.5 h: still not due when the
        # retry runs, however slow the machine (50 s was only just ahead of a loaded run's start).
        schedule = {names[0]: now + 30 * 86400, names[1]: now - 30 * 86400, names[2]: now + 1800}
        for name, when in schedule.items():
            s._db.execute(
                "UPDATE files SET state = 'failed', attempts = 1, next_attempt_at = ? WHERE blob_name = ?",
                (when, name),
            )
    finally:
        s.close()
    result = h.cli_json("retry")
    assert result["uploaded"] == 2, result
    recs = records(h)
    assert recs[names[0]].state == "uploaded"  # clock went back: scheduled 30 days ahead
    assert recs[names[1]].state == "uploaded"  # clock went forward: overdue by 30 days
    assert recs[names[2]].state == "failed"  # still inside its backoff: not retried early


def test_faketime_clock_jump_backwards(private_harness, media_roots):
    """The same with a real clock jump: the retry run itself sees a clock 30 days behind."""
    faketime = shutil.which("faketime")
    if faketime is None:
        pytest.skip("faketime is not installed (.ci/setup installs Debian's faketime package)")
    h, az = private_harness
    h.write_config(RETRY_BASE_DELAY="60", RETRY_MAX_DELAY="3600")
    files = library(media_roots, 880, n=1, size=5_000)
    az.stop()
    h.cli("upload", "--no-watch", check=True)
    az.start()
    rec = next(iter(records(h).values()))
    # The outage postponed it by the backoff (not charged as an attempt): a clock 30 days behind
    # must still find it due rather than wait a month.
    assert rec.state == "pending" and rec.attempts == 0 and rec.next_attempt_at > time.time()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AZURE_", "MEDIA_", "MYSQL_", "UPLOAD_"))}
    argv = [faketime, "-f", "-30d", sys.executable, "-m", "agent", "--config", str(h.config_path), "retry", "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["uploaded"] == 1, proc.stdout + proc.stderr
    assert {r.state for r in records(h).values()} == {"uploaded"}
    assert set(files)


# ---- credential expiring -------------------------------------------------------------------------

_OTHER_MI_SOURCES = (
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IMDS_ENDPOINT",
    "AZURE_FEDERATED_TOKEN_FILE",
    "IDENTITY_SERVER_THUMBPRINT",
)


def test_short_lived_tokens_are_refreshed_during_a_long_upload(
    tmp_path, media_roots, azurite_factory, tls, token_server, monkeypatch
):
    """Tokens live 5 s; a bandwidth-capped multi-block upload takes several lifetimes over HTTPS +
    OAuth Azurite, which rejects expired tokens. The upload must refresh and finish."""
    az = azurite_factory(https=True, oauth=True)
    container = f"tok-{uuid.uuid4().hex[:12]}"
    service = BlobServiceClient.from_connection_string(az.connection_string, connection_verify=str(tls.ca))
    service.create_container(container)
    # The premise: this Azurite refuses an expired bearer token (else the test proves nothing).
    expired = token_server.mint(lifetime=-600)
    r = requests.get(
        f"{az.blob_endpoint}/{container}?restype=container&comp=list",
        headers={"Authorization": f"Bearer {expired}", "x-ms-version": "2021-12-02"},
        verify=str(tls.ca),
        timeout=10,
    )
    assert r.status_code in (401, 403), r.status_code
    token_server.set_lifetime(5)
    h = Harness(tmp_path, media_roots)
    h.settings = {
        "MEDIA_STORAGE_BACKEND": "azure_blob",
        "AZURE_AUTH_MODE": "managed_identity",
        "AZURE_STORAGE_ACCOUNT_NAME": "devstoreaccount1",
        "AZURE_STORAGE_CONTAINER_NAME": container,
        "AZURE_BLOB_ENDPOINT": az.blob_endpoint,
        "AZURE_CA_BUNDLE": str(tls.ca),
        "MEDIA_ROOTS": f"audio={media_roots['audio']},video={media_roots['video']}",
        "GIGHIVE_MEDIA_STATE_DIR": str(h.state_dir),
        "UPLOAD_SETTLE_SECONDS": "0",
        "UPLOAD_BLOCK_SIZE": "256KiB",
        "UPLOAD_BLOCK_CONCURRENCY": "1",
        "UPLOAD_BANDWIDTH_LIMIT": "192KiB",
    }
    h.write_config()
    path, sha = make_content_addressed(media_roots["video"], 3 * 1024 * 1024, "mp4", seed=890)
    for var in _OTHER_MI_SOURCES:
        monkeypatch.delenv(var, raising=False)
    env = {"AZURE_POD_IDENTITY_AUTHORITY_HOST": token_server.url}
    started = time.time()
    proc = h.cli("upload", "--no-watch", "--json", env=env, timeout=300)
    took = time.time() - started
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["uploaded"] == 1 and result["failed"] == 0, (result["errors"], proc.stderr[-3000:])
    issued = token_server.issued
    # The premise: tokens were still being minted after the first one had expired, so the upload
    # outlived it and could only finish with fresh ones.
    assert len(issued) >= 2 and issued[-1]["exp"] - 5 > issued[0]["exp"], issued
    got = service.get_container_client(container).get_blob_client(f"video/{sha}.mp4").download_blob().readall()
    assert got == path.read_bytes()
    print(f"\n[deps] token lifetime 5 s, upload {took:.1f} s, tokens issued {len(issued)}")
