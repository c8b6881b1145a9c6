"""RFC 9110 rules of the stream server, checked directly (no sockets): Range, validators,
request-head parsing. The live-server tests check the same rules end to end."""

from __future__ import annotations

import time

import pytest

from agent.stream.http import (
    HttpError,
    Multipart,
    Request,
    Unsatisfiable,
    check_preconditions,
    http_date,
    if_range_allows,
    parse_etags,
    parse_head,
    parse_http_date,
    parse_range,
)

SIZE = 10_000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-1", [(0, 1)]),  # Safari's probe
        ("bytes=0-0", [(0, 0)]),
        ("bytes=0-", [(0, SIZE - 1)]),
        ("bytes=100-", [(100, SIZE - 1)]),
        ("bytes=-500", [(SIZE - 500, SIZE - 1)]),
        ("bytes=-20000", [(0, SIZE - 1)]),
        (f"bytes={SIZE - 1}-", [(SIZE - 1, SIZE - 1)]),
        ("bytes=0-99999", [(0, SIZE - 1)]),
        ("bytes=0-99999999999999999999999999999", [(0, SIZE - 1)]),
        ("BYTES=0-1", [(0, 1)]),
        ("bytes= 0-1 ,  5-6", [(0, 1), (5, 6)]),
        ("bytes=5-6,0-1", [(0, 1), (5, 6)]),
        ("bytes=0-5,3-10", [(0, 10)]),
        ("bytes=0-1,2-3", [(0, 3)]),
        ("bytes=0-1,,4-5", [(0, 1), (4, 5)]),
        ("bytes=-1,0-0", [(0, 0), (SIZE - 1, SIZE - 1)]),
        (f"bytes=0-1,{SIZE}-", [(0, 1)]),  # the unsatisfiable member is dropped
    ],
)
def test_satisfiable_ranges_are_sorted_and_coalesced(header: str, expected: list[tuple[int, int]]) -> None:
    assert parse_range(header, SIZE, max_ranges=16) == expected


@pytest.mark.parametrize(
    "header",
    [
        f"bytes={SIZE}-",
        f"bytes={SIZE}-{SIZE + 10}",
        "bytes=-0",
        "bytes=99999999999999999999999-",
        f"bytes={SIZE}-,-0",
    ],
)
def test_unsatisfiable_ranges_raise(header: str) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(header, SIZE, max_ranges=16)


@pytest.mark.parametrize(
    "header",
    [
        "bytes=5-4",  # last before first: invalid, the whole header is ignored
        "bytes=abc",
        "bytes=",
        "bytes=,",
        "bytes=1-2-3",
        "bytes=--1",
        "bytes=+1-2",
        "bytes=0x10-20",
        "bytes=1 -2",
        "bytes 0-1",
        "items=0-1",
        "=0-1",
        "bytes=0-1;x",
        "bytes=0-1, 5-4",
    ],
)
def test_invalid_or_foreign_range_headers_are_ignored(header: str) -> None:
    assert parse_range(header, SIZE, max_ranges=16) is None


def test_more_ranges_than_allowed_are_answered_whole() -> None:
    header = "bytes=" + ",".join(f"{i * 10}-{i * 10 + 1}" for i in range(17))
    assert parse_range(header, SIZE, max_ranges=16) is None
    assert parse_range(header, SIZE, max_ranges=17) is not None


def test_empty_representation_ignores_range() -> None:
    assert parse_range("bytes=0-1", 0, max_ranges=16) is None
    assert parse_range("bytes=-5", 0, max_ranges=16) is None


def test_multipart_length_matches_the_bytes_sent() -> None:
    ranges = ((0, 1), (100, 199), (9000, 9999))
    mp = Multipart("b0undary", "video/mp4", SIZE, ranges)
    body = b"".join(mp.part_header(i) + b"x" * (last - first + 1) for i, (first, last) in enumerate(ranges))
    body += mp.trailer
    assert mp.length == len(body)
    assert mp.media_type == "multipart/byteranges; boundary=b0undary"
    assert b"Content-Range: bytes 100-199/10000\r\n" in body


# ---- validators ----------------------------------------------------------------------------

ETAG = '"' + "a" * 64 + '"'
LM = 1_700_000_000


def req(**headers: str) -> Request:
    return Request("GET", "/", 1, {k.replace("_", "-"): v for k, v in headers.items()})


def test_etag_lists_parse_strong_weak_and_star() -> None:
    assert parse_etags("*") is None
    assert parse_etags('"a", W/"b" ,"c"') == [(False, '"a"'), (True, '"b"'), (False, '"c"')]
    assert parse_etags('bogus, "a"') == [(False, '"a"')]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"if_none_match": ETAG}, 304),
        ({"if_none_match": f"W/{ETAG}"}, 304),  # weak comparison for If-None-Match
        ({"if_none_match": f'"other", {ETAG}'}, 304),
        ({"if_none_match": "*"}, 304),
        ({"if_none_match": '"other"'}, None),
        ({"if_modified_since": http_date(LM)}, 304),
        ({"if_modified_since": http_date(LM + 3600)}, 304),
        ({"if_modified_since": http_date(LM - 1)}, None),
        ({"if_modified_since": "yesterday"}, None),
        ({"if_modified_since": http_date(time.time() + 86400 * 365)}, None),  # future: invalid
        # If-None-Match present: If-Modified-Since is not evaluated.
        ({"if_none_match": '"other"', "if_modified_since": http_date(LM)}, None),
        ({"if_match": ETAG}, None),
        ({"if_match": "*"}, None),
        ({"if_match": '"other"'}, 412),
        ({"if_match": f"W/{ETAG}"}, 412),  # strong comparison for If-Match
        ({"if_unmodified_since": http_date(LM - 1)}, 412),
        ({"if_unmodified_since": http_date(LM)}, None),
        ({"if_match": ETAG, "if_unmodified_since": http_date(LM - 1)}, None),  # If-Match wins
        ({"if_match": '"other"', "if_none_match": ETAG}, 412),
    ],
)
def test_preconditions_follow_rfc9110_order(headers: dict[str, str], expected: int | None) -> None:
    assert check_preconditions(req(**headers), ETAG, LM) == expected


@pytest.mark.parametrize(
    ("value", "allowed"),
    [
        (ETAG, True),
        (f"W/{ETAG}", False),
        ('"other"', False),
        (http_date(LM), True),
        (http_date(LM + 1), False),
        ("not a date", False),
    ],
)
def test_if_range_needs_a_strong_match(value: str, allowed: bool) -> None:
    assert if_range_allows(req(if_range=value), ETAG, LM) is allowed


def test_if_range_date_is_not_strong_for_a_file_changed_just_now() -> None:
    now = int(time.time())
    assert if_range_allows(req(if_range=http_date(now)), ETAG, now) is False


@pytest.mark.parametrize(
    "value", ["Sun, 06 Nov 1994 08:49:37 GMT", "Sunday, 06-Nov-94 08:49:37 GMT", "Sun Nov  6 08:49:37 1994"]
)
def test_all_three_http_date_forms_are_accepted(value: str) -> None:
    assert parse_http_date(value) == 784111777


# ---- request heads -------------------------------------------------------------------------


def test_a_plain_request_parses() -> None:
    r = parse_head(b"GET /video/x.mp4 HTTP/1.1\r\nHost: a\r\nRange: bytes=0-1\r\nX-Dup: 1\r\nx-dup: 2")
    assert (r.method, r.target, r.minor_version) == ("GET", "/video/x.mp4", 1)
    assert r.header("range") == "bytes=0-1"
    assert r.header("x-dup") == "1, 2"
    assert r.keep_alive and not r.has_body


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close", False),
        (b"GET / HTTP/1.0", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Keep-Alive, TE", True),
    ],
)
def test_persistence_follows_version_and_connection(head: bytes, keep_alive: bool) -> None:
    assert parse_head(head).keep_alive is keep_alive


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET / HTTP/1.1", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n folded", 400),
        (b"GET / HTTP/1.1\r\nHost : a", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1", 400),
        (b"GET  / HTTP/1.1\r\nHost: a", 400),
        (b"GET / HTTP/1.1 extra\r\nHost: a", 400),
        (b"GET /", 400),
        (b"G(T / HTTP/1.1\r\nHost: a", 400),
        (b"GET / HTTP/2.0\r\nHost: a", 505),
        (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X: y\r\n" * 101, 431),
    ],
)
def test_malformed_heads_are_rejected(head: bytes, status: int) -> None:
    with pytest.raises(HttpError) as e:
        parse_head(head)
    assert e.value.status == status


def test_an_announced_body_marks_the_request() -> None:
    assert parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 3").has_body
    assert parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked").has_body
    assert not parse_head(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0").has_body
