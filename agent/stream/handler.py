"""One request: map the URL, pick the source, apply RFC 9110, send.

The same code path answers for local files and for blobs; only the body transport differs
(sendfile for a local file descriptor, a chunked read loop for a blob range).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import socket
import threading
import time
from collections.abc import Iterable
from http import HTTPStatus

from ..config import Config
from ..media import MediaFile
from ..media_urls import media_file_for_target
from ..storage import ObjectChanged, ObjectNotFound
from .http import (
    ALLOWED_METHODS,
    HttpError,
    Multipart,
    Request,
    Unsatisfiable,
    check_preconditions,
    content_range,
    format_status_line,
    http_date,
    if_range_allows,
    parse_range,
    utc_timestamp,
)
from .markers import apache_etag
from .settings import StreamSettings
from .sources import Opened, OpenObject, RangeReader, Sources, UpstreamError

log = logging.getLogger(__name__)

Headers = list[tuple[str, str]]

# Last-Modified of every verified content-addressed file, whichever side sends it (this server
# from disk or Blob, nginx from disk after a handover): the name is the sha256 of the bytes, so what a URL names
# never changes, and a fixed date is true for all of them. A file's own mtime (or a blob's
# upload time) would change when the file moves from disk to Blob or is imported again, and
# every If-Range carrying the old date would then get a 200 instead of a 206, which iOS players
# treat as fatal. nginx's internal locations (front/nginx-internal.conf) send the same date for
# the verified files handed to them; keep them in step. Only verified bytes get it (sources.py).
CONTENT_ADDRESSED_LAST_MODIFIED = 946684800  # Sat, 01 Jan 2000 00:00:00 GMT

# A content-addressed name whose bytes are not verified (sources.py: being written in place, cut,
# corrupt, or not yet hashed by the agent) is sent as what it is: revalidated on every use, under
# a validator of this very file that any write changes, never the name's sha256 or the fixed date.
UNVERIFIED_CACHE_CONTROL = "no-cache"


class ClientGone(Exception):
    """The client closed the connection or stopped reading; nothing more can be sent."""


class Stats:
    """Counters for STATUS= and the idle check, shared by all connection threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.connections = 0
        self.active_streams = 0
        self.bytes_sent = 0
        self.requests = 0
        self.upstream_errors = 0
        self.last_activity = time.monotonic()
        self.version = 0  # bumped on every change the STATUS line shows

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)
            self.last_activity = time.monotonic()
            self.version += 1

    def add_bytes(self, n: int) -> None:
        # Hot path: no lock. A lost update only makes the STATUS line a little low.
        self.bytes_sent += n


class BufferPool:
    """Reusable read buffers, one per running Blob stream.

    Memory for streaming is then exactly (streams at the busiest moment) x STREAM_CHUNK_SIZE and
    stays put, instead of a fresh allocation per chunk that the allocator may never give back.
    With a limit, at most that many buffers are out at once and get() returns None beyond it.
    """

    def __init__(self, size: int, keep: int, limit: int | None = None):
        self.size, self.keep, self.limit = size, keep, limit
        self._free: list[bytearray] = []
        self._out = 0
        self._lock = threading.Lock()

    def get(self) -> bytearray | None:
        with self._lock:
            if self.limit is not None and self._out >= self.limit:
                return None
            self._out += 1
            if self._free:
                return self._free.pop()
        return bytearray(self.size)

    def put(self, buf: bytearray) -> None:
        with self._lock:
            self._out -= 1
            if len(self._free) < self.keep:
                self._free.append(buf)


# A Blob stream reading faster than this gets the large buffer: no media plays at this rate, so
# it is a download or a player filling its buffer, where the cost per chunk is what limits it.
FAST_STREAM_BYTES_PER_SECOND = 16_000_000
# ... judged once it has sent this much, so that the first burst of a seek does not count.
FAST_STREAM_AFTER_BYTES = 1024 * 1024


class StreamBuffer:
    """The read buffer of one Blob stream: STREAM_CHUNK_SIZE, then STREAM_FAST_CHUNK_SIZE once the
    stream proves fast.

    Each chunk costs a read from Azure and a write to the client in Python; at 64 KiB that
    per-chunk cost is a third of the server's CPU on a long read, at 256 KiB it is small. But most
    streams are players reading at the media's bit rate, and a large buffer each would put
    hundreds of them over the memory budget. So every stream starts small, and only a fast one
    (FAST_STREAM_BYTES_PER_SECOND) moves to a large buffer, of which at most STREAM_FAST_STREAMS
    exist: memory stays (streams x STREAM_CHUNK_SIZE) + (STREAM_FAST_STREAMS x the large size).
    """

    def __init__(self, small: BufferPool, large: BufferPool | None):
        self._large = large
        self._pool = small
        self._buf = small.get() or bytearray(small.size)  # the small pool has no limit
        self.view = memoryview(self._buf)
        self._started = time.monotonic()
        self._sent = 0
        self._judge = large is not None

    def sent(self, n: int) -> bool:
        """Count n bytes written; may swap in the large buffer (self.view then changes). True
        when it just did: the stream is now a fast one."""
        self._sent += n
        if not self._judge or self._sent < FAST_STREAM_AFTER_BYTES:
            return False
        elapsed = time.monotonic() - self._started
        if self._sent < FAST_STREAM_BYTES_PER_SECOND * elapsed:
            if elapsed > 1.0:
                self._judge = False  # a stream at a player's pace: do not look again
            return False
        self._judge = False  # one try: when all large buffers are taken, stay small
        large = self._large.get() if self._large is not None else None
        if large is None:
            return False
        self._release()
        self._pool, self._buf = self._large, large  # type: ignore[assignment]
        self.view = memoryview(large)
        return True

    def _release(self) -> None:
        self.view.release()
        self._pool.put(self._buf)

    def close(self) -> None:
        self._release()


class Output:
    """The client side of one connection: bounded-time sends, sendfile, byte counting."""

    def __init__(self, conn: socket.socket, settings: StreamSettings, stats: Stats):
        self.conn = conn
        self.settings = settings
        self.stats = stats
        self.head_sent = False
        self.broken = False
        self.sent = 0  # bytes written to this connection
        self._sndbuf: int | None = None  # the socket's own send buffer while widened

    def widen(self, size: int) -> None:
        """A larger send buffer on the front's unix socket, for a fast stream only.

        Each hop of a download reads ahead only as far as its buffers reach: Azure's TCP window,
        this server's read, the unix socket to the front, the front's proxy buffers. The socket's
        default (net.core.wmem_default, 208 KiB) makes the server stop and wait for the front
        every few reads, and on a 2-core host every wait is a context switch the front and Azure
        pay for too; with more room both run longer bursts (docs/benchmarks.md, stop 23: a small
        gain, 2-8 % through nginx by the medians of before/after pairs). Kernel memory, used
        only while the front lags: Linux doubles the request and caps it at net.core.wmem_max
        (stock Ubuntu: 2 x 208 KiB), and at most STREAM_FAST_STREAMS streams are fast at once.
        A TCP connection keeps its default: setting SO_SNDBUF there turns off the kernel's
        autotuning, which already grows it to what the path needs."""
        if self.conn.family != socket.AF_UNIX or self._sndbuf is not None:
            return
        try:
            # getsockopt reports the doubled figure the kernel keeps; narrow() asks for half.
            default = self.conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 2
            if size <= default:
                return  # a small STREAM_FAST_CHUNK_SIZE: never less room than the default
            self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
            self._sndbuf = default
        except OSError:
            pass

    def narrow(self) -> None:
        """The socket's default again at the end of the answer: the connection stays open for the
        front's next request, likely a player's, whose backlog should not sit in the kernel."""
        if self._sndbuf is None:
            return
        with contextlib.suppress(OSError):
            self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self._sndbuf)
        self._sndbuf = None

    def send(self, data: bytes | memoryview) -> None:
        if not data:
            return
        try:
            # sendall's timeout bounds the whole call; a chunk is small, so this is the time a
            # client may go without reading before it is dropped.
            self.conn.settimeout(self.settings.send_timeout)
            self.conn.sendall(data)
        except OSError as e:  # BrokenPipe, ConnectionReset, TimeoutError
            self.broken = True
            raise ClientGone(str(e) or type(e).__name__) from e
        self.sent += len(data)
        self.stats.add_bytes(len(data))

    def sendfile(self, fd: int, offset: int, count: int) -> None:
        """Zero-copy from a file descriptor; the bytes never enter this process."""
        self.conn.settimeout(self.settings.send_timeout)  # makes the fd non-blocking
        sock_fd = self.conn.fileno()
        poller = select.poll()
        poller.register(sock_fd, select.POLLOUT)
        while count > 0:
            try:
                sent = os.sendfile(sock_fd, fd, offset, min(count, 1 << 30))
            except BlockingIOError:
                if not poller.poll(self.settings.send_timeout * 1000):
                    self.broken = True
                    raise ClientGone("client did not read within the send timeout") from None
                continue
            except OSError as e:
                self.broken = True
                raise ClientGone(str(e)) from e
            if sent == 0:
                raise UpstreamError("local file shrank while it was being sent")
            offset += sent
            count -= sent
            self.sent += sent
            self.stats.add_bytes(sent)

    def head(self, status: int, headers: Headers, first_body: bytes = b"") -> None:
        lines = [format_status_line(status), f"Date: {http_date(time.time())}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        lines.append("\r\n")
        self.head_sent = True
        # One write for the head and the first body bytes: one packet, not two.
        self.send("".join(lines).encode("latin-1") + first_body)


def error_response(
    out: Output, status: int, detail: str = "", head_only: bool = False, extra: Iterable[tuple[str, str]] = ()
) -> None:
    body = f"{status} {detail or HTTPStatus(status).phrase}\n".encode()
    extra = list(extra)
    headers: Headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("X-Content-Type-Options", "nosniff"),
    ]
    if not any(name == "Cache-Control" for name, _ in extra):
        headers.append(("Cache-Control", "no-store"))
    headers += extra
    out.head(status, headers, b"" if head_only else body)


class Handler:
    def __init__(self, config: Config, settings: StreamSettings, sources: Sources, stats: Stats):
        self.config = config
        self.settings = settings
        self.sources = sources
        self.stats = stats
        self.buffers = BufferPool(settings.chunk_size, keep=settings.max_connections)
        self.fast_buffers = (
            BufferPool(settings.fast_chunk_size, keep=settings.fast_streams, limit=settings.fast_streams)
            if settings.fast_streams and settings.fast_chunk_size > settings.chunk_size
            else None
        )

    # ---- entry -------------------------------------------------------------------------------
    def handle(self, req: Request, out: Output) -> bool:
        """Answer one request; True if the connection may serve another one."""
        self.stats.add(requests=1)
        keep_alive = req.keep_alive and not req.has_body
        head_only = req.method == "HEAD"
        if req.method not in ALLOWED_METHODS:
            self._log_refusal(req, 405)
            error_response(out, 405, extra=[("Allow", ", ".join(ALLOWED_METHODS)), *self._conn(req, keep_alive)])
            return keep_alive
        media = media_file_for_target(self.config, req.target)
        if media is None:
            self._log_refusal(req, 404)
            error_response(out, 404, head_only=head_only, extra=self._conn(req, keep_alive))
            return keep_alive
        try:
            return self._serve(req, out, media, keep_alive)
        except UpstreamError as e:
            self.stats.add(upstream_errors=1)
            status = 504 if e.timeout else 502
            cut = out.head_sent
            log.error(
                "reading %s failed%s: %s",
                media.blob_name,
                " mid-response, response cut" if cut else "",
                e,
                extra={
                    "fields": {"blob_name": media.blob_name, "http_status": "cut" if cut else status, "cause": str(e)}
                },
            )
            if cut:
                return False  # the client sees a body shorter than its Content-Length
            retry_after = [("Retry-After", str(self.settings.retry_after_seconds))]
            error_response(out, status, head_only=head_only, extra=[*retry_after, *self._conn(req, keep_alive)])
            return keep_alive

    @staticmethod
    def _conn(req: Request, keep_alive: bool) -> Headers:
        if not keep_alive:
            return [("Connection", "close")]
        # An HTTP/1.0 client keeps the connection only if the answer says so.
        return [("Connection", "keep-alive")] if req.minor_version == 0 else []

    def _log_refusal(self, req: Request, status: int) -> None:
        # Debug only: scanners produce these by the thousand and the front logs them anyway.
        log.debug("%s %r -> %d", req.method, req.target[:200], status)

    # ---- choosing the bytes ------------------------------------------------------------------
    def _open(self, media: MediaFile) -> Opened | None:
        return self.sources.open(media)

    def _serve(self, req: Request, out: Output, media: MediaFile, keep_alive: bool) -> bool:
        # A blob that changes between its properties and its read is read again, once; If-Match
        # on every read makes sure the response never mixes the two versions.
        for _attempt in range(2):
            opened = self._open(media)
            if opened is None:
                error_response(out, 404, head_only=req.method == "HEAD", extra=self._conn(req, keep_alive))
                return keep_alive
            obj = opened.obj
            try:
                return self._respond(req, out, media, opened, keep_alive)
            except ObjectChanged:
                fields = {"fields": {"blob_name": media.blob_name}}
                if out.head_sent:
                    log.warning("blob changed while streaming; response cut", extra=fields)
                    return False
                log.info("blob changed since its properties were read; reading again", extra=fields)
            except ObjectNotFound:
                if out.head_sent:
                    return False
                error_response(out, 404, head_only=req.method == "HEAD", extra=self._conn(req, keep_alive))
                return keep_alive
            finally:
                obj.close()
        raise UpstreamError(f"{media.blob_name} changed on every read")

    @staticmethod
    def promised(media: MediaFile, opened: Opened) -> bool:
        """Whether this answer carries the name's promise: the sha256 ETag, the fixed date, immutable."""
        return media.expected_sha256 is not None and opened.verified

    def representation_etag(self, media: MediaFile, opened: Opened) -> str:
        if self.promised(media, opened):
            # The sha256 in a content-addressed name identifies the bytes wherever they are
            # stored, so a client's cached copy stays valid when the file moves from disk to Blob.
            return f'"{media.expected_sha256}"'
        st = opened.st
        if media.expected_sha256 is not None and st is not None:
            # Unverified local file: strong, but only for this inode at this size and mtime, so a
            # write in place (or a new file under the name) changes it and If-Range then gets
            # the whole current file instead of a splice. It can never equal the sha256 ETag, and
            # it is the ETag Apache computes for the same file when it sends it from disk
            # (markers.py), so both sides agree.
            return apache_etag(st)
        return opened.obj.info.etag

    def _hand_over(self, req: Request, obj: OpenObject, may: bool) -> bool:
        """Whether nginx sends this local file (X-Accel-Redirect) instead of this server."""
        return bool(
            self.settings.x_accel_prefix
            and obj.local_path
            and req.method != "HEAD"
            # nginx's content-addressed internal locations put the name's promise (sha256 ETag,
            # fixed date) on what they send: only a verified file may be handed over.
            and may
            # nginx judges If-Match and If-Unmodified-Since again after the handover, by its own
            # (absent) ETag and the file's mtime, and would answer 412 where this server did not.
            and req.header("if-match") is None
            and req.header("if-unmodified-since") is None
        )

    # ---- the response ------------------------------------------------------------------------
    def _respond(self, req: Request, out: Output, media: MediaFile, opened: Opened, keep_alive: bool) -> bool:
        obj = opened.obj
        info = obj.info
        head_only = req.method == "HEAD"
        expected = media.expected_sha256
        if expected and info.sha256 and info.sha256.lower() != expected:
            # The uploader records the sha256 it verified; bytes under another hash are not this name.
            raise UpstreamError(f"stored object's sha256 {info.sha256} does not match its name")
        promised = self.promised(media, opened)
        etag = self.representation_etag(media, opened)
        last_modified = CONTENT_ADDRESSED_LAST_MODIFIED if promised else utc_timestamp(info.last_modified)
        size = info.size
        validators: Headers = [("ETag", etag)]
        if last_modified is not None:
            validators.append(("Last-Modified", http_date(last_modified)))
        if promised:
            cache = self.settings.immutable_cache_control
        else:
            cache = UNVERIFIED_CACHE_CONTROL if expected else self.settings.mutable_cache_control
        common: Headers = [*validators, ("Cache-Control", cache), *self._conn(req, keep_alive)]

        precondition = check_preconditions(req, etag, last_modified)
        if precondition == 304:
            out.head(304, common)
            self._log_done(req, media, obj, 304, 0)
            return keep_alive
        if precondition == 412:
            error_response(out, 412, head_only=head_only, extra=[*validators, *self._conn(req, keep_alive)])
            return keep_alive

        ranges = None
        if req.header("range") is not None and if_range_allows(req, etag, last_modified):
            try:
                ranges = parse_range(req.header("range"), size, self.settings.max_ranges)
            except Unsatisfiable:
                unsatisfied = [("Content-Range", f"bytes */{size}"), *validators, *self._conn(req, keep_alive)]
                error_response(out, 416, head_only=head_only, extra=unsatisfied)
                self._log_done(req, media, obj, 416, 0)
                return keep_alive

        content_type = media.content_type
        typed: Headers = [
            ("Content-Type", content_type),
            ("Accept-Ranges", "bytes"),
            ("X-Content-Type-Options", "nosniff"),
            *common,
        ]
        if self._hand_over(req, obj, promised or not expected):
            # nginx sends the file (and applies the Range) from its internal location.
            target = f"{self.settings.x_accel_prefix}/{media.blob_name}"
            out.head(200, [("X-Accel-Redirect", target), ("Content-Length", "0"), *typed])
            self._log_done(req, media, obj, 200, 0, via="x-accel")
            return keep_alive

        if ranges is None:
            status, parts, multipart = 200, [(0, size - 1)] if size else [], None
            headers = [("Content-Length", str(size)), *typed]
        elif len(ranges) == 1:
            (first, last), status, parts, multipart = ranges[0], 206, ranges, None
            headers = [
                ("Content-Range", content_range(first, last, size)),
                ("Content-Length", str(last - first + 1)),
                *typed,
            ]
        else:
            status, parts = 206, ranges
            multipart = Multipart(secrets.token_hex(12), content_type, size, tuple(ranges))
            headers = [("Content-Type", multipart.media_type), ("Content-Length", str(multipart.length))]
            headers += [h for h in typed if h[0] != "Content-Type"]

        if head_only or not parts:
            out.head(status, headers)
            self._log_done(req, media, obj, status, 0)
            return keep_alive

        self.stats.add(active_streams=1)
        sent_before = out.sent
        try:
            self._send_body(out, obj, status, headers, parts, multipart)
        except ClientGone as e:
            log.info(
                "client went away after %s: %s",
                "the head" if out.head_sent else "nothing",
                e,
                extra={"fields": {"blob_name": media.blob_name, "source": obj.origin}},
            )
            return False
        finally:
            self.stats.add(active_streams=-1)
        self._log_done(req, media, obj, status, out.sent - sent_before)
        return keep_alive

    def _send_body(
        self,
        out: Output,
        obj: OpenObject,
        status: int,
        headers: Headers,
        parts: list[tuple[int, int]],
        multipart: Multipart | None,
    ) -> None:
        fd = obj.sendfile_fd
        if fd is not None:
            prefix = multipart.part_header(0) if multipart else b""
            out.head(status, headers, prefix)
            for index, (first, last) in enumerate(parts):
                if index and multipart:
                    out.send(multipart.part_header(index))
                out.sendfile(fd, first, last - first + 1)
            if multipart:
                out.send(multipart.trailer)
            return
        buf = StreamBuffer(self.buffers, self.fast_buffers)
        reader: RangeReader | None = None
        try:
            # The first read happens before the head goes out, so a missing or failing blob
            # still gets a clean 404/502 instead of a truncated 200. It is small, so that the
            # client (a player seeking) gets its first bytes as soon as Azure sends them.
            first, last = parts[0]
            reader = obj.reader(first, last - first + 1)
            n = reader.readinto(buf.view[: self.settings.first_chunk_size])
            prefix = multipart.part_header(0) if multipart else b""
            out.head(status, headers, prefix + bytes(buf.view[:n]))
            for index, (first, last) in enumerate(parts):
                if index:
                    if multipart:
                        out.send(multipart.part_header(index))
                    reader = obj.reader(first, last - first + 1)
                while n := reader.readinto(buf.view):
                    out.send(buf.view[:n])
                    if buf.sent(n):
                        out.widen(self.settings.fast_chunk_size)
                reader.close()
                reader = None
            if multipart:
                out.send(multipart.trailer)
        finally:
            if reader is not None:
                # Closing the reader closes its Azure connection: the download stops now.
                reader.close()
            buf.close()
            out.narrow()

    def _log_done(self, req: Request, media: MediaFile, obj: OpenObject, status: int, sent: int, via: str = "") -> None:
        log.debug(
            "%s %s -> %d (%s%s, %d bytes)",
            req.method,
            media.blob_name,
            status,
            obj.origin,
            f" via {via}" if via else "",
            sent,
            extra={
                "fields": {"blob_name": media.blob_name, "http_status": status, "source": obj.origin, "bytes": sent}
            },
        )


def reject(out: Output, error: HttpError) -> None:
    """Answer a request that could not be parsed; the connection is closed afterwards."""
    extra: Headers = [("Connection", "close")]
    error_response(out, error.status, error.detail, extra=extra)
