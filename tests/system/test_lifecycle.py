"""Package lifecycle on a configured host: upgrade in place, remove, purge. Media is never touched."""

from __future__ import annotations

import hashlib

import pytest

from tests.system.conftest import ENV_FILE, STATE_DIR, TRIGGERS
from tests.system.debbuild import Build
from tests.system.nspawn import Container

pytestmark = pytest.mark.system


def sha256_of_tree(c: Container, root: str) -> dict[str, str]:
    base = c.path(root)
    return {
        str(p.relative_to(base)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(base.rglob("*"))
        if p.is_file()
    }


def test_reinstall_keeps_enabled_units_running(installed: Container, configure_agent, deb: Build) -> None:
    configure_agent(installed, env={"MEDIA_STORAGE_BACKEND": "local"})
    installed.systemctl("enable", "--now", *TRIGGERS)
    # The same version again: dpkg runs the upgrade path of the maintainer scripts (preinst
    # upgrade, prerm upgrade, postinst configure with the old version).
    out = installed.run(["dpkg", "-i", f"/root/{deb.deb.name}"]).stdout
    assert "Preparing to unpack" in out and "over (0" in out, out
    for unit in TRIGGERS:
        assert installed.systemctl("is-active", unit, check=False).stdout.strip() == "active", unit
        assert installed.systemctl("is-enabled", unit, check=False).stdout.strip() == "enabled", unit


def test_remove_keeps_configuration_and_state_purge_removes_them_and_media_is_untouched(
    installed: Container, configure_agent
) -> None:
    setup = configure_agent(
        installed,
        roots={"video": "/srv/gighive/video", "audio": "/srv/gighive/audio"},
        env={"MEDIA_STORAGE_BACKEND": "local"},
        credentials={"mysql-password": "pw"},
    )
    for name, root in setup.roots.items():
        for i in range(3):
            installed.write(f"{root}/{name}-{i}.bin", f"{name} {i}\n" * 1000, owner="www-data:www-data")
    media_before = {root: sha256_of_tree(installed, root) for root in setup.roots.values()}
    installed.systemctl("enable", "--now", *TRIGGERS)
    installed.systemctl("start", "gighive-media-upload.service")  # creates the state directory
    installed.wait_inactive("gighive-media-upload.service")
    assert installed.run(["test", "-d", STATE_DIR], check=False).returncode == 0

    installed.run(["apt-get", "remove", "-y", "gighive-media-agent"])
    for unit in TRIGGERS:
        assert installed.systemctl("is-active", unit, check=False).stdout.strip() != "active", unit
    assert installed.run(["test", "-e", "/opt/venvs/gighive-media-agent"], check=False).returncode != 0
    assert installed.run(["test", "-e", "/usr/bin/gighive-media"], check=False).returncode != 0
    # remove keeps what the host configured and what the agent recorded
    for path in (ENV_FILE, STATE_DIR, "/etc/gighive-media-agent/agent.env.example"):
        assert installed.run(["test", "-e", path], check=False).returncode == 0, path
    assert installed.run(["getent", "passwd", "gighive-media"], check=False).returncode == 0

    installed.run(["apt-get", "purge", "-y", "gighive-media-agent"])
    for path in (
        "/etc/gighive-media-agent",
        STATE_DIR,
        "/etc/credstore/gighive-media-agent.mysql-password",
        "/etc/systemd/system/gighive-media-upload.path.d",
        "/etc/systemd/system/paths.target.wants/gighive-media-upload.path",
    ):
        assert installed.run(["test", "-e", path], check=False).returncode != 0, f"{path} survived purge"
    assert installed.run(["getent", "passwd", "gighive-media"], check=False).returncode != 0
    assert installed.run(["getent", "group", "gighive-media"], check=False).returncode != 0
    status = installed.run(["dpkg-query", "-W", "-f=${db:Status-Status}", "gighive-media-agent"], check=False)
    assert status.stdout in ("", "not-installed"), status.stdout

    media_after = {root: sha256_of_tree(installed, root) for root in setup.roots.values()}
    assert media_after == media_before, "media roots changed"
    for root in setup.roots.values():
        assert installed.run(["stat", "-c", "%U", root]).stdout.strip() == "root"
