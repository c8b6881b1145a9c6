"""The media_storage_azure_blob role, applied for real with ansible-playbook (connection: local)
inside a booted Debian 12 container, against the session's Azurite on the shared 127.0.0.1.

One container for the module: the tests run in order (install, idempotence, back to local,
bad variables), as an operator would apply the role over time.

Docker is not in the container. For the volume:<name> media root, /usr/local/bin/docker is a tiny
stand-in script that answers only `docker volume inspect NAME` with the JSON the real CLI prints
(the mountpoint under /var/lib/docker/volumes); everything else about the volume is real: a
root-only /var/lib/docker, and a _data directory owned by www-data (uid 33) as tusd's would be.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.system.nspawn import Container

UNITS = ("gighive-media-upload.path", "gighive-media-retry.timer", "gighive-media-stream.socket")
VOLUME = "files_video"
VOLUME_DATA = f"/var/lib/docker/volumes/{VOLUME}/_data"

FAKE_DOCKER = """#!/bin/sh
# Test stand-in for the docker CLI: answers only `docker volume inspect NAME`, like the real one.
if [ "$1" != volume ] || [ "$2" != inspect ] || [ -z "$3" ]; then
    echo "fake docker: only 'docker volume inspect NAME' is supported" >&2
    exit 1
fi
if [ ! -d "/var/lib/docker/volumes/$3" ]; then
    echo "[]"; echo "Error response from daemon: get $3: no such volume" >&2; exit 1
fi
printf '[{"CreatedAt": "2026-01-01T00:00:00Z", "Driver": "local", "Labels": null, '
printf '"Mountpoint": "/var/lib/docker/volumes/%s/_data", "Name": "%s", "Options": null, "Scope": "local"}]\\n' "$3" "$3"
"""


def playbook(c: Container, variables: dict, check: bool = False) -> tuple[int, str, dict[str, int]]:
    c.write("/root/vars.json", json.dumps(variables), mode=0o600)
    argv = [
        "env",
        "HOME=/root",
        "ANSIBLE_ROLES_PATH=/root/ansible/roles",
        "ANSIBLE_NOCOLOR=1",
        "ANSIBLE_PYTHON_INTERPRETER=/usr/bin/python3",
        "ANSIBLE_LOCALHOST_WARNING=0",
        "ansible-playbook",
        "-i",
        "localhost,",
        "-c",
        "local",
        "-e",
        "ansible_become=false",
        "-e",
        "@/root/vars.json",
        "/root/ansible/playbooks/media_storage.yml",
    ]
    r = c.run(argv, check=False, timeout=600)
    out = r.stdout + r.stderr
    m = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", out)
    recap = dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups()), strict=True)) if m else {}
    return r.returncode, out, recap


@pytest.fixture(scope="module")
def host(ansible_container: Container) -> Container:
    c = ansible_container
    c.write("/usr/local/bin/docker", FAKE_DOCKER, mode=0o755)
    c.sh(
        f"install -d -m 0710 /var/lib/docker && install -d -m 0701 /var/lib/docker/volumes "
        f"&& install -d -m 0755 /var/lib/docker/volumes/{VOLUME} && install -d -o 33 -g 33 -m 0755 {VOLUME_DATA} "
        f"&& install -d -o 33 -g 33 -m 0755 {VOLUME_DATA}/thumbnails "
        "&& install -d -o 33 -g 33 -m 0755 /srv/gighive/audio"
    )
    return c


@pytest.fixture(scope="module")
def azure_vars(azurite, role_container_name, deb) -> dict:
    return {
        "media_storage_backend": "azure_blob",
        "azure_auth_mode": "connection_string",
        "azure_storage_connection_string": azurite.connection_string,
        "azure_storage_container_name": role_container_name,
        "media_roots": {"audio": "/srv/gighive/audio", "video": f"volume:{VOLUME}"},
        "media_agent_deb_path": f"/root/{deb.deb.name}",
        # No Docker bridge in the container; the stream socket keeps its unix socket only.
        "media_agent_stream_tcp_listen": "",
    }


def unit_states(c: Container) -> dict[str, tuple[str, str]]:
    return {
        u: (
            c.systemctl("is-enabled", u, check=False).stdout.strip(),
            c.systemctl("is-active", u, check=False).stdout.strip(),
        )
        for u in UNITS
    }


def test_first_run_installs_configures_and_enables_the_units(host, azure_vars):
    rc, out, recap = playbook(host, azure_vars)
    assert rc == 0, out
    assert recap["changed"] > 0 and recap["failed"] == 0
    assert unit_states(host) == {u: ("enabled", "active") for u in UNITS}, out
    # agent.env 0640 root:gighive-media, the credential 0600 root, nothing secret in agent.env
    st = host.run(["stat", "-c", "%a %U:%G", "/etc/gighive-media-agent/agent.env"]).stdout.split()
    assert st == ["640", "root:gighive-media"]
    cred = "/etc/credstore/gighive-media-agent.azure-storage-connection-string"
    assert host.run(["stat", "-c", "%a %U", cred]).stdout.split() == ["600", "root"]
    env = host.run(["cat", "/etc/gighive-media-agent/agent.env"]).stdout
    assert "AccountKey" not in env
    assert f"MEDIA_ROOTS=audio=/srv/gighive/audio,video={VOLUME_DATA}" in env
    # the volume root, resolved with `docker volume inspect`, is watched with its subdirectory
    roots = host.run(["cat", "/etc/systemd/system/gighive-media-upload.path.d/roots.conf"]).stdout
    assert f"PathChanged={VOLUME_DATA}\n" in roots and f"PathChanged={VOLUME_DATA}/thumbnails\n" in roots
    # the service user can reach the volume through root-only /var/lib/docker (ACLs the role set)
    host.run(["runuser", "-u", "gighive-media", "--", "ls", VOLUME_DATA])
    # the preflight ran: doctor passes as the service sees it, now with the units enabled
    assert "gighive-media doctor" in out or "preflight" in out
    doctor = host.run(
        [
            "systemd-run",
            "--quiet",
            "--wait",
            "--pipe",
            "--collect",
            "-p",
            "User=gighive-media",
            "-p",
            "EnvironmentFile=/etc/gighive-media-agent/agent.env",
            "-p",
            "StateDirectory=gighive-media-agent",
            "-p",
            "LoadCredential=azure-storage-connection-string:gighive-media-agent.azure-storage-connection-string",
            "/usr/bin/gighive-media",
            "doctor",
            "--json",
        ],
        check=False,
    )
    report = json.loads(doctor.stdout)
    assert report["result"] == "PASS", doctor.stdout
    for name in (
        "front/apache-media-proxy.conf",
        "front/nginx-media-locations.conf",
        "front/docker-compose-extra-hosts.yml",
    ):
        host.run(["test", "-s", f"/etc/gighive-media-agent/{name}"])


def test_second_run_changes_nothing(host, azure_vars):
    rc, out, recap = playbook(host, azure_vars)
    assert rc == 0, out
    assert recap["changed"] == 0, out


def test_upload_through_the_configured_units(host, azurite, role_container_name):
    from azure.storage.blob import BlobServiceClient

    from tests.system.nspawn import wait_for

    # www-data writes into the volume, as GigHive's tusd/PHP would; the path unit picks it up.
    host.sh(f"printf 'thumb' > /tmp/t.png && install -o 33 -g 33 -m 0644 /tmp/t.png {VOLUME_DATA}/thumbnails/x.png")
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        role_container_name
    )
    wait_for(
        lambda: "video/thumbnails/x.png" in {b.name for b in container.list_blobs()},
        timeout=90,
        what="the thumbnail to reach Blob through the path unit",
    )


def set_state(c: Container, blob: str, state: str) -> None:
    """Change one file's state in the agent's SQLite queue, as the service user (files stay its own)."""
    script = (
        "import sqlite3, sys; db = sqlite3.connect('/var/lib/gighive-media-agent/state.sqlite3'); "
        "n = db.execute('UPDATE files SET state = ?, local_copy = ? WHERE blob_name = ?', "
        "(sys.argv[1], 0 if sys.argv[1] == 'evicted' else 1, sys.argv[2])).rowcount; db.commit(); "
        "sys.exit(0 if n == 1 else 1)"
    )
    c.run(["runuser", "-u", "gighive-media", "--", "python3", "-c", script, state, blob])


def test_backend_local_is_refused_while_files_exist_only_in_blob(host, azure_vars):
    set_state(host, "video/thumbnails/x.png", "evicted")
    try:
        rc, out, recap = playbook(host, {**azure_vars, "media_storage_backend": "local"})
        assert rc != 0, out
        assert "exist only in Azure Blob" in out and "gighive-media migrate --to-local" in out, out
        # nothing was stopped
        assert unit_states(host) == {u: ("enabled", "active") for u in UNITS}
    finally:
        set_state(host, "video/thumbnails/x.png", "uploaded")


def test_backend_local_leaves_no_enabled_agent_unit(host, azure_vars):
    rc, out, recap = playbook(host, {**azure_vars, "media_storage_backend": "local"})
    assert rc == 0, out
    enabled = host.run(
        ["systemctl", "list-unit-files", "gighive-media*", "--state=enabled", "--no-legend"], check=False
    ).stdout.strip()
    assert enabled == "", enabled
    assert all(active != "active" for _e, active in unit_states(host).values())
    assert "MEDIA_STORAGE_BACKEND=local" in host.run(["cat", "/etc/gighive-media-agent/agent.env"]).stdout
    rc, out, recap = playbook(host, {**azure_vars, "media_storage_backend": "local"})
    assert rc == 0 and recap["changed"] == 0, out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {
                "azure_auth_mode": "managed_identity",
                "azure_storage_connection_string": "",
                "azure_storage_account_name": "",
            },
            "azure_storage_account_name is missing or invalid",
        ),
        ({"azure_auth_mode": "certificate_please"}, "azure_auth_mode is 'certificate_please'"),
        (
            {
                "azure_auth_mode": "managed_identity",
                "azure_storage_connection_string": "",
                "azure_storage_account_name": "gighivemedia",
                "azure_client_secret": "hunter2",
            },
            "a managed identity needs no secret",
        ),
        ({"media_storage_backend": "s3"}, "media_storage_backend is 's3'"),
    ],
    ids=["missing-account", "bad-auth-mode", "secret-with-managed-identity", "bad-backend"],
)
def test_bad_variables_fail_in_the_assert_step(host, azure_vars, override, message):
    before = host.run(["sha256sum", "/etc/gighive-media-agent/agent.env"]).stdout
    rc, out, recap = playbook(host, {**azure_vars, **override})
    assert rc != 0 and recap.get("failed") == 1, out
    assert message in out, out
    failed_task = re.findall(r"TASK \[media_storage_azure_blob : ([^\]]+)\]", out)[-1]
    assert failed_task.startswith("Check"), failed_task
    assert "hunter2" not in out
    assert host.run(["sha256sum", "/etc/gighive-media-agent/agent.env"]).stdout == before
