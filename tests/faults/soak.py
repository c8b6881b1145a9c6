"""Many concurrent range readers against a running stream server, verifying every byte.

Shared by tests/faults/test_stream_abuse.py (about a minute in CI) and bench/stream_soak.py
(several minutes, for figures). Each client is a player that seeks: it keeps one keep-alive
connection, asks for a random range of a random file in one of the Range shapes browsers send,
and compares what it gets with the file's bytes. A failed request is counted and the client
reconnects, so one failure never hides the ones after it.
"""

from __future__ import annotations

import collections
import http.client
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tests.stream.support import Address, connection

from .stream_fixtures import proc_status

# A seek reads at most this much before the next seek, so ranges of every size are exercised
# while the whole run stays within what two CPUs can move.
MAX_RANGE = 2 * 1024 * 1024


@dataclass
class SoakItem:
    url: str
    data: bytes
    origin: str  # "local" or "blob": figures are reported per origin


@dataclass
class SoakResult:
    clients: int
    seconds: float
    requests: int = 0
    bytes: int = 0
    statuses: collections.Counter = field(default_factory=collections.Counter)
    per_origin: collections.Counter = field(default_factory=collections.Counter)
    errors: list[str] = field(default_factory=list)
    rss_start_mib: float = 0.0
    rss_peak_mib: float = 0.0  # sampled VmRSS
    hwm_mib: float = 0.0  # kernel high-water mark at the end
    rss_first_half_peak_mib: float = 0.0
    rss_second_half_peak_mib: float = 0.0
    threads_peak: int = 0
    concurrent_peak: int = 0  # requests in flight at once, as the clients saw it

    def summary(self) -> dict[str, object]:
        return {
            "clients": self.clients,
            "seconds": round(self.seconds, 1),
            "requests": self.requests,
            "bytes": self.bytes,
            "statuses": dict(self.statuses),
            "per_origin": dict(self.per_origin),
            "errors": len(self.errors),
            "first_errors": self.errors[:10],
            "rss_start_mib": round(self.rss_start_mib, 1),
            "rss_peak_mib": round(self.rss_peak_mib, 1),
            "hwm_mib": round(self.hwm_mib, 1),
            "rss_first_half_peak_mib": round(self.rss_first_half_peak_mib, 1),
            "rss_second_half_peak_mib": round(self.rss_second_half_peak_mib, 1),
            "threads_peak": self.threads_peak,
            "concurrent_peak": self.concurrent_peak,
        }


def range_header(rng: random.Random, size: int) -> tuple[str, int, int]:
    """A Range value in one of the shapes players send, and the bytes [first, last] it selects."""
    length = rng.randint(1, min(MAX_RANGE, size))
    shape = rng.random()
    if shape < 0.1:  # suffix: the end of the file (moov atom at the end)
        return f"bytes=-{length}", size - length, size - 1
    if shape < 0.2 and size - MAX_RANGE > 0:  # open-ended, close to the end so it stays small
        first = rng.randrange(size - MAX_RANGE, size)
        return f"bytes={first}-", first, size - 1
    if shape < 0.25:  # Safari's probe
        return "bytes=0-1", 0, min(1, size - 1)
    first = rng.randrange(0, size - length + 1)
    return f"bytes={first}-{first + length - 1}", first, first + length - 1


def run_soak(
    pid: int,
    addr: Address,
    items: Sequence[SoakItem],
    clients: int = 200,
    seconds: float = 60.0,
    seed: int = 1,
) -> SoakResult:
    result = SoakResult(clients=clients, seconds=seconds)
    lock = threading.Lock()
    start = proc_status(pid)
    result.rss_start_mib = start["VmRSS"] / 1024
    barrier = threading.Barrier(clients + 1)
    in_flight = [0]
    t_start = [0.0]
    stop = threading.Event()

    def client(index: int) -> None:
        rng = random.Random(seed * 100_003 + index)
        conn: http.client.HTTPConnection | None = None
        barrier.wait(120)
        while time.monotonic() < t_start[0] + seconds:
            item = rng.choice(items)
            value, first, last = range_header(rng, len(item.data))
            status = "exception"
            try:
                if conn is None:
                    conn = connection(addr, timeout=120)
                with lock:
                    in_flight[0] += 1
                    result.concurrent_peak = max(result.concurrent_peak, in_flight[0])
                try:
                    conn.request("GET", item.url, headers={"Range": value})
                    r = conn.getresponse()
                    body = r.read()
                finally:
                    with lock:
                        in_flight[0] -= 1
                status = str(r.status)
                want = item.data[first : last + 1]
                problem = None
                if r.status != 206:
                    problem = f"status {r.status}"
                elif r.getheader("Content-Range") != f"bytes {first}-{last}/{len(item.data)}":
                    problem = f"Content-Range {r.getheader('Content-Range')}"
                elif body != want:
                    problem = f"{len(body)} bytes, {'wrong bytes' if len(body) == len(want) else 'short'}"
                if problem:
                    raise AssertionError(problem)
                with lock:
                    result.requests += 1
                    result.bytes += len(body)
                    result.statuses[status] += 1
                    result.per_origin[item.origin] += 1
            except Exception as e:  # noqa: BLE001 - every failure is a finding of the run
                with lock:
                    result.requests += 1
                    result.statuses[status] += 1
                    result.errors.append(f"{item.origin} {item.url[:20]} {value}: {type(e).__name__}: {e}")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def sample() -> None:
        while not stop.is_set():
            try:
                st = proc_status(pid)
            except FileNotFoundError:
                with lock:
                    result.errors.append("the server process is gone")
                return
            rss = st["VmRSS"] / 1024
            with lock:
                result.rss_peak_mib = max(result.rss_peak_mib, rss)
                result.threads_peak = max(result.threads_peak, st["Threads"])
                if t_start[0] and time.monotonic() < t_start[0] + seconds / 2:
                    result.rss_first_half_peak_mib = max(result.rss_first_half_peak_mib, rss)
                elif t_start[0]:
                    result.rss_second_half_peak_mib = max(result.rss_second_half_peak_mib, rss)
            stop.wait(0.1)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t_start[0] = time.monotonic()
    barrier.wait(120)
    for t in threads:
        # Generous: a client's last request may start just before the deadline.
        t.join(seconds + 600)
    stop.set()
    sampler.join(10)
    result.seconds = time.monotonic() - t_start[0]
    result.hwm_mib = proc_status(pid)["VmHWM"] / 1024
    return result
