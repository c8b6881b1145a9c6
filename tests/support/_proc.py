"""Child-process plumbing shared by the service wrappers."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1
try:
    # Loaded before any fork: dlopen in a forked child of a threaded process can deadlock.
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except (OSError, AttributeError):  # pragma: no cover - non-Linux
    _prctl = None

_live: set[subprocess.Popen] = set()
_live_lock = threading.Lock()


def _die_with_parent() -> None:
    # If pytest itself is SIGKILLed (CI timeout), no finalizer runs; the kernel then kills the service.
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a service with stdout+stderr appended to log_path (a file, so a chatty service can never
    block on a full pipe)."""
    # PDEATHSIG fires when the forking *thread* exits, so only arm it from the main thread.
    preexec = _die_with_parent if threading.current_thread() is threading.main_thread() else None
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=preexec,  # only prctl(), see _die_with_parent
            close_fds=True,
        )
    with _live_lock:
        _live.add(proc)
    return proc


def terminate(proc: subprocess.Popen | None, timeout: float = 20.0) -> None:
    """SIGTERM, then SIGKILL if the process does not exit within timeout."""
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill(proc)
    _forget(proc)


def kill(proc: subprocess.Popen | None) -> None:
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    _forget(proc)


def _forget(proc: subprocess.Popen) -> None:
    with _live_lock:
        _live.discard(proc)


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        procs = list(_live)
    for p in procs:
        kill(p)


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago. Callers must cope with losing the race (retry on EADDRINUSE)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def tail(path: Path, start: int = 0, limit: int = 8000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return "<no log file>"
    text = data.decode("utf-8", "replace")
    return text if len(text) <= limit else "...\n" + text[-limit:]


def log_size(path: Path) -> int:
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0
