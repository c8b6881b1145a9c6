"""HTTP/1.1 rules the stream server applies, without any I/O: parsing a request head, and the
Range and conditional-request logic of RFC 9110 (sections 13 and 14).

Kept free of sockets so every rule is tested directly, and so local and blob responses cannot
drift apart: both go through exactly these functions.
"""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http import HTTPStatus

ALLOWED_METHODS = ("GET", "HEAD")
MAX_HEADER_LINES = 100
# Digits beyond this are a position no file reaches; parsing them would only cost CPU.
_MAX_POS_DIGITS = 19
_POS_INFINITY = 10**19

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # noqa: S105 - RFC 9110 token characters
_REQUEST_LINE_RE = re.compile(rf"^({_TOKEN}) (\S+) HTTP/(\d)\.(\d)$")
_FIELD_NAME_RE = re.compile(rf"^{_TOKEN}$")
_FIELD_VALUE_BAD_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_INT_RANGE_RE = re.compile(r"^(\d+)-(\d*)$")
_SUFFIX_RANGE_RE = re.compile(r"^-(\d+)$")
_ETAG_RE = re.compile(r'\s*(W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


class HttpError(Exception):
    """A request the server answers with an error status (and, for most, then closes)."""

    def __init__(self, status: int, detail: str = "", close: bool = True):
        self.status = status
        self.detail = detail or HTTPStatus(status).phrase
        self.close = close
        super().__init__(f"{status} {self.detail}")


@dataclass
class Request:
    method: str
    target: str
    minor_version: int
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if "close" in tokens:
            return False
        if self.minor_version == 0:
            return "keep-alive" in tokens
        return True

    @property
    def has_body(self) -> bool:
        # GET and HEAD carry no meaningful body; one that is announced is not read, so the
        # connection is closed after the answer instead of parsing the body as a next request.
        length = self.header("content-length")
        return self.header("transfer-encoding") is not None or (length is not None and length != "0")


def parse_head(head: bytes) -> Request:
    """Parse a request head (request line + header fields, without the final empty line).

    Strict where leniency would let a request mean two things to two parsers (the front and
    this server): obs-fold, whitespace before the colon, duplicate Host or Content-Length.
    """
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    # RFC 9112 2.2: ignore empty lines received before the request line.
    while lines and lines[0] == "":
        lines.pop(0)
    if not lines:
        raise HttpError(400, "empty request")
    m = _REQUEST_LINE_RE.match(lines[0])
    if not m:
        raise HttpError(400, "malformed request line")
    method, target, major, minor = m.group(1), m.group(2), int(m.group(3)), int(m.group(4))
    if major != 1:
        raise HttpError(505)
    if len(lines) - 1 > MAX_HEADER_LINES:
        raise HttpError(431, "too many header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            raise HttpError(400, "empty line inside the header section")
        if line[0] in " \t":
            raise HttpError(400, "obsolete line folding")
        name, sep, value = line.partition(":")
        if not sep or not _FIELD_NAME_RE.match(name):
            raise HttpError(400, "malformed header field")
        value = value.strip(" \t")
        if _FIELD_VALUE_BAD_RE.search(value):
            raise HttpError(400, "control character in a header field")
        key = name.lower()
        if key in headers:
            if key == "host":
                raise HttpError(400, "more than one Host")
            if key == "content-length" and headers[key] != value:
                raise HttpError(400, "conflicting Content-Length")
            if key != "content-length":
                headers[key] = f"{headers[key]}, {value}"
        else:
            headers[key] = value
    if minor >= 1 and "host" not in headers:
        raise HttpError(400, "HTTP/1.1 request without Host")
    length = headers.get("content-length")
    if length is not None and not length.isdigit():
        raise HttpError(400, "invalid Content-Length")
    return Request(method=method, target=target, minor_version=min(minor, 1), headers=headers)


# ---- dates ---------------------------------------------------------------------------------


def http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def parse_http_date(value: str | None) -> int | None:
    """Seconds since the epoch for IMF-fixdate, RFC 850 and asctime forms; None if invalid."""
    if not value or "," in value.split(" ", 1)[-1]:
        # More than one member (a list) makes the field invalid (RFC 9110 13.1.3).
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return int(parsed.timestamp())


# ---- validators ----------------------------------------------------------------------------


def parse_etags(value: str) -> list[tuple[bool, str]] | None:
    """An If-Match / If-None-Match value as [(weak, opaque-tag)], or None for '*'.

    Malformed members are skipped: they can never match, which is the safe reading.
    """
    if value.strip() == "*":
        return None
    tags: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(value):
        m = _ETAG_RE.match(value, pos)
        if not m:
            comma = value.find(",", pos)
            if comma < 0:
                break
            pos = comma + 1
            continue
        tags.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
    return tags


def _strong_match(tags: list[tuple[bool, str]], etag: str) -> bool:
    return any(not weak and tag == etag for weak, tag in tags)


def _weak_match(tags: list[tuple[bool, str]], etag: str) -> bool:
    return any(tag == etag for _weak, tag in tags)


def check_preconditions(req: Request, etag: str, last_modified: int | None) -> int | None:
    """The status the preconditions demand (412 or 304), or None to go on (RFC 9110 13.2.2)."""
    if_match = req.header("if-match")
    if if_match is not None:
        tags = parse_etags(if_match)
        if tags is not None and not _strong_match(tags, etag):
            return 412
    else:
        since = parse_http_date(req.header("if-unmodified-since"))
        if since is not None and last_modified is not None and last_modified > since:
            return 412
    if_none_match = req.header("if-none-match")
    if if_none_match is not None:
        tags = parse_etags(if_none_match)
        if tags is None or _weak_match(tags, etag):
            return 304
    elif last_modified is not None:
        since = parse_http_date(req.header("if-modified-since"))
        # A date in the future is invalid (RFC 9110 13.1.3) and must not make anything fresh.
        if since is not None and since <= time.time() and last_modified <= since:
            return 304
    return None


def if_range_allows(req: Request, etag: str, last_modified: int | None) -> bool:
    """Whether a Range may be honoured given If-Range (True when there is no If-Range)."""
    value = req.header("if-range")
    if value is None:
        return True
    value = value.strip()
    if value.startswith(('"', "W/")):
        tags = parse_etags(value)
        return bool(tags) and len(tags) == 1 and _strong_match(tags, etag)  # type: ignore[arg-type]
    date = parse_http_date(value)
    # A date is only a strong validator if the file was last modified at least a second ago.
    return date is not None and last_modified is not None and date == last_modified < time.time() - 1


# ---- ranges --------------------------------------------------------------------------------


class Unsatisfiable(Exception):
    """No range in the Range header overlaps the representation (416)."""


def _position(digits: str) -> int:
    return _POS_INFINITY if len(digits) > _MAX_POS_DIGITS else int(digits)


def parse_range(value: str | None, size: int, max_ranges: int) -> list[tuple[int, int]] | None:
    """Byte ranges (first, last inclusive) to send, sorted and coalesced; None = send it all.

    Raises Unsatisfiable when the header is valid but no range overlaps (RFC 9110 14.1.1).
    Headers in another unit, with bad syntax, or with more than max_ranges ranges are
    ignored, as RFC 9110 14.2 allows: a 200 with the whole body is always a correct answer.
    """
    if value is None or size <= 0:
        return None
    unit, sep, spec_text = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip(" \t") for s in spec_text.split(",")]
    specs = [s for s in specs if s]  # list syntax tolerates empty members
    if not specs or len(specs) > max_ranges:
        return None
    ranges: list[tuple[int, int]] = []
    for spec in specs:
        m = _INT_RANGE_RE.match(spec)
        if m:
            first = _position(m.group(1))
            last = _position(m.group(2)) if m.group(2) else None
            if last is not None and last < first:
                return None
            if first < size:
                ranges.append((first, size - 1 if last is None else min(last, size - 1)))
            continue
        m = _SUFFIX_RANGE_RE.match(spec)
        if not m:
            return None
        suffix = _position(m.group(1))
        if suffix > 0:
            ranges.append((max(0, size - suffix), size - 1))
    if not ranges:
        raise Unsatisfiable()
    ranges.sort()
    merged = [ranges[0]]
    for first, last in ranges[1:]:
        prev_first, prev_last = merged[-1]
        if first <= prev_last + 1:
            merged[-1] = (prev_first, max(prev_last, last))
        else:
            merged.append((first, last))
    return merged


def content_range(first: int, last: int, size: int) -> str:
    return f"bytes {first}-{last}/{size}"


@dataclass(frozen=True)
class Multipart:
    """The framing of a multipart/byteranges body, so its length is known before sending."""

    boundary: str
    content_type: str
    size: int
    ranges: tuple[tuple[int, int], ...]

    def part_header(self, index: int) -> bytes:
        first, last = self.ranges[index]
        return (
            f"\r\n--{self.boundary}\r\nContent-Type: {self.content_type}\r\n"
            f"Content-Range: {content_range(first, last, self.size)}\r\n\r\n"
        ).encode("latin-1")

    @property
    def trailer(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode("latin-1")

    @property
    def media_type(self) -> str:
        return f"multipart/byteranges; boundary={self.boundary}"

    @property
    def length(self) -> int:
        body = sum(last - first + 1 for first, last in self.ranges)
        return body + sum(len(self.part_header(i)) for i in range(len(self.ranges))) + len(self.trailer)


def format_status_line(status: int) -> str:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {status} {phrase}\r\n"


def utc_timestamp(dt: datetime | None) -> int | None:
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())
