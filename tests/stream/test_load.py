"""200 concurrent streams: no errors, every body right, and the server's memory stays bounded
(one read buffer per Blob stream, nothing per local stream)."""

from __future__ import annotations

import hashlib
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.support.media import pseudo_random_bytes

from .conftest import MediaLibrary
from .support import connection

STREAMS = 200
STREAM_BYTES = 2 * 1024 * 1024
# Each client reads like a player (2 Mbit/s) for about 8 s, so all 200 streams are open at once.
CLIENT_RATE = 250_000
# The target for the whole process at 200 streams.
RSS_LIMIT_MIB = 100


def rss_mib(pid: int) -> float:
    m = re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(m.group(1)) / 1024 if m else 0.0


@pytest.mark.parametrize("where", ["blob", "local"])
def test_200_concurrent_streams_without_an_error_in_bounded_memory(
    start_server, fresh_library: MediaLibrary, where: str
) -> None:
    item = fresh_library.add(
        "big", pseudo_random_bytes(64 * 1024 * 1024, seed=31), local=where == "local", blob=where == "blob"
    )
    srv = start_server(fresh_library, LOG_LEVEL="info")
    rng = random.Random(5)
    offsets = [rng.randrange(0, item.size - STREAM_BYTES) for _ in range(STREAMS)]
    barrier = threading.Barrier(STREAMS)
    # Every stream has its answer before any reads on: all 200 are open at once, by construction,
    # however a loaded machine staggers the requests.
    all_open = threading.Barrier(STREAMS)
    open_streams = [0]
    peak = {"streams": 0, "rss": rss_mib(srv.proc.pid)}
    lock = threading.Lock()
    done = threading.Event()
    errors: list[str] = []

    def sample() -> None:
        while not done.is_set():
            peak["rss"] = max(peak["rss"], rss_mib(srv.proc.pid))
            time.sleep(0.05)

    def stream(offset: int) -> None:
        conn = connection(srv.tcp, timeout=120)
        try:
            barrier.wait(120)
            conn.request("GET", item.url, headers={"Range": f"bytes={offset}-{offset + STREAM_BYTES - 1}"})
            r = conn.getresponse()
            with lock:
                open_streams[0] += 1
                peak["streams"] = max(peak["streams"], open_streams[0])
            all_open.wait(300)
            h, got, t0 = hashlib.sha256(), 0, time.monotonic()
            while chunk := r.read(64 * 1024):
                h.update(chunk)
                got += len(chunk)
                ahead = got / CLIENT_RATE - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
            with lock:
                open_streams[0] -= 1
            want = hashlib.sha256(item.data[offset : offset + STREAM_BYTES]).hexdigest()
            if r.status != 206 or got != STREAM_BYTES or h.hexdigest() != want:
                errors.append(f"{offset}: status {r.status}, {got} bytes")
        except Exception as e:  # noqa: BLE001 - every failure is an error of this test
            errors.append(f"{offset}: {type(e).__name__}: {e}")
        finally:
            conn.close()

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    with ThreadPoolExecutor(STREAMS) as pool:
        list(pool.map(stream, offsets))
    done.set()
    sampler.join()
    assert errors == []
    assert peak["streams"] == STREAMS, "the streams were not all open at once"
    assert peak["rss"] < RSS_LIMIT_MIB, f"server RSS peaked at {peak['rss']:.1f} MiB"
    assert "ERROR" not in srv.log_text()
