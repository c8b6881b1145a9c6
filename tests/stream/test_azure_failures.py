"""When Azure (Azurite) is down, slow, changing under a read, or the client leaves mid-stream."""

from __future__ import annotations

import contextlib
import hashlib
import socket
from collections.abc import Callable, Iterator

import pytest
from azure.core.exceptions import ResourceExistsError

from tests.support.azurite import ACCOUNT_KEY, ACCOUNT_NAME, Azurite
from tests.support.media import pseudo_random_bytes

from .conftest import MediaLibrary, _library
from .support import CountingProxy, ServerProcess, request, wait_for

BIG = 64 * 1024 * 1024


@pytest.fixture
def private_azurite(azurite_factory: Callable[..., Azurite]) -> Azurite:
    """An Azurite of this test's own, so stopping it disturbs no other test."""
    return azurite_factory()


@pytest.fixture
def lib(tmp_path, private_azurite: Azurite) -> MediaLibrary:
    return _library(tmp_path / "library", private_azurite)


@pytest.fixture
def proxy(private_azurite: Azurite) -> Iterator[CountingProxy]:
    p = CountingProxy(private_azurite.port)
    yield p
    p.close()


def through(proxy: CountingProxy) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
        f"BlobEndpoint=http://127.0.0.1:{proxy.port}/{ACCOUNT_NAME};"
    )


def read_some(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(min(65536, n - len(data)))
        assert chunk, "connection closed early"
        data += chunk
    return data


def read_to_close(s: socket.socket) -> bytes:
    data = b""
    s.settimeout(60)
    while True:
        try:
            chunk = s.recv(1 << 20)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def body_of(data: bytes) -> bytes:
    return data.partition(b"\r\n\r\n")[2]


def test_azure_unreachable_gets_502_with_retry_after_and_a_logged_cause(
    start_server, lib: MediaLibrary, private_azurite: Azurite
) -> None:
    cached = lib.add("cached", pseudo_random_bytes(100_000, seed=1), local=False, blob=True)
    fresh = lib.add("fresh", pseudo_random_bytes(100_000, seed=2), local=False, blob=True)
    local = lib.add("local", pseudo_random_bytes(1000, seed=3), local=True, blob=False)
    srv = start_server(lib, STREAM_UPSTREAM_RETRIES="0")
    assert request(srv.tcp, cached.url, {"Range": "bytes=0-0"}).status == 206  # properties now cached
    private_azurite.stop()
    for item in (cached, fresh):  # the read fails, and the properties request fails
        r = request(srv.tcp, item.url)
        assert r.status == 502, r.body
        assert r.header("retry-after") == "5"
        assert b"Traceback" not in r.body
    assert "Azure Blob unreachable" in srv.log_text()
    assert "http_status=502" in srv.log_text()
    # Local files do not depend on Azure.
    r = request(srv.tcp, local.url)
    assert r.status == 200 and r.body == local.data
    private_azurite.start()
    r = request(srv.tcp, fresh.url)
    assert r.status == 200 and r.body == fresh.data


def test_azure_not_answering_gets_504(start_server, lib: MediaLibrary, private_azurite: Azurite) -> None:
    item = lib.add("blob", pseudo_random_bytes(10_000, seed=4), local=False, blob=True)
    srv = start_server(lib, STREAM_UPSTREAM_RETRIES="0", STREAM_UPSTREAM_TIMEOUT_SECONDS="1")
    private_azurite.pause()  # the port accepts, nothing answers
    try:
        r = request(srv.tcp, item.url)
    finally:
        private_azurite.resume()
    assert r.status == 504
    assert r.header("retry-after") == "5"
    assert "timed out" in srv.log_text()
    assert request(srv.tcp, item.url).body == item.data


def test_a_missing_container_is_a_502_that_says_so(start_server, lib: MediaLibrary) -> None:
    item = lib.add("blob", b"abc", local=False, blob=True)
    srv = start_server(lib, AZURE_STORAGE_CONTAINER_NAME="no-such-container")
    r = request(srv.tcp, item.url)
    assert r.status == 502
    assert "ContainerNotFound" in srv.log_text()


def test_azure_stopping_mid_stream_cuts_the_response_and_the_server_recovers(
    start_server, lib: MediaLibrary, private_azurite: Azurite
) -> None:
    item = lib.add("big", pseudo_random_bytes(BIG, seed=5), local=False, blob=True)
    local = lib.add("local", pseudo_random_bytes(1000, seed=6), local=True, blob=False)
    srv = start_server(lib)
    with srv.tcp.connect() as s:
        s.sendall(f"GET {item.url} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        first = read_some(s, 1 << 20)
        assert first.startswith(b"HTTP/1.1 200 ")
        private_azurite.kill()
        rest = read_to_close(s)
    body = body_of(first + rest)
    assert 0 < len(body) < item.size  # cut short: the client knows it from Content-Length
    assert body == item.data[: len(body)]  # and what arrived is right
    wait_for(lambda: "response cut" in srv.log_text(), what="the failure to be logged")
    r = request(srv.tcp, local.url)
    assert r.status == 200 and r.body == local.data
    private_azurite.start()
    # A killed Azurite may forget what was created in its last seconds (see tests/support/azurite.py).
    with contextlib.suppress(ResourceExistsError):
        lib.container.create_container()
    again = lib.add("again", pseudo_random_bytes(5000, seed=7), local=False, blob=True)
    assert request(srv.tcp, again.url).body == again.data


def test_a_broken_azure_connection_is_resumed_at_the_same_version(
    start_server, lib: MediaLibrary, proxy: CountingProxy
) -> None:
    item = lib.add("big", pseudo_random_bytes(BIG, seed=8), local=False, blob=True)
    srv = start_server(lib, AZURE_STORAGE_CONNECTION_STRING=through(proxy))
    with srv.tcp.connect() as s:
        s.sendall(f"GET {item.url} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n".encode())
        first = read_some(s, 1 << 20)
        assert proxy.sever() >= 1
        rest = read_to_close(s)
    body = body_of(first + rest)
    assert hashlib.sha256(body).hexdigest() == item.sha256
    assert "resuming at byte" in srv.log_text()


def test_a_blob_overwritten_mid_stream_is_never_mixed(start_server, lib: MediaLibrary, proxy: CountingProxy) -> None:
    name = "video/thumbnails/" + "c" * 64 + ".png"  # not content-addressed: may change
    old, new = pseudo_random_bytes(BIG, seed=9), pseudo_random_bytes(BIG, seed=10)
    lib.upload(name, old, content_type="image/png")
    srv = start_server(lib, AZURE_STORAGE_CONNECTION_STRING=through(proxy))
    with srv.tcp.connect() as s:
        s.sendall(f"GET /{name} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n".encode())
        first = read_some(s, 1 << 20)
        lib.upload(name, new, content_type="image/png")
        proxy.sever()  # the resume must be refused (If-Match), not continue with the new bytes
        rest = read_to_close(s)
    body = body_of(first + rest)
    assert len(body) < len(old)
    assert body == old[: len(body)]
    assert "changed" in srv.log_text()
    # The next request gets the new version, whole.
    r = request(srv.tcp, f"/{name}")
    assert r.status == 200 and r.body == new


def test_a_blob_changed_since_its_cached_properties_is_read_again(start_server, lib: MediaLibrary) -> None:
    name = "video/thumbnails/" + "d" * 64 + ".png"
    lib.upload(name, b"old version", content_type="image/png")
    srv = start_server(lib, STREAM_STAT_CACHE_SECONDS="3600")
    first = request(srv.tcp, f"/{name}")
    assert first.body == b"old version"
    lib.upload(name, b"the new version", content_type="image/png")
    r = request(srv.tcp, f"/{name}")
    assert r.status == 200 and r.body == b"the new version"
    assert r.header("etag") != first.header("etag")
    assert r.header("content-length") == str(len(b"the new version"))


def test_a_client_that_disconnects_stops_the_download(start_server, lib: MediaLibrary, proxy: CountingProxy) -> None:
    item = lib.add("big", pseudo_random_bytes(BIG, seed=11), local=False, blob=True)
    srv: ServerProcess = start_server(lib, AZURE_STORAGE_CONNECTION_STRING=through(proxy))
    with srv.tcp.connect() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        s.sendall(f"GET {item.url} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        read_some(s, 256 * 1024)
    # The server notices on its next write, closes its Azure connection, and Azure stops.
    wait_for(lambda: "client went away" in srv.log_text(), what="the server to notice the disconnect")

    def download_connections_closed() -> bool:
        return all(c["closed"] for c in proxy.connections if int(c["down"]) > 1 << 20)  # type: ignore[arg-type]

    wait_for(download_connections_closed, what="the Azure download connection to close")
    assert proxy.total_down() < item.size // 2
    # The server is fine afterwards.
    assert request(srv.tcp, item.url, {"Range": "bytes=0-9"}).body == item.data[:10]


def test_a_blob_whose_recorded_sha256_differs_from_its_name_is_not_served(start_server, lib: MediaLibrary) -> None:
    data = b"these bytes are not what the name promises"
    name = "video/" + "f" * 64 + ".mp4"
    lib.upload(name, data, sha=hashlib.sha256(data).hexdigest())
    srv = start_server(lib)
    r = request(srv.tcp, f"/{name}")
    assert r.status == 502
    assert "does not match its name" in srv.log_text()
