"""The agent's Apache snippet inside a front built like GigHive's container (Debian's apache2: TLS,
Basic Auth, the /video gallery nonce, `CacheEnable disk /`, forced media headers, CORS).

The Range and conditional matrix also runs through this front (test_range_matrix.py, transport
"apache"); this module covers what is particular to it: who may read, front-first serving of
verified files,
validators that survive an eviction, files over 4 GiB, clients that leave, errors, and that
nothing media-related lands in Apache's disk cache."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.apache import NONCE, ApacheFront, basic_auth, grant_read
from tests.support.azurite import ACCOUNT_KEY, ACCOUNT_NAME
from tests.support.media import pseudo_random_bytes

from .conftest import MediaLibrary, apache_address, apache_in_front
from .support import Address, ServerProcess, request, wait_for

GIGHIVE_MEDIA_CACHE = "public, max-age=604800, immutable"
# Headers a client keys its cache and its If-Range on: the same whichever side answers.
SAME_EVERYWHERE = (
    "etag",
    "last-modified",
    "content-type",
    "cache-control",
    "accept-ranges",
    "content-length",
    "access-control-allow-origin",
    "access-control-expose-headers",
)


@pytest.fixture
def front(start_server, fresh_library: MediaLibrary, tmp_path: Path) -> Iterator[tuple[ServerProcess, ApacheFront]]:
    srv = start_server(fresh_library)
    apache = apache_in_front(tmp_path / "apache", srv.unix, fresh_library.roots)
    yield srv, apache
    apache.stop()


def handlers(apache: ApacheFront, url: str) -> list[str]:
    """Which handler answered each request for url, from the access log: "proxy-server" for the
    stream server, anything else for Apache itself."""
    return re.findall(rf'"(?:GET|HEAD) {re.escape(url)} HTTP/1.1" .*handler=(\S+)', apache.access_log())


def anonymous(apache: ApacheFront) -> Address:
    return apache_address(apache, auth=False)


# ---- who may read --------------------------------------------------------------------------


def test_without_credentials_nothing_is_sent(front, fresh_library: MediaLibrary) -> None:
    _srv, apache = front
    local = fresh_library.add("local", pseudo_random_bytes(70_000, seed=1), local=True, blob=False)
    blob = fresh_library.add("blob", pseudo_random_bytes(70_000, seed=2), local=False, blob=True)
    audio = fresh_library.add("audio", pseudo_random_bytes(9_000, seed=3), local=False, blob=True, root="audio")
    missing = "/video/" + "e" * 64 + ".mp4"
    wrong = Address(
        "https", port=apache.port, ca=str(apache.tls.ca), headers=(("Authorization", basic_auth(password="no")),)
    )
    for addr in (anonymous(apache), wrong):
        for url in (local.url, blob.url, audio.url, missing):
            r = request(addr, url, {"Range": "bytes=0-1"})
            # The same answer for a file on disk, in Blob or nowhere: no bytes, no hint.
            assert r.status == 401, url
            assert r.header("cache-control") == "no-store"
            assert r.header("etag") is None and r.header("content-range") is None
    # A nonce is not a password for /audio.
    assert request(anonymous(apache), audio.url, {"X-Gallery-Nonce": NONCE}).status == 401


@pytest.mark.parametrize("where", ["local", "blob"])
def test_the_gallery_nonce_plays_video_with_real_206s(front, fresh_library: MediaLibrary, where: str) -> None:
    """GigHive's iOS player sends X-Gallery-Nonce and no password; bytes=0-1 must be a 206."""
    _srv, apache = front
    item = fresh_library.add(where, pseudo_random_bytes(300_001, seed=4), local=where == "local", blob=where == "blob")
    player = anonymous(apache)
    for _ in range(3):  # the second and third would come from a cache, if anything cached them
        r = request(player, item.url, {"Range": "bytes=0-1", "X-Gallery-Nonce": NONCE})
        assert r.status == 206 and r.body == item.data[:2]
        assert r.header("content-range") == f"bytes 0-1/{item.size}"
    r = request(player, item.url, {"Range": "bytes=0-1", "X-Gallery-Nonce": "too-short"})
    assert r.status == 401


# ---- local first, and validators across the move to Blob ------------------------------------


def markers(lib: MediaLibrary, sha: str) -> list[str]:
    """The server's markers for a video (agent/stream/markers.py): gate and identity names."""
    return sorted(p.name.removeprefix(f"{sha}.mp4.") for p in (lib.verified_dir / "video").glob(f"{sha}.mp4.*"))


def test_a_verified_file_on_disk_is_sent_by_apache_from_the_second_request(front, fresh_library: MediaLibrary) -> None:
    """The first request for a verified local file goes to the server, which checks the agent's
    state and leaves its markers; from then on Apache sends the file itself, with the same headers."""
    srv, apache = front
    local = fresh_library.add("local", pseudo_random_bytes(200_000, seed=5), local=True, blob=False)
    blob = fresh_library.add("blob", pseudo_random_bytes(200_000, seed=6), local=False, blob=True)
    assert local.local is not None and local.sha256 is not None
    addr = apache_address(apache)
    assert markers(fresh_library, local.sha256) == []
    first = request(addr, local.url)
    assert first.status == 200 and first.body == local.data
    st = local.local.stat()
    identity = f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns // 1000:x}"'
    assert markers(fresh_library, local.sha256) == sorted([str(st.st_size), identity])
    gate = fresh_library.verified_dir / "video" / f"{local.sha256}.mp4.{st.st_size}"
    assert stat.S_IMODE(gate.stat().st_mode) == 0o644 and gate.stat().st_size == 0
    assert stat.S_IMODE(gate.parent.stat().st_mode) == 0o755
    second = request(addr, local.url)
    assert second.status == 200 and second.body == local.data
    for name in SAME_EVERYWHERE:
        assert second.header(name) == first.header(name), name
    assert second.header("etag") == f'"{local.sha256}"' and second.header("cache-control") == GIGHIVE_MEDIA_CACHE
    ranged = request(addr, local.url, {"Range": "bytes=7-9", "If-Range": f'"{local.sha256}"'})
    assert ranged.status == 206 and ranged.body == local.data[7:10]
    assert ranged.header("etag") == first.header("etag")
    wait_for(lambda: len(handlers(apache, local.url)) == 3, what="the access log")
    assert handlers(apache, local.url)[0] == "proxy-server"
    assert "proxy-server" not in handlers(apache, local.url)[1:]
    # The server saw the first request only, not the two Apache answered from disk.
    assert srv.log_text().count(f"video/{local.sha256}.mp4 ->") == 1
    # Conditional requests go to the server even for a verified file on disk (it judges them).
    assert request(addr, local.url, {"If-None-Match": f'"{local.sha256}"'}).status == 304
    wait_for(lambda: len(handlers(apache, local.url)) == 4, what="the access log")
    assert handlers(apache, local.url)[3] == "proxy-server"
    # A file only in Blob is always the server's, and gets no markers.
    for _ in range(2):
        assert request(addr, blob.url).body == blob.data
    wait_for(lambda: len(handlers(apache, blob.url)) == 2, what="the access log")
    assert set(handlers(apache, blob.url)) == {"proxy-server"}
    assert blob.sha256 is not None and markers(fresh_library, blob.sha256) == []


def test_a_same_size_write_in_place_is_sent_from_disk_without_the_promise(front, fresh_library: MediaLibrary) -> None:
    """A writer that sets the final size first (preallocation, rsync --inplace) keeps the gate's
    size: Apache then sends the file from disk, but its own ETag (inode, size, mtime) is not the
    identity the server vouched for, so the answer never carries the name's promise."""
    _srv, apache = front
    item = fresh_library.add("v", pseudo_random_bytes(300_001, seed=8), local=True, blob=False)
    assert item.local is not None and item.sha256 is not None
    addr = apache_address(apache)
    assert request(addr, item.url).header("etag") == f'"{item.sha256}"'  # the server; markers now
    assert request(addr, item.url).header("etag") == f'"{item.sha256}"'  # Apache from disk
    with open(item.local, "r+b") as f:
        f.truncate(0)
        f.truncate(item.size)  # preallocated: the final size, zeros
        f.write(item.data[:100_000])
        f.flush()
        os.utime(item.local, (1_600_000_000, 1_600_000_000))  # settled in the past, another time
        half = item.data[:100_000] + bytes(item.size - 100_000)
        r = request(addr, item.url)
        wait_for(lambda: len(handlers(apache, item.url)) == 3, what="the access log")
        assert handlers(apache, item.url)[2] != "proxy-server"  # sent from disk ...
        assert r.status == 200 and r.body == half
        assert r.header("etag") != f'"{item.sha256}"'  # ... as what it is
        assert r.header("last-modified") != "Sat, 01 Jan 2000 00:00:00 GMT"
        assert r.header("cache-control") == "no-cache"
        seek = request(addr, item.url, {"Range": "bytes=1-5", "If-Range": f'"{item.sha256}"'})
        assert seek.status == 200 and seek.body == half
        # A revalidation reaches the server, which withdraws the gate: the server answers now.
        assert request(addr, item.url, {"If-None-Match": r.header("etag") or ""}).status == 304
        assert str(item.size) not in markers(fresh_library, item.sha256)
        again = request(addr, item.url)
        assert again.header("etag") == r.header("etag") and again.header("cache-control") == "no-cache"
        wait_for(lambda: len(handlers(apache, item.url)) == 6, what="the access log")
        assert handlers(apache, item.url)[5] == "proxy-server"
        f.seek(0)
        f.write(item.data)
    os.utime(item.local, (1_600_000_000, 1_600_000_000))
    fresh_library.vouch(item)  # the agent hashed the finished file
    assert request(addr, item.url).header("etag") == f'"{item.sha256}"'  # the server; new markers
    from_disk = request(addr, item.url, {"Range": "bytes=1-5", "If-Range": f'"{item.sha256}"'})
    assert from_disk.status == 206 and from_disk.body == item.data[1:6]
    wait_for(lambda: len(handlers(apache, item.url)) == 8, what="the access log")
    assert handlers(apache, item.url)[7] != "proxy-server"


def test_validators_and_if_range_survive_an_eviction(front, fresh_library: MediaLibrary) -> None:
    """The iOS failure: an If-Range that stops matching after a file moves from disk to Blob
    turns every seek into a 200. The same name must keep the same validators."""
    _srv, apache = front
    item = fresh_library.add("both", pseudo_random_bytes(1_000_003, seed=7), local=True, blob=True)
    assert item.local is not None
    addr = apache_address(apache)
    on_disk = request(addr, item.url)
    assert on_disk.status == 200 and on_disk.body == item.data
    assert on_disk.header("etag") == f'"{item.sha256}"'
    assert on_disk.header("cache-control") == GIGHIVE_MEDIA_CACHE
    etag, date = on_disk.header("etag"), on_disk.header("last-modified")
    assert etag and date

    def seeks() -> list[int]:
        statuses = []
        for validator in (etag, date):
            for spec, first, last in (
                ("bytes=0-1", 0, 1),
                ("bytes=500000-500099", 500000, 500099),
                ("bytes=-7", item.size - 7, item.size - 1),
            ):
                r = request(addr, item.url, {"Range": spec, "If-Range": validator})
                assert r.body == item.data[first : last + 1], (spec, validator, r.status)
                statuses.append(r.status)
        return statuses

    assert set(seeks()) == {206}
    # The first answer was the server's (it verified the file and left its markers); the seeks
    # were Apache's own, from disk, with the same headers.
    from_disk = request(addr, item.url)
    assert handlers(apache, item.url)[0] == "proxy-server"
    wait_for(lambda: len(handlers(apache, item.url)) == 8, what="the access log")
    assert "proxy-server" not in handlers(apache, item.url)[1:]
    for name in SAME_EVERYWHERE:
        assert from_disk.header(name) == on_disk.header(name), name
    os.unlink(item.local)  # local eviction: now only Blob has it
    assert item.sha256 is not None and str(item.size) in markers(fresh_library, item.sha256)
    from_blob = request(addr, item.url)
    assert from_blob.status == 200 and from_blob.body == item.data
    assert "proxy-server" in handlers(apache, item.url)
    # Answering from Blob, the server withdrew the gate: a file that comes back at this size is
    # the server's to judge first.
    assert str(item.size) not in markers(fresh_library, item.sha256)
    for name in SAME_EVERYWHERE:
        assert from_blob.header(name) == on_disk.header(name), name
    # A ranged request with a matching validator never gets a 200.
    assert set(seeks()) == {206}
    assert request(addr, item.url, {"If-None-Match": etag}).status == 304
    # The file comes back under the same name (a re-import): a new mtime, the same validators.
    item.local.write_bytes(item.data)
    again = request(addr, item.url)
    for name in SAME_EVERYWHERE:
        assert again.header(name) == on_disk.header(name), name
    assert set(seeks()) == {206}


# ---- big files and clients that leave ----------------------------------------------------------


@pytest.fixture
def huge(fresh_library: MediaLibrary) -> tuple[str, int, dict[int, bytes]]:
    """A sparse file over 4 GiB under a content-addressed name, with marks at deep offsets."""
    size = (5 << 30) + 12345
    name = "c" * 64 + ".mp4"
    path = fresh_library.roots["video"] / name
    marks = {
        0: b"\x00\x00\x00\x20ftypisom",
        (4 << 30) - 3: b"across-4GiB",
        (4 << 30) + 777: b"deep",
        size - 9: b"last-nine",
    }
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in marks.items():
            f.seek(offset)
            f.write(data)
    path.chmod(0o644)
    return f"/video/{name}", size, marks


def test_seeks_past_4_gib(front, huge) -> None:
    _srv, apache = front
    url, size, marks = huge
    addr = apache_address(apache)
    head = request(addr, url, method="HEAD")
    assert head.status == 200 and head.header("content-length") == str(size)
    for offset, data in marks.items():
        last = offset + len(data) - 1
        for extra in ({}, {"If-Range": head.header("etag") or ""}, {"If-None-Match": '"other"'}):
            # the last one goes through the stream server (a conditional request)
            r = request(addr, url, {"Range": f"bytes={offset}-{last}", **extra})
            assert r.status == 206, (offset, extra)
            assert r.body == data
            assert r.header("content-range") == f"bytes {offset}-{last}/{size}"
    r = request(anonymous(apache), url, {"Range": "bytes=0-1", "X-Gallery-Nonce": NONCE})
    assert r.status == 206 and r.header("content-range") == f"bytes 0-1/{size}"


def _read_some_and_leave(addr: Address, url: str, n: int = 1 << 20) -> None:
    with addr.connect() as s:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {basic_auth()}\r\n\r\n".encode())
        got = 0
        while got < n:
            chunk = s.recv(65536)
            assert chunk, "closed early"
            got += len(chunk)
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def test_a_client_that_closes_early(front, fresh_library: MediaLibrary, huge) -> None:
    srv, apache = front
    url, _size, marks = huge
    blob = fresh_library.add("blob", pseudo_random_bytes(24 << 20, seed=8), local=False, blob=True)
    addr = apache_address(apache)
    for target in (url, blob.url):
        for _ in range(3):
            _read_some_and_leave(addr, target)
    # The server noticed for the proxied Blob stream and stopped reading from Azure ...
    wait_for(lambda: "client went away" in srv.log_text(), what="the server to notice the client left")
    # ... and both Apache and the server go on serving.
    assert request(addr, url, {"Range": "bytes=0-11"}).body == marks[0][:12]
    assert request(addr, blob.url, {"Range": "bytes=-5"}).body == blob.data[-5:]


# ---- errors ------------------------------------------------------------------------------


def test_a_missing_file_is_404_no_store_and_not_cached(front) -> None:
    _srv, apache = front
    url = "/video/" + "d" * 64 + ".mp4"
    nonce = {"X-Gallery-Nonce": NONCE}
    for addr, headers in (
        (apache_address(apache), {}),
        (apache_address(apache), {"Range": "bytes=0-1"}),
        (anonymous(apache), nonce),
    ):
        r = request(addr, url, headers)
        assert r.status == 404
        assert r.header("cache-control") == "no-store"
        # Every copy: GigHive's own site-wide rule adds one to the server's for a 404.
        assert {v for k, v in r.header_list if k.lower() == "cache-control"} == {"no-store"}
        assert r.header("etag") is None
    assert_no_media_cached(apache)


def test_an_outage_is_502_or_503_with_retry_after_and_not_cached(
    start_server, fresh_library: MediaLibrary, tmp_path: Path
) -> None:
    # Azure unreachable: the server answers 502 with Retry-After, through Apache unchanged.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = dead.getsockname()[1]
    srv = start_server(
        fresh_library,
        AZURE_STORAGE_CONNECTION_STRING=(
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{port}/{ACCOUNT_NAME};"
        ),
        STREAM_UPSTREAM_RETRIES="0",
    )
    apache = apache_in_front(tmp_path / "apache", srv.unix, fresh_library.roots)
    # And a front whose stream server cannot be reached at all (Apache's own 503): a socket file
    # nobody listens on.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    apache_down = apache_in_front(
        tmp_path / "apache-down", Address("unix", path=str(tmp_path / "stale.sock")), fresh_library.roots
    )
    try:
        url = "/video/" + "b" * 64 + ".mp4"
        for front_, statuses in ((apache, (502, 504)), (apache_down, (502, 503))):
            for addr, headers in ((apache_address(front_), {}), (anonymous(front_), {"X-Gallery-Nonce": NONCE})):
                r = request(addr, url, headers)
                assert r.status in statuses, r.status
                assert r.header("retry-after") == "5"
                assert "no-store" in (r.header("cache-control") or "")
                assert [k.lower() for k, _ in r.header_list].count("retry-after") == 1, r.header_list
                assert [k.lower() for k, _ in r.header_list].count("cache-control") == 1, r.header_list
            assert_no_media_cached(front_)
    finally:
        apache.stop()
        apache_down.stop()
        dead.close()


# ---- Apache's disk cache -------------------------------------------------------------------


def assert_no_media_cached(apache: ApacheFront) -> None:
    for path in apache.cached_files():
        data = path.read_bytes()
        assert b"/video/" not in data and b"/audio/" not in data, f"{path} holds a media answer"


def test_nothing_media_related_lands_in_the_disk_cache(front, fresh_library: MediaLibrary) -> None:
    _srv, apache = front
    local = fresh_library.add("local", pseudo_random_bytes(100_000, seed=9), local=True, blob=False)
    blob = fresh_library.add("blob", pseudo_random_bytes(100_000, seed=10), local=False, blob=True)
    user, player = apache_address(apache), anonymous(apache)  # the player sends no Authorization: cacheable
    nonce = {"X-Gallery-Nonce": NONCE}
    for item in (local, blob):
        for addr, headers in (
            (user, {}),
            (user, {"Range": "bytes=0-1"}),
            (player, nonce),
            (player, {**nonce, "Range": "bytes=0-1"}),
        ):
            for _ in range(2):
                assert request(addr, item.url, headers).status in (200, 206)
    # The cache works (a control: a public page is stored) ...
    page = apache.docroot / "public" / "page.txt"
    page.parent.mkdir(exist_ok=True)
    page.write_text("hello\n")
    grant_read(page.parent)
    for _ in range(2):
        assert request(player, "/public/page.txt").status == 200
    wait_for(
        lambda: any(b"/public/page.txt" in p.read_bytes() for p in apache.cached_files()),
        what="the control to be cached",
    )
    # ... and holds nothing from /video or /audio.
    assert_no_media_cached(apache)


def test_a_symlink_on_disk_is_not_followed(front, fresh_library: MediaLibrary, tmp_path: Path) -> None:
    """The server never follows a symlink inside a media root; local first must not either."""
    _srv, apache = front
    secret = tmp_path / "outside.mp4"
    secret.write_bytes(b"not media, outside the roots")
    secret.chmod(0o644)
    link = fresh_library.roots["video"] / ("a" * 64 + ".mp4")
    link.symlink_to(secret)
    r = request(apache_address(apache), f"/video/{link.name}")
    assert r.status == 404 and b"not media" not in r.body
