"""The Range / conditional matrix, end to end: local only, Blob only and both, each reached
over loopback TCP, over the unix socket, and through Debian's nginx with the shipped snippet.
Every body must be byte-identical to the file."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from agent.stream.http import http_date, parse_http_date

from .conftest import MediaLibrary, apache_address
from .support import Address, ServerProcess, parse_multipart, request

SOURCES = ["local", "blob", "both"]
TRANSPORTS = ["tcp", "unix", "nginx", "apache"]


@pytest.fixture(params=TRANSPORTS)
def addr(request: pytest.FixtureRequest, server: ServerProcess) -> Address:
    if request.param == "nginx":
        return dataclasses.replace(request.getfixturevalue("nginx").addr, local_first="nginx")
    if request.param == "apache":
        return apache_address(request.getfixturevalue("apache"))
    return server.tcp if request.param == "tcp" else server.unix


def served_by_the_front(addr: Address, item) -> str:
    """Which front sends this content-addressed file on disk itself (local first), or ""."""
    return addr.local_first if item.local is not None else ""


@pytest.fixture(params=SOURCES)
def item(request: pytest.FixtureRequest, library: MediaLibrary):
    return library.items[request.param]


def test_full_get_sends_the_file_with_validators_and_cache_headers(addr: Address, item) -> None:
    r = request(addr, item.url)
    assert r.status == 200
    assert r.body == item.data
    assert r.header("content-length") == str(item.size)
    assert r.header("content-type") == "video/mp4"
    assert r.header("accept-ranges") == "bytes"
    assert r.header("etag") == f'"{item.sha256}"'
    assert parse_http_date(r.header("last-modified")) is not None
    assert r.header("cache-control") == addr.media_cache_control
    assert r.header("content-range") is None


def test_head_sends_the_same_headers_as_get_and_no_body(addr: Address, item) -> None:
    get = request(addr, item.url)
    head = request(addr, item.url, method="HEAD")
    assert head.status == 200 and head.body == b""
    for name in ("content-length", "content-type", "etag", "last-modified", "cache-control", "accept-ranges"):
        assert head.header(name) == get.header(name), name


def test_head_with_a_range_describes_the_partial_answer(addr: Address, item) -> None:
    head = request(addr, item.url, {"Range": "bytes=10-19"}, method="HEAD")
    assert head.status == 206
    assert head.header("content-range") == f"bytes 10-19/{item.size}"
    assert head.header("content-length") == "10"
    assert head.body == b""


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [
        ("bytes=0-1", 0, 1),  # Safari's probe must get a real 206
        ("bytes=0-0", 0, 0),
        ("bytes=1000-", 1000, None),
        ("bytes=-500", -500, None),
        ("bytes=-1", -1, None),
        ("bytes=65535-65537", 65535, 65537),  # across the server's read size
        ("bytes=131071-131073", 131071, 131073),
        ("bytes=16383-16385", 16383, 16385),  # across the small first read
        ("bytes=SIZE1-", "SIZE1", None),
        ("bytes=0-SIZE10", 0, None),
        ("bytes=1048576-2097151", 1048576, 2097151),
    ],
)
def test_single_ranges_get_206_with_content_range(addr: Address, item, spec: str, first, last) -> None:
    size = item.size
    spec = spec.replace("SIZE10", str(size + 10)).replace("SIZE1", str(size - 1))
    if first == "SIZE1":
        first = size - 1
    if isinstance(first, int) and first < 0:
        first = size + first
    last = size - 1 if last is None else last
    r = request(addr, item.url, {"Range": spec})
    assert r.status == 206, r.body[:200]
    assert r.header("content-range") == f"bytes {first}-{last}/{size}"
    assert r.header("content-length") == str(last - first + 1)
    assert r.body == item.data[first : last + 1]
    assert r.header("etag") == f'"{item.sha256}"'


@pytest.mark.parametrize("spec", ["bytes=SIZE-", "bytes=SIZE-SIZE9", "bytes=-0", "bytes=SIZE-,-0"])
def test_unsatisfiable_ranges_get_416_with_the_size(addr: Address, item, spec: str) -> None:
    size = item.size
    r = request(addr, item.url, {"Range": spec.replace("SIZE9", str(size + 9)).replace("SIZE", str(size))})
    if served_by_the_front(addr, item) == "apache":
        # Apache's own answer for a file it sends from disk: 416 without Content-Range, and a
        # zero-length suffix ("-0") ignored. Never a 206 with wrong bytes.
        assert r.status in (416, 200) if "-0" in spec else r.status == 416
        assert r.status == 416 or r.body == item.data
        return
    assert r.status == 416
    assert r.header("content-range") == f"bytes */{size}"


@pytest.mark.parametrize("spec", ["bytes=5-3", "bytes=abc", "items=0-1", "bytes=0-1;x", "bytes 0-1", "bytes=--1"])
def test_bad_range_syntax_is_ignored_with_a_full_200(addr: Address, item, spec: str) -> None:
    r = request(addr, item.url, {"Range": spec})
    if served_by_the_front(addr, item) == "nginx" and r.status == 416:
        return  # nginx's own answer for a file it sends from disk; never a 206
    assert r.status == 200
    assert r.body == item.data


def test_multiple_ranges_get_multipart_byteranges(addr: Address, item) -> None:
    size = item.size
    r = request(addr, item.url, {"Range": f"bytes=0-1,200000-200099,-3,{size + 5}-"})
    assert r.status == 206
    content_type = r.header("content-type") or ""
    assert content_type.startswith("multipart/byteranges; boundary=")
    assert r.header("content-length") == str(len(r.body))
    parts = parse_multipart(r.body, content_type)
    assert parts == [
        (f"bytes 0-1/{size}", item.data[0:2]),
        (f"bytes 200000-200099/{size}", item.data[200000:200100]),
        (f"bytes {size - 3}-{size - 1}/{size}", item.data[size - 3 :]),
    ]


def test_overlapping_ranges_are_coalesced_into_one(addr: Address, item) -> None:
    r = request(addr, item.url, {"Range": "bytes=0-100,50-300,301-400"})
    assert r.status == 206
    if served_by_the_front(addr, item) == "nginx":
        # nginx sends overlapping ranges as they were asked (multipart), with the right bytes.
        parts = parse_multipart(r.body, r.header("content-type") or "")
        assert [p[1] for p in parts] == [item.data[0:101], item.data[50:301], item.data[301:401]]
        return
    assert r.header("content-range") == f"bytes 0-400/{item.size}"
    assert r.body == item.data[:401]


def test_too_many_ranges_get_the_whole_body(addr: Address, item) -> None:
    spec = "bytes=" + ",".join(f"{i * 1000}-{i * 1000 + 1}" for i in range(40))
    r = request(addr, item.url, {"Range": spec})
    assert r.status == 200
    assert r.body == item.data


def test_if_none_match_with_the_etag_gets_304(addr: Address, item) -> None:
    etag = f'"{item.sha256}"'
    for value in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
        r = request(addr, item.url, {"If-None-Match": value})
        assert r.status == 304, value
        assert r.body == b""
        assert r.header("etag") == etag
        assert r.header("cache-control") == addr.media_cache_control
    assert request(addr, item.url, {"If-None-Match": '"nope"'}).status == 200


def test_if_modified_since_gets_304_until_the_file_is_newer(addr: Address, item) -> None:
    last_modified = request(addr, item.url, method="HEAD").header("last-modified")
    assert request(addr, item.url, {"If-Modified-Since": last_modified}).status == 304
    earlier = http_date(parse_http_date(last_modified) - 10)  # type: ignore[operator]
    r = request(addr, item.url, {"If-Modified-Since": earlier})
    assert r.status == 200 and r.body == item.data
    assert request(addr, item.url, {"If-Modified-Since": "not a date"}).status == 200


def test_if_range_with_the_etag_keeps_the_range(addr: Address, item) -> None:
    etag = f'"{item.sha256}"'
    r = request(addr, item.url, {"Range": "bytes=10-19", "If-Range": etag})
    assert r.status == 206 and r.body == item.data[10:20]


@pytest.mark.parametrize("if_range", ['"something-else"', "W/ETAG", "Mon, 01 Jan 1990 00:00:00 GMT"])
def test_if_range_that_does_not_match_gets_the_whole_body(addr: Address, item, if_range: str) -> None:
    if_range = if_range.replace("ETAG", f'"{item.sha256}"')
    r = request(addr, item.url, {"Range": "bytes=10-19", "If-Range": if_range})
    assert r.status == 200 and r.body == item.data


def test_if_range_with_the_last_modified_date_keeps_the_range(addr: Address, item) -> None:
    last_modified = request(addr, item.url, method="HEAD").header("last-modified")
    # A date is a strong validator only once the file is a second old (RFC 9110 13.1.5).
    while time.time() < parse_http_date(last_modified) + 1.5:  # type: ignore[operator]
        time.sleep(0.1)
    r = request(addr, item.url, {"Range": "bytes=10-19", "If-Range": last_modified})
    assert r.status == 206 and r.body == item.data[10:20]


def test_if_match_mismatch_gets_412(addr: Address, item) -> None:
    assert request(addr, item.url, {"If-Match": '"other"'}).status == 412
    r = request(addr, item.url, {"If-Match": f'"{item.sha256}"', "Range": "bytes=0-1"})
    assert r.status == 206 and r.body == item.data[:2]


def test_random_ranges_are_byte_identical(addr: Address, item) -> None:
    rng = random.Random(f"{item.url}-{addr}")
    size = item.size
    for _ in range(25):
        first = rng.randrange(size)
        last = min(size - 1, first + rng.choice([0, 1, 255, 4096, 65535, 262144, 1 << 20]))
        r = request(addr, item.url, {"Range": f"bytes={first}-{last}"})
        assert r.status == 206
        assert r.body == item.data[first : last + 1]


# ---- things that differ by file, not by source ---------------------------------------------


def test_the_etag_of_a_content_addressed_file_is_the_same_from_disk_and_blob(
    server: ServerProcess, library: MediaLibrary, tmp_path
) -> None:
    item = library.items["both"]
    from_disk = request(server.tcp, item.url)
    # Move the local copy away (as local eviction after upload does): now Blob answers.
    moved = tmp_path / "moved"
    item.local.rename(moved)
    try:
        from_blob = request(server.tcp, item.url)
    finally:
        moved.rename(item.local)
    assert from_disk.body == from_blob.body == item.data
    assert from_disk.header("etag") == from_blob.header("etag") == f'"{item.sha256}"'
    # A client holding the disk copy's ETag revalidates cheaply against the blob.
    item.local.rename(moved)
    try:
        r = request(server.tcp, item.url, {"If-None-Match": from_disk.header("etag"), "Range": "bytes=0-1"})
    finally:
        moved.rename(item.local)
    assert r.status == 304


@pytest.mark.parametrize("key", ["thumb_local", "thumb_blob"])
def test_thumbnails_get_png_and_a_short_cache_with_a_size_or_blob_etag(
    server: ServerProcess, library: MediaLibrary, key: str
) -> None:
    item = library.items[key]
    r = request(server.tcp, item.url)
    assert r.status == 200 and r.body == item.data
    assert r.header("content-type") == "image/png"
    assert r.header("cache-control") == "private, max-age=300"
    etag = r.header("etag") or ""
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith("W/")
    assert item.url.rsplit("/", 1)[1].split(".")[0] not in etag  # not the video's sha
    assert request(server.tcp, item.url, {"If-None-Match": etag}).status == 304
    r = request(server.tcp, item.url, {"Range": "bytes=1-3", "If-Range": etag})
    assert r.status == 206 and r.body == item.data[1:4]


def test_audio_gets_its_content_type(server: ServerProcess, library: MediaLibrary) -> None:
    item = library.items["audio"]
    r = request(server.tcp, item.url, {"Range": "bytes=-10"})
    assert r.status == 206 and r.body == item.data[-10:]
    assert r.header("content-type") == "audio/mpeg"


def test_a_one_byte_file_answers_every_range_form(server: ServerProcess, library: MediaLibrary) -> None:
    item = library.items["tiny"]
    assert request(server.tcp, item.url, {"Range": "bytes=0-1"}).body == b"x"
    assert request(server.tcp, item.url, {"Range": "bytes=-5"}).body == b"x"
    assert request(server.tcp, item.url, {"Range": "bytes=1-"}).status == 416


def test_an_empty_file_gets_an_empty_200_even_with_a_range(server: ServerProcess, library: MediaLibrary) -> None:
    item = library.items["empty"]
    for headers in ({}, {"Range": "bytes=0-1"}, {"Range": "bytes=-5"}):
        r = request(server.tcp, item.url, headers)
        assert r.status == 200 and r.body == b"" and r.header("content-length") == "0"


def test_missing_files_are_404_from_every_transport(server: ServerProcess, nginx, library: MediaLibrary) -> None:
    url = "/video/" + "e" * 64 + ".mp4"
    for addr in (server.tcp, server.unix, nginx.addr):
        r = request(addr, url)
        assert r.status == 404
        assert b"Traceback" not in r.body
