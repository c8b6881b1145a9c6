"""A loopback TCP proxy that breaks the network between the agent and Azurite on command.

The agent's BlobEndpoint points at the proxy; the test switches the mode while uploads run:

    passthrough()                 forward everything
    reset_mid_body(after, times)  the next `times` requests whose body exceeds `after` bytes get
                                  `after` body bytes forwarded, then a TCP RST (SO_LINGER 0)
    stall()                       accept and read nothing, forward nothing: a black hole
    trickle(bytes_per_second)     forward at this rate (both directions, all connections)
    refuse()                      close the listener (connection refused) and reset open connections
    lose_responses(n, comp, method)  forward the next n requests (matching comp= and method, if given) whole, then
                                  reset the connection instead of relaying the answer: the service
                                  applied the request but the client never hears so
    http_errors(n, statuses)      answer the next n requests itself with these statuses in turn and
                                  an Azure-style XML error body, then pass through again
    hold(comp, method)            hold the next matching request (before its first byte goes on)
                                  until release(); `held` is set once it is held: a state a test
                                  can wait for, whatever the machine's speed

In HTTP mode (the default) the proxy parses request framing (headers + Content-Length body) so it
can count requests, cut a body at a chosen offset and answer a request itself. With http=False
(TLS) it relays bytes and counts connections only. Stdlib only: threads, two per connection.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import struct
import threading
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

# 400 Md5Mismatch is what Azure answers when a body does not match its Content-MD5: a failure of
# that one request's content, not of the service.
_ERROR_CODES = {400: "Md5Mismatch", 500: "InternalError", 503: "ServerBusy"}


@dataclass(frozen=True)
class Seen:
    """One request as the proxy saw it, and what it did with it."""

    method: str
    path: str
    comp: str | None
    outcome: str  # forwarded | reset | http_<status>


def _rst(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN: the peer sees ECONNRESET, as on a dropped link."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    # Wake the other thread of this connection if it sits in recv() on this socket: on Linux a
    # close() alone does not, and the socket (so the RST) then lives on until that recv returns.
    # A lost response on a kept-alive connection then reached the agent as a silent hang until
    # its network timeout instead of a reset. SHUT_RD sends nothing to the peer.
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RD)
    with contextlib.suppress(OSError):
        sock.close()


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, *, http: bool = True) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.http = http
        self._lock = threading.Lock()
        self._mode = "pass"
        self._reset_after = 0
        self._resets_left = 0
        self._errors: list[int] = []
        self._lose_left = 0
        self._lose_comp: str | None = None
        self._lose_method: str | None = None
        self._hold_left = 0
        self._hold_comp: str | None = None
        self._hold_method: str | None = None
        self.held = threading.Event()
        self._released = threading.Event()
        self._rate = 0.0
        self._next_send = 0.0  # trickle: monotonic time the link is free again
        self._conns: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._port = 0
        self._closed = threading.Event()
        self.connections = 0
        self.seen: list[Seen] = []

    # ---- lifecycle ------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._listen()
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()
        return self

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            listener, self._listener = self._listener, None
            conns = list(self._conns)
        if listener is not None:
            listener.close()
        for c in conns:
            _rst(c)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._port

    def _listen(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", self._port))
        s.listen(64)
        s.settimeout(0.1)
        self._port = s.getsockname()[1]
        with self._lock:
            self._listener = s

    # ---- modes ----------------------------------------------------------------------------

    def passthrough(self) -> None:
        with self._lock:
            was_refusing = self._mode == "refuse"
            self._mode, self._resets_left, self._errors, self._rate = "pass", 0, [], 0.0
            self._lose_left = 0
        if was_refusing:
            self._listen()

    def reset_mid_body(self, after: int, times: int) -> None:
        with self._lock:
            self._mode, self._reset_after, self._resets_left = "pass", after, times

    def stall(self) -> None:
        with self._lock:
            self._mode = "stall"

    def trickle(self, bytes_per_second: float) -> None:
        with self._lock:
            self._mode, self._rate = "pass", float(bytes_per_second)

    def refuse(self) -> None:
        with self._lock:
            self._mode = "refuse"
            listener, self._listener = self._listener, None
            conns = list(self._conns)
        if listener is not None:
            listener.close()
        for c in conns:
            _rst(c)

    def lose_responses(self, n: int, comp: str | None = None, method: str | None = None) -> None:
        with self._lock:
            self._lose_left, self._lose_comp, self._lose_method = n, comp, method

    def hold(self, comp: str | None = None, method: str | None = None) -> None:
        with self._lock:
            self._hold_left, self._hold_comp, self._hold_method = 1, comp, method
            self.held.clear()
            self._released.clear()

    def release(self) -> None:
        self._released.set()

    def http_errors(self, n: int, statuses: tuple[int, ...] = (500, 503)) -> None:
        with self._lock:
            self._errors = [s for s, _ in zip(itertools.cycle(statuses), range(n), strict=False)]

    # ---- observation ----------------------------------------------------------------------

    def requests(self, outcome: str | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if outcome is None or s.outcome == outcome]

    @property
    def injected(self) -> int:
        """Requests the proxy broke (reset or answered with an error) instead of forwarding."""
        return sum(1 for s in self.requests() if s.outcome != "forwarded")

    @property
    def errors_left(self) -> int:
        with self._lock:
            return len(self._errors)

    @property
    def resets_left(self) -> int:
        with self._lock:
            return self._resets_left

    # ---- relaying -------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                listener = self._listener
            if listener is None:
                time.sleep(0.05)
                continue
            try:
                client, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            client.settimeout(None)
            with self._lock:
                self.connections += 1
                self._conns.add(client)
            threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn", daemon=True).start()

    def _wait_while_stalled(self, *socks: socket.socket) -> bool:
        """Hold the connection while stalled; False if it was closed meanwhile."""
        while True:
            with self._lock:
                mode = self._mode
            if mode != "stall":
                return all(s.fileno() != -1 for s in socks)
            if self._closed.is_set():
                return False
            time.sleep(0.05)

    def _send(self, sock: socket.socket, data: bytes) -> None:
        """sendall, paced by the trickle rate when one is set (one shared link for all connections)."""
        view = memoryview(data)
        while view:
            with self._lock:
                rate = self._rate
            if not rate:
                sock.sendall(view)
                return
            piece = view[:1024]
            with self._lock:
                now = time.monotonic()
                start = max(now, self._next_send)
                self._next_send = start + len(piece) / rate
            if start > now:
                time.sleep(start - now)
            sock.sendall(piece)
            view = view[len(piece) :]

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            if not self._wait_while_stalled(client):
                return
            upstream = socket.create_connection(self.upstream, timeout=10)
            upstream.settimeout(None)
            with self._lock:
                self._conns.add(upstream)
            lose = threading.Event()  # set: the next answer on this connection is dropped
            threading.Thread(
                target=self._pump, args=(upstream, client, lose), name="faultproxy-down", daemon=True
            ).start()
            if self.http:
                self._requests(client, upstream, lose)
            else:
                self._pump(client, upstream)
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                if s is not None:
                    with self._lock:
                        self._conns.discard(s)
                    with contextlib.suppress(OSError):
                        s.close()

    def _pump(self, src: socket.socket, dst: socket.socket, lose: threading.Event | None = None) -> None:
        try:
            while True:
                if not self._wait_while_stalled(src, dst):
                    return
                data = src.recv(65536)
                if not data:
                    break
                if lose is not None and lose.is_set():
                    _rst(src)
                    _rst(dst)
                    return
                self._send(dst, data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def _requests(self, client: socket.socket, upstream: socket.socket, lose: threading.Event) -> None:
        buf = b""
        while True:
            while b"\r\n\r\n" not in buf:
                if not self._wait_while_stalled(client, upstream):
                    return
                data = client.recv(65536)
                if not data:
                    with contextlib.suppress(OSError):
                        upstream.shutdown(socket.SHUT_WR)
                    return
                buf += data
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target = lines[0].split(" ")[:2]
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if "chunked" in headers.get("transfer-encoding", "").lower():
                raise OSError("chunked request bodies are not supported by this proxy")
            length = int(headers.get("content-length", "0") or 0)
            url = urlsplit(target)
            comp = parse_qs(url.query).get("comp", [None])[0]

            with self._lock:
                status = self._errors.pop(0) if self._errors else None
                cut = status is None and self._resets_left > 0 and length > self._reset_after
                if cut:
                    self._resets_left -= 1
                drop = (
                    status is None
                    and not cut
                    and self._lose_left > 0
                    and self._lose_comp in (None, comp)
                    and self._lose_method in (None, method)
                )
                if drop:
                    self._lose_left -= 1
                    lose.set()  # before the body goes out, so the answer cannot slip through first
                hold = (
                    status is None
                    and not cut
                    and not drop
                    and self._hold_left > 0
                    and self._hold_comp in (None, comp)
                    and self._hold_method in (None, method)
                )
                if hold:
                    self._hold_left -= 1
                outcome = f"http_{status}" if status else ("reset" if cut else ("lost" if drop else "forwarded"))
                self.seen.append(Seen(method, url.path, comp, outcome))

            if status is not None:
                body, buf = self._read_body(client, buf, length)
                client.sendall(self._error_response(status, method))
                continue
            if hold:
                self.held.set()
                while not self._released.wait(0.05):
                    if self._closed.is_set():
                        return
            self._send(upstream, head + b"\r\n\r\n")
            if cut:
                body, buf = self._read_body(client, buf, self._reset_after)
                self._send(upstream, body)
                _rst(upstream)
                _rst(client)
                return
            remaining = length
            while remaining:
                if not buf:
                    if not self._wait_while_stalled(client, upstream):
                        return
                    buf = client.recv(min(65536, remaining))
                    if not buf:
                        return
                piece, buf = buf[:remaining], buf[remaining:]
                self._send(upstream, piece)
                remaining -= len(piece)

    @staticmethod
    def _read_body(client: socket.socket, buf: bytes, length: int) -> tuple[bytes, bytes]:
        while len(buf) < length:
            data = client.recv(65536)
            if not data:
                raise OSError("client closed mid-body")
            buf += data
        return buf[:length], buf[length:]

    @staticmethod
    def _error_response(status: int, method: str) -> bytes:
        code = _ERROR_CODES.get(status, "InternalError")
        reason = {400: "Bad Request", 500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Error")
        body = (
            '<?xml version="1.0" encoding="utf-8"?><Error>'
            f"<Code>{code}</Code><Message>Injected by the test fault proxy.\nRequestId:00000000-0000-0000-0000-"
            f"000000000000\nTime:{time.strftime('%Y-%m-%dT%H:%M:%S.0000000Z', time.gmtime())}</Message></Error>"
        ).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"x-ms-error-code: {code}\r\n"
            "x-ms-request-id: 00000000-0000-0000-0000-000000000000\r\n"
            "x-ms-version: 2021-12-02\r\n"
            "Connection: keep-alive\r\n\r\n"
        ).encode()
        # A response to HEAD carries the headers only; a body would be read as the next response.
        return head if method == "HEAD" else head + body
