"""The role with the ansible-core releases operators run, driven from a control node over SSH.

test_role.py applies the role with Debian 12's ansible-core 2.14, connection: local inside the
container. Here the control node is this host: ansible-playbook from a virtualenv built from a
hashed lock (tests/ansible/locks/core-<release>.lock: 2.16 as on Ubuntu 24.04; 2.19, the newest
on Debian 12's Python 3.11, whose templating and conditionals changed; 2.21, the newest, on
Python 3.12) reaches
a booted Debian 12 container over SSH, as an operator's laptop reaches a GigHive host. The .deb is
copied from the control node by the role. Each lane converges, then converges again with changed=0,
then goes back to local the same way.

The container shares the host's network: its sshd listens on 127.0.0.1 at a free port, and the
agent reaches the session's Azurite on 127.0.0.1 too.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ansible.conftest import ANSIBLE_DEBS, ANSIBLE_DIR, CACHE, venv_env
from tests.system.nspawn import Container, wait_for

pytestmark = pytest.mark.system

LANES = ("core-2.16", "core-2.19", "core-2.21")
SSH_DEBS = CACHE / "ssh-debs"
UNITS = ("gighive-media-upload.path", "gighive-media-retry.timer", "gighive-media-stream.socket")
RECAP = re.compile(r"target\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ssh_key(system_tmp: Path) -> Path:
    key = Path(tempfile.mkdtemp(prefix="ssh-", dir=system_tmp)) / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="module", params=LANES)
def lane(request, ansible_host, system_host: Path, system_tmp: Path, ssh_key: Path) -> Iterator[tuple]:
    """(release, container, sshd port): a booted container with sshd on 127.0.0.1:<port> and the
    control node's key authorized for root. Nothing of the role is installed yet."""
    release = request.param
    env = venv_env(release)
    port = free_port()
    with Container(system_host, Path(tempfile.mkdtemp(prefix="container-", dir=system_tmp))) as c:
        # Before the package starts sshd: listen only on the free port (the network is the host's).
        c.write(
            "/etc/ssh/sshd_config.d/test.conf",
            f"Port {port}\nListenAddress 127.0.0.1\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n",
        )
        c.write("/root/.ssh/authorized_keys", ssh_key.with_suffix(".pub").read_text(), mode=0o600)
        c.run(["chmod", "700", "/root/.ssh"])
        # sshd, and what the role's own tasks need without an apt index: python3-apt (the apt
        # module) and acl (setfacl), as test_role.py's container has them.
        debs = sorted(SSH_DEBS.glob("*.deb")) + [
            d
            for d in sorted(ANSIBLE_DEBS.glob("*.deb"))
            if d.name.startswith(("python3-apt_", "python-apt-common_", "distro-info-data_", "acl_"))
        ]
        assert debs, f"no .debs in {SSH_DEBS}; .ci/setup-ansible should have fetched them"
        c.run(["install", "-d", "/root/debs"])
        for d in debs:
            c.path(f"/root/debs/{d.name}").write_bytes(d.read_bytes())
        c.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *(f"/root/debs/{d.name}" for d in debs)])
        c.systemctl("restart", "ssh.service")
        # The media roots as GigHive has them: owned by www-data (uid 33).
        c.sh("install -d -o 33 -g 33 -m 0755 /srv/gighive/audio /srv/gighive/video /srv/gighive/video/thumbnails")

        def ssh_ready() -> bool:
            # A handshake that outlasts its own timeout on a loaded machine is "not yet", not an error.
            try:
                r = subprocess.run(
                    [
                        "ssh",
                        "-i",
                        str(ssh_key),
                        "-p",
                        str(port),
                        "-o",
                        "BatchMode=yes",
                        "-o",
                        "StrictHostKeyChecking=no",
                        "-o",
                        "UserKnownHostsFile=/dev/null",
                        "root@127.0.0.1",
                        "true",
                    ],
                    capture_output=True,
                    timeout=30,
                )
            except subprocess.TimeoutExpired:
                return False
            return r.returncode == 0

        wait_for(ssh_ready, timeout=300, what=f"sshd in the container on 127.0.0.1:{port}")
        assert env  # the venv exists (venv_env asserts it)
        yield release, c, port


def playbook(lane: tuple, ssh_key: Path, variables: dict, workdir: Path) -> tuple[int, str, dict[str, int]]:
    release, _c, port = lane
    inventory = workdir / "inventory.ini"
    inventory.write_text(
        f"target ansible_host=127.0.0.1 ansible_port={port} ansible_user=root "
        f"ansible_ssh_private_key_file={ssh_key} ansible_python_interpreter=/usr/bin/python3\n"
    )
    extra = workdir / "vars.json"
    extra.write_text(json.dumps(variables))
    extra.chmod(0o600)
    env = {
        **venv_env(release),
        "HOME": str(workdir),
        "ANSIBLE_ROLES_PATH": str(ANSIBLE_DIR / "roles"),
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=60s -o UserKnownHostsFile=/dev/null",
    }
    r = subprocess.run(
        [
            "ansible-playbook",
            "-i",
            str(inventory),
            "-e",
            "ansible_become=false",
            "-e",
            f"@{extra}",
            str(ANSIBLE_DIR / "playbooks" / "media_storage.yml"),
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = r.stdout + r.stderr
    m = RECAP.search(out)
    recap = dict(zip(("ok", "changed", "unreachable", "failed"), map(int, m.groups()), strict=True)) if m else {}
    return r.returncode, out, recap


def test_converges_over_ssh_then_changes_nothing_both_ways(
    lane, ssh_key, azurite, role_container_name, deb, system_tmp
):
    release, c, _port = lane
    workdir = Path(tempfile.mkdtemp(prefix=f"controller-{release}-", dir=system_tmp))
    version = subprocess.run(
        ["ansible-playbook", "--version"], env=venv_env(release), capture_output=True, text=True, check=True
    ).stdout
    assert f"core {release.removeprefix('core-')}." in version, version
    variables = {
        "media_storage_backend": "azure_blob",
        "azure_auth_mode": "connection_string",
        "azure_storage_connection_string": azurite.connection_string,
        "azure_storage_container_name": role_container_name,
        "media_roots": {"audio": "/srv/gighive/audio", "video": "/srv/gighive/video"},
        # A path on the control node: the role copies it to the host over SSH.
        "media_agent_deb_path": str(deb.deb),
    }
    rc, out, recap = playbook(lane, ssh_key, variables, workdir)
    assert rc == 0 and recap.get("failed") == 0 and recap["changed"] > 0, out
    for unit in UNITS:
        assert c.systemctl("is-enabled", unit, check=False).stdout.strip() == "enabled", unit
        assert c.systemctl("is-active", unit, check=False).stdout.strip() == "active", unit
    env = c.run(["cat", "/etc/gighive-media-agent/agent.env"]).stdout
    assert "MEDIA_ROOTS=audio=/srv/gighive/audio,video=/srv/gighive/video" in env, env
    assert (
        "PathChanged=/srv/gighive/video/thumbnails"
        in c.run(["cat", "/etc/systemd/system/gighive-media-upload.path.d/roots.conf"]).stdout
    )

    rc, out, recap = playbook(lane, ssh_key, variables, workdir)
    assert rc == 0 and recap.get("changed") == 0, out

    # The way back (tasks/local.yml): nothing exists only in Blob here, so it switches, once.
    local = {**variables, "media_storage_backend": "local"}
    rc, out, recap = playbook(lane, ssh_key, local, workdir)
    assert rc == 0 and recap.get("changed", 0) > 0, out
    for unit in UNITS:
        assert c.systemctl("is-enabled", unit, check=False).stdout.strip() != "enabled", unit
    assert "MEDIA_STORAGE_BACKEND=local" in c.run(["cat", "/etc/gighive-media-agent/agent.env"]).stdout
    rc, out, recap = playbook(lane, ssh_key, local, workdir)
    assert rc == 0 and recap.get("changed") == 0, out
