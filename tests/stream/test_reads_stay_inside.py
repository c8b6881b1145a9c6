"""Property: whatever a client sends, the server reads only allowed names, and only inside the
media roots and the container. Fuzzed with hypothesis against a live server whose two sources
record every name they are asked for; canary files and blobs outside the allowed set (some
reachable through symlinks placed inside the roots) must never show up in any answer."""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import load
from agent.stream.server import StreamServer
from agent.stream.settings import load_settings
from agent.stream.sources import BlobSource, LocalSource, Sources

from .conftest import MediaLibrary
from .support import write_config

CANARY = b"CANARY-must-never-be-served-" * 8
SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_C = "c" * 64
SHA_D = "d" * 64  # a legitimate local file
SHA_E = "e" * 64  # a legitimate blob
LEGIT = b"legitimate media bytes " * 40
ALLOWED_NAME = re.compile(r"^(audio|video)/([0-9a-f]{64}\.[A-Za-z0-9]{1,10}|thumbnails/[0-9a-f]{64}\.png)$")


class RecordingLocal(LocalSource):
    def __init__(self, config, seen: list[str]):
        super().__init__(config)
        self.seen = seen

    def open(self, media):
        self.seen.append(str(media.path))
        return super().open(media)


class RecordingBlob(BlobSource):
    def __init__(self, config, settings, seen: list[str]):
        super().__init__(config, settings)
        self.seen = seen

    def stat(self, name):
        self.seen.append(name)
        return super().stat(name)

    def _download(self, name, offset, length, etag):
        self.seen.append(name)
        return super()._download(name, offset, length, etag)


@pytest.fixture(scope="module")
def trap(tmp_path_factory: pytest.TempPathFactory, library: MediaLibrary) -> Iterator[dict[str, object]]:
    """The module's library plus canaries, and an in-process server with recording sources."""
    root = library.roots["root"]
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.mp4").write_bytes(CANARY)
    (outside / f"{SHA_A}.png").write_bytes(CANARY)
    (root / "secret.mp4").write_bytes(CANARY)
    (root / "state").mkdir(exist_ok=True)
    (root / "state" / "queue.db").write_bytes(CANARY)
    # Symlinks inside the roots, with names the URL gate accepts, pointing outside.
    os.symlink(outside / "secret.mp4", library.roots["video"] / f"{SHA_A}.mp4")
    os.symlink(outside, library.roots["audio"] / "thumbnails")
    os.symlink(outside / "secret.mp4", library.roots["thumbnails"] / f"{SHA_B}.png")
    os.mkfifo(library.roots["video"] / f"{SHA_C}.mp4")  # must not hang the server
    (library.roots["video"] / f"{SHA_D}.mp4").write_bytes(LEGIT)
    library.upload(f"video/{SHA_E}.mp4", LEGIT)
    # Blobs outside the allowed prefixes and shapes.
    for name in ("secret.mp4", f"videos/{SHA_A}.mp4", f"state/{SHA_A}.mp4", f"video/x/{SHA_A}.mp4", "video/secret.mp4"):
        library.upload(name, CANARY)

    config_path = write_config(tmp_path_factory.mktemp("trap") / "agent.env", library.config_values())
    config = load(config_path)
    stream_settings = load_settings(config)
    local_seen: list[str] = []
    blob_seen: list[str] = []
    sources = Sources(RecordingLocal(config, local_seen), RecordingBlob(config, stream_settings, blob_seen))
    listener = socket.create_server(("127.0.0.1", 0))
    server = StreamServer(config, stream_settings, [listener], socket_activated=False, sources=sources)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    yield {
        "port": listener.getsockname()[1],
        "local_seen": local_seen,
        "blob_seen": blob_seen,
        "roots": [library.roots["audio"], library.roots["video"]],
    }
    server.request_stop("test over")
    thread.join(30)


def exchange(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        return out


def check_reads(trap: dict[str, object]) -> None:
    roots: list[Path] = trap["roots"]  # type: ignore[assignment]
    for path_text in list(trap["local_seen"]):  # type: ignore[call-overload]
        path = Path(path_text)
        root = next((r for r in roots if path.is_relative_to(r)), None)
        assert root is not None, f"local read outside the roots: {path}"
        assert ALLOWED_NAME.match(f"{root.name}/{path.relative_to(root).as_posix()}"), path
    for name in list(trap["blob_seen"]):  # type: ignore[call-overload]
        assert ALLOWED_NAME.match(name), f"blob read outside the allowed names: {name}"


@pytest.mark.parametrize(
    "target",
    [
        f"/video/{SHA_A}.mp4",  # symlink to a file outside
        f"/audio/thumbnails/{SHA_A}.png",  # through a symlinked directory
        f"/video/thumbnails/{SHA_B}.png",
        f"/video/{SHA_C}.mp4",  # a FIFO
        "/secret.mp4",
        f"/videos/{SHA_A}.mp4",
        f"/state/{SHA_A}.mp4",
        f"/video/x/{SHA_A}.mp4",
        "/video/secret.mp4",
        "/video/../secret.mp4",
        "/video/%2e%2e/secret.mp4",
        "/video/..%2fstate%2fqueue.db",
    ],
)
def test_known_traps_are_404(trap: dict[str, object], target: str) -> None:
    data = exchange(trap["port"], f"GET {target} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n".encode())  # type: ignore[arg-type]
    assert data.startswith(b"HTTP/1.1 404 "), data[:200]
    assert CANARY not in data
    check_reads(trap)


_PIECES = st.sampled_from(
    [
        "audio",
        "video",
        "thumbnails",
        "videos",
        "state",
        "secret.mp4",
        "queue.db",
        "..",
        ".",
        "",
        "%2e",
        "%2E%2e",
        "%2f",
        "%2F",
        "%5c",
        "%00",
        "\\",
        "~",
        "x",
        f"{SHA_A}.mp4",
        f"{SHA_A}.png",
        f"{SHA_B}.png",
        f"{SHA_C}.mp4",
        f"{SHA_A.upper()}.mp4",
        f"{SHA_D}.mp4",
        f"{SHA_E}.mp4",
        "a" * 200,
        "é",
        ";",
        "?",
        "#",
        "%",
        "//",
        "http:",
        "*",
    ]
)
_METHODS = st.sampled_from(["GET", "HEAD", "POST", "get", "OPTIONS", "GET /", ""])
_EXTRA = st.sampled_from(
    ["", "Range: bytes=0-1\r\n", "Range: bytes=-5,0-0\r\n", "If-None-Match: *\r\n", "Content-Length: 3\r\n\r\nabc"]
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    method=_METHODS,
    pieces=st.lists(_PIECES, max_size=6),
    prefix=st.sampled_from(["/", "", "//", "http://h/", "/./"]),
    noise=st.text(max_size=30),
    extra=_EXTRA,
)
def test_fuzzed_requests_read_nothing_outside_the_allowed_set(
    trap: dict[str, object], method: str, pieces: list[str], prefix: str, noise: str, extra: str
) -> None:
    target = prefix + "/".join(pieces) + noise
    raw = f"{method} {target} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n{extra}\r\n".encode(errors="replace")
    data = exchange(trap["port"], raw)  # type: ignore[arg-type]
    assert CANARY not in data
    if data:
        status = int(data[9:12])
        assert status in (200, 206, 304, 400, 404, 405, 414, 416, 431, 505), data[:200]
        assert b"Traceback" not in data
        if status in (200, 206) and method == "GET":
            assert data.partition(b"\r\n\r\n")[2] in (LEGIT, LEGIT[:2], LEGIT[-5:]) or b"multipart" in data
    check_reads(trap)
