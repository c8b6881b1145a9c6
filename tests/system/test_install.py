"""Installing the package on a booted Debian 12 and what the units do before configuration."""

from __future__ import annotations

import json
import re

import pytest

from tests.system.conftest import ALL_UNITS, ENV_FILE, SERVICES, STATE_DIR, TRIGGERS, AgentSetup
from tests.system.nspawn import Container

pytestmark = pytest.mark.system


def test_install_creates_the_system_user_and_compiles_bytecode(installed_shared: Container) -> None:
    entry = installed_shared.run(["getent", "passwd", "gighive-media"]).stdout.strip().split(":")
    name, _, uid, gid, _, home, shell = entry
    assert int(uid) < 1000, "a system user"
    assert home == "/nonexistent" and shell == "/usr/sbin/nologin"
    group = installed_shared.run(["getent", "group", "gighive-media"]).stdout.strip().split(":")
    assert group[2] == gid
    assert installed_shared.run(["gighive-media", "--version"]).stdout.strip().endswith("0.1.0")
    pyc = installed_shared.run(["find", "/opt/venvs/gighive-media-agent/lib", "-name", "*.pyc"]).stdout.split()
    assert any("/agent/__pycache__/cli." in p for p in pyc), "postinst compiles the bytecode"
    assert installed_shared.run(["test", "-e", ENV_FILE], check=False).returncode != 0, "no agent.env from the package"


def test_units_are_installed_but_not_enabled(installed_shared: Container) -> None:
    for unit in TRIGGERS:
        state = installed_shared.systemctl("is-enabled", unit, check=False).stdout.strip()
        assert state == "disabled", f"{unit}: {state}"
    for unit in SERVICES:
        # Services have no [Install] target of their own: their trigger enables them.
        state = installed_shared.systemctl("is-enabled", unit, check=False).stdout.strip()
        assert state == "indirect", f"{unit}: {state}"
    for unit in ALL_UNITS:
        assert installed_shared.systemctl("is-active", unit, check=False).stdout.strip() == "inactive", unit


def test_installed_units_pass_systemd_analyze_verify(installed_shared: Container) -> None:
    paths = [f"/lib/systemd/system/{u}" for u in ALL_UNITS]
    r = installed_shared.run(["systemd-analyze", "verify", "--man=no", *paths], check=False)
    ours = [line for line in (r.stdout + r.stderr).splitlines() if "gighive" in line]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr


@pytest.mark.parametrize("service", SERVICES)
def test_installed_service_scores_at_most_1_5_under_systemd(installed_shared: Container, service: str) -> None:
    out = installed_shared.run(["systemd-analyze", "security", "--no-pager", service]).stdout
    score = float(re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out).group(1))
    print(f"{service} (installed, systemd 252): {score}")
    assert score <= 1.5, out


def test_without_configuration_every_unit_stays_inactive_not_failed(installed_shared: Container) -> None:
    for unit in ALL_UNITS:
        installed_shared.systemctl("start", unit)  # succeeds: a failed condition is not an error
    for unit in ALL_UNITS:
        props = installed_shared.show(unit, "ActiveState", "ConditionResult")
        assert props == {"ActiveState": "inactive", "ConditionResult": "no"}, f"{unit}: {props}"
    failed = installed_shared.systemctl("list-units", "--failed", "--plain", "--no-legend").stdout
    assert "gighive" not in failed, failed


PROBE = r"""
import json, os, socket, stat
import agent.cli, azure.identity, azure.storage.blob, inotify_simple, pymysql, sdnotify, systemd.journal
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
ec.generate_private_key(ec.SECP256R1()).sign(b"x", ec.ECDSA(hashes.SHA256()))  # compiled wheels under MDWE
out = {"uid": os.getuid(), "cap_eff": open("/proc/self/status").read().split("CapEff:")[1].split()[0]}
state = os.environ["STATE_DIRECTORY"]
open(os.path.join(state, "probe"), "w").write("ok")
out["state_dir"] = state
def writable(path):
    try:
        open(path, "w").close()
        return True
    except OSError as e:
        return e.strerror
out["etc"] = writable("/etc/gighive-media-agent/probe")
out["media"] = writable("/srv/gighive/video/probe")
creds = os.environ["CREDENTIALS_DIRECTORY"]
path = os.path.join(creds, "mysql-password")
out["credential"] = open(path).read()
out["credential_mode"] = oct(stat.S_IMODE(os.stat(path).st_mode))
out["credentials"] = sorted(os.listdir(creds))
out["secret_in_env"] = any("s3cret" in v for v in os.environ.values())
out["inotify"] = inotify_simple.INotify().add_watch("/srv/gighive/video", inotify_simple.flags.CLOSE_WRITE) > 0
def connect(host, port):
    s = socket.socket()
    s.settimeout(1.5)
    try:
        return s.connect_ex((host, port))
    except OSError as e:
        return e.errno
out["loopback"] = connect("127.0.0.1", 9)
out["elsewhere"] = connect("192.0.2.1", 443)
print("PROBE " + json.dumps(out))
"""


def test_hardened_service_runs_the_agents_code_with_least_privilege(installed: Container, configure_agent) -> None:
    """The upload service as shipped, with only ExecStart= replaced by a probe run with the
    package's own interpreter: every dependency (compiled ones too) loads under the hardening;
    the state directory is writable and nothing else; secrets arrive as files; traffic leaves
    only to loopback."""
    setup: AgentSetup = configure_agent(installed, credentials={"mysql-password": "s3cret"}, reload=False)
    installed.write("/usr/local/lib/gighive-probe.py", PROBE)
    installed.write(
        "/etc/systemd/system/gighive-media-upload.service.d/zz-probe.conf",
        "[Service]\nExecStart=\nExecStart=/opt/venvs/gighive-media-agent/bin/python /usr/local/lib/gighive-probe.py\n",
    )
    installed.systemctl("daemon-reload")
    installed.systemctl("start", "gighive-media-upload.service")
    props = installed.wait_inactive("gighive-media-upload.service")
    log = installed.journal("gighive-media-upload.service", "-o", "cat")
    assert props["Result"] == "success", log
    probe = json.loads(log.split("PROBE ", 1)[1].splitlines()[0])
    uid = installed.run(["id", "-u", "gighive-media"]).stdout.strip()
    assert probe["uid"] == int(uid)
    assert probe["cap_eff"] == "0000000000000000"
    assert probe["state_dir"] == STATE_DIR
    assert installed.run(["stat", "-c", "%U %a", STATE_DIR]).stdout.split() == ["gighive-media", "750"]
    assert probe["etc"] == "Read-only file system"
    assert probe["media"] in ("Read-only file system", "Permission denied"), setup.roots
    assert probe["credential"] == "s3cret" and probe["credential_mode"] == "0o400"
    assert probe["credentials"] == ["mysql-password"], "absent secrets are simply not passed"
    assert probe["secret_in_env"] is False
    assert probe["inotify"] is True
    assert probe["loopback"] == 111, "loopback is allowed (connection refused by nobody listening)"
    assert probe["elsewhere"] != 0 and probe["elsewhere"] != 111, "other addresses are dropped"
