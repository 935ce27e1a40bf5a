"""Waits in the calling thread that a Ctrl-C still ends.

The kernel hands a process's SIGINT to any of its threads that does not block it; CPython runs the
handler (KeyboardInterrupt) only in the main thread, and a main thread asleep on a lock without a
timeout only learns of a signal another thread took when something wakes it. segment-images'
main thread, waiting for its shards, once slept through Ctrl-C until a shard of 1000 images had
finished (the other, told nothing, had too). These waits wake every WAKE_SECONDS.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, TypeVar

WAKE_SECONDS = 0.25


class _Waitable(Protocol):
    def add_done_callback(self, fn: Callable[..., object], /) -> None: ...


Future = TypeVar("Future", bound=_Waitable)


def as_completed_awake(futures: Sequence[Future]) -> Iterator[Future]:
    """The futures (concurrent.futures', Prefect's, or any with `add_done_callback(fn)`, which
    calls `fn(future)`) in the order they finish, as `concurrent.futures.as_completed` gives them,
    with the calling thread woken every WAKE_SECONDS to take a signal."""
    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(finished.put)
    for _ in range(len(futures)):
        while True:
            try:
                yield finished.get(timeout=WAKE_SECONDS)
                break
            except queue.Empty:
                continue
