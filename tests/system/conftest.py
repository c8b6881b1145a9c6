"""Fixtures for the system test: the built .deb and Debian 12 containers booted with systemd-nspawn.

What runs where:
- The package build, lintian and `systemd-analyze security --offline=true` run on the host.
- Everything about installing and running the units runs inside a container with real systemd as
  PID 1 (tests/system/nspawn.py). Each container is a fresh copy of the cached root filesystem.

The session first runs .ci/setup-system (idempotent; about a second when everything is in place):
it installs the host packages (dh-virtualenv, lintian, debootstrap, systemd-container, ...) and
builds or reuses the cached rootfs tarball. These tests need root. They are skipped only where a
container can never boot (not root, or no CAP_SYS_ADMIN, e.g. inside an unprivileged container),
with the reason; anywhere else a failure to build or boot fails the test loudly.

Environment:
  GIGHIVE_DEB=/path/to/gighive-media-agent_*.deb  test this package instead of building one
  GIGHIVE_CACHE                                   cache root shared with .ci/setup-system
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.system.debbuild import REPO, Build, build_deb
from tests.system.nspawn import Container

CACHE = Path(os.environ.get("GIGHIVE_CACHE") or Path.home() / ".cache" / "gighive-media-agent")
ROOTFS_TARBALL = CACHE / "rootfs-bookworm" / "rootfs.tar.zst"

UNITS_DIR = REPO / "units"
SERVICES = ("gighive-media-upload.service", "gighive-media-retry.service", "gighive-media-stream.service")
TRIGGERS = ("gighive-media-upload.path", "gighive-media-retry.timer", "gighive-media-stream.socket")
ALL_UNITS = TRIGGERS + SERVICES
ENV_FILE = "/etc/gighive-media-agent/agent.env"
STATE_DIR = "/var/lib/gighive-media-agent"
CREDENTIALS = ("azure-client-secret", "azure-client-certificate", "azure-storage-connection-string", "mysql-password")


def _cannot_boot_reason() -> str | None:
    """Why this host can never boot a container, or None if it should be able to."""
    if not sys.platform.startswith("linux"):
        return f"systemd-nspawn needs Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "the system test needs root (systemd-nspawn, nsenter, apt-get); run it as root or in CI"
    status = Path("/proc/self/status").read_text()
    cap_eff = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), 16)
    if not cap_eff & (1 << 21):  # CAP_SYS_ADMIN
        return "no CAP_SYS_ADMIN (an unprivileged container?): systemd-nspawn cannot create a container here"
    return None


@pytest.fixture(scope="session")
def system_host() -> Path:
    """Prepare the host with .ci/setup-system and return the cached rootfs tarball (or
    GIGHIVE_ROOTFS's)."""
    reason = _cannot_boot_reason()
    if reason:
        pytest.skip(f"system test cannot run on this host: {reason}")
    r = subprocess.run(["bash", str(REPO / ".ci" / "setup-system")], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        pytest.fail(f".ci/setup-system failed ({r.returncode}):\n{r.stdout}\n{r.stderr}", pytrace=False)
    sys.stderr.write(r.stdout)
    # Another distribution's root filesystem (tests/system/ubuntu_lane.py: Ubuntu 24.04).
    other = os.environ.get("GIGHIVE_ROOTFS")
    if other:
        return Path(other)
    assert ROOTFS_TARBALL.is_file(), f"{ROOTFS_TARBALL} missing after .ci/setup-system"
    return ROOTFS_TARBALL


@pytest.fixture(scope="session")
def system_tmp() -> Iterator[Path]:
    """Scratch space for builds and container trees, under /var/tmp (disk, not a tmpfs /tmp).
    Not pytest's tmp_path: pytest deletes all but its three newest base directories, so a
    concurrent pytest session would pull a container's root filesystem away mid-test."""
    path = Path(tempfile.mkdtemp(prefix="gighive-system-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def deb(system_host: Path, system_tmp: Path) -> Build:
    """The package, built once per session with dpkg-buildpackage (or GIGHIVE_DEB)."""
    given = os.environ.get("GIGHIVE_DEB")
    if given:
        path = Path(given).resolve()
        changes = next(iter(sorted(path.parent.glob(path.name.rsplit("_", 1)[0] + "_*.changes"))), path)
        return Build(deb=path, changes=changes, log=path, seconds=0.0)
    return build_deb(Path(tempfile.mkdtemp(prefix="debbuild-", dir=system_tmp)))


@pytest.fixture
def container_factory(system_host: Path, system_tmp: Path) -> Iterator[Callable[[], Container]]:
    """Boot fresh containers on demand; all are powered off and deleted at teardown."""
    made: list[Container] = []

    def boot() -> Container:
        c = Container(system_host, Path(tempfile.mkdtemp(prefix="container-", dir=system_tmp)))
        made.append(c)
        return c.__enter__()

    try:
        yield boot
    finally:
        for c in made:
            c.poweroff()


def install_deb(container: Container, build: Build) -> str:
    """Install the .deb the way the issue asks: apt-get install ./file.deb. The rootfs already holds
    every dependency, so apt needs no network (and its package lists are empty)."""
    inside = f"/root/{build.deb.name}"
    container.path(inside).write_bytes(build.deb.read_bytes())
    r = container.run(["apt-get", "install", "-y", "--no-install-recommends", inside], timeout=300)
    return r.stdout + r.stderr


@pytest.fixture
def installed(container_factory: Callable[[], Container], deb: Build) -> Container:
    """A fresh container with the package installed and nothing configured, for a test that
    changes it."""
    c = container_factory()
    install_deb(c, deb)
    return c


@pytest.fixture(scope="module")
def installed_shared(system_host: Path, system_tmp: Path, deb: Build) -> Iterator[Container]:
    """One container per module with the package installed, for tests that only look (booting
    and installing costs about 8 s)."""
    with Container(system_host, Path(tempfile.mkdtemp(prefix="container-", dir=system_tmp))) as c:
        install_deb(c, deb)
        yield c


@dataclass
class AgentSetup:
    """What configure_agent wrote, for the test to refer to."""

    env: dict[str, str]
    roots: dict[str, str]


@pytest.fixture
def configure_agent() -> Callable[..., AgentSetup]:
    """Write the per-host configuration the way the Ansible role will: agent.env (0640
    root:gighive-media), credentials in /etc/credstore (0600 root, picked up by the units'
    LoadCredential=), the media roots, and the path unit's drop-in watching them.

    configure_agent(container, roots={"video": "/srv/gighive/video"}, env={...}, credentials={...})

    This is also where the upload-through-the-path-unit test plugs in: give it an Azurite
    connection string (AZURE_AUTH_MODE=connection_string, credential
    azure-storage-connection-string) and a root, move a file into the root, and wait for the blob.
    """

    def configure(
        container: Container,
        *,
        roots: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        credentials: dict[str, str] | None = None,
        reload: bool = True,
    ) -> AgentSetup:
        roots = roots if roots is not None else {"video": "/srv/gighive/video"}
        values = {
            "MEDIA_STORAGE_BACKEND": "azure_blob",
            "MEDIA_ROOTS": ",".join(f"{name}={path}" for name, path in roots.items()),
            "LOG_LEVEL": "info",
        }
        values.update(env or {})
        for path in roots.values():
            container.run(["install", "-d", "-m", "0755", path])
        container.run(["install", "-d", "-m", "0755", "/etc/gighive-media-agent"])
        text = "".join(f"{k}={v}\n" for k, v in values.items())
        container.write(ENV_FILE, text, mode=0o640, owner="root:gighive-media")
        if credentials:
            container.run(["install", "-d", "-m", "0700", "/etc/credstore"])
            for name, secret in credentials.items():
                container.write(f"/etc/credstore/gighive-media-agent.{name}", secret, mode=0o600)
        dropin = "[Path]\n" + "".join(f"PathChanged={p}\n" for p in roots.values())
        container.write("/etc/systemd/system/gighive-media-upload.path.d/roots.conf", dropin)
        if reload:
            container.systemctl("daemon-reload")
        return AgentSetup(env=values, roots=roots)

    return configure


def agent_cli(container: Container, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `gighive-media ARGS` inside the container the way the services run it: as gighive-media,
    with agent.env, the credentials and the state directory, through systemd-run (the same way an
    operator gets the services' view, see docs/packaging.md)."""
    props = [
        "User=gighive-media",
        "Group=gighive-media",
        f"EnvironmentFile={ENV_FILE}",
        "StateDirectory=gighive-media-agent",
        *(f"LoadCredential={name}:gighive-media-agent.{name}" for name in CREDENTIALS),
    ]
    argv = ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", *(f"--property={p}" for p in props)]
    return container.run([*argv, "/usr/bin/gighive-media", *args], check=check)
