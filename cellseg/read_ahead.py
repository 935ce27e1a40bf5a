"""Reading the next images while the model works on this one: in order, concurrently, bounded in
memory and in time.

`ReadAhead` hands out the results of `read(url)` in the order of its items. Each read runs on a
thread of its own, ahead of its use: always the next `min_ahead` items, and beyond them more, up
to `max_ahead`, while fewer than `threads` are running and the results read and not yet taken
hold less than `max_bytes`. So a fast consumer (a GPU) finds many images waiting on slow
storage, and memory stays bounded by max_bytes plus one result per read under way. A read that
fails is raised for its own item only; one not finished `timeout` seconds after it started is
given up as `ReadTimeout` (its thread is left to end on its own, holding nothing else up) and
the items after it are read as usual.
"""

from __future__ import annotations

import _thread
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial
from typing import Generic, TypeVar

Result = TypeVar("Result")

READ_THREADS = 4
MAX_AHEAD = 64  # items read ahead at most, whatever their size
MAX_AHEAD_BYTES = 256 * 2**20  # results read and not yet taken; past it only the next min_ahead items are read
READ_TIMEOUT = 600.0  # seconds one read may take once started (storage clients time out sooner)


class ReadTimeout(TimeoutError):
    """A read that did not finish in time; the message names the URL."""


@dataclass(frozen=True)
class _Read(Generic[Result]):
    """One read under way, on a thread of its own: its future and when it started."""

    image_id: str
    url: str
    future: Future[Result]
    started: float


class ReadAhead(Generic[Result]):
    """`read(url)` of (id, url) items, read ahead on threads and handed out in order by `take`."""

    def __init__(
        self, items: Iterable[tuple[str, str]], read: Callable[[str], Result], size: Callable[[Result], int],
        min_ahead: int = 2, max_ahead: int = MAX_AHEAD, max_bytes: int = MAX_AHEAD_BYTES,
        threads: int = READ_THREADS, timeout: float | None = None,
    ):
        self._items = iter(items)
        self._read, self._size = read, size
        self._timeout = READ_TIMEOUT if timeout is None else timeout
        self._min_ahead, self._max_ahead, self._max_bytes = min_ahead, max(min_ahead, max_ahead), max_bytes
        self._threads = threads
        self._ahead: deque[_Read[Result]] = deque()  # started, not taken, in item order
        self._fill()

    def __enter__(self) -> ReadAhead[Result]:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Start nothing more; reads under way end on their own, their results unused."""
        self._ahead.clear()
        self._items = iter(())

    def take(self, count: int) -> list[tuple[str, str, Callable[[], Result]]]:
        """The next `count` items (fewer at the end) as (id, url, result): `result()` waits for the
        read and returns its result or raises its error (ReadTimeout when it took too long)."""
        taken: list[tuple[str, str, Callable[[], Result]]] = []
        while len(taken) < count and (self._ahead or self._fill()):
            read = self._ahead.popleft()
            taken.append((read.image_id, read.url, partial(self._result, read)))
        self._fill()
        return taken

    def _result(self, read: _Read[Result]) -> Result:
        try:
            return read.future.result(timeout=max(0.0, read.started + self._timeout - time.monotonic()))
        except FutureTimeout:
            raise ReadTimeout(f"'{read.url}': reading took longer than {self._timeout:g} s; given up") from None

    def _fill(self) -> bool:
        """Start reads until the next min_ahead items are under way, then more while fewer than
        `threads` run and those done hold less than max_bytes; whether any item is under way."""
        while len(self._ahead) < self._max_ahead:
            if len(self._ahead) >= self._min_ahead:
                running = sum(not read.future.done() for read in self._ahead)
                held = sum(self._size(read.future.result()) for read in self._ahead
                           if read.future.done() and read.future.exception() is None)
                if running >= self._threads or held >= self._max_bytes:
                    break
            item = next(self._items, None)
            if item is None:
                break
            self._ahead.append(self._start(*item))
        return bool(self._ahead)

    def _start(self, image_id: str, url: str) -> _Read[Result]:
        future: Future[Result] = Future()

        def run() -> None:
            try:
                future.set_result(self._read(url))
            except BaseException as error:  # noqa: BLE001 - raised to the caller of result()
                future.set_exception(error)

        # A thread of its own, which the exit does not wait for: a read that hangs holds nothing else
        # up. Started without `threading.Thread.start`, which waits until the new thread has run:
        # 3-9 ms (median) while other threads hold the GIL, against 0.1 ms, and the caller is the
        # thread that feeds the model.
        _thread.start_new_thread(run, ())
        return _Read(image_id, url, future, time.monotonic())
