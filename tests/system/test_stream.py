"""The stream server under real systemd: socket activation on the unix socket, a 206 for a Range
request, idle exit, and activation again on the next request."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import pytest
from azure.storage.blob import ContainerClient

from tests.support.azurite import Azurite
from tests.system.debbuild import Build
from tests.system.nspawn import Container, wait_for
from tests.system.test_upload import agent_env_for

pytestmark = pytest.mark.system

SOCKET = "/run/gighive-media-agent/stream.sock"
SERVICE = "gighive-media-stream.service"

CLIENT = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(30)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print(json.dumps({"error": e.strerror}))
    sys.exit(0)
s.sendall(b"GET " + sys.argv[2].encode() + b" HTTP/1.1\r\nHost: gighive\r\nRange: bytes=0-1\r\nConnection: close\r\n\r\n")
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
head, _, body = data.partition(b"\r\n\r\n")
lines = head.decode("latin-1").split("\r\n")
print(json.dumps({"status": int(lines[0].split()[1]), "headers": lines[1:], "body": body.hex()}))
"""


def fetch(c: Container, url: str, user: str) -> dict:
    out = c.run(["runuser", "-u", user, "--", "python3", "/usr/local/lib/gighive-client.py", SOCKET, url]).stdout
    return json.loads(out)


def package_has_serve(build: Build) -> bool:
    """Whether the packaged CLI has the `serve` command (read from the .deb, before booting)."""
    tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(build.deb)], capture_output=True, check=True).stdout
    cli = subprocess.run(
        ["tar", "-x", "-O", "--wildcards", "*/site-packages/agent/cli.py"], input=tar, capture_output=True, check=True
    ).stdout
    return b'"serve"' in cli


def test_request_on_the_socket_starts_the_server_which_answers_206_and_exits_when_idle(
    deb: Build, request: pytest.FixtureRequest, configure_agent, azurite: Azurite, blob_container: ContainerClient
) -> None:
    if not package_has_serve(deb):
        pytest.skip("`gighive-media serve` is not in the CLI yet (issue 3); this test runs once it is")
    installed: Container = request.getfixturevalue("installed")
    env, credentials = agent_env_for(azurite, blob_container)
    env["STREAM_IDLE_EXIT_SECONDS"] = "2"
    setup = configure_agent(installed, roots={"video": "/srv/gighive/video"}, env=env, credentials=credentials)
    data = os.urandom(64 * 1024)
    name = f"{hashlib.sha256(data).hexdigest()}.mp4"
    installed.write(f"{setup.roots['video']}/{name}", data, owner="www-data:www-data")
    installed.write("/usr/local/lib/gighive-client.py", CLIENT)
    installed.systemctl("enable", "--now", "gighive-media-stream.socket")
    assert installed.show(SERVICE, "ActiveState")["ActiveState"] == "inactive", "nothing runs before a request"

    # The web front's user may connect; anybody else may not (the server has no auth of its own).
    assert fetch(installed, f"/video/{name}", "nobody") == {"error": "Permission denied"}
    first = fetch(installed, f"/video/{name}", "www-data")
    assert first["status"] == 206, first
    assert bytes.fromhex(first["body"]) == data[:2]
    assert any(h.lower() == f"content-range: bytes 0-1/{len(data)}" for h in first["headers"]), first
    started = installed.show(SERVICE, "ExecMainStartTimestampMonotonic")

    idle = installed.wait_inactive(SERVICE, timeout=300)
    assert idle["Result"] == "success" and idle["ExecMainStatus"] == "0", installed.journal(SERVICE)
    assert installed.show("gighive-media-stream.socket", "SubState")["SubState"] == "listening"

    second = fetch(installed, f"/video/{name}", "www-data")
    assert second["status"] == 206, second
    assert installed.show(SERVICE, "ExecMainStartTimestampMonotonic") != started, "started again"
    wait_for(lambda: installed.show(SERVICE, "ActiveState")["ActiveState"] == "inactive", 300, what="idle exit")
    failed = installed.systemctl("list-units", "--failed", "--plain", "--no-legend").stdout
    assert "gighive" not in failed, failed
