"""The upload path as a user runs it: a file lands in a media root, systemd's path unit starts the
agent, and the blob appears in Azurite (on the host's loopback), verified."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
from azure.storage.blob import ContainerClient

from tests.support.azurite import Azurite
from tests.system.conftest import agent_cli
from tests.system.nspawn import Container, wait_for

pytestmark = pytest.mark.system

SERVICE = "gighive-media-upload.service"


def agent_env_for(azurite: Azurite, container: ContainerClient) -> tuple[dict[str, str], dict[str, str]]:
    """agent.env values and credentials for Azurite with the connection string as a credential."""
    env = {
        "AZURE_AUTH_MODE": "connection_string",
        "AZURE_STORAGE_CONTAINER_NAME": container.container_name,
        "UPLOAD_SETTLE_SECONDS": "0",
        "UPLOAD_IDLE_EXIT_SECONDS": "3",
    }
    return env, {"azure-storage-connection-string": azurite.connection_string}


def land(c: Container, root: str, data: bytes, ext: str = "mp4") -> str:
    """Move a finished file into a media root the way GigHive's finalize does (write, then rename)."""
    name = f"{hashlib.sha256(data).hexdigest()}.{ext}"
    staging = c.path("/srv/gighive/staging")
    staging.mkdir(parents=True, exist_ok=True)
    (staging / name).write_bytes(data)
    os.chmod(staging / name, 0o644)
    os.rename(staging / name, c.path(f"{root}/{name}"))
    return name


def test_file_moved_into_a_media_root_is_uploaded_by_the_path_unit(
    installed: Container, configure_agent, azurite: Azurite, blob_container: ContainerClient
) -> None:
    env, credentials = agent_env_for(azurite, blob_container)
    setup = configure_agent(installed, roots={"video": "/srv/gighive/video"}, env=env, credentials=credentials)
    installed.systemctl("enable", "--now", "gighive-media-upload.path")

    data = os.urandom(1024 * 1024)
    landed_at = time.time()  # the container shares the host's clock
    name = land(installed, setup.roots["video"], data)
    blob = blob_container.get_blob_client(f"video/{name}")
    wait_for(blob.exists, timeout=300, interval=0.1, what=f"blob video/{name}")
    assert blob.download_blob().readall() == data
    props = blob.get_blob_properties()
    assert props.metadata.get("sha256") == name.split(".")[0], props.metadata

    final = installed.wait_inactive(SERVICE, timeout=300)
    log = installed.journal(SERVICE, "-o", "cat")
    assert final["Result"] == "success" and final["ExecMainStatus"] == "0", log
    assert "Logging error" not in log, log
    fields = [json.loads(line) for line in installed.journal(SERVICE, "-o", "json").splitlines()]
    ours = [f for f in fields if f.get("SYSLOG_IDENTIFIER") == "gighive-media"]
    done = [f for f in ours if f.get("BLOB_NAME") == f"video/{name}" and f.get("SHA256") == name.split(".")[0]]
    assert done and done[-1].get("BYTES") == str(len(data)), ours[-5:]
    # Benchmark figure (not an assertion): file landing -> blob committed and verified.
    verified_at = int(done[-1]["__REALTIME_TIMESTAMP"]) / 1e6
    print(f"1 MiB file landed -> blob verified: {verified_at - landed_at:.2f} s")
    status = installed.systemctl("status", SERVICE, check=False).stdout
    assert "status=0/SUCCESS" in status and "Traceback" not in status, status
    path = installed.show("gighive-media-upload.path", "ActiveState", "SubState")
    assert path == {"ActiveState": "active", "SubState": "waiting"}, path
    failed = installed.systemctl("list-units", "--failed", "--plain", "--no-legend").stdout
    assert "gighive" not in failed, failed
    processes = installed.run(["pgrep", "-u", "gighive-media"], check=False).stdout.split()
    print(f"agent processes resident while idle: {len(processes)}")
    assert processes == []


FAST_TIMER = """[Timer]
# Test only: an empty assignment resets every trigger of the shipped timer, then run often.
OnActiveSec=
OnActiveSec=2s
OnUnitInactiveSec=3s
RandomizedDelaySec=0
AccuracySec=1s
"""


def test_while_azure_is_down_the_file_stays_local_and_the_timer_uploads_it_later(
    installed: Container, configure_agent, azurite: Azurite, blob_container: ContainerClient
) -> None:
    env, credentials = agent_env_for(azurite, blob_container)
    env.update({"RETRY_BASE_DELAY": "0", "RETRY_MAX_DELAY": "0"})
    setup = configure_agent(installed, roots={"video": "/srv/gighive/video"}, env=env, credentials=credentials)
    installed.write("/etc/systemd/system/gighive-media-retry.timer.d/fast.conf", FAST_TIMER)
    installed.systemctl("daemon-reload")
    installed.systemctl("enable", "--now", "gighive-media-upload.path")

    azurite.stop()
    data = os.urandom(256 * 1024)
    name = land(installed, setup.roots["video"], data)
    wait_for(lambda: "Started gighive-media-upload" in installed.journal(SERVICE), timeout=300, what="a run")
    run = installed.wait_inactive(SERVICE, timeout=120)
    log = installed.journal(SERVICE, "-o", "cat")
    # A failed upload is recorded for the timer, not reported as a failed unit.
    assert run["Result"] == "success" and run["ExecMainStatus"] == "0", log
    assert installed.path(f"{setup.roots['video']}/{name}").read_bytes() == data, "the file stays local"
    status = json.loads(agent_cli(installed, "status", "--json", check=False).stdout)
    # An outage, not the file's failure: it waits, queued, and status says so.
    assert status["counts"].get("pending") == 1 and status["counts"].get("failed") == 0, status
    assert status["outage"] is not None and "unreachable" in status["outage"]["last_error"], status

    # Timer runs while Azure is still down keep failing without failing any unit.
    installed.systemctl("start", "gighive-media-retry.timer")
    wait_for(
        lambda: installed.journal("gighive-media-retry.service").count("Finished gighive-media-retry") >= 2,
        timeout=300,
        what="two retry runs while Azure is down",
    )
    for unit in ("gighive-media-upload.path", "gighive-media-retry.timer"):
        assert installed.show(unit, "ActiveState")["ActiveState"] == "active", unit
    failed = installed.systemctl("list-units", "--failed", "--plain", "--no-legend").stdout
    assert "gighive" not in failed, failed

    azurite.start()  # same port: the configured connection string still points at it
    blob = blob_container.get_blob_client(f"video/{name}")
    wait_for(blob.exists, timeout=300, interval=0.5, what="the timer's retry to upload the blob")
    assert blob.download_blob().readall() == data
    retry_log = installed.journal("gighive-media-retry.service", "-o", "cat")
    assert f"video/{name}" in retry_log, retry_log
