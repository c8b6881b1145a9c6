"""Fixtures for the Ansible role tests.

The role runs for real: ansible-playbook (ansible-core from Debian) inside a Debian 12 container
booted with systemd-nspawn (the system test's rootfs and helpers), with connection: local there.
ansible-core is not in that rootfs, so .ci/setup-ansible caches its .debs once and each container
installs them (apt-get install ./*.deb, no network needed). The container shares the host's
network, so the role's preflight (`gighive-media doctor`) and the agent reach Azurite on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient

from tests.system.conftest import CACHE, deb, system_host, system_tmp  # noqa: F401
from tests.system.debbuild import REPO
from tests.system.nspawn import Container

ANSIBLE_DIR = REPO / "ansible"
ANSIBLE_DEBS = CACHE / "ansible-debs"
# One virtualenv per hashed lock in tests/ansible/locks/ (.ci/setup-ansible builds them).
ANSIBLE_VENVS = CACHE / "ansible-venvs"


def venv_env(name: str) -> dict[str, str]:
    """An environment whose PATH starts with the bin/ of the venv built from locks/<name>.lock."""
    bin_dir = ANSIBLE_VENVS / name / "bin"
    if not (ANSIBLE_VENVS / name / ".stamp").exists():
        lock = REPO / "tests" / "ansible" / "locks" / f"{name}.lock"
        python = lock.read_text().splitlines()[0].removeprefix("# ")
        pytest.skip(f"{bin_dir} is missing: .ci/setup-ansible builds it when this machine has the lock's {python}")
    return {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(ANSIBLE_DIR.parent), "LANG": "C.UTF-8"}


@pytest.fixture(scope="session")
def ansible_host() -> None:
    """ansible-core on the host, the venvs of tests/ansible/locks/ and the container's ansible .debs,
    via .ci/setup-ansible."""
    if os.geteuid() != 0:
        if shutil.which("ansible-playbook") and (ANSIBLE_VENVS / "lint" / ".stamp").exists():
            return
        pytest.skip(
            "installing ansible-core and the ansible venvs needs root (.ci/setup-ansible); run it as root or in CI"
        )
    r = subprocess.run(["bash", str(REPO / ".ci" / "setup-ansible")], capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        pytest.fail(f".ci/setup-ansible failed ({r.returncode}):\n{r.stdout}\n{r.stderr}", pytrace=False)


@pytest.fixture(scope="module")
def ansible_container(ansible_host, system_host: Path, system_tmp: Path, deb) -> Iterator[Container]:  # noqa: F811
    """One booted container per module with ansible-core installed, the role tree in /root/ansible
    and the .deb in /root; the package itself is not installed (the role does that)."""
    with Container(system_host, Path(tempfile.mkdtemp(prefix="container-", dir=system_tmp))) as c:
        debs = sorted(ANSIBLE_DEBS.glob("*.deb"))
        assert debs, f"no .debs in {ANSIBLE_DEBS}; .ci/setup-ansible should have fetched them"
        c.run(["install", "-d", "/root/ansible-debs"])
        for d in debs:
            c.path(f"/root/ansible-debs/{d.name}").write_bytes(d.read_bytes())
        c.run(
            [
                "apt-get",
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                *(f"/root/ansible-debs/{d.name}" for d in debs),
            ],
            timeout=300,
        )
        shutil.copytree(ANSIBLE_DIR, c.path("/root/ansible"))
        c.path(f"/root/{deb.deb.name}").write_bytes(deb.deb.read_bytes())
        yield c


@pytest.fixture(scope="module")
def role_container_name(azurite) -> Iterator[str]:
    service = BlobServiceClient.from_connection_string(azurite.connection_string)
    name = f"role-{uuid.uuid4().hex[:12]}"
    service.create_container(name)
    yield name
    with contextlib.suppress(Exception):  # best effort; a stopped Azurite needs no cleanup
        service.delete_container(name)
