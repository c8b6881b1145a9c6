"""The media_storage_azure_blob role, applied for real with ansible-playbook (Debian 12's
ansible-core 2.14, connection: local) inside a booted Debian 12 container, against the session's
Azurite on the shared 127.0.0.1. (test_matrix.py drives newer releases over SSH.)

One container for the module: the tests run in order, as an operator would apply the role over
time: install, idempotence, an upload through the units, turning local deletion on and changing
a credential (each must reach the running services by the end of the play), the way back to
local (refused while a file exists only in Blob, then allowed after `migrate --to-local`), bad
variables.

Docker is not in the container. For the volume:<name> media root, /usr/local/bin/docker is a tiny
stand-in script that answers only `docker volume inspect NAME` with the JSON the real CLI prints
(the mountpoint under /var/lib/docker/volumes); everything else about the volume is real: a
root-only /var/lib/docker, and a _data directory owned by www-data (uid 33) as tusd's would be.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid

import pytest

from tests.ansible.conftest import ANSIBLE_DIR
from tests.system.debbuild import REPO
from tests.system.nspawn import Container, wait_for

UNITS = ("gighive-media-upload.path", "gighive-media-retry.timer", "gighive-media-stream.socket")
VOLUME = "files_video"
VOLUME_DATA = f"/var/lib/docker/volumes/{VOLUME}/_data"
FRONT = REPO / "agent" / "stream" / "front"
TEMPLATES = ANSIBLE_DIR / "roles" / "media_storage_azure_blob" / "templates"
# What an earlier release of the role left behind: the Docker-bridge listener and its compose fragment.
OLD_TCP = "/etc/systemd/system/gighive-media-stream.socket.d/tcp.conf"
OLD_COMPOSE = "/etc/gighive-media-agent/front/docker-compose-extra-hosts.yml"

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
    # An upgrade from the release that listened on the Docker bridge for every container.
    c.write(OLD_TCP, "[Socket]\nListenStream=172.17.0.1:8787\nFreeBind=yes\nIPAddressAllow=172.16.0.0/12\n")
    c.write(OLD_COMPOSE, 'extra_hosts:\n  - "host.docker.internal:host-gateway"\n')
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
        # The stream listener is left at the role's default: the unix socket only.
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
        "front/nginx-media-upstream.conf",
        "front/nginx-media-locations.conf",
        "front/docker-compose-media-stream.yml",
    ):
        host.run(["test", "-s", f"/etc/gighive-media-agent/{name}"])


def test_the_stream_server_is_private_by_default(host, azure_vars):
    """No TCP listener and no Docker range: only the front reaches the server, through its socket."""
    assert host.run(["test", "-e", OLD_TCP], check=False).returncode == 1, "the old TCP drop-in is still there"
    socket = host.systemctl("cat", "gighive-media-stream.socket").stdout
    listens = [line.split("=", 1)[1] for line in socket.splitlines() if line.startswith("ListenStream=")]
    assert listens == ["/run/gighive-media-agent/stream.sock"], socket
    assert "172.16.0.0/12" not in socket
    show = host.systemctl("show", "-p", "Listen", "gighive-media-stream.socket").stdout
    assert show.strip() == "Listen=/run/gighive-media-agent/stream.sock (Stream)", show
    env = host.run(["cat", "/etc/gighive-media-agent/agent.env"]).stdout
    assert "STREAM_ALLOWED_PEERS=localhost\n" in env and "172.16" not in env, env


def test_the_stream_server_keeps_its_markers_where_apache_can_read_them(host, azure_vars):
    """The first connection starts the server; its unit makes /run/gighive-media-agent/verified
    (the front-first markers, agent/stream/markers.py): the service user's, readable but not
    writable by www-data (Apache in its container, through the bind mount of the parent)."""
    ask = (
        "import socket; s = socket.socket(socket.AF_UNIX); s.connect('/run/gighive-media-agent/stream.sock'); "
        "s.sendall(b'GET /video/' + b'0' * 64 + b'.mp4 HTTP/1.0\\r\\n\\r\\n'); print(s.recv(64).decode())"
    )
    answer = host.run(["runuser", "-u", "www-data", "--", "python3", "-c", ask]).stdout
    assert answer.startswith("HTTP/1.1 404"), answer
    d = "/run/gighive-media-agent/verified"
    assert host.run(["stat", "-c", "%a %U", d]).stdout.split() == ["755", "gighive-media"]
    assert host.run(["runuser", "-u", "www-data", "--", "test", "-r", d]).returncode == 0
    touch = host.run(["runuser", "-u", "www-data", "--", "touch", f"{d}/x"], check=False)
    assert touch.returncode != 0


def test_the_compose_override_mounts_the_socket_into_apache(host, azure_vars):
    """The rendered override gives GigHive's Apache container the socket directory and the snippet,
    and needs no host.docker.internal (so it fits inventories with or without the telemetry proxy);
    the old extra_hosts fragment is gone."""
    front = "/etc/gighive-media-agent/front"
    override = host.run(["cat", f"{front}/docker-compose-media-stream.yml"]).stdout
    lines = [line.strip() for line in override.splitlines() if not line.lstrip().startswith("#")]
    assert lines[:3] == ["services:", "apacheWebServer:", "volumes:"], override
    assert "- /run/gighive-media-agent:/run/gighive-media-agent:ro" in lines, override
    assert f"- {front}/apache-media-proxy.conf:/etc/apache2/conf-available/gighive-media-proxy.conf:ro" in lines
    assert "extra_hosts" not in "\n".join(lines) and "host.docker.internal" not in "\n".join(lines)
    assert host.run(["test", "-e", OLD_COMPOSE], check=False).returncode == 1, "the old compose fragment is still there"


def test_the_rendered_nginx_snippets_are_the_shipped_ones(host, azure_vars):
    """What the role installs for nginx is the tested snippet (it sends every media request to the
    server, so it has no per-host paths)."""
    front = "/etc/gighive-media-agent/front"
    upstream = host.run(["cat", f"{front}/nginx-media-upstream.conf"]).stdout.partition("\n")[2]
    assert upstream == (FRONT / "nginx-upstream.conf").read_text()
    locations = host.run(["cat", f"{front}/nginx-media-locations.conf"]).stdout.partition("\n")[2]
    assert locations == (FRONT / "nginx-locations.conf").read_text()


def test_the_nginx_templates_do_not_drift_from_the_shipped_snippets():
    """The templates are the shipped files plus the managed header; no other template logic."""
    upstream = (TEMPLATES / "nginx-media-upstream.conf.j2").read_text()
    header, _, body = upstream.partition("\n")
    assert header == "# {{ ansible_managed }}" and body == (FRONT / "nginx-upstream.conf").read_text()
    header, _, body = (TEMPLATES / "nginx-media-locations.conf.j2").read_text().partition("\n")
    assert header == "# {{ ansible_managed }}"
    assert "{{" not in body and "{%" not in body
    assert body == (FRONT / "nginx-locations.conf").read_text()


def test_second_run_changes_nothing(host, azure_vars):
    rc, out, recap = playbook(host, azure_vars)
    assert rc == 0, out
    assert recap["changed"] == 0, out


def test_an_operators_tcp_listener_gets_only_their_allow_list(host, azure_vars):
    """A TCP listener is opt-in: the operator's address and allow-list, and nothing broader; unset
    again, the drop-in goes and the socket is back to the unix socket alone."""
    tcp = {"media_agent_stream_tcp_listen": "127.0.0.1:47931", "media_agent_stream_tcp_allow": ["10.0.0.5"]}
    rc, out, _ = playbook(host, {**azure_vars, **tcp})
    assert rc == 0, out
    dropin = host.run(["cat", OLD_TCP]).stdout
    assert "ListenStream=127.0.0.1:47931\n" in dropin and "IPAddressAllow=10.0.0.5\n" in dropin, dropin
    assert "172.16" not in dropin
    env = host.run(["cat", "/etc/gighive-media-agent/agent.env"]).stdout
    assert "STREAM_ALLOWED_PEERS=localhost,10.0.0.5\n" in env, env
    listen = host.systemctl("show", "-p", "Listen", "gighive-media-stream.socket").stdout
    assert "127.0.0.1:47931 (Stream)" in listen, listen
    rc, out, _ = playbook(host, azure_vars)
    assert rc == 0, out
    assert host.run(["test", "-e", OLD_TCP], check=False).returncode == 1
    listen = host.systemctl("show", "-p", "Listen", "gighive-media-stream.socket").stdout
    assert listen.strip() == "Listen=/run/gighive-media-agent/stream.sock (Stream)", listen
    assert "STREAM_ALLOWED_PEERS=localhost\n" in host.run(["cat", "/etc/gighive-media-agent/agent.env"]).stdout


def test_upload_through_the_configured_units(host, azurite, role_container_name):
    from azure.storage.blob import BlobServiceClient

    # www-data writes into the volume, as GigHive's tusd/PHP would; the path unit picks it up.
    host.sh(f"printf 'thumb' > /tmp/t.png && install -o 33 -g 33 -m 0644 /tmp/t.png {VOLUME_DATA}/thumbnails/x.png")
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client(
        role_container_name
    )
    wait_for(
        lambda: "video/thumbnails/x.png" in {b.name for b in container.list_blobs()},
        timeout=300,
        what="the thumbnail to reach Blob through the path unit",
    )


AGENT_RUN = [
    "systemd-run",
    "--quiet",
    "--wait",
    "--pipe",
    "--collect",
    "-p",
    "User=gighive-media",
    "-p",
    "Group=gighive-media",
    "-p",
    "EnvironmentFile=/etc/gighive-media-agent/agent.env",
    "-p",
    "StateDirectory=gighive-media-agent",
    "-p",
    "LoadCredential=azure-storage-connection-string:gighive-media-agent.azure-storage-connection-string",
    "/usr/bin/gighive-media",
]
# Keeps the upload run that the play starts, and the stream server, alive while the test looks at
# them (by default they exit after 60 s and 300 s idle). EVICT_MIN_AGE_DAYS=0: the eviction
# policy would otherwise keep the test's new file local for days (an agent without the policy
# ignores the variable).
LONG_RUN = {
    "media_agent_extra_env": {
        "UPLOAD_IDLE_EXIT_SECONDS": "3600",
        "STREAM_IDLE_EXIT_SECONDS": "3600",
        "EVICT_MIN_AGE_DAYS": "0",
    }
}
AUDIO_ROOT = "/srv/gighive/audio"
AUDIO_BYTES = b"ID3 gighive role test audio " + uuid.uuid4().bytes
AUDIO_NAME = hashlib.sha256(AUDIO_BYTES).hexdigest() + ".mp3"


def file_state(c: Container, blob: str) -> str | None:
    """One file's state in the agent's SQLite queue, read as the service user."""
    script = (
        "import sqlite3, sys; db = sqlite3.connect('file:/var/lib/gighive-media-agent/state.sqlite3?mode=ro', "
        "uri=True); row = db.execute('SELECT state FROM files WHERE blob_name = ?', (sys.argv[1],)).fetchone(); "
        "print(row[0] if row else '')"
    )
    out = c.run(["runuser", "-u", "gighive-media", "--", "python3", "-c", script, blob]).stdout.strip()
    return out or None


def invocation(c: Container, unit: str) -> str:
    """The unit's InvocationID: a new one each time the service (re)starts; empty when inactive."""
    props = c.show(unit, "InvocationID", "ActiveState")
    return props["InvocationID"] if props["ActiveState"] == "active" else ""


def ranged_get(c: Container, url_path: str) -> str:
    """GET bytes=0-3 of url_path over the stream socket, as the web front would; the raw head + body."""
    script = (
        "import socket, sys; s = socket.socket(socket.AF_UNIX); s.connect('/run/gighive-media-agent/stream.sock'); "
        "s.sendall(('GET ' + sys.argv[1] + ' HTTP/1.1\\r\\nHost: t\\r\\nRange: bytes=0-3\\r\\n"
        "Connection: close\\r\\n\\r\\n').encode()); data = b''\n"
        "while chunk := s.recv(65536): data += chunk\n"
        "sys.stdout.write(data.decode('latin-1'))"
    )
    return c.run(["python3", "-c", script, url_path], timeout=60).stdout


def test_deletion_switch_reaches_the_running_upload_service(host, azure_vars):
    """Turning media_delete_local_after_upload on while an upload run is active: the run is
    restarted with the new agent.env and drop-in, and the verified file is evicted now, not at
    the next retry timer run (the issue seen over SSH: the running service kept its old settings)."""
    rc, out, _recap = playbook(host, {**azure_vars, **LONG_RUN})
    assert rc == 0, out
    host.write("/root/a.mp3", AUDIO_BYTES)
    host.run(["install", "-o", "33", "-g", "33", "-m", "0644", "/root/a.mp3", f"{AUDIO_ROOT}/{AUDIO_NAME}"])
    blob = f"audio/{AUDIO_NAME}"
    wait_for(lambda: file_state(host, blob) == "uploaded", timeout=300, what=f"{blob} to be uploaded")
    before = invocation(host, "gighive-media-upload.service")
    assert before, "the play should have left an upload run active (UPLOAD_IDLE_EXIT_SECONDS=3600)"
    host.run(["test", "-f", f"{AUDIO_ROOT}/{AUDIO_NAME}"])  # deletion is still off

    rc, out, recap = playbook(host, {**azure_vars, **LONG_RUN, "media_delete_local_after_upload": True})
    assert rc == 0 and recap["changed"] > 0, out
    after = invocation(host, "gighive-media-upload.service")
    assert after and after != before, "the running upload service was not restarted"
    pid = host.show("gighive-media-upload.service", "MainPID")["MainPID"]
    environ = host.run(["cat", f"/proc/{pid}/environ"]).stdout.split("\0")
    assert "DELETE_LOCAL_AFTER_UPLOAD=true" in environ
    wait_for(lambda: file_state(host, blob) == "evicted", timeout=300, what=f"{blob} to be evicted")
    assert host.run(["test", "-e", f"{AUDIO_ROOT}/{AUDIO_NAME}"], check=False).returncode != 0
    # The stream server answers for it from Blob now.
    response = ranged_get(host, f"/{blob}")
    assert response.startswith("HTTP/1.1 206"), response[:300]
    assert response.endswith(AUDIO_BYTES[:4].decode("latin-1")), response[-100:]


def test_credential_change_restarts_the_services_that_read_it(host, azure_vars, azurite):
    # An equivalent connection string written differently: a changed credential file, still valid.
    changed = azurite.connection_string.rstrip(";")
    assert changed != azurite.connection_string
    base = {**azure_vars, **LONG_RUN, "media_delete_local_after_upload": True}
    ranged_get(host, f"/audio/{AUDIO_NAME}")  # socket activation: the stream server is running
    before = {u: invocation(host, u) for u in ("gighive-media-upload.service", "gighive-media-stream.service")}
    assert all(before.values()), before

    rc, out, recap = playbook(host, {**base, "azure_storage_connection_string": changed})
    assert rc == 0 and recap["changed"] > 0, out
    for unit, old in before.items():
        # The stream server's restart is queued (no_block): wait for its new run.
        wait_for(lambda u=unit, o=old: invocation(host, u) not in ("", o), timeout=300, what=f"{unit} to restart")
        loaded = host.run(["cat", f"/run/credentials/{unit}/azure-storage-connection-string"]).stdout
        assert loaded == changed, unit
    response = ranged_get(host, f"/audio/{AUDIO_NAME}")
    assert response.startswith("HTTP/1.1 206"), response[:300]
    # The same variables again: nothing changes and nothing is restarted.
    settled = {u: invocation(host, u) for u in before}
    rc, out, recap = playbook(host, {**base, "azure_storage_connection_string": changed})
    assert rc == 0 and recap["changed"] == 0, out
    assert {u: invocation(host, u) for u in before} == settled


# Until the agent has `migrate --to-local --check`, this stand-in answers it with what the test
# wrote; every other command (and --check when no answer is set) goes to the real agent.
CHECK_WRAPPER = """#!/bin/sh
case " $* " in
*" --check "*)
    if [ -r /etc/gighive-test/answer.json ]; then
        cat /etc/gighive-test/answer.json
        exit "$(cat /etc/gighive-test/answer.rc)"
    fi ;;
esac
exec /usr/bin/gighive-media.real "$@"
"""


@pytest.mark.parametrize(
    ("rc", "answer", "expected"),
    [
        (
            1,
            {"safe": False, "reasons": ["audio/a.mp3 exists only in Blob", "the state lists 1 evicted file"]},
            ["not safe yet: audio/a.mp3 exists only in Blob; the state lists 1 evicted file."],
        ),
        (69, {"safe": None, "reasons": []}, ["cannot reach Azure Blob or MySQL (exit 69)"]),
    ],
    ids=["not-safe", "unreachable"],
)
def test_backend_local_follows_the_agents_check(host, azure_vars, rc, answer, expected):
    """The role's side of `migrate --to-local --check`: exit 1 fails the play with the agent's
    reasons, 69 fails it as "cannot tell"; either way after the path unit and the timer are
    stopped, and with the stream server still serving."""
    host.run(["mv", "/usr/bin/gighive-media", "/usr/bin/gighive-media.real"])
    try:
        host.write("/usr/bin/gighive-media", CHECK_WRAPPER, mode=0o755)
        host.write("/etc/gighive-test/answer.json", json.dumps(answer))
        host.write("/etc/gighive-test/answer.rc", str(rc))
        rc_play, out, _recap = playbook(host, {**azure_vars, "media_storage_backend": "local"})
    finally:
        host.run(["rm", "-rf", "/etc/gighive-test"])
        host.run(["mv", "/usr/bin/gighive-media.real", "/usr/bin/gighive-media"])
    assert rc_play != 0, out
    for text in expected:
        assert text in " ".join(out.split()), out
    assert "sudo -u gighive-media gighive-media migrate --to-local" in out, out
    states = unit_states(host)
    assert states["gighive-media-upload.path"] == ("disabled", "inactive"), states
    assert states["gighive-media-retry.timer"] == ("disabled", "inactive"), states
    assert states["gighive-media-stream.socket"] == ("enabled", "active"), states


def test_backend_local_is_refused_while_files_exist_only_in_blob(host, azure_vars):
    rc, out, _recap = playbook(host, {**azure_vars, "media_storage_backend": "local"})
    assert rc != 0, out
    assert "sudo -u gighive-media gighive-media migrate --to-local" in out, out
    # Stopped first, so no run can evict after the check: the path unit, the timer, their services.
    states = unit_states(host)
    assert states["gighive-media-upload.path"] == ("disabled", "inactive"), states
    assert states["gighive-media-retry.timer"] == ("disabled", "inactive"), states
    for unit in ("gighive-media-upload.service", "gighive-media-retry.service"):
        assert host.systemctl("is-active", unit, check=False).stdout.strip() != "active", unit
    # The stream server still serves the file that exists only in Blob.
    assert states["gighive-media-stream.socket"] == ("enabled", "active"), states
    response = ranged_get(host, f"/audio/{AUDIO_NAME}")
    assert response.startswith("HTTP/1.1 206"), response[:300]


def test_backend_local_after_migrate_to_local_leaves_no_enabled_agent_unit(host, azure_vars):
    r = host.run([*AGENT_RUN, "migrate", "--to-local"], check=False, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert host.path(f"{AUDIO_ROOT}/{AUDIO_NAME}").read_bytes() == AUDIO_BYTES
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
        (
            {"media_agent_stream_tcp_listen": "127.0.0.1:8787", "media_agent_stream_tcp_allow": "10.0.0.5"},
            "media_agent_stream_tcp_allow a list",
        ),
    ],
    ids=["missing-account", "bad-auth-mode", "secret-with-managed-identity", "bad-backend", "tcp-allow-not-a-list"],
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


def test_failed_preflight_stops_the_play_with_doctors_reasons(host, azure_vars):
    """A container that does not exist: configuration is written, then doctor FAILs and the play
    stops before the units are enabled, naming the failed check and its reason."""
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    rc, out, recap = playbook(host, {**azure_vars, "azure_storage_container_name": missing})
    assert rc != 0 and recap.get("failed") == 1, out
    assert "gighive-media doctor found problems" in out, out
    assert "container" in out, out
    failed_task = re.findall(r"TASK \[media_storage_azure_blob : ([^\]]+)\]", out)[-1]
    assert failed_task == "Stop on failed preflight checks", failed_task
