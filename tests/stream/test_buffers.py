"""The read buffers of Blob streams: small by default, a bounded number of large ones for fast
streams, and the socket room a fast one gets. Pure logic with a fake clock (and real sockets for
the room): nothing here depends on how fast the machine is."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.stream import handler
from agent.stream.handler import FAST_STREAM_AFTER_BYTES, FAST_STREAM_BYTES_PER_SECOND, BufferPool, StreamBuffer

SMALL, LARGE = 64 * 1024, 256 * 1024


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(handler.time, "monotonic", fake)
    return fake


def pools(limit: int = 2) -> tuple[BufferPool, BufferPool]:
    return BufferPool(SMALL, keep=8), BufferPool(LARGE, keep=limit, limit=limit)


def test_a_limited_pool_hands_out_at_most_its_limit_and_takes_them_back() -> None:
    pool = BufferPool(LARGE, keep=2, limit=2)
    a, b = pool.get(), pool.get()
    assert a is not None and b is not None
    assert pool.get() is None
    pool.put(a)
    again = pool.get()
    assert again is a


def test_a_fast_stream_moves_to_the_large_buffer(clock: Clock) -> None:
    small, large = pools()
    buf = StreamBuffer(small, large)
    assert len(buf.view) == SMALL
    clock.now += 0.01  # 1 MiB in 10 ms: far above any media bit rate
    assert buf.sent(FAST_STREAM_AFTER_BYTES), "it says when the stream became fast"
    assert len(buf.view) == LARGE
    clock.now += 0.01
    assert not buf.sent(FAST_STREAM_AFTER_BYTES), "and says it once"
    buf.close()
    # Both buffers are back in their pools for the next stream.
    assert small.get() is not None and large.get() is not None and large.get() is not None


def test_a_stream_at_a_players_pace_keeps_the_small_buffer(clock: Clock) -> None:
    small, large = pools()
    buf = StreamBuffer(small, large)
    for _ in range(40):
        clock.now += 1.0
        assert not buf.sent(1_000_000)  # 1 MB/s
    assert len(buf.view) == SMALL
    buf.close()
    assert large.get() is not None and large.get() is not None  # none was taken


def test_nothing_is_judged_before_the_first_mebibyte(clock: Clock) -> None:
    small, large = pools()
    buf = StreamBuffer(small, large)
    clock.now += 0.001
    buf.sent(FAST_STREAM_AFTER_BYTES - 1)
    assert len(buf.view) == SMALL
    buf.close()


def test_large_buffers_are_bounded_whatever_the_number_of_fast_streams(clock: Clock) -> None:
    small, large = pools(limit=2)
    streams = [StreamBuffer(small, large) for _ in range(5)]
    clock.now += 0.01
    became_fast = [s.sent(int(FAST_STREAM_BYTES_PER_SECOND * 0.01) + FAST_STREAM_AFTER_BYTES) for s in streams]
    assert sorted(len(s.view) for s in streams) == [SMALL, SMALL, SMALL, LARGE, LARGE]
    assert became_fast.count(True) == 2, "only a stream that got a large buffer counts as fast"
    for s in streams:
        s.close()


def test_without_a_large_pool_every_stream_stays_small(clock: Clock) -> None:
    small, _ = pools()
    buf = StreamBuffer(small, None)
    clock.now += 0.01
    buf.sent(10 * FAST_STREAM_AFTER_BYTES)
    assert len(buf.view) == SMALL
    buf.close()


class FakeReader:
    def __init__(self, data: bytes, offset: int, length: int):
        self.data, self.pos, self.end = data, offset, offset + length

    def readinto(self, view: memoryview) -> int:
        # Short reads of odd sizes, as a socket gives them.
        n = min(len(view), self.end - self.pos, 100_003)
        view[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n

    def close(self) -> None:
        pass


class FakeBlob:
    origin = "blob"
    sendfile_fd = None

    def __init__(self, data: bytes):
        self.data = data

    def reader(self, offset: int, length: int) -> FakeReader:
        return FakeReader(self.data, offset, length)


class FakeOut:
    def __init__(self) -> None:
        self.body = bytearray()
        self.head_sent = False

    def head(self, status: int, headers: list[tuple[str, str]], first_body: bytes = b"") -> None:
        self.head_sent = True
        self.body += first_body

        self.widened: list[int] = []
        self.narrowed = 0

    def send(self, data: bytes | memoryview) -> None:
        self.body += data

    def widen(self, size: int) -> None:
        self.widened.append(size)

    def narrow(self) -> None:
        self.narrowed += 1


@pytest.mark.parametrize("fast_streams", [0, 1])
def test_the_bytes_are_the_same_when_a_stream_changes_buffers_midway(clock: Clock, fast_streams: int) -> None:
    from agent.stream.handler import Handler, Stats
    from agent.stream.settings import StreamSettings

    data = bytes(range(256)) * (5 * 1024 * 1024 // 256 + 7)
    settings = StreamSettings(fast_streams=fast_streams)
    h = Handler(None, settings, None, Stats())  # type: ignore[arg-type]
    out = FakeOut()
    # The clock stands still: the stream is infinitely fast and moves to the large buffer at 1 MiB.
    parts = [(3, 2_000_000), (2_500_000, len(data) - 2)]
    h._send_body(out, FakeBlob(data), 206, [], parts, None)  # type: ignore[arg-type]
    assert bytes(out.body) == b"".join(data[a : b + 1] for a, b in parts)
    if fast_streams:
        assert h.fast_buffers is not None and h.fast_buffers._free, "the large buffer was used and given back"
        assert out.widened == [settings.fast_chunk_size], "the fast stream's socket got more room, once"
    else:
        assert h.fast_buffers is None
        assert out.widened == []
    assert out.narrowed == 1, "and the connection's next answer starts from the default"


def test_a_unix_socket_is_widened_for_a_fast_stream_and_narrowed_after() -> None:
    import socket

    from agent.stream.handler import Output, Stats
    from agent.stream.settings import StreamSettings

    ours, front = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, front:
        out = Output(ours, StreamSettings(), Stats())
        default = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        wanted = default  # getsockopt gave the doubled figure: this asks for twice the default
        out.widen(wanted)
        # Linux doubles the request, capped at net.core.wmem_max.
        cap = int(Path("/proc/sys/net/core/wmem_max").read_text())
        widened = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert widened == 2 * min(wanted, cap) and widened > default
        out.widen(4 * wanted)
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == widened, "widened once per answer"
        out.narrow()
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == default
        out.narrow()  # nothing to undo: harmless
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == default
        out.widen(default // 4)  # less than the default: never shrinks it
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == default
        out.narrow()
        assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == default


def test_a_tcp_connection_keeps_the_kernels_autotuned_buffer() -> None:
    import socket

    from agent.stream.handler import Output, Stats
    from agent.stream.settings import StreamSettings

    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()):
        ours, _ = listener.accept()
        with ours:
            out = Output(ours, StreamSettings(), Stats())
            before = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            out.widen(1024 * 1024)
            assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == before
            out.narrow()
            assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == before
