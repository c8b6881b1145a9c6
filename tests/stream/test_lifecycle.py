"""Socket activation, sd_notify, idle exit and restart, graceful stop, startup errors."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import _proc
from tests.support.media import pseudo_random_bytes

from .conftest import MediaLibrary
from .support import (
    SERVE_ARGV,
    Address,
    NotifyListener,
    SocketActivator,
    read_one_response,
    read_response_after_signal,
    request,
    wait_for,
    write_config,
)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="gms-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def notify(short_dir: Path) -> Iterator[NotifyListener]:
    n = NotifyListener(short_dir / "notify")
    yield n
    n.close()


@pytest.mark.skipif(shutil.which("systemd-socket-activate") is None, reason="needs systemd's systemd-socket-activate")
def test_systemd_socket_activation_on_tcp_and_unix_with_sd_notify(
    library: MediaLibrary, short_dir: Path, notify: NotifyListener, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "agent.env", library.config_values())
    port = _proc.free_port()
    sock = short_dir / "stream.sock"
    argv = [
        "systemd-socket-activate",
        "-l", f"127.0.0.1:{port}",
        "-l", str(sock),
        "-E", f"NOTIFY_SOCKET={notify.path}",
        "-E", "WATCHDOG_USEC=1000000",
        *SERVE_ARGV, "--config", str(config), "--log-level", "debug",
    ]  # fmt: skip
    log = tmp_path / "activate.log"
    proc = _proc.spawn(argv, log)
    try:
        wait_for(lambda: _proc.port_open("127.0.0.1", port), what="systemd-socket-activate to listen")
        item = library.items["both"]
        # The first connection starts the server, which takes the socket from fd 3.
        r = request(Address("tcp", port=port), item.url, {"Range": "bytes=0-1"})
        assert r.status == 206 and r.body == item.data[:2]
        r = request(Address("unix", path=str(sock)), library.items["blob"].url, {"Range": "bytes=-4"})
        assert r.status == 206 and r.body == library.items["blob"].data[-4:]
        wait_for(lambda: notify.seen("READY=1"), what="READY=1")
        # WATCHDOG_USEC=1 s: pings every half second while the server runs.
        wait_for(lambda: len(notify.seen("WATCHDOG=1")) >= 3, what="watchdog pings")
        wait_for(lambda: any("sent" in m and "requests" in m for m in notify.seen("STATUS=")), what="a STATUS line")
        text = _proc.tail(log)
        assert "socket-activated" in text
        assert f"127.0.0.1:{port}" in text and str(sock) in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert notify.seen("STOPPING=1")
    finally:
        _proc.terminate(proc)


@pytest.fixture
def activator(library: MediaLibrary, short_dir: Path, notify: NotifyListener, tmp_path: Path):
    config = write_config(
        tmp_path / "agent.env",
        library.config_values(STREAM_IDLE_EXIT_SECONDS="1", STREAM_STATUS_INTERVAL_SECONDS="0.2"),
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NOTIFY_SOCKET": notify.path}
    a = SocketActivator([*SERVE_ARGV, "--config", str(config)], short_dir / "stream.sock", tmp_path / "a.log", env)
    yield a
    a.close()


def test_idle_exit_then_the_next_connection_starts_the_server_again(
    activator: SocketActivator, library: MediaLibrary, notify: NotifyListener
) -> None:
    item = library.items["local"]
    assert request(activator.tcp, item.url, {"Range": "bytes=0-9"}).body == item.data[:10]
    assert activator.starts == 1
    wait_for(lambda: activator.exit_codes, what="the idle server to exit")
    assert activator.exit_codes == [0]
    assert "idle for 1s" in activator.log_text()
    assert notify.seen("STOPPING=1")
    # The socket kept listening; this connection starts a new server.
    r = request(activator.unix, library.items["blob"].url, {"Range": "bytes=0-9"})
    assert r.status == 206 and r.body == library.items["blob"].data[:10]
    assert activator.starts == 2
    wait_for(lambda: len(activator.exit_codes) == 2, what="the second idle exit")


def test_no_idle_exit_while_a_connection_is_open(activator: SocketActivator, library: MediaLibrary) -> None:
    item = library.items["local"]
    with activator.tcp.connect() as s:
        s.sendall(f"GET {item.url} HTTP/1.1\r\nHost: m\r\nRange: bytes=0-0\r\n\r\n".encode())
        assert read_one_response(s) == (206, item.data[:1])
        wait_for(lambda: activator.running, what="the server to run")
        # Several idle periods pass while the keep-alive connection stays open.
        with pytest.raises(AssertionError):
            wait_for(lambda: activator.exit_codes, timeout=3, what="an exit that must not happen")
        s.sendall(f"GET {item.url} HTTP/1.1\r\nHost: m\r\nRange: bytes=1-1\r\n\r\n".encode())
        assert read_one_response(s) == (206, item.data[1:2])
    wait_for(lambda: activator.exit_codes, what="the idle exit after the connection closed")
    assert activator.starts == 1


def test_a_burst_of_connections_starts_one_server(activator: SocketActivator, library: MediaLibrary) -> None:
    item = library.items["blob"]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(lambda i: request(activator.tcp, item.url, {"Range": f"bytes={i}-{i}"}), range(64)))
    assert [r.body for r in results] == [item.data[i : i + 1] for i in range(64)]
    assert activator.starts == 1


@pytest.mark.parametrize("where", ["local", "blob"])
def test_stop_lets_running_streams_finish(start_server, fresh_library: MediaLibrary, where: str) -> None:
    item = fresh_library.add(
        "big", pseudo_random_bytes(48 * 1024 * 1024, seed=21), local=where == "local", blob=where == "blob"
    )
    srv = start_server(fresh_library)
    body = read_response_after_signal(srv, item.url, signal.SIGTERM)
    assert body == item.data
    assert srv.proc.wait(30) == 0
    assert "stopping (SIGTERM)" in srv.log_text()


def test_stop_cuts_streams_after_the_drain_time(start_server, fresh_library: MediaLibrary) -> None:
    item = fresh_library.add("big", pseudo_random_bytes(48 * 1024 * 1024, seed=22), local=True, blob=False)
    srv = start_server(fresh_library, STREAM_DRAIN_SECONDS="0.5")
    with srv.tcp.connect() as s:
        s.sendall(f"GET {item.url} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
        assert s.recv(65536).startswith(b"HTTP/1.1 200")
        srv.proc.send_signal(signal.SIGTERM)  # and this client never reads again
        assert srv.proc.wait(60) == 0
    assert "cutting 1 stream(s)" in srv.log_text()


def test_serve_without_sockets_or_listen_is_a_config_error(library: MediaLibrary, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.env", library.config_values())
    env = {k: v for k, v in os.environ.items() if k not in ("LISTEN_FDS", "LISTEN_PID")}
    r = subprocess.run([*SERVE_ARGV, "--config", str(config)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 78
    assert "--listen" in r.stderr and "gighive-media-stream.socket" in r.stderr


def test_bad_stream_settings_name_the_variable_and_exit_78(library: MediaLibrary, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "agent.env",
        library.config_values(
            STREAM_CHUNK_SIZE="lots",
            STREAM_IDLE_EXIT_SECONDS="-1",
            STREAM_X_ACCEL_PREFIX="x",
            STREAM_VERIFIED_DIR="relative/verified",
            STREAM_VERIFIED_MARKERS_MAX="many",
        ),
    )
    r = subprocess.run(
        [*SERVE_ARGV, "--config", str(config), "--listen", "127.0.0.1:0"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 78
    names = ("STREAM_CHUNK_SIZE", "STREAM_IDLE_EXIT_SECONDS", "STREAM_X_ACCEL_PREFIX", "STREAM_VERIFIED_DIR")
    for name in (*names, "STREAM_VERIFIED_MARKERS_MAX"):
        assert name in r.stderr


def test_a_bad_listen_address_is_refused(library: MediaLibrary, tmp_path: Path) -> None:
    config = write_config(tmp_path / "agent.env", library.config_values())
    (tmp_path / "not-a-socket").write_text("x")
    for spec in ("nonsense", "unix:relative/path", f"unix:{tmp_path}/not-a-socket", "127.0.0.1:99999"):
        r = subprocess.run(
            [*SERVE_ARGV, "--config", str(config), "--listen", spec], capture_output=True, text=True, timeout=60
        )
        assert r.returncode != 0, spec
        assert "--listen" in r.stderr and "Traceback" not in r.stderr, r.stderr
