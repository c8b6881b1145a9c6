"""The queue lock: one agent process works on the queue at a time.

flock(2) on a file in the state directory: the kernel drops it when the holder dies, even by
SIGKILL, so a crashed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import LockBusy, StateError


class QueueLock:
    def __init__(self, state_dir: Path):
        self.path = state_dir / "queue.lock"
        self._fd: int | None = None

    def acquire(self, wait: bool = False) -> None:
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
        except OSError as e:
            raise StateError(f"cannot open lock file {self.path}: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise LockBusy(f"another gighive-media process holds {self.path}") from None
        # The holder's pid helps an operator who wonders who holds the queue; it is advisory.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> QueueLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
