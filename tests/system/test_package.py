"""The .deb as built by dpkg-buildpackage: lintian, dependencies and contents (on the host)."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib

import pytest

from tests.system.conftest import ALL_UNITS, UNITS_DIR
from tests.system.debbuild import REPO, Build

pytestmark = pytest.mark.system

VENV = "/opt/venvs/gighive-media-agent"


def deb_field(build: Build, field: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(build.deb), field], capture_output=True, text=True, check=True
    ).stdout.strip()


def deb_listing(build: Build) -> dict[str, str]:
    """path -> listing line of `dpkg-deb -c` (paths without the leading '.')."""
    out = subprocess.run(["dpkg-deb", "-c", str(build.deb)], capture_output=True, text=True, check=True).stdout
    listing = {}
    for line in out.splitlines():
        path = line.split(None, 5)[5].split(" -> ")[0]
        listing[path.removeprefix(".").rstrip("/") or "/"] = line
    return listing


def test_lintian_reports_no_errors_and_no_warnings(deb: Build) -> None:
    print(f"package built in {deb.seconds:.0f} s: {deb.deb.name}")
    r = subprocess.run(
        ["lintian", "--pedantic", "--display-experimental", str(deb.changes)], capture_output=True, text=True
    )
    tags = [line for line in r.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert not tags, "lintian:\n" + r.stdout
    # Infos and pedantic tags are reported, not failed on (lintian exits 0 for them).
    assert r.returncode == 0, r.stdout + r.stderr


def test_package_depends_on_the_python_minor_it_was_built_with(deb: Build) -> None:
    major, minor = subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    # Built elsewhere (tests/system/ubuntu_lane.py: Ubuntu 24.04), with that tree's python3.
    major, minor = os.environ.get("GIGHIVE_DEB_PYTHON", f"{major}.{minor}").split(".")
    depends = deb_field(deb, "Depends")
    assert f"python3 (>= {major}.{minor}~)" in depends, depends
    assert f"python3 (<< {major}.{int(minor) + 1}~)" in depends, depends
    assert "adduser" in depends, depends


def test_package_version_is_the_projects(deb: Build) -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert deb_field(deb, "Version") == project


def test_package_ships_the_venv_the_command_the_man_page_and_the_units(deb: Build) -> None:
    listing = deb_listing(deb)
    assert f"{VENV}/bin/gighive-media" in listing
    assert listing["/usr/bin/gighive-media"].endswith(f"-> {VENV}/bin/gighive-media")
    assert "/usr/share/man/man1/gighive-media.1.gz" in listing
    assert "/etc/gighive-media-agent/agent.env.example" in listing
    assert "/etc/gighive-media-agent/agent.env" not in listing, "agent.env is per host, never packaged"
    for unit in ALL_UNITS:
        assert f"/lib/systemd/system/{unit}" in listing, unit
    assert any(
        p.startswith("/usr/share/doc/gighive-media-agent/examples/gighive-media-upload.path.d/") for p in listing
    )
    site = [p for p in listing if "/site-packages/" in p]
    assert any(p.endswith("/site-packages/agent/cli.py") for p in site)
    # The web front snippets: where the docs point operators, and inside the package for the code.
    for snippet in ("nginx-locations.conf", "nginx-upstream.conf", "nginx-internal.conf", "apache-proxy.conf"):
        assert f"/usr/share/gighive-media-agent/front/{snippet}" in listing, snippet
        assert any(p.endswith(f"/site-packages/agent/stream/front/{snippet}") for p in site), snippet
    # Shipped lean: no bytecode (postinst compiles it), no pip/setuptools, no activate scripts.
    assert not [p for p in listing if p.endswith((".pyc", ".pyo")) or "__pycache__" in p]
    assert not [p for p in site if re.search(r"/site-packages/(pip|setuptools)(-[^/]*)?(/|$)", p)]
    assert not [p for p in listing if p.startswith(f"{VENV}/bin/activate")]


def test_shipped_units_are_the_repositorys(deb: Build, tmp_path) -> None:
    subprocess.run(["dpkg-deb", "-x", str(deb.deb), str(tmp_path)], check=True)
    for unit in ALL_UNITS:
        assert (tmp_path / "lib/systemd/system" / unit).read_text() == (UNITS_DIR / unit).read_text(), unit


def test_example_config_is_a_conffile(deb: Build, tmp_path) -> None:
    subprocess.run(["dpkg-deb", "-e", str(deb.deb), str(tmp_path)], check=True)
    assert (tmp_path / "conffiles").read_text().split() == ["/etc/gighive-media-agent/agent.env.example"]
