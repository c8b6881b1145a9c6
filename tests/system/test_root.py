"""An operator runs a state-writing command with sudo before the units ever ran (the operations
guide shows `sudo gighive-media migrate`). The run must leave no root-owned state behind: the
services, which run as gighive-media, keep working afterwards."""

from __future__ import annotations

import os

import pytest
from azure.storage.blob import ContainerClient

from tests.support.azurite import Azurite
from tests.system.nspawn import Container
from tests.system.test_upload import land

pytestmark = pytest.mark.system

CREDENTIAL = "/etc/credstore/gighive-media-agent.azure-storage-connection-string"


def test_a_run_as_root_becomes_the_service_user_and_the_units_still_work(
    installed: Container, configure_agent, azurite: Azurite, blob_container: ContainerClient
) -> None:
    env = {
        "AZURE_AUTH_MODE": "connection_string",
        "AZURE_STORAGE_CONTAINER_NAME": blob_container.container_name,
        "UPLOAD_SETTLE_SECONDS": "0",
    }
    setup = configure_agent(
        installed,
        roots={"video": "/srv/gighive/video"},
        env=env,
        credentials={"azure-storage-connection-string": azurite.connection_string},
    )
    assert installed.run(["test", "-e", "/var/lib/gighive-media-agent"], check=False).returncode != 0
    first = land(installed, setup.roots["video"], os.urandom(200_000))

    # A root shell has no $CREDENTIALS_DIRECTORY: the operator names the secret file (0600 root),
    # which root reads before it drops to the service user.
    as_root = ["env", f"AZURE_STORAGE_CONNECTION_STRING_FILE={CREDENTIAL}", "gighive-media"]
    ran = installed.run([*as_root, "migrate", "--no-progress"], check=False)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "running as the service user gighive-media" in ran.stderr
    assert blob_container.get_blob_client(f"video/{first}").exists()
    owners = installed.run(
        [
            "stat",
            "-c",
            "%U %n",
            "/var/lib/gighive-media-agent",
            "/var/lib/gighive-media-agent/state.sqlite3",
            "/var/lib/gighive-media-agent/queue.lock",
        ]
    ).stdout.split("\n")
    assert all(line.startswith("gighive-media ") for line in owners if line), owners

    # `status` as root only looks: it must not create anything either.
    installed.run([*as_root, "status"], check=False)
    root_owned = installed.run(["find", "/var/lib/gighive-media-agent", "-user", "root"]).stdout.strip()
    assert root_owned == "", root_owned

    # The service, as gighive-media, uses the same state.
    second = land(installed, setup.roots["video"], os.urandom(300_000))
    installed.systemctl("start", "gighive-media-retry.service", check=False)
    final = installed.wait_inactive("gighive-media-retry.service", timeout=120)
    log = installed.journal("gighive-media-retry.service", "-o", "cat")
    assert final["Result"] == "success" and final["ExecMainStatus"] == "0", log
    assert blob_container.get_blob_client(f"video/{second}").exists(), log
