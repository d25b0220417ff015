"""Threads for a source's network work (header ranges, downloads) that never keep the
process from stopping: a signal in the waiting main thread leaves at once, without
joining the threads (still inside a request, or sleeping before a retry); the CLI then
exits with `os._exit`, which ends them. A `with ThreadPoolExecutor()` would wait for every
running request first, up to torchrun's SIGKILL 30 s later.

Example::

    headers = thread_map(fetch_header, shards, workers=8, name="distload-hub")
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["thread_map"]

A = TypeVar("A")
R = TypeVar("R")


def thread_map(fn: Callable[[A], R], items: Iterable[A], *, workers: int, name: str,
               cancel: threading.Event | None = None) -> list[R]:
    """``[fn(x) for x in items]`` on up to `workers` threads, in order; the first item's
    exception (in order) is raised once every call ended. An exception in the caller's
    thread while it waits (a signal) cancels what has not started, sets `cancel` (which
    `fn` may watch, to stop retrying and stay quiet) and returns at once."""
    items = list(items)
    pool = ThreadPoolExecutor(max(1, min(workers, len(items))), thread_name_prefix=name)
    try:
        results = list(pool.map(fn, items))
    except BaseException:
        if cancel is not None:
            cancel.set()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results
