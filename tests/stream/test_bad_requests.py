"""Requests a server on the network must survive: traversal and encoding tricks, oversized
heads, wrong methods, old and pipelined HTTP, slow and idle clients."""

from __future__ import annotations

import socket
import time

import pytest

from tests.support.media import pseudo_random_bytes

from .conftest import MediaLibrary
from .support import Address, ServerProcess, raw_exchange, request, split_responses, wait_for

SHA = "ab" * 32


def status_of(data: bytes) -> int:
    assert data.startswith(b"HTTP/1.1 "), data[:100]
    return int(data[9:12])


def get(target: bytes, version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    return b"GET " + target + b" " + version + b"\r\nHost: media\r\n" + extra + b"\r\n"


@pytest.mark.parametrize(
    "target",
    [
        b"/video/../../../../etc/passwd",
        b"/video/..%2f..%2f..%2fetc%2fpasswd",
        b"/video/%2e%2e/%2e%2e/etc/passwd",
        b"/video/%2E%2E%2Fstate%2Fqueue.db",
        b"/video%2f" + SHA.encode() + b".mp4",
        b"/video/" + SHA.encode() + b"%2emp4",
        b"/video/" + SHA.encode() + b".mp4%00.png",
        b"/video/" + SHA.encode() + b".mp4\x00",
        b"/video/./" + SHA.encode() + b".mp4",
        b"/video//" + SHA.encode() + b".mp4",
        b"/video\\..\\..\\etc\\passwd",
        b"/video/thumbnails/../../etc/passwd",
        b"/video/%c0%ae%c0%ae/etc/passwd",
        b"/audio/" + b"a" * 2000 + b".mp3",
        b"/state/queue.db",
        b"/etc/passwd",
        b"/",
        b"*",
        b"/video/" + SHA.upper().encode() + b".mp4",
    ],
)
def test_paths_outside_the_media_shapes_are_404(server: ServerProcess, target: bytes) -> None:
    data = raw_exchange(server.tcp, get(target))
    assert status_of(data) == 404
    assert b"Traceback" not in data and b"root:" not in data


def test_the_server_keeps_serving_after_refusals_on_the_same_connection(
    server: ServerProcess, library: MediaLibrary
) -> None:
    item = library.items["local"]
    data = raw_exchange(server.tcp, get(b"/video/../x") + get(item.url.encode(), extra=b"Range: bytes=0-3\r\n"))
    (s1, _h1, _b1), (s2, _h2, b2) = split_responses(data)
    assert (s1, s2) == (404, 206) and b2 == item.data[:4]


@pytest.mark.parametrize("method", [b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"PROPFIND", b"FOO"])
def test_methods_other_than_get_and_head_get_405_with_allow(
    server: ServerProcess, library: MediaLibrary, method: bytes
) -> None:
    url = library.items["local"].url.encode()
    data = raw_exchange(server.tcp, method + b" " + url + b" HTTP/1.1\r\nHost: m\r\nContent-Length: 0\r\n\r\n")
    assert status_of(data) == 405
    assert b"\r\nAllow: GET, HEAD\r\n" in data


def test_a_huge_header_gets_431(server: ServerProcess, library: MediaLibrary) -> None:
    data = raw_exchange(server.tcp, get(library.items["local"].url.encode(), extra=b"X-Big: " + b"a" * 20000 + b"\r\n"))
    assert status_of(data) == 431


def test_too_many_header_lines_get_431(server: ServerProcess, library: MediaLibrary) -> None:
    extra = b"".join(b"X-%d: y\r\n" % i for i in range(150))
    assert status_of(raw_exchange(server.tcp, get(library.items["local"].url.encode(), extra=extra))) == 431


def test_a_huge_request_line_gets_414(server: ServerProcess) -> None:
    assert status_of(raw_exchange(server.tcp, get(b"/video/" + b"a" * 40000))) == 414


def test_endless_header_bytes_are_cut_off(server: ServerProcess) -> None:
    # A client that never ends its head is answered once the cap is reached, not read forever.
    with server.tcp.connect() as s:
        s.sendall(b"GET /video/x HTTP/1.1\r\n")
        try:
            for _ in range(1000):
                s.sendall(b"X-Filler: " + b"z" * 1000 + b"\r\n")
        except OSError:
            pass  # the server closed after answering
        answer = _closed_by_server(s)
    assert status_of(answer) == 431


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /video/x HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /video/x HTTP/2.0\r\nHost: m\r\n\r\n", 505),
        (b"GET /video/x HTTP/1.1\r\nHost: m\r\n folded: x\r\n\r\n", 400),
        (b"GET /video/x HTTP/1.1\r\nHost : m\r\n\r\n", 400),
        (b"GET /video/x\r\n\r\n", 400),  # HTTP/0.9
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),  # a TLS ClientHello
        (b"GET /video/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ],
)
def test_malformed_requests_get_4xx_and_no_traceback(server: ServerProcess, raw: bytes, status: int) -> None:
    data = raw_exchange(server.tcp, raw)
    assert status_of(data) == status
    assert b"Traceback" not in data
    assert b"\r\nConnection: close\r\n" in data


def test_http_1_0_is_answered_and_closed(server: ServerProcess, library: MediaLibrary) -> None:
    item = library.items["blob"]
    with server.tcp.connect() as s:
        s.sendall(b"GET " + item.url.encode() + b" HTTP/1.0\r\nRange: bytes=0-9\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):  # the server closes: a 1.0 client did not ask to keep it
            data += chunk
    [(status, headers, body)] = split_responses(data)
    assert status == 206 and body == item.data[:10]
    assert headers["connection"] == "close"


def test_http_1_0_keep_alive_is_honoured(server: ServerProcess, library: MediaLibrary) -> None:
    item = library.items["local"]
    one = b"GET " + item.url.encode() + b" HTTP/1.0\r\nConnection: keep-alive\r\nRange: bytes=0-4\r\n\r\n"
    data = raw_exchange(server.tcp, one + one)
    responses = split_responses(data)
    assert [r[0] for r in responses] == [206, 206]
    assert responses[0][1]["connection"] == "keep-alive"


def test_pipelined_requests_are_answered_in_order(server: ServerProcess, library: MediaLibrary) -> None:
    local, blob = library.items["local"], library.items["blob"]
    batch = (
        get(blob.url.encode(), extra=b"Range: bytes=5-9\r\n")
        + b"HEAD "
        + local.url.encode()
        + b" HTTP/1.1\r\nHost: m\r\n\r\n"
        + get(b"/video/nope.mp4")
        + get(local.url.encode(), extra=b"Range: bytes=-3\r\n")
        + get(blob.url.encode(), extra=b'If-None-Match: "' + blob.sha256.encode() + b'"\r\n')
    )
    with server.tcp.connect() as s:
        s.sendall(batch)
        data = b""
        # The 5th answer is a body-less 304; once it is complete the connection must still be
        # open for another request.
        while not data.endswith(b"\r\n\r\n") or len(split_responses(data, head_requests=[1])) < 5:
            chunk = s.recv(65536)
            assert chunk, "server closed a keep-alive connection"
            data += chunk
        s.sendall(get(local.url.encode(), extra=b"Range: bytes=0-0\r\nConnection: close\r\n"))
        while chunk := s.recv(65536):
            data += chunk
    responses = split_responses(data, head_requests=[1])
    assert [r[0] for r in responses] == [206, 200, 404, 206, 304, 206]
    assert responses[0][2] == blob.data[5:10]
    assert responses[1][2] == b"" and responses[1][1]["content-length"] == str(local.size)
    assert responses[3][2] == local.data[-3:]
    assert responses[5][2] == local.data[:1]


def test_a_request_with_a_body_is_answered_and_the_connection_closed(
    server: ServerProcess, library: MediaLibrary
) -> None:
    item = library.items["local"]
    data = raw_exchange(
        server.tcp, get(item.url.encode(), extra=b"Range: bytes=0-1\r\nContent-Length: 5\r\n") + b"hello" + get(b"/x")
    )
    [(status, headers, body)] = split_responses(data)
    assert status == 206 and body == item.data[:2] and headers["connection"] == "close"


def test_absolute_form_targets_are_served(server: ServerProcess, library: MediaLibrary) -> None:
    item = library.items["local"]
    data = raw_exchange(server.tcp, get(b"http://media.example" + item.url.encode(), extra=b"Range: bytes=0-2\r\n"))
    [(status, _headers, body)] = split_responses(data)
    assert status == 206 and body == item.data[:3]


# ---- slow and idle clients -----------------------------------------------------------------


@pytest.fixture
def strict_server(start_server, library: MediaLibrary) -> ServerProcess:
    return start_server(
        library,
        STREAM_HEADER_TIMEOUT_SECONDS="1",
        STREAM_KEEPALIVE_TIMEOUT_SECONDS="1",
        STREAM_SEND_TIMEOUT_SECONDS="2",
    )


def _closed_by_server(s: socket.socket) -> bytes:
    s.settimeout(60)
    data = b""
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_client_that_sends_nothing_is_closed_with_408(strict_server: ServerProcess) -> None:
    with strict_server.tcp.connect() as s:
        assert status_of(_closed_by_server(s)) == 408


def test_a_slowloris_trickle_does_not_hold_the_connection(strict_server: ServerProcess) -> None:
    # One byte every 0.2 s would take minutes for this head; the head deadline ends it.
    head = get(b"/video/" + SHA.encode() + b".mp4", extra=b"X-Slow: " + b"s" * 1000 + b"\r\n")
    closed = False
    with strict_server.tcp.connect() as s:
        for byte in head:
            try:
                s.sendall(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
            s.setblocking(False)
            try:
                if s.recv(65536, socket.MSG_PEEK):
                    closed = True
                    break
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
        assert closed, "the server waited for the whole trickled head"
        s.settimeout(30)
        assert status_of(_closed_by_server(s)) == 408


def test_an_idle_keep_alive_connection_is_closed_quietly(strict_server: ServerProcess, library: MediaLibrary) -> None:
    item = library.items["local"]
    with strict_server.tcp.connect() as s:
        s.sendall(get(item.url.encode(), extra=b"Range: bytes=0-0\r\n"))
        data = _closed_by_server(s)
    [(status, _h, body)] = split_responses(data)
    assert status == 206 and body == item.data[:1]  # and then a close, no 408 for an idle client


@pytest.mark.parametrize("where", ["local", "blob"])
def test_a_client_that_stops_reading_is_dropped_and_others_are_served(
    start_server, fresh_library: MediaLibrary, where: str
) -> None:
    # Bigger than every socket buffer between the two, so the server really has to wait.
    big = fresh_library.add(
        "big", pseudo_random_bytes(48 * 1024 * 1024, seed=3), local=where == "local", blob=where == "blob"
    )
    small = fresh_library.add("small", pseudo_random_bytes(1000, seed=4), local=True, blob=False)
    srv = start_server(fresh_library, STREAM_SEND_TIMEOUT_SECONDS="1")
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect((srv.tcp.host, srv.tcp.port))
    try:
        stalled.sendall(get(big.url.encode()))
        wait_for(lambda: "client went away" in srv.log_text(), what="the stalled client to be dropped")
        r = request(srv.tcp, small.url)
        assert r.status == 200 and r.body == small.data
    finally:
        stalled.close()


def test_unix_socket_answers_the_same_refusals(server: ServerProcess) -> None:
    addr: Address = server.unix
    assert status_of(raw_exchange(addr, get(b"/video/%2e%2e/x"))) == 404
    assert status_of(raw_exchange(addr, b"DELETE /video/x HTTP/1.1\r\nHost: m\r\n\r\n")) == 405
