"""Only the front may reach the stream server: another local user cannot open its unix socket, and
another network namespace (a container on a Docker network) gets nothing over TCP, not even a hint
whether a file exists. Both need root (a second user, a namespace)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.support.media import pseudo_random_bytes

from .conftest import MediaLibrary, socket_like_the_unit

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a second user and a network namespace")

# Connects, sends one GET and prints what came back (repr), or the error's name.
_CLIENT = r"""
import socket, sys
kind, where, url = sys.argv[1:4]
try:
    if kind == "unix":
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(20)
        s.connect(where)
    else:
        host, port = where.rsplit(":", 1)
        s = socket.create_connection((host, int(port)), timeout=20)
    s.sendall(f"GET {url} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    print(repr(data[:200]))
except OSError as e:
    print(type(e).__name__)
"""


def client(prefix: list[str], kind: str, where: str, url: str) -> str:
    r = subprocess.run(
        [*prefix, sys.executable, "-c", _CLIENT, kind, where, url], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def as_user(user: str) -> list[str]:
    return ["setpriv", f"--reuid={user}", "--regid=65534", "--clear-groups", "--"]


def test_another_local_user_cannot_open_the_socket(start_server, fresh_library: MediaLibrary) -> None:
    item = fresh_library.add("m", pseudo_random_bytes(5000, seed=1), local=True, blob=False)
    srv = start_server(fresh_library)
    sock = Path(srv.unix.path)
    socket_like_the_unit(sock)
    missing = "/video/" + "f" * 64 + ".mp4"
    # nobody: the same refusal for a file that exists and one that does not.
    for url in (item.url, missing):
        assert client(as_user("nobody"), "unix", str(sock), url) == "PermissionError"
    # www-data (Apache's workers, in the container too: uid/gid 33) is the front.
    fresh_library.roots["video"].chmod(0o755)
    (fresh_library.roots["video"] / Path(item.url).name).chmod(0o644)
    answer = client(
        ["setpriv", "--reuid=www-data", "--regid=www-data", "--init-groups", "--"], "unix", str(sock), item.url
    )
    assert answer.startswith("b'HTTP/1.1 200 ")


@pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2")
def test_a_container_network_gets_nothing_over_tcp(start_server, fresh_library: MediaLibrary) -> None:
    """A namespace on a Docker-like network (172.16.0.0/12, no longer allowed by default)."""
    item = fresh_library.add("m", pseudo_random_bytes(5000, seed=2), local=True, blob=False)
    srv = start_server(fresh_library, listen=["0.0.0.0:0"])
    port = srv.addresses[0].port
    ns = f"gms-{uuid.uuid4().hex[:8]}"
    host_if, ns_if = f"h{ns[4:]}", f"n{ns[4:]}"
    subnet = f"172.31.{int(ns[4:6], 16)}"
    setup = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", ns_if],
        ["ip", "link", "set", ns_if, "netns", ns],
        ["ip", "addr", "add", f"{subnet}.1/30", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        ["ip", "-n", ns, "addr", "add", f"{subnet}.2/30", "dev", ns_if],
        ["ip", "-n", ns, "link", "set", ns_if, "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]
    try:
        for cmd in setup:
            subprocess.run(cmd, check=True, capture_output=True)
        inside = ["ip", "netns", "exec", ns]
        answers = {
            url: client(inside, "tcp", f"{subnet}.1:{port}", url) for url in (item.url, "/video/" + "f" * 64 + ".mp4")
        }
        # Connected, then closed before a byte was read: no status, no hint whether a file exists.
        assert set(answers.values()) == {"b''"}, answers
        assert f"refused a connection from {subnet}.2" in srv.log_text()
        # The same server still answers its front on loopback.
        assert client([], "tcp", f"127.0.0.1:{port}", item.url).startswith("b'HTTP/1.1 200 ")
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
