"""The unit files as shipped, checked on the host without booting anything."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.system.conftest import ALL_UNITS, SERVICES, UNITS_DIR

pytestmark = pytest.mark.system

MAX_EXPOSURE = 1.5
_OVERALL = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def exposure(unit: str, *, root: Path | None = None) -> tuple[float, str]:
    """systemd-analyze's exposure score (0 = locked down, 10 = exposed) for a unit file, offline."""
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian package systemd); .ci/setup-system installs the rest")
    if root is None:
        cmd = ["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNITS_DIR / unit)]
    else:
        cmd = ["systemd-analyze", "security", "--offline=true", "--no-pager", f"--root={root}", unit]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=root or UNITS_DIR)
    match = _OVERALL.search(r.stdout)
    assert match, f"no score in systemd-analyze output:\n{r.stdout}\n{r.stderr}"
    return float(match.group(1)), r.stdout


@pytest.mark.parametrize("service", SERVICES)
def test_shipped_service_scores_at_most_1_5(service: str) -> None:
    score, report = exposure(service)
    print(f"{service}: {score}")
    assert score <= MAX_EXPOSURE, report


@pytest.mark.parametrize("service", SERVICES)
def test_service_with_the_example_per_host_dropins_still_scores_at_most_1_5(service: str, tmp_path: Path) -> None:
    """As deployed: the example drop-ins (network allow-list, write access for local deletion,
    watched paths, TCP listener) must not undo the hardening."""
    etc = tmp_path / "etc" / "systemd" / "system"
    etc.mkdir(parents=True)
    for unit in ALL_UNITS:
        shutil.copy(UNITS_DIR / unit, etc / unit)
    shutil.copytree(UNITS_DIR / "examples", etc, dirs_exist_ok=True)
    score, report = exposure(service, root=tmp_path)
    # Proof that the drop-ins were read: the allow-list now has non-loopback entries.
    assert "allow list with non-localhost entries" in report, report
    print(f"{service} with drop-ins: {score}")
    assert score <= MAX_EXPOSURE, report


def test_units_carry_no_per_host_values() -> None:
    """Watched paths, write access, IP allow-lists and TCP listeners belong in drop-ins."""
    for unit in ALL_UNITS:
        text = (UNITS_DIR / unit).read_text()
        settings = [line for line in text.splitlines() if line and not line.startswith("#")]
        for line in settings:
            key, _, value = line.partition("=")
            if key == "PathChanged":
                assert value == "/etc/gighive-media-agent/agent.env", f"{unit}: {line}"
            assert key not in ("ReadWritePaths", "PathModified", "DirectoryNotEmpty"), f"{unit}: {line}"
            if key == "IPAddressAllow":
                assert value == "localhost", f"{unit}: {line}"
            if key == "ListenStream":
                assert value.startswith("/run/"), f"{unit}: {line}"
            assert "/home/" not in value, f"{unit}: {line}"


def test_every_unit_needs_the_config_and_documents_the_man_page() -> None:
    for unit in ALL_UNITS:
        text = (UNITS_DIR / unit).read_text()
        assert "ConditionPathExists=/etc/gighive-media-agent/agent.env" in text, unit
        assert "Documentation=man:gighive-media(1)" in text, unit


@pytest.mark.parametrize("service", SERVICES)
def test_services_never_restart_on_bad_configuration(service: str) -> None:
    text = (UNITS_DIR / service).read_text()
    assert re.search(r"^RestartPreventExitStatus=.*\b78\b", text, re.M), service
    assert "User=gighive-media" in text
    assert "StateDirectory=gighive-media-agent" in text
    assert "EnvironmentFile=/etc/gighive-media-agent/agent.env" in text
