"""Prompt, safe stops: SIGINT (Ctrl-C) and SIGTERM (`systemctl stop`) end a run within a second.

A KeyboardInterrupt is not enough. It lands in the main thread only, while the bytes move in
pool threads that may sit in a socket read (up to AZURE_NETWORK_TIMEOUT per try), in the SDK's
retry sleeps or in a container listing; unwinding then joins those threads (the pool's
shutdown, then the interpreter's exit, which joins every non-daemon thread), and a stop took
from seconds to minutes.

Instead the signal wakes a stopper thread through a pipe, written by the interpreter's C-level
handler (signal.set_wakeup_fd): that works while the main thread is stuck in a system call, and no
Python lock is taken in a signal handler, so none can deadlock on one the main thread holds.
The stopper sets the run's stop
events (no new file starts, rate-limit waits end, block uploads stop between blocks), gives work
in flight GRACE_S to reach a safe point, then takes the state database's lock (a transaction in
progress finishes, none starts after), records the files still `uploading` as interrupted
(pending, due at once), closes the database, flushes the logs, releases the queue lock and
leaves with os._exit(130 or 143), abandoning threads blocked in sockets. That is safe because
the agent is crash-safe: a SIGKILL at any point loses nothing (tests/faults/test_crash_points.py),
so an abandoned request costs at most sending it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

log = logging.getLogger(__name__)

# Time work in flight gets to finish on its own (a file between its last block and its state
# write): long enough for a local request, short enough that a stop stays well under a second.
GRACE_S = 0.5
# A transaction holds the state lock for milliseconds; this only bounds a stuck one (SQLite's
# busy wait). Leaving without the lock is still safe: SQLite rolls back an unfinished transaction.
STATE_LOCK_WAIT_S = 2.0
# If the stopper thread itself failed, the main thread leaves on its own after this long.
FALLBACK_EXIT_S = 10.0

_signum: int | None = None
_installed = False
_pipe: tuple[int, int] | None = None
_busy = 0
_busy_lock = threading.Lock()
_terminating = threading.Lock()
_stops: list[threading.Event] = []
_states: list[Any] = []
_locks: list[Any] = []
_closers: list[Callable[[], None]] = []
_on_exit: Callable[[int, str], None] | None = None


def install(on_exit: Callable[[int, str], None] | None = None) -> None:
    """Handle SIGINT and SIGTERM this way for the rest of the process (a run's command)."""
    global _installed, _pipe, _on_exit
    if _installed:
        return
    _on_exit = on_exit
    r, w = os.pipe()
    os.set_blocking(w, False)
    _pipe = (r, w)
    # Started now, not in the handler: starting a thread takes locks the main thread may hold
    # at the moment the signal arrives.
    threading.Thread(target=_stopper, name="stopper", daemon=True).start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _handler)
    # The interpreter writes each signal's number to this pipe from its C handler, whichever
    # thread the kernel delivered it to: one byte per signal, so a second one is seen too.
    signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    _installed = True


def requested() -> bool:
    """Whether a stop signal arrived."""
    return _signum is not None


def adopt(*, state: Any = None, lock: Any = None, stop: threading.Event | None = None) -> None:
    """Things a stop must take care of: the run's StateStore (its lock is taken and it is closed),
    its QueueLock (released), its stop event (set). Nothing to do where no handler is installed."""
    if not _installed:
        return
    if state is not None:
        _states.append(state)
    if lock is not None:
        _locks.append(lock)
    if stop is not None:
        _stops.append(stop)
        if requested():
            stop.set()


def on_stop(close: Callable[[], None]) -> Callable[[], None]:
    """Run `close` (a progress bar's) before leaving; returns a function that unregisters it."""
    if _installed:
        _closers.append(close)

    def forget() -> None:
        with contextlib.suppress(ValueError):
            _closers.remove(close)

    return forget


@contextlib.contextmanager
def busy() -> Iterator[None]:
    """Marks work a stop should give its grace to (a transfer, a restore); idle runs stop at once."""
    global _busy
    with _busy_lock:
        _busy += 1
    try:
        yield
    finally:
        with _busy_lock:
            _busy -= 1


def finish() -> NoReturn:
    """Called by the main thread at a point where it has nothing more to do after a stop: it
    waits there (holding nothing) while the stopper leaves the process."""
    deadline = time.monotonic() + FALLBACK_EXIT_S
    while time.monotonic() < deadline:
        time.sleep(0.05)
    _terminate()


def guarded(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args); after a stop signal, whether fn returned or raised, the process leaves with
    130 or 143 (and never through the interpreter's exit, which joins blocked threads)."""
    try:
        result = fn(*args)
    except BaseException:
        if requested():
            finish()
        raise
    if requested():
        finish()
    return result


def exit_code(signum: int) -> int:
    return 128 + signum


# ---- the signal side ----------------------------------------------------------------------


def _handler(signum: int, _frame: object) -> None:
    # Replaces the default action (KeyboardInterrupt, or death by SIGTERM); the stopper, woken
    # through the wakeup pipe, does the work.
    global _signum
    if _signum is None:
        _signum = signum


def _stopper() -> None:
    global _signum
    assert _pipe is not None
    r = _pipe[0]
    first = os.read(r, 1)  # PEP 475: retried on EINTR
    if _signum is None:
        _signum = first[0]
    for stop in list(_stops):
        stop.set()
    deadline = time.monotonic() + GRACE_S
    while _busy > 0:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([r], [], [], min(left, 0.01))
        if ready:
            break  # a second signal (an impatient Ctrl-C): no more grace
    _terminate()


def _terminate() -> NoReturn:
    if not _terminating.acquire(blocking=False):
        while True:  # the other thread is leaving the process
            time.sleep(1)
    signum = _signum if _signum is not None else signal.SIGTERM
    code = exit_code(signum)
    name = signal.Signals(signum).name
    try:
        for close in list(_closers):
            with contextlib.suppress(Exception):
                close()
        recorded = 0
        for state in _states:
            # Kept until os._exit: no transaction is cut, and no thread starts one afterwards.
            if not state._lock.acquire(timeout=STATE_LOCK_WAIT_S):
                log.warning("the state database stayed busy; leaving without recording the files in flight")
                continue
            with contextlib.suppress(Exception):
                for rec in state.in_state("uploading"):
                    state.defer(rec.blob_name, 0, f"interrupted by {name}; the next run resumes it")
                    recorded += 1
            with contextlib.suppress(Exception):
                state.close()
        log.warning(
            "interrupted by %s; %sthe next run continues where this one stopped",
            name,
            f"{recorded} file(s) in flight recorded as interrupted; " if recorded else "",
            extra={"fields": {"signal": name, "exit_code": code, "interrupted_files": recorded}},
        )
        if _on_exit is not None:
            with contextlib.suppress(Exception):
                _on_exit(code, name)
        with contextlib.suppress(Exception):
            from .notify import Notifier

            Notifier().stopping()
        for handler in logging.getLogger().handlers:
            with contextlib.suppress(Exception):
                handler.flush()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for lock in _locks:
            with contextlib.suppress(Exception):
                lock.release()
    finally:
        os._exit(code)
