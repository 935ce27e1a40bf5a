"""GPU work holds a slot of the Prefect global concurrency limit `gpu` when that limit exists."""

from __future__ import annotations

import threading
import time
from itertools import pairwise

import pytest

from cellseg.flows._common import GPU_LIMIT, gpu_slot

pytestmark = pytest.mark.integration


def _hold_slots(workers: int, on_gpu: bool, seconds: float = 1.0) -> list[tuple[float, float]]:
    """Start `workers` threads that each hold gpu_slot(on_gpu) for `seconds`; their (start, end) times."""
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()

    def work() -> None:
        with gpu_slot(on_gpu):
            started = time.monotonic()
            time.sleep(seconds)
            with lock:
                intervals.append((started, time.monotonic()))

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return sorted(intervals)


def _overlap(intervals: list[tuple[float, float]]) -> bool:
    return any(later[0] < earlier[1] for earlier, later in pairwise(intervals))


def test_gpu_work_waits_for_a_free_slot_of_the_gpu_limit(prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with get_client(sync_client=True) as client:
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=GPU_LIMIT, limit=1))
        try:
            intervals = _hold_slots(workers=2, on_gpu=True)
            assert len(intervals) == 2 and not _overlap(intervals)  # one GPU slot: one at a time
            assert _overlap(_hold_slots(workers=2, on_gpu=False))  # CPU work never waits for it
        finally:
            client.delete_global_concurrency_limit_by_name(GPU_LIMIT)


def test_without_the_limit_gpu_work_does_not_wait(prefect_harness):
    intervals = _hold_slots(workers=2, on_gpu=True)
    assert len(intervals) == 2 and _overlap(intervals)
