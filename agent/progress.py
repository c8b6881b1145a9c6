"""Progress of a long run (migrate, verify): a bar on a terminal, STATUS and journal lines under systemd.

A migration of a large library runs for hours, often from a shell over SSH, sometimes as a
transient unit (`systemd-run gighive-media migrate`). On a terminal the operator watches a bar;
otherwise the same figures go to sd_notify STATUS (`systemctl status`) and, every
`log_interval` seconds, to one journal line with structured fields.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import interrupts
from .notify import Notifier

log = logging.getLogger(__name__)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    def __init__(
        self,
        label: str,
        total_files: int,
        total_bytes: int,
        notifier: Notifier | None = None,
        stream: TextIO | None = None,
        interactive: bool | None = None,
        log_interval: float | None = None,
    ):
        self.label = label
        self.total_files = total_files
        self.total_bytes = total_bytes
        self.files = 0
        self.bytes = 0
        self.problems = 0
        self.notifier = notifier or Notifier()
        # GIGHIVE_MEDIA_PROGRESS_INTERVAL: seconds between journal progress lines (tests use less).
        if log_interval is None:
            try:
                log_interval = float(os.environ.get("GIGHIVE_MEDIA_PROGRESS_INTERVAL") or 30.0)
            except ValueError:
                log_interval = 30.0
        self.log_interval = log_interval
        self.started = time.monotonic()
        self._last_log = self.started
        self._last_status = 0.0
        self._lock = threading.Lock()
        stream = stream or sys.stderr
        if interactive is None:
            interactive = stream.isatty()
        self.bar = (
            tqdm(
                total=total_bytes,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                file=stream,
                dynamic_ncols=True,
                smoothing=0.05,
                postfix=self._postfix(),
            )
            if interactive
            else None
        )
        self._redirect = None
        if self.bar is not None:
            # Log lines would tear the bar apart: they go above it through tqdm, and only warnings
            # and errors do, since one INFO line per file would scroll the bar off any terminal.
            self._redirect = logging_redirect_tqdm()
            self._redirect.__enter__()
            for handler in logging.getLogger().handlers:
                handler.setLevel(max(handler.level, logging.WARNING))
        # A stop signal leaves the process without unwinding: the bar is finished first.
        self._forget_stop = interrupts.on_stop(self.close)

    def _postfix(self) -> str:
        text = f"{self.files}/{self.total_files} files"
        return text + (f", {self.problems} problems" if self.problems else "")

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.bytes / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float | None:
        rate = self.rate()
        if rate <= 0:
            return None
        return max(0.0, (self.total_bytes - self.bytes) / rate)

    def line(self) -> str:
        return (
            f"{self.label}: {self.files}/{self.total_files} files, {human_bytes(self.bytes)} of "
            f"{human_bytes(self.total_bytes)}, {human_bytes(self.rate())}/s, "
            f"ETA {human_duration(self.eta())}" + (f", {self.problems} problems" if self.problems else "")
        )

    def advance(self, files: int = 1, nbytes: int = 0, problems: int = 0) -> None:
        with self._lock:
            self.files += files
            self.bytes += nbytes
            self.problems += problems
            now = time.monotonic()
            if self.bar is not None:
                self.bar.update(nbytes)
                self.bar.set_postfix_str(self._postfix(), refresh=False)
            # One STATUS a second is plenty for `systemctl status`; a datagram per file of a
            # 100,000-file run would not be.
            if now - self._last_status >= 1.0:
                self._last_status = now
                self.notifier.status(self.line())
            if self.bar is None and now - self._last_log >= self.log_interval:
                self._last_log = now
                self._log()

    def _log(self) -> None:
        log.info(
            "%s",
            self.line(),
            extra={
                "fields": {
                    "progress_files": self.files,
                    "progress_files_total": self.total_files,
                    "progress_bytes": self.bytes,
                    "progress_bytes_total": self.total_bytes,
                }
            },
        )

    def close(self) -> None:
        self._forget_stop()
        with self._lock:
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            if self._redirect is not None:
                self._redirect.__exit__(None, None, None)
                self._redirect = None
            self.notifier.status(self.line())
