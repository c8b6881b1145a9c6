"""Run a function over many items on a thread pool, in order, a bounded number ahead.

`ThreadPoolExecutor.map` submits every item at once: a future per file of a 100,000-file library
(verify), or every prefix's finished listing waiting its turn (inventory), held at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], ahead: int) -> Iterator[R]:
    """pool.map, in order, with at most `ahead` calls submitted but not yet taken."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()
