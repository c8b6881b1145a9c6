"""Opening what a command needs (state, blob store, DB pointer) from a validated Config."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from . import interrupts
from .config import Config
from .errors import LockBusy
from .lock import QueueLock
from .notify import Notifier
from .pointer import PointerDB
from .state import StateStore
from .storage.azure_blob import AzureBlobStore
from .worker import Worker

log = logging.getLogger(__name__)


@contextmanager
def queue_worker(config: Config, wait_for_lock: bool) -> Iterator[Worker]:
    """The queue lock, the repaired state and a Worker, for commands that change the queue."""
    lock = QueueLock(config.state_dir)
    if wait_for_lock:
        try:
            lock.acquire(wait=False)
        except LockBusy:
            log.info("another gighive-media run holds the queue; waiting for it to finish")
            lock.acquire(wait=True)
    else:
        lock.acquire(wait=False)
    state = None
    pointer_db = None
    try:
        state = StateStore.open(config.state_dir)
        repaired = state.recover_interrupted()
        if repaired:
            log.warning("%d file(s) were left mid-upload by an interrupted run; queued again", repaired)
        pointer_db = PointerDB(config.mysql) if config.mysql else None
        store = AzureBlobStore(config)
        worker = Worker(config, state, store, pointer_db, Notifier())
        interrupts.adopt(state=state, lock=lock, stop=worker.stop)
        worker.recover()
        yield worker
    finally:
        if pointer_db is not None:
            pointer_db.close()
        if state is not None:
            state.close()
        lock.release()
