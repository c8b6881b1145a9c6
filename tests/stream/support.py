"""Helpers for the stream server tests: the server as a real process, a systemd-like socket
activator, Debian's nginx with the shipped snippets, a byte-counting TCP proxy in front of
Azurite, an sd_notify listener, and small HTTP clients (well-formed and raw)."""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import select
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import _proc

REPO = Path(__file__).resolve().parents[2]
FRONT = REPO / "agent" / "stream" / "front"
# How the server is started in tests: the real CLI, `gighive-media serve`.
SERVE_ARGV = [sys.executable, "-m", "agent", "serve"]
_SERVING_RE = re.compile(r"serving on (.+?) \(")


def wait_for(predicate, timeout: float = 300.0, interval: float = 0.02, what: str = "condition"):
    """Poll until predicate() is truthy; a generous deadline, not a performance threshold."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def write_config(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    return path


# ---- addresses and clients -----------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """Where a server listens: ("tcp", host, port), ("unix", path) or ("https", host, port) with the
    CA to trust. `headers` go with every request() (the Apache front's Basic Auth)."""

    kind: str
    host: str = "127.0.0.1"
    port: int = 0
    path: str = ""
    ca: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    # What a content-addressed file's 200/206/304 carries here (the Apache front forces GigHive's).
    media_cache_control: str = "private, max-age=31536000, immutable"
    # "apache" / "nginx" when this is a front that sends content-addressed files on disk itself
    # (local first): edge cases (bad Range syntax, overlaps, 416 details) are then its own.
    local_first: str = ""

    @classmethod
    def parse(cls, text: str) -> Address:
        if text.startswith("unix:"):
            return cls("unix", path=text[5:])
        host, _, port = text.rpartition(":")
        return cls("tcp", host=host.strip("[]"), port=int(port))

    def connect(self, timeout: float = 30.0) -> socket.socket:
        if self.kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(timeout)
            s.connect(self.path)
            return s
        s = socket.create_connection((self.host, self.port), timeout=timeout)
        if self.kind == "https":
            return self.ssl_context().wrap_socket(s, server_hostname=self.host)
        return s

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=self.ca)

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"{'https://' if self.kind == 'https' else ''}{self.host}:{self.port}"


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float):
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def connection(addr: Address, timeout: float = 30.0) -> http.client.HTTPConnection:
    if addr.kind == "unix":
        return _UnixHTTPConnection(addr.path, timeout)
    if addr.kind == "https":
        return http.client.HTTPSConnection(addr.host, addr.port, timeout=timeout, context=addr.ssl_context())
    return http.client.HTTPConnection(addr.host, addr.port, timeout=timeout)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    header_list: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


def request(
    addr: Address, path: str, headers: dict[str, str] | None = None, method: str = "GET", timeout: float = 30.0
) -> Response:
    conn = connection(addr, timeout)
    try:
        conn.request(method, path, headers={**dict(addr.headers), **(headers or {})})
        r = conn.getresponse()
        body = r.read()
        items = r.getheaders()
        return Response(r.status, {k.lower(): v for k, v in items}, body, items)
    finally:
        conn.close()


def raw_exchange(addr: Address, data: bytes, timeout: float = 30.0) -> bytes:
    """Send raw bytes, half-close, and read everything until the server closes."""
    with addr.connect(timeout) as s:
        s.sendall(data)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def split_responses(data: bytes, head_requests: Sequence[int] = ()) -> list[tuple[int, dict[str, str], bytes]]:
    """Parse a stream of HTTP/1.1 responses with Content-Length bodies; the responses at the
    indexes in head_requests (answers to HEAD) and 304s carry no body."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"incomplete response head: {data[:200]!r}")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        bodiless = status == 304 or len(out) in head_requests
        length = 0 if bodiless else int(headers.get("content-length", "0"))
        out.append((status, headers, rest[:length]))
        data = rest[length:]
    return out


def parse_multipart(body: bytes, content_type: str) -> list[tuple[str, bytes]]:
    """(Content-Range, bytes) of each part of a multipart/byteranges body."""
    m = re.search(r"boundary=([^;]+)", content_type)
    assert m, content_type
    delimiter = b"--" + m.group(1).encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:]  # CRLF after the delimiter
        head, _, data = chunk.partition(b"\r\n\r\n")
        fields = dict(
            (k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in head.decode().split("\r\n"))
        )
        assert data.endswith(b"\r\n")
        parts.append((fields["content-range"], data[:-2]))
    return parts


# ---- the server as a process ---------------------------------------------------------------


class ServerProcess:
    """`gighive-media serve --listen ...` as a child process."""

    def __init__(self, config: Path, log_path: Path, listen: Sequence[str], env: dict[str, str] | None = None):
        self.config = config
        self.log_path = log_path
        argv = [*SERVE_ARGV, "--config", str(config), "--log-level", "debug"]
        for spec in listen:
            argv += ["--listen", spec]
        full_env = {**os.environ, **(env or {})}
        for name in ("LISTEN_FDS", "LISTEN_PID", "NOTIFY_SOCKET", "WATCHDOG_USEC"):
            if not env or name not in env:
                full_env.pop(name, None)
        self.proc = _proc.spawn(argv, log_path, env=full_env)
        line = wait_for(self._serving_line, what=f"the server to listen (log: {log_path})")
        self.addresses = [Address.parse(a.strip()) for a in line.split(",")]

    def _serving_line(self) -> str | None:
        m = _SERVING_RE.search(self.log_text())
        if m:
            return m.group(1)
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log_text()}")
        return None

    @property
    def tcp(self) -> Address:
        return next(a for a in self.addresses if a.kind == "tcp")

    @property
    def unix(self) -> Address:
        return next(a for a in self.addresses if a.kind == "unix")

    def log_text(self) -> str:
        return _proc.tail(self.log_path, limit=1 << 20)

    def stop(self) -> int | None:
        _proc.terminate(self.proc, timeout=30)
        return self.proc.returncode


# ---- sd_notify -----------------------------------------------------------------------------


class NotifyListener:
    """A NOTIFY_SOCKET that records every datagram, as systemd would receive them."""

    def __init__(self, path: Path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.extend(data.decode().split("\n"))

    def seen(self, prefix: str) -> list[str]:
        return [m for m in list(self.messages) if m.startswith(prefix)]

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)
        self.sock.close()


# ---- socket activation like systemd --------------------------------------------------------

_EXEC_WITH_FDS = """
import os, sys
fds = [int(x) for x in sys.argv[1].split(",")]
# Move the inherited sockets to 3, 4, ... the way systemd passes them.
import fcntl
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i, inheritable=True)
    os.set_inheritable(3 + i, True)
os.environ["LISTEN_FDS"] = str(len(fds))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.argv[2], sys.argv[2:])
"""


class SocketActivator:
    """What gighive-media-stream.socket does: own the listening sockets, start the service on
    the first connection (Accept=no, fds from 3), and start it again after it exits."""

    def __init__(self, argv: Sequence[str], unix_path: Path, log_path: Path, env: dict[str, str]):
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.unix_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.unix_sock.bind(str(unix_path))
        self.unix_sock.listen(128)
        self.tcp_sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.unix = Address("unix", path=str(unix_path))
        self.tcp = Address("tcp", port=self.tcp_sock.getsockname()[1])
        self.starts = 0
        self.exit_codes: list[int] = []
        self.current: subprocess.Popen | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        socks = [self.tcp_sock, self.unix_sock]
        while not self._stop:
            readable, _, _ = select.select(socks, [], [], 0.05)
            if not readable:
                continue
            fds = ",".join(str(s.fileno()) for s in socks)
            argv = [sys.executable, "-c", _EXEC_WITH_FDS, fds, *self.argv]
            with open(self.log_path, "ab") as log:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                    pass_fds=[s.fileno() for s in socks],
                )
            self.current = proc
            self.starts += 1
            while proc.poll() is None and not self._stop:
                time.sleep(0.02)
            if proc.poll() is not None:
                self.exit_codes.append(proc.returncode)

    @property
    def running(self) -> bool:
        return self.current is not None and self.current.poll() is None

    def log_text(self) -> str:
        return _proc.tail(self.log_path, limit=1 << 20)

    def close(self) -> None:
        self._stop = True
        self._thread.join(10)
        if self.current is not None:
            _proc.terminate(self.current, timeout=30)
        self.unix_sock.close()
        self.tcp_sock.close()


# ---- nginx ---------------------------------------------------------------------------------


def front_snippet(name: str, socket_path: str | None = None, roots: dict[str, Path] | None = None) -> str:
    """A shipped nginx snippet with this host's socket path and media roots filled in."""
    text = (FRONT / name).read_text()
    if socket_path:
        text = text.replace("/run/gighive-media-agent/stream.sock", socket_path)
    for root, path in (roots or {}).items():
        text = text.replace(f"/home/ubuntu/{root}/", f"{path}/")
    return text


class Nginx:
    """Debian's nginx in the foreground with a private prefix, serving the shipped snippets."""

    def __init__(self, workdir: Path, server_block: str, http_extra: str = ""):
        self.workdir = workdir
        for d in ("logs", "spool"):
            (workdir / d).mkdir(parents=True, exist_ok=True)
        self.port = _proc.free_port()
        user = "user root;" if os.geteuid() == 0 else ""
        conf = f"""
daemon off;
master_process on;
worker_processes 1;
{user}
error_log {workdir}/logs/error.log info;
pid {workdir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    include /etc/nginx/mime.types;
    access_log {workdir}/logs/access.log;
    client_body_temp_path {workdir}/spool/body;
    proxy_temp_path {workdir}/spool/proxy;
    fastcgi_temp_path {workdir}/spool/fastcgi;
    uwsgi_temp_path {workdir}/spool/uwsgi;
    scgi_temp_path {workdir}/spool/scgi;
    sendfile on;
    {http_extra}
    server {{
        listen 127.0.0.1:{self.port};
        {server_block}
    }}
}}
"""
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(conf)
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        check = subprocess.run([binary, "-t", "-p", str(workdir), "-c", str(self.conf)], capture_output=True)
        if check.returncode != 0:
            raise AssertionError(f"nginx -t failed:\n{check.stderr.decode()}\n{conf}")
        self.proc = _proc.spawn([binary, "-p", str(workdir), "-c", str(self.conf)], workdir / "logs" / "stdout.log")
        wait_for(lambda: _proc.port_open("127.0.0.1", self.port), what="nginx to listen")
        self.addr = Address("tcp", port=self.port)

    def error_log(self) -> str:
        return _proc.tail(self.workdir / "logs" / "error.log")

    def stop(self) -> None:
        # SIGQUIT is nginx's graceful stop; SIGTERM (what terminate sends) is the fast one.
        _proc.terminate(self.proc, timeout=30)


# ---- a TCP proxy that counts ---------------------------------------------------------------


class CountingProxy:
    """Forwards TCP to a target and counts what flows back from it, per connection, so a test
    can see that the server stopped downloading (closed its upstream connection)."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.listener.getsockname()[1]
        self.connections: list[dict[str, object]] = []
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            record: dict[str, object] = {"down": 0, "closed": False, "sockets": (client, upstream)}
            with self._lock:
                self.connections.append(record)
            threading.Thread(target=self._pump, args=(client, upstream, record), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket, record: dict[str, object]) -> None:
        socks = [client, upstream]
        try:
            while not self._stop:
                readable, _, _ = select.select(socks, [], [], 0.1)
                for s in readable:
                    data = s.recv(65536)
                    if not data:
                        return
                    if s is upstream:
                        record["down"] = int(record["down"]) + len(data)  # type: ignore[arg-type]
                        client.sendall(data)
                    else:
                        upstream.sendall(data)
        except OSError:
            return
        finally:
            record["closed"] = True
            client.close()
            upstream.close()

    def total_down(self) -> int:
        with self._lock:
            return sum(int(c["down"]) for c in self.connections)  # type: ignore[arg-type]

    def open_connections(self) -> int:
        with self._lock:
            return sum(1 for c in self.connections if not c["closed"])

    def sever(self) -> int:
        """Break every open connection (both sides), like a network failure; returns how many."""
        n = 0
        with self._lock:
            for c in self.connections:
                if not c["closed"]:
                    n += 1
                    for sock in c["sockets"]:  # type: ignore[union-attr]
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_RDWR)
        return n

    def close(self) -> None:
        self._stop = True
        self.listener.close()


def iter_lines(text: str) -> Iterator[str]:
    yield from text.splitlines()


def read_response_after_signal(server: ServerProcess, url: str, signum: int) -> bytes:
    """GET url, read the first MiB, send the server a signal, then read the rest of the body."""
    with server.tcp.connect(timeout=60) as s:
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data) < (1 << 20):
            chunk = s.recv(1 << 20)
            assert chunk, "closed before the first MiB"
            data += chunk
        server.proc.send_signal(signum)
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        while len(body) < length:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            body += chunk
        return body


def read_one_response(s: socket.socket) -> tuple[int, bytes]:
    """Read exactly one response with a Content-Length body from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, "connection closed before a response head"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed inside a body"
        body += chunk
    assert len(body) == length, "more bytes than one response"
    return int(head[9:12]), body
