"""Sockets, connections and lifecycle of `gighive-media serve`.

Why not http.server's ThreadingHTTPServer: it starts a thread for every connection without a
bound, its header timeout is per recv() (a slowloris client sending a byte every few seconds
holds a thread forever), it reads header lines of up to 64 KiB each, and it writes through a
buffered file object, so sendfile(2) is out of reach. This module keeps the useful part of that
design (one blocking thread per connection, which suits the blocking Azure SDK and sendfile)
and adds what a server facing the network needs:

- at most STREAM_MAX_CONNECTIONS connections; beyond that, new ones wait in the listen backlog
  (owned by systemd), not in this process;
- a deadline for the whole request head, a cap on its size, an idle keep-alive timeout and a
  send timeout, so slow or idle clients cannot pin threads;
- memory per stream bounded by one read (Blob) or zero copies (sendfile).

The accept loop runs in the main thread with a selector; it also sends the watchdog pings,
so a wedged loop is noticed by systemd and restarted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import stat
import threading
import time
from pathlib import Path

from ..config import Config
from ..errors import EXIT_CONFIG, EXIT_OK, AgentError, ConfigError, ConfigErrors
from ..notify import Notifier
from .handler import ClientGone, Handler, Output, Stats, reject
from .http import HttpError, parse_head
from .markers import VerifiedMarkers
from .settings import StreamSettings, load_settings, peer_allowed
from .sources import BlobSource, LocalSource, Sources

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3
# Large enough for a burst of 200 streams starting at once while the service starts up.
BACKLOG = 1024
# A media URL is about 120 characters; 8 KiB is what common servers allow for the request line.
MAX_REQUEST_LINE = 8192
# How long and how much a closing connection keeps reading (and discarding) client input.
LINGER_SECONDS = 2.0
LINGER_BYTES = 4 * 1024 * 1024
# Refused peers are logged at most this often (with a count), so a scan cannot flood the journal.
REFUSAL_LOG_INTERVAL = 60.0
# Bytes asked of recv() while waiting for a request head (and while lingering at close).
# CPython allocates the whole size before it blocks and only shrinks it once data arrives, so
# every connection waiting for its next request (idle keep-alive ones pooled by the front, new
# ones) holds this much: at 64 KiB, a front's 128 pooled connections were 8 MiB of RSS for
# nothing. A request head is far smaller; a larger one simply takes several reads.
RECV_SIZE = 8192
# Connection states (see StreamServer._conns).
NEW, BUSY, IDLE = "new", "busy", "idle"


class ListenError(AgentError):
    """A --listen address cannot be used, or systemd passed no usable socket."""

    # Like a bad configuration: restarting cannot fix it (RestartPreventExitStatus=78).
    exit_code = EXIT_CONFIG


# ---- listening sockets ---------------------------------------------------------------------


def systemd_sockets(environ: dict[str, str] | None = None) -> list[socket.socket] | None:
    """The listening sockets systemd passed (LISTEN_FDS/LISTEN_PID), or None when not activated.

    The variables are removed afterwards, as sd_listen_fds(1) does, so no child process
    mistakes the sockets for its own.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if not pid or not count:
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    if not pid.isdigit() or int(pid) != os.getpid():
        return None  # meant for another process (e.g. inherited through a wrapper)
    if not count.isdigit() or int(count) < 1:
        raise ListenError(f"LISTEN_FDS={count!r} is not a positive number of sockets")
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        try:
            os.set_inheritable(fd, False)
            mode = os.fstat(fd).st_mode
        except OSError as e:
            raise ListenError(f"fd {fd} from systemd (LISTEN_FDS={count}) is not open: {e.strerror}") from e
        if not stat.S_ISSOCK(mode):
            raise ListenError(f"fd {fd} from systemd is not a socket (check ListenStream= in the socket unit)")
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ListenError(f"fd {fd} from systemd is not a listening stream socket (use ListenStream=, Accept=no)")
        sockets.append(sock)
    return sockets


def listen_socket(spec: str) -> socket.socket:
    """A listening socket for `--listen unix:PATH` or `--listen HOST:PORT` (development)."""
    if spec.startswith("unix:"):
        path = Path(spec[5:])
        if not path.is_absolute():
            raise ListenError(f"--listen {spec}: the socket path must be absolute")
        if path.exists():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ListenError(f"--listen {spec}: {path} exists and is not a socket")
            path.unlink()  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
        except OSError as e:
            sock.close()
            raise ListenError(f"--listen {spec}: {e.strerror}") from e
        sock.listen(BACKLOG)
        return sock
    host, sep, port_text = spec.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ListenError(f"--listen {spec}: expected HOST:PORT, [IPv6]:PORT or unix:/absolute/path")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, int(port_text)), family=family, backlog=BACKLOG)
    except OSError as e:
        raise ListenError(f"--listen {spec}: {e.strerror or e}") from e


def describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name.decode() if isinstance(name, bytes) else name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


# ---- the server ----------------------------------------------------------------------------


class _HeadReader:
    """Reads request heads from one connection, keeping pipelined bytes for the next request."""

    def __init__(self, conn: socket.socket, settings: StreamSettings):
        self.conn = conn
        self.settings = settings
        self.buf = bytearray()

    def next_head(self, first: bool) -> bytes | None:
        """The next request head, None when the client closed or idled out between requests."""
        s = self.settings
        now = time.monotonic()
        # Between requests a client may idle (keep-alive); once it starts one, the whole head
        # must arrive within the header timeout, however slowly it trickles in.
        deadline = now + (s.header_timeout if first or self.buf else s.keepalive_timeout)
        started = first or bool(self.buf)
        while True:
            while self.buf[:2] == b"\r\n":  # RFC 9112 2.2: empty lines before a request
                del self.buf[:2]
            line_end = self.buf.find(b"\r\n", 0, MAX_REQUEST_LINE + 2)
            if line_end < 0 and len(self.buf) > MAX_REQUEST_LINE:
                raise HttpError(414, "request line too long")
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                if end + 4 > s.max_header_bytes:
                    raise HttpError(431, "request head too large")
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > s.max_header_bytes:
                raise HttpError(431, "request head too large")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if not self.buf and not first:
                    return None  # idle keep-alive connection: close quietly
                raise HttpError(408, "request head not received in time")
            self.conn.settimeout(remaining)
            try:
                data = self.conn.recv(RECV_SIZE)
            except TimeoutError:
                continue
            except OSError:
                return None
            if not data:
                return None
            if not started:
                started = True
                deadline = time.monotonic() + s.header_timeout
            self.buf += data


class StreamServer:
    def __init__(
        self,
        config: Config,
        settings: StreamSettings,
        listeners: list[socket.socket],
        socket_activated: bool,
        sources: Sources | None = None,
        notifier: Notifier | None = None,
    ):
        self.config = config
        self.settings = settings
        self.listeners = listeners
        self.socket_activated = socket_activated
        self.stats = Stats()
        if sources is None:
            blob = BlobSource(config, settings) if config.is_azure else None
            markers = None
            if settings.verified_dir is not None:
                roots = {r.name: r.path for r in config.roots if r.content_addressed}
                markers = VerifiedMarkers(settings.verified_dir, settings.verified_markers_max, roots)
                # Markers left by an earlier run for files that changed since go first (and the
                # count starts true), then every interval; in the background, so no request waits.
                markers.keep_sweeping(settings.verified_sweep_seconds)
            sources = Sources(local=LocalSource(config), blob=blob, markers=markers)
        self.sources = sources
        self.handler = Handler(config, settings, sources, self.stats)
        self.notifier = notifier or Notifier()
        self.stopping = False
        self._stop_reason = ""
        # connection -> NEW (no request yet), BUSY (answering) or IDLE (kept alive between requests)
        self._conns: dict[socket.socket, str] = {}
        self._reclaiming: set[socket.socket] = set()  # idle connections closed to make room
        self._conns_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.refused_peers = 0
        self._refusals_unlogged = 0
        self._next_refusal_log = 0.0

    # -- signals and wake-ups ------------------------------------------------------------------
    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def request_stop(self, reason: str) -> None:
        if not self.stopping:
            self.stopping = True
            self._stop_reason = reason
        self._wake()

    def _on_signal(self, signum: int, _frame: object) -> None:
        self.request_stop(signal.Signals(signum).name)

    # -- connections ---------------------------------------------------------------------------
    def _serve_connection(self, conn: socket.socket) -> None:
        out = Output(conn, self.settings, self.stats)
        reader = _HeadReader(conn, self.settings)
        first = True
        try:
            if conn.family in (socket.AF_INET, socket.AF_INET6):
                # The head and a small first chunk must leave at once, not wait for an ACK.
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while not self.stopping:
                try:
                    head = reader.next_head(first)
                except HttpError as e:
                    reject(out, e)
                    break
                if head is None:
                    break
                first = False
                self._set_busy(conn, True)
                try:
                    try:
                        request = parse_head(head)
                    except HttpError as e:
                        reject(out, e)
                        break
                    out.head_sent = False
                    if not self.handler.handle(request, out):
                        break
                finally:
                    self._set_busy(conn, False)
                    if self.stats.connections >= self.settings.max_connections:
                        self._wake()  # an idle connection may now make room for a waiting one
        except ClientGone:
            pass  # the client left while an answer was being written; nothing to tell anyone
        except Exception:
            # A bug: the traceback goes to the journal, the client gets a bare 500 (if anything).
            log.exception("internal error while serving a connection")
            if not out.head_sent and not out.broken:
                with contextlib.suppress(Exception):
                    reject(out, HttpError(500, "internal error"))
        finally:
            _lingering_close(conn)
            with self._conns_lock:
                self._conns.pop(conn, None)
                self._reclaiming.discard(conn)
            self.stats.add(connections=-1)
            self._wake()

    def _set_busy(self, conn: socket.socket, busy: bool) -> None:
        with self._conns_lock:
            if conn in self._conns:
                self._conns[conn] = BUSY if busy else IDLE

    def _accept(self, listener: socket.socket) -> bool:
        try:
            conn, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as e:
            # EMFILE and friends: log, and let the loop try again later instead of spinning.
            log.error("accept failed: %s", e)
            time.sleep(0.1)
            return False
        if conn.family in (socket.AF_INET, socket.AF_INET6) and not peer_allowed(peer[0], self.settings.allowed_peers):
            # Refused in the accept loop, before any byte is read and without a thread, so a
            # flood of refused connections costs no more than its accept() calls.
            conn.close()
            self._refused(peer[0])
            return True
        conn.setblocking(True)
        with self._conns_lock:
            self._conns[conn] = NEW
        self.stats.add(connections=1)
        thread = threading.Thread(target=self._serve_connection, args=(conn,), daemon=True, name="stream-conn")
        thread.start()
        return True

    def _refused(self, host: str) -> None:
        self.refused_peers += 1
        self._refusals_unlogged += 1
        now = time.monotonic()
        if now >= self._next_refusal_log:
            log.warning(
                "refused a connection from %s: not in STREAM_ALLOWED_PEERS (%d refused since the last "
                "message); if this is the web front, add its address there and to the socket's IPAddressAllow=",
                host,
                self._refusals_unlogged,
                extra={"fields": {"peer": host}},
            )
            self._refusals_unlogged = 0
            self._next_refusal_log = now + REFUSAL_LOG_INTERVAL

    def _can_reclaim(self) -> bool:
        with self._conns_lock:
            return not self._reclaiming and IDLE in self._conns.values()

    def _reclaim_idle(self) -> None:
        """Close the oldest kept-alive idle connection so that a waiting client gets its slot.

        Otherwise clients that send a request now and then, just within the keep-alive timeout,
        could hold every slot forever (the header deadline never applies to them) and lock new
        clients out; nginx gives up idle keep-alive connections the same way when it runs out.
        A request racing the close is retried by the front on a fresh connection (GET is
        idempotent; nginx-locations.conf allows one such retry), as with any keep-alive close.
        One at a time: the next waits until this one's thread has ended and freed its slot.
        """
        with self._conns_lock:
            if self._reclaiming:
                return
            victim = next((c for c, state in self._conns.items() if state == IDLE), None)
            if victim is None:
                return
            self._reclaiming.add(victim)
        with contextlib.suppress(OSError):
            victim.shutdown(socket.SHUT_RDWR)

    # -- status and watchdog -------------------------------------------------------------------
    def status_line(self) -> str:
        s = self.stats
        return (
            f"{s.active_streams} active streams, {s.connections} connections, "
            f"{_human(s.bytes_sent)} sent, {s.requests} requests, {s.upstream_errors} Azure errors"
        )

    @staticmethod
    def watchdog_interval(environ: dict[str, str] | None = None) -> float | None:
        env = os.environ if environ is None else environ
        usec, pid = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
        if not usec or not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None
        # Half of WatchdogSec, as sd_watchdog_enabled(3) recommends.
        return int(usec) / 2 / 1e6

    # -- main loop -----------------------------------------------------------------------------
    def serve(self) -> int:
        sel = selectors.DefaultSelector()
        for sock in self.listeners:
            sock.setblocking(False)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        registered = False
        watchdog = self.watchdog_interval()
        next_ping = time.monotonic()
        next_status = 0.0
        status_version = -1
        idle_exit = self.settings.idle_exit_seconds if self.socket_activated else 0.0
        self.notifier.ready(self.status_line())
        log.info(
            "serving on %s (%s); idle exit %s",
            ", ".join(describe(s) for s in self.listeners),
            "socket-activated" if self.socket_activated else "--listen",
            f"after {idle_exit:g}s" if idle_exit else "off",
        )
        while not self.stopping:
            # Beyond the connection limit, stop accepting (the kernel queues the rest), unless a
            # kept-alive idle connection can make room for a waiting one.
            want = self.stats.connections < self.settings.max_connections or self._can_reclaim()
            if want != registered:
                for sock in self.listeners:
                    if want:
                        sel.register(sock, selectors.EVENT_READ, sock)
                    else:
                        sel.unregister(sock)
                registered = want
            now = time.monotonic()
            timeout = 1.0
            if watchdog:
                timeout = min(timeout, max(0.0, next_ping - now))
            if idle_exit and self.stats.connections == 0:
                timeout = min(timeout, max(0.0, self.stats.last_activity + idle_exit - now))
            for key, _events in sel.select(timeout):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    continue
                if self.stats.connections >= self.settings.max_connections:
                    self._reclaim_idle()
                    continue
                # Accept what is queued, up to the limit, before looking at the clock again.
                while self.stats.connections < self.settings.max_connections and self._accept(key.data):
                    pass
            now = time.monotonic()
            if watchdog and now >= next_ping:
                self.notifier.watchdog()
                next_ping = now + watchdog
            if self.stats.version != status_version and now >= next_status:
                status_version = self.stats.version
                next_status = now + self.settings.status_interval
                self.notifier.status(self.status_line())
            if idle_exit and self.stats.connections == 0 and now - self.stats.last_activity >= idle_exit:
                # Whatever arrives from now on waits in systemd's socket and starts us again.
                self.request_stop(f"idle for {idle_exit:g}s")
        for sock in self.listeners:
            with contextlib.suppress(KeyError, ValueError):
                sel.unregister(sock)
        sel.close()
        return self._drain(watchdog)

    def _drain(self, watchdog: float | None) -> int:
        self.notifier.stopping()
        log.info("stopping (%s): %s", self._stop_reason, self.status_line())
        deadline = time.monotonic() + self.settings.drain_seconds
        while True:
            with self._conns_lock:
                idle = [c for c, state in self._conns.items() if state != BUSY]
                busy = len(self._conns) - len(idle)
            # Idle keep-alive connections are closed now; running streams may finish.
            for conn in idle:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            if not busy and not idle:
                break
            if time.monotonic() >= deadline:
                log.warning("cutting %d stream(s) still running after %gs", busy, self.settings.drain_seconds)
                with self._conns_lock:
                    for conn in list(self._conns):
                        with contextlib.suppress(OSError):
                            conn.shutdown(socket.SHUT_RDWR)
                break
            self.notifier.status(f"stopping: {self.status_line()}")
            if watchdog:
                self.notifier.watchdog()
            time.sleep(0.1)
        if not self.socket_activated:
            for sock in self.listeners:
                if sock.family == socket.AF_UNIX:
                    with contextlib.suppress(OSError):
                        os.unlink(sock.getsockname())
                sock.close()
        return EXIT_OK


def _lingering_close(conn: socket.socket) -> None:
    """Close so that the last response survives unread input from the client.

    Closing a socket with unread bytes in its receive buffer makes the kernel send a reset,
    which can destroy the response (a 431, or the last of several pipelined answers) before
    the client reads it. So: send FIN, discard what the client still sends for a moment, close.
    """
    try:
        conn.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + LINGER_SECONDS
        drained = 0
        while drained < LINGER_BYTES:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            conn.settimeout(remaining)
            data = conn.recv(RECV_SIZE)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            conn.close()


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def run(config: Config, listen: list[str] | None = None) -> int:
    """`gighive-media serve`: serve until stopped or idle; returns the exit code."""
    settings = load_settings(config)
    if listen:
        listeners = [listen_socket(spec) for spec in listen]
        activated = False
    else:
        passed = systemd_sockets()
        if passed is None:
            raise ConfigErrors(
                [
                    ConfigError(
                        "--listen",
                        "no socket from systemd (LISTEN_FDS) and no --listen address; start "
                        "gighive-media-stream.socket, or pass --listen 127.0.0.1:8787 or --listen unix:/path",
                    )
                ]
            )
        listeners, activated = passed, True
    server = StreamServer(config, settings, listeners, socket_activated=activated)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, server._on_signal)
    return server.serve()
