import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from cellseg.waiting import WAKE_SECONDS, as_completed_awake


@pytest.fixture
def ctrl_c_raises_keyboard_interrupt():
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def _ctrl_c_taken_by_another_thread(after: float) -> threading.Thread:
    """A SIGINT that the kernel hands to a thread other than the main one, as it may a Ctrl-C to the
    process: the handler runs there, and the main thread, asleep, is not woken by it."""
    def take_it() -> None:
        time.sleep(after)
        signal.pthread_kill(threading.get_ident(), signal.SIGINT)

    taker = threading.Thread(target=take_it, daemon=True)
    taker.start()
    return taker


def test_futures_come_in_the_order_they_finish():
    gates = [threading.Event() for _ in range(3)]
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(gate.wait, 10) for gate in gates]
        order = []
        waits = as_completed_awake(futures)
        for index in (2, 0, 1):
            gates[index].set()
            order.append(next(waits))
        assert order == [futures[2], futures[0], futures[1]]
        assert list(waits) == []


def test_a_ctrl_c_another_thread_took_ends_the_wait_at_its_next_wake(ctrl_c_raises_keyboard_interrupt):
    """segment-images' main thread, waiting on its shards, once slept through Ctrl-C until a shard of
    1000 images had finished (concurrent.futures' and Prefect's as_completed wait without a timeout)."""
    release = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(release.wait, 30)
        taker = _ctrl_c_taken_by_another_thread(after=0.3)
        started = time.monotonic()
        try:
            with pytest.raises(KeyboardInterrupt):
                list(as_completed_awake([busy]))
        finally:
            release.set()
        assert time.monotonic() - started < 0.3 + WAKE_SECONDS + 2.0
        taker.join(5)
