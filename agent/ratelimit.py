"""A token bucket shared by all upload threads, for slow VPN links (UPLOAD_BANDWIDTH_LIMIT)."""

from __future__ import annotations

import threading
import time

from .errors import Interrupted


class RateLimiter:
    def __init__(self, bytes_per_second: int, burst: int | None = None):
        self.rate = float(bytes_per_second)
        # One second of traffic as burst keeps the average honest without stalling each block.
        self.capacity = float(burst if burst is not None else bytes_per_second)
        self._tokens = self.capacity
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, nbytes: int, stop: threading.Event | None = None) -> float:
        """Block until `nbytes` may be sent; returns the seconds waited.

        A request larger than the bucket borrows against the future (the balance goes negative),
        so a block bigger than one second of bandwidth still goes out, and the next caller waits
        for the debt to be repaid.
        """
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            if stop is None:
                time.sleep(wait)
            elif stop.wait(wait):
                # A slow link can owe many seconds; Ctrl-C must not wait them out.
                raise Interrupted("stopping")
        return wait
