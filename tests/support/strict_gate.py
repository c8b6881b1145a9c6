"""A strict-Azure gate: a loopback HTTP(S) proxy in front of Azurite that refuses what real Azure
refuses and Azurite lets through.

Azurite shows what a request does; this gate shows whether real Azure would accept it. It parses
each request's head, checks the documented service rules Azurite does not check (RULES below;
each one's source is in docs/azure-conformance.md), and either streams the request on to Azurite
unchanged or answers it itself the way Azure would: the status, an x-ms-error-code header, and
the XML error body with the real error code.

Otherwise it is a strict pass-through: bodies are streamed in pieces of up to 256 KiB in both
directions (only a Put Block List body, a few KiB of XML, is read whole), Range and keep-alive
work as upstream answers them, and a connection to a stopped Azurite is reset, as the service being
down would look. Every refusal is recorded; the suite fails a test that caused one it did not
expect (tests/conftest.py), so a non-conforming request cannot hide behind the agent's retries.

Stdlib only: threads, one per client connection.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import select
import socket
import ssl
import struct
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, parsedate_to_datetime
from urllib.parse import parse_qs, unquote, urlsplit

# Every published Azure Storage service version (the Versioning page and "Previous Azure Storage
# service versions"); a request naming another one is refused with 400 InvalidHeaderValue.
KNOWN_VERSIONS = frozenset(
    [
        "2009-09-19",
        "2011-08-18",
        "2012-02-12",
        "2013-08-15",
        "2014-02-14",
        "2015-02-21",
        "2015-04-05",
        "2015-07-08",
        "2015-12-11",
        "2016-05-31",
        "2017-04-17",
        "2017-07-29",
        "2017-11-09",
        "2018-03-28",
        "2018-11-09",
        "2019-02-02",
        "2019-07-07",
        "2019-10-10",
        "2019-12-12",
        "2020-02-10",
        "2020-04-08",
        "2020-06-12",
        "2020-08-04",
        "2020-10-02",
        "2020-12-06",
        "2021-02-12",
        "2021-04-10",
        "2021-06-08",
        "2021-08-06",
        "2021-10-04",
        "2021-12-02",
        "2022-11-02",
        "2023-01-03",
        "2023-05-03",
        "2023-08-03",
        "2023-11-03",
        "2024-02-04",
        "2024-05-04",
        "2024-08-04",
        "2024-11-04",
        "2025-01-05",
        "2025-05-05",
        "2025-07-05",
        "2025-11-05",
        "2026-02-06",
        "2026-04-06",
        "2026-06-06",
        "2026-10-06",
    ]
)
MIN_BEARER_VERSION = "2017-11-09"
MAX_BLOCK_IDS_BYTES = 64
MAX_COMMITTED_BLOCKS = 50_000
MAX_UNCOMMITTED_BLOCKS = 100_000
MAX_METADATA_BYTES = 8 * 1024
MAX_CLIENT_REQUEST_ID = 1024
CLOCK_SKEW = 15 * 60
_MIB = 1024 * 1024
# An ASCII C# identifier (letters, digits, underscore; not starting with a digit). C# allows
# other Unicode letters too, but an HTTP header name is ASCII.
_CS_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Where the head parser notes a metadata name given twice (headers are kept in a dict).
_DUPLICATE = "x-strict-gate-duplicate-metadata"
_LIST_INCLUDES = frozenset(
    [
        "snapshots",
        "metadata",
        "uncommittedblobs",
        "copy",
        "deleted",
        "tags",
        "versions",
        "deletedwithversions",
        "immutabilitypolicy",
        "legalhold",
        "permissions",
    ]
)

# rule id -> one line; docs/azure-conformance.md has the source of each.
RULES = {
    "version-required": "x-ms-version is required on every authorized request",
    "version-known": "x-ms-version must be a published service version",
    "bearer-version": "a bearer-token request needs x-ms-version 2017-11-09 or later",
    "bearer-https": "a bearer token is only accepted over HTTPS",
    "date-required": "Date or x-ms-date is required on every authorized request",
    "date-format": "x-ms-date/Date is an RFC 1123 date",
    "date-skew": "a Shared Key request's date is at most 15 minutes old",
    "client-request-id": "x-ms-client-request-id is at most 1 KiB of visible ASCII",
    "content-length": "Put Blob, Put Block and Put Block List need Content-Length",
    "content-md5-format": "Content-MD5 and x-ms-blob-content-md5 are base64 of 16 bytes",
    "metadata-name": "metadata names are C# identifiers, each given once",
    "metadata-size": "all metadata together is at most 8 KiB",
    "block-id": "a block id is base64 of at most 64 bytes",
    "block-id-length": "all block ids of one blob have the same length",
    "block-size": "a block is at most 4000 MiB (100 MiB before 2019-12-12, 4 MiB before 2016-05-31)",
    "put-blob-size": "a Put Blob body is at most 5000 MiB (256 MiB before 2019-12-12, 64 MiB before 2016-05-31)",
    "uncommitted-blocks": "a blob has at most 100,000 uncommitted blocks",
    "block-list-length": "a block list names at most 50,000 blocks",
    "block-list-ids": "a block list's ids are valid block ids of one length",
    "list-maxresults": "List Blobs maxresults is a positive integer",
    "list-include": "List Blobs include names known data sets",
    "agent-block-md5": "(agent rule) every Put Block carries the transactional Content-MD5",
}


@dataclass(frozen=True)
class Refusal:
    rule: str
    status: int
    code: str
    method: str
    target: str
    detail: str

    def __str__(self) -> str:
        return f"{self.method} {self.target}: {self.status} {self.code} [{self.rule}] {self.detail}"


@dataclass
class Seen:
    """A request as the gate saw it (headers lower-cased) and what it did."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    refused: Refusal | None = None

    @property
    def comp(self) -> str | None:
        return self.query.get("comp")


class _Refuse(Exception):
    def __init__(self, rule: str, status: int, code: str, detail: str, extra: dict[str, str] | None = None):
        super().__init__(detail)
        self.rule, self.status, self.code, self.detail, self.extra = rule, status, code, detail, extra or {}


@dataclass
class _BlobBlocks:
    id_length: int | None = None
    uncommitted: set[str] = field(default_factory=set)


def _rst(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _b64_bytes(value: str) -> bytes | None:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None


class StrictGate:
    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        certfile: str | None = None,
        keyfile: str | None = None,
        require_block_md5: bool = True,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.https = certfile is not None
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None
        if self.https:
            self._server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._server_ctx.load_cert_chain(certfile, keyfile)
            # The upstream is our own Azurite on loopback; its certificate is the one we serve.
            self._client_ctx = ssl.create_default_context()
            self._client_ctx.check_hostname = False
            self._client_ctx.verify_mode = ssl.CERT_NONE
        self.require_block_md5 = require_block_md5
        self._lock = threading.Lock()
        self._blocks: dict[str, _BlobBlocks] = {}
        self._expected: list[str] = []
        self._listener: socket.socket | None = None
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self.port = 0
        self.seen: list[Seen] = []
        self.refusals: list[Refusal] = []
        self.unexpected: list[Refusal] = []

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> StrictGate:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(128)
        s.settimeout(0.2)
        self.port = s.getsockname()[1]
        self._listener = s
        threading.Thread(target=self._accept_loop, name="strict-gate-accept", daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            _rst(c)

    def __enter__(self) -> StrictGate:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what tests use -------------------------------------------------------------------

    @contextlib.contextmanager
    def expecting(self, *codes: str) -> Iterator[None]:
        """Refusals with these error codes are what the test wants to see, not a failure."""
        with self._lock:
            self._expected.extend(codes)
        try:
            yield
        finally:
            with self._lock:
                for c in codes:
                    self._expected.remove(c)

    def requests(self, method: str | None = None, comp: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if method in (None, s.method) and comp in (None, s.comp)]

    def take_unexpected(self) -> list[Refusal]:
        """The refusals no test expected since the last call; and forget what was seen."""
        with self._lock:
            out, self.unexpected = self.unexpected, []
            self.seen = []
            self.refusals = []
            return out

    # ---- relaying -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(client,), name="strict-gate-conn", daemon=True).start()

    def _connect_upstream(self) -> socket.socket:
        up = socket.create_connection(self.upstream, timeout=10)
        up.settimeout(None)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._client_ctx is not None:
            up = self._client_ctx.wrap_socket(up, server_hostname=self.upstream[0])
        with self._lock:
            self._conns.add(up)
        return up

    @staticmethod
    def _alive(sock: socket.socket) -> bool:
        """False when the upstream closed an idle keep-alive connection (Azurite restarted)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
            if not readable:
                return True
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return True
            return bool(sock.recv(1, socket.MSG_PEEK))
        except (OSError, ValueError):
            return False

    def _serve(self, raw: socket.socket) -> None:
        client: socket.socket = raw
        upstream: socket.socket | None = None
        with self._lock:
            self._conns.add(raw)
        try:
            if self._server_ctx is not None:
                client = self._server_ctx.wrap_socket(raw, server_side=True)
            crf = client.makefile("rb", buffering=262144)
            urf = None
            while not self._closed.is_set():
                head = self._read_head(crf)
                if head is None:
                    return
                request_line, headers, raw_head = head
                method, target = request_line.split(" ")[:2]
                url = urlsplit(target)
                query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
                length = int(headers.get("content-length", "0") or 0)
                seen = Seen(method, unquote(url.path), query, dict(headers))
                with self._lock:
                    self.seen.append(seen)
                body: bytes | None = None
                try:
                    if "chunked" in headers.get("transfer-encoding", "").lower():
                        raise _Refuse("content-length", 411, "MissingContentLengthHeader", "chunked request bodies")
                    self._check(method, url.path, query, headers, length)
                    if method == "PUT" and query.get("comp") == "blocklist":
                        body = crf.read(length)
                        self._check_block_list(url.path, body)
                except _Refuse as r:
                    if body is None:
                        self._drain(crf, length)
                    self._refuse(client, seen, method, target, headers, r)
                    continue
                if upstream is None or not self._alive(upstream):
                    _rst(upstream)
                    try:
                        upstream = self._connect_upstream()
                    except OSError:
                        # Azurite is down: the client sees the connection go, as with the service.
                        return
                    urf = upstream.makefile("rb", buffering=262144)
                assert urf is not None
                upstream.sendall(raw_head)
                if body is not None:
                    upstream.sendall(body)
                else:
                    self._copy(crf, upstream, length)
                status, keep = self._relay_response(urf, client, method)
                self._after(method, url.path, query, status)
                if not keep or headers.get("connection", "").lower() == "close":
                    return
        except (OSError, ValueError, ssl.SSLError):
            return
        finally:
            for s in (client, upstream, raw):
                if s is not None:
                    with self._lock:
                        self._conns.discard(s)
                    with contextlib.suppress(OSError):
                        s.close()

    @staticmethod
    def _read_head(f) -> tuple[str, dict[str, str], bytes] | None:
        lines = []
        while True:
            line = f.readline(65537)
            if not line:
                return None
            if line in (b"\r\n", b"\n"):
                if not lines:
                    continue
                break
            lines.append(line)
        raw = b"".join(lines) + b"\r\n"
        text = [ln.decode("latin-1").rstrip("\r\n") for ln in lines]
        headers: dict[str, str] = {}
        for ln in text[1:]:
            k, _, v = ln.partition(":")
            key = k.strip().lower()
            if key in headers and key.startswith("x-ms-meta-"):
                headers[_DUPLICATE] = key[len("x-ms-meta-") :]
            headers[key] = f"{headers[key]}, {v.strip()}" if key in headers else v.strip()
        return text[0], headers, raw

    @staticmethod
    def _drain(f, length: int) -> None:
        while length > 0:
            got = f.read(min(65536, length))
            if not got:
                raise OSError("client closed mid-body")
            length -= len(got)

    @staticmethod
    def _copy(src, dst: socket.socket, length: int) -> None:
        while length > 0:
            got = src.read1(min(262144, length))
            if not got:
                raise OSError("closed mid-body")
            dst.sendall(got)
            length -= len(got)

    def _relay_response(self, urf, client: socket.socket, method: str) -> tuple[int, bool]:
        while True:
            head = self._read_head(urf)
            if head is None:
                raise OSError("upstream closed before answering")
            status_line, headers, raw = head
            status = int(status_line.split(" ")[1])
            client.sendall(raw)
            if status >= 200 or status == 101:
                break  # 1xx interim answers are relayed and followed by the real one
        keep = headers.get("connection", "").lower() != "close"
        if method == "HEAD" or status in (204, 304):
            return status, keep
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = urf.readline(65537)
                if not size_line:
                    raise OSError("upstream closed mid-chunk")
                client.sendall(size_line)
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, then the blank line
                        trailer = urf.readline(65537)
                        client.sendall(trailer)
                        if trailer in (b"\r\n", b"\n", b""):
                            return status, keep
                self._copy(urf, client, size + 2)
        if "content-length" in headers:
            self._copy(urf, client, int(headers["content-length"]))
            return status, keep
        while chunk := urf.read1(65536):  # no framing: the body ends with the connection
            client.sendall(chunk)
        return status, False

    # ---- the rules ------------------------------------------------------------------------

    def _check(self, method: str, path: str, query: dict[str, str], h: dict[str, str], length: int) -> None:
        auth = h.get("authorization", "")
        scheme = auth.split(" ", 1)[0].lower() if auth else ""
        authorized = bool(scheme)  # a SAS (sig= in the query) carries its version as sv=
        version = h.get("x-ms-version")
        if scheme == "bearer":
            if not self.https:
                raise _Refuse(
                    "bearer-https",
                    403,
                    "AuthenticationFailed",
                    "Server failed to authenticate the request. Make sure the value of Authorization "
                    "header is formed correctly including the signature.",
                    {"AuthenticationErrorDetail": "Bearer token authentication is not permitted over HTTP."},
                )
            if not version or version < MIN_BEARER_VERSION:
                raise _Refuse(
                    "bearer-version",
                    403,
                    "AuthenticationFailed",
                    "Server failed to authenticate the request. Make sure the value of Authorization "
                    "header is formed correctly including the signature.",
                    {"AuthenticationErrorDetail": "Authentication scheme Bearer is not supported in this version."},
                )
        if authorized and not version:
            raise _Refuse(
                "version-required",
                400,
                "MissingRequiredHeader",
                "An HTTP header that's mandatory for this request is not specified.",
                {"HeaderName": "x-ms-version"},
            )
        if version and version not in KNOWN_VERSIONS:
            raise _Refuse(
                "version-known",
                400,
                "InvalidHeaderValue",
                "The value for one of the HTTP headers is not in the correct format.",
                {"HeaderName": "x-ms-version", "HeaderValue": version},
            )
        if authorized:
            self._check_date(scheme, h)
        rid = h.get("x-ms-client-request-id")
        if rid is not None and (len(rid) > MAX_CLIENT_REQUEST_ID or not all(33 <= ord(c) < 127 for c in rid)):
            raise _Refuse(
                "client-request-id",
                400,
                "InvalidHeaderValue",
                "The value for one of the HTTP headers is not in the correct format.",
                {"HeaderName": "x-ms-client-request-id", "HeaderValue": rid[:64]},
            )
        for name in ("content-md5", "x-ms-blob-content-md5"):
            if name in h and (d := _b64_bytes(h[name])) is not None and len(d) == 16:
                continue
            if name in h:
                raise _Refuse(
                    "content-md5-format",
                    400,
                    "InvalidMd5",
                    "The MD5 value specified in the request is invalid. The MD5 value must be 128 bits "
                    "and Base64-encoded.",
                    {"HeaderName": name, "HeaderValue": h[name]},
                )
        self._check_metadata(h)
        comp = query.get("comp")
        writes_blob = method == "PUT" and (
            comp in ("block", "blocklist") or (comp is None and "x-ms-blob-type" in h and "restype" not in query)
        )
        if writes_blob and "content-length" not in h:
            raise _Refuse("content-length", 411, "MissingContentLengthHeader", "The Content-Length header is required.")
        v = version or "2009-09-19"
        if method == "PUT" and comp == "block":
            self._check_put_block(path, query, h, length, v)
        elif writes_blob and comp is None:
            limit = 5000 * _MIB if v >= "2019-12-12" else 256 * _MIB if v >= "2016-05-31" else 64 * _MIB
            if length > limit:
                raise _Refuse("put-blob-size", 413, "RequestBodyTooLarge", "The request body is too large.")
        if method == "GET" and comp == "list" and query.get("restype") == "container":
            mr = query.get("maxresults")
            if mr is not None and (not mr.isdigit() or int(mr) <= 0):
                raise _Refuse(
                    "list-maxresults",
                    400,
                    "OutOfRangeQueryParameterValue",
                    "One of the query parameters specified in the request URI is outside the permissible range.",
                    {"QueryParameterName": "maxresults", "QueryParameterValue": mr},
                )
            for inc in filter(None, query.get("include", "").split(",")):
                if inc.lower() not in _LIST_INCLUDES:
                    raise _Refuse(
                        "list-include",
                        400,
                        "InvalidQueryParameterValue",
                        "Value for one of the query parameters specified in the request URI is invalid.",
                        {"QueryParameterName": "include", "QueryParameterValue": inc},
                    )

    @staticmethod
    def _check_date(scheme: str, h: dict[str, str]) -> None:
        raw = h.get("x-ms-date") or h.get("date")
        shared_key = scheme in ("sharedkey", "sharedkeylite")
        if not raw:
            if shared_key:
                raise _Refuse(
                    "date-required",
                    403,
                    "AuthenticationFailed",
                    "Server failed to authenticate the request.",
                    {"AuthenticationErrorDetail": "The Date header in the request is missing."},
                )
            raise _Refuse(
                "date-required",
                400,
                "MissingRequiredHeader",
                "An HTTP header that's mandatory for this request is not specified.",
                {"HeaderName": "x-ms-date"},
            )
        try:
            when = parsedate_to_datetime(raw)
            if not raw.rstrip().endswith("GMT") or when.tzinfo is None:
                raise ValueError(raw)
        except (TypeError, ValueError):
            raise _Refuse(
                "date-format",
                400,
                "InvalidHeaderValue",
                "The value for one of the HTTP headers is not in the correct format.",
                {"HeaderName": "x-ms-date" if "x-ms-date" in h else "Date", "HeaderValue": raw},
            ) from None
        if shared_key and abs((datetime.now(UTC) - when).total_seconds()) > CLOCK_SKEW:
            raise _Refuse(
                "date-skew",
                403,
                "AuthenticationFailed",
                "Server failed to authenticate the request.",
                {"AuthenticationErrorDetail": f"Request date header too old: '{raw}'"},
            )

    @staticmethod
    def _check_metadata(h: dict[str, str]) -> None:
        names = [k[len("x-ms-meta-") :] for k in h if k.startswith("x-ms-meta-")]
        if _DUPLICATE in h:
            raise _Refuse(
                "metadata-name",
                400,
                "InvalidMetadata",
                "The metadata specified is invalid. A metadata name is given more than once.",
                {"MetadataName": h[_DUPLICATE]},
            )
        total = 0
        for name in names:
            if not name:
                raise _Refuse(
                    "metadata-name",
                    400,
                    "EmptyMetadataKey",
                    "The key for one of the metadata key-value pairs is empty.",
                )
            if not _CS_IDENTIFIER.match(name):
                raise _Refuse(
                    "metadata-name",
                    400,
                    "InvalidMetadata",
                    "The metadata specified is invalid. It has characters that are not permitted.",
                    {"MetadataName": name},
                )
            total += len(name) + len(h[f"x-ms-meta-{name}"].encode())
        if total > MAX_METADATA_BYTES:
            raise _Refuse(
                "metadata-size",
                400,
                "MetadataTooLarge",
                "The size of the specified metadata exceeds the maximum size permitted.",
            )

    def _check_put_block(self, path: str, query: dict[str, str], h: dict[str, str], length: int, v: str) -> None:
        bid = query.get("blockid")
        raw = _b64_bytes(bid) if bid else None
        if not bid or raw is None or len(raw) > MAX_BLOCK_IDS_BYTES:
            raise _Refuse(
                "block-id",
                400,
                "InvalidQueryParameterValue",
                "Value for one of the query parameters specified in the request URI is invalid.",
                {"QueryParameterName": "blockid", "QueryParameterValue": bid or "", "Reason": "Not a valid block id"},
            )
        limit = 4000 * _MIB if v >= "2019-12-12" else 100 * _MIB if v >= "2016-05-31" else 4 * _MIB
        if length > limit:
            raise _Refuse(
                "block-size",
                413,
                "RequestBodyTooLarge",
                "The request body is too large and exceeds the maximum permissible limit.",
            )
        with self._lock:
            state = self._blocks.get(path)
            if state is not None and state.uncommitted and state.id_length not in (None, len(raw)):
                raise _Refuse(
                    "block-id-length", 400, "InvalidBlobOrBlock", "The specified blob or block content is invalid."
                )
            if state is not None and bid not in state.uncommitted and len(state.uncommitted) >= MAX_UNCOMMITTED_BLOCKS:
                raise _Refuse(
                    "uncommitted-blocks",
                    409,
                    "BlockCountExceedsLimit",
                    "The uncommitted block count cannot exceed the maximum limit of 100,000 blocks.",
                )
        if self.require_block_md5 and "content-md5" not in h:
            raise _Refuse(
                "agent-block-md5",
                400,
                "GateMissingTransactionalMd5",
                "The strict gate requires every Put Block to carry Content-MD5 (an agent integrity rule).",
            )

    def _check_block_list(self, path: str, body: bytes) -> None:
        try:
            root = ET.fromstring(body)  # noqa: S314 - test traffic from our own client
        except ET.ParseError:
            raise _Refuse(
                "block-list-ids", 400, "InvalidXmlDocument", "XML specified is not syntactically valid."
            ) from None
        ids = [(e.text or "") for e in root]
        if len(ids) > MAX_COMMITTED_BLOCKS:
            raise _Refuse(
                "block-list-length", 400, "BlockListTooLong", "The block list may not contain more than 50,000 blocks."
            )
        lengths = set()
        for bid in ids:
            raw = _b64_bytes(bid)
            if raw is None or len(raw) > MAX_BLOCK_IDS_BYTES:
                raise _Refuse("block-list-ids", 400, "InvalidBlockList", "The specified block list is invalid.")
            lengths.add(len(raw))
        if len(lengths) > 1:
            raise _Refuse("block-list-ids", 400, "InvalidBlockList", "The specified block list is invalid.")

    def _after(self, method: str, path: str, query: dict[str, str], status: int) -> None:
        """Track each blob's uncommitted block ids, as the service does, from what it accepted."""
        if status >= 300:
            return
        comp = query.get("comp")
        with self._lock:
            if method == "PUT" and comp == "block":
                raw = _b64_bytes(query.get("blockid", "")) or b""
                state = self._blocks.setdefault(path, _BlobBlocks())
                state.id_length = len(raw)
                state.uncommitted.add(query.get("blockid", ""))
            elif (method == "PUT" and comp in (None, "blocklist")) or (method == "DELETE" and comp is None):
                # A commit or a Put Blob discards the blob's uncommitted blocks; so does a delete.
                self._blocks.pop(path, None)

    def _refuse(
        self, client: socket.socket, seen: Seen, method: str, target: str, h: dict[str, str], r: _Refuse
    ) -> None:
        refusal = Refusal(r.rule, r.status, r.code, method, target[:200], r.detail)
        with self._lock:
            seen.refused = refusal
            self.refusals.append(refusal)
            if r.code not in self._expected:
                self.unexpected.append(refusal)
        request_id = str(uuid.uuid4())
        now = datetime.now(UTC)
        message = f"{r.detail}\nRequestId:{request_id}\nTime:{now.strftime('%Y-%m-%dT%H:%M:%S.%f0Z')}"
        extra = "".join(f"<{k}>{_xml(v)}</{k}>" for k, v in r.extra.items())
        body = (
            f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{r.code}</Code>'
            f"<Message>{_xml(message)}</Message>{extra}</Error>"
        ).encode()
        reason = {
            400: "Bad Request",
            403: "Forbidden",
            409: "Conflict",
            411: "Length Required",
            413: "Request Entity Too Large",
        }
        head = (
            f"HTTP/1.1 {r.status} {reason.get(r.status, 'Error')}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Content-Type: application/xml\r\n"
            "Server: Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0\r\n"
            f"x-ms-request-id: {request_id}\r\n"
            f"x-ms-client-request-id: {h.get('x-ms-client-request-id', '')}\r\n"
            f"x-ms-version: {h.get('x-ms-version') if h.get('x-ms-version') in KNOWN_VERSIONS else '2009-09-19'}\r\n"
            f"x-ms-error-code: {r.code}\r\n"
            f"Date: {format_datetime(now, usegmt=True)}\r\n\r\n"
        ).encode()
        client.sendall(head if method == "HEAD" else head + body)


def _xml(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
