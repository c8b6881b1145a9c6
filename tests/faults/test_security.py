"""Security checks: secrets never leak, the units stay locked down, the stream server answers
only its front, and nothing writes into a media root except the deletion the operator enabled."""

from __future__ import annotations

import ipaddress
import socket
import subprocess

import pytest

from tests.stream.support import Address, ServerProcess, request, wait_for
from tests.support.media import pseudo_random_bytes

from .stream_fixtures import *  # noqa: F403 - the fixtures
from .stream_fixtures import REPO_UNITS, MediaLibrary

# ---- stream peers ------------------------------------------------------------------------------


def _get(url: str) -> bytes:
    return f"GET {url} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n".encode()


def exchange_from(source: str, addr: Address, data: bytes) -> bytes:
    """Send a request from a given local address (any 127.x works on loopback); read to close."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.bind((source, 0))
        s.connect((addr.host, addr.port))
        try:
            s.sendall(data)
        except OSError:
            return b""
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk


def global_address() -> str | None:
    """An address of this machine outside loopback and the Docker range (the default allow-list)."""
    text = subprocess.run(["ip", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
    for line in text.splitlines():
        fields = line.split()
        cidr = fields[fields.index("inet") + 1] if "inet" in fields else None
        if cidr is None:
            continue
        ip = ipaddress.ip_interface(cidr).ip
        if ip not in ipaddress.ip_network("172.16.0.0/12"):
            return str(ip)
    return None


def test_tcp_peers_outside_stream_allowed_peers_get_no_answer(start_server, fresh_library: MediaLibrary) -> None:
    item = fresh_library.add("m", pseudo_random_bytes(5000, seed=1), local=True, blob=False)
    srv: ServerProcess = start_server(fresh_library, STREAM_ALLOWED_PEERS="127.0.0.2, 127.0.1.0/24")
    # Not on the list: the connection is closed before a byte of the request is read.
    refused = exchange_from("127.0.0.1", srv.tcp, _get(item.url))
    assert refused == b"", refused[:200]
    assert exchange_from("127.0.0.3", srv.tcp, _get(item.url)) == b""
    # On the list (one address, and one inside a network): served.
    for source in ("127.0.0.2", "127.0.1.77"):
        answer = exchange_from(source, srv.tcp, _get(item.url))
        assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(item.data), answer[:200]
    wait_for(lambda: "refused a connection from 127.0.0.1" in srv.log_text(), what="the refusal to be logged")
    # The unix socket is guarded by its file mode (the socket unit), not by addresses: still served.
    assert request(srv.unix, item.url).body == item.data


def test_the_default_allow_list_refuses_a_peer_that_is_not_local(start_server, fresh_library: MediaLibrary) -> None:
    address = global_address()
    if address is None:
        pytest.skip("this machine has no address outside loopback and 172.16.0.0/12 to connect from")
    item = fresh_library.add("m", pseudo_random_bytes(5000, seed=2), local=True, blob=False)
    srv: ServerProcess = start_server(fresh_library, listen=["0.0.0.0:0"])
    port = srv.addresses[0].port
    assert exchange_from(address, Address("tcp", host=address, port=port), _get(item.url)) == b""
    answer = exchange_from("127.0.0.1", Address("tcp", port=port), _get(item.url))
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_refused_peers_cost_no_thread_and_the_server_keeps_serving(start_server, fresh_library: MediaLibrary) -> None:
    item = fresh_library.add("m", pseudo_random_bytes(5000, seed=3), local=True, blob=False)
    srv: ServerProcess = start_server(fresh_library, STREAM_ALLOWED_PEERS="127.0.0.2")
    held = []
    for _ in range(300):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.connect((srv.tcp.host, srv.tcp.port))
        held.append(s)
    try:
        for s in held:
            s.settimeout(30)
            assert s.recv(100) == b""  # closed by the server at once
        answer = exchange_from("127.0.0.2", srv.tcp, _get(item.url))
        assert answer.startswith(b"HTTP/1.1 200 ")
    finally:
        for s in held:
            s.close()
    # One line per burst, not one per connection: a scan cannot flood the journal.
    assert srv.log_text().count("refused a connection") < 10


def test_the_socket_unit_lets_only_the_front_connect() -> None:
    """The unix socket's gate is its mode (the service runs with PrivateUsers=yes, where a peer's
    uid is not visible); the TCP gate is the socket unit's IP allow-list plus the server's own."""
    text = (REPO_UNITS / "gighive-media-stream.socket").read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))
    assert settings["SocketMode"] == "0660"
    assert settings["SocketUser"] == "root" and settings["SocketGroup"] == "www-data"
    assert settings["IPAddressDeny"] == "any" and settings["IPAddressAllow"] == "localhost"
