"""A segmentation job's shards segmented in this process: one (`segment_shard`, also a task of the
segment-images flow), or several side by side on threads (`segment_shards`), stopped together
after a failure or Ctrl-C."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager

from cellseg.job_config import SegmentJob
from cellseg.jobs_plan import Shard, model_source
from cellseg.model_source import shared_predictor
from cellseg.runtime import SHARD_CORES
from cellseg.segment import SegmentReport, StopFlag, StoppedWriting, model_record, segment_images
from cellseg.store import ResultStore


def segment_shard(job: SegmentJob, shard: Shard, on_image: Callable[[str], None] | None = None,
                  beside_others: bool = False, stop: StopFlag | None = None) -> SegmentReport:
    """Segment one shard into the store with the job's (pinned) model, loaded once per process.

    Images done meanwhile (by an earlier attempt, or another run on the same store) are skipped;
    bad images are recorded in the store and in the report, and the shard carries on.
    `beside_others`: the shard runs beside others in this process (a run's thread pool); without a
    thread count in the job, and off Dask (whose workers keep their own), it takes its share of
    the process's cores before each batch (`cellseg.runtime.CoreShare`). Once `stop` is set, the
    shard ends after writing the images it has predicted.
    """
    if stop is not None and stop.is_set():  # stopped before it started: no model to load
        return SegmentReport()
    predictor = shared_predictor(model_source(job), job.predict)
    store = ResultStore.open(job.store_url)
    done_before = store.done_among([image_id for image_id, _ in shard])
    remaining = [(image_id, url) for image_id, url in shard if image_id not in done_before]
    cores = SHARD_CORES if beside_others and job.dask_address is None else None
    report = segment_images(remaining, store, predictor, model_record(predictor, model_source(job).location()),
                            on_image=on_image, cores=cores, stop=stop)
    report.skipped[:0] = sorted(done_before)
    return report


_stop_events: dict[str, threading.Event] = {}


@contextmanager
def stopped_when_left_by_an_error(key: str) -> Iterator[None]:
    """Within the block, `stop_event(key)` is an event set if the block is left by an exception
    (Ctrl-C): work that runs in this process's threads under `key` (a flow run's shards) and
    passes it as `segment_shard`'s `stop` ends after writing what it has predicted.

    Left by an exception, the set event stays behind for `key` until `forget_stop_event(key)`,
    once that work has ended: a shard whose thread looks it up only after the block has ended (its
    task still starting when Ctrl-C came, on a loaded machine) then stops at once, instead of
    finding no event and segmenting its whole shard while the interrupted run waits for it."""
    stop = _stop_events[key] = threading.Event()
    try:
        yield
    except BaseException:
        stop.set()
        raise
    _stop_events.pop(key, None)


def stop_event(key: str) -> threading.Event | None:
    """The event of `stopped_when_left_by_an_error(key)` while its block runs in this process, or
    after an exception left it (set)."""
    return _stop_events.get(key)


def forget_stop_event(key: str) -> None:
    """Drop the set event an exception left for `key`, once nothing under `key` can look it up."""
    _stop_events.pop(key, None)


STOP_GRACE = 30.0  # seconds an interrupted run waits for the images its shards have predicted to be written


def segment_shards(job: SegmentJob, shards: Sequence[Shard], on_image: Callable[[str], None] | None = None,
                   ) -> SegmentReport:
    """Segment the shards in this process, `job.max_parallel_shards` at a time side by side, the
    cores split between those running (`segment_shard(beside_others=True)`), as segment-images runs
    them on its thread pool: two loops of one thread each keep two cores busier than one loop of
    two threads (docs/performance.md, "`cellseg predict`'s shards side by side"). `on_image` is
    called from one thread at a time.

    When a shard fails, the others stop once the images they have predicted are written, and its
    error is raised. A store that cannot be written (`StoppedWriting`) starts no more shards: those
    running stop at their own next write, if it fails too, and the error counts the images of the
    whole run. When the caller is interrupted (Ctrl-C), the shards stop as after a failure, and the
    interrupt is raised once they have, or after STOP_GRACE seconds: a shard waiting on a read
    that hangs is left behind (on a daemon thread), and an image it had not finished is redone by
    the next run."""
    if not any(shards):  # nothing to segment: no model to load
        return SegmentReport()
    if len(shards) <= 1 or job.max_parallel_shards == 1:
        return segment_shard(job, [pair for shard in shards for pair in shard], on_image)
    started = time.monotonic()
    stop, no_more = threading.Event(), threading.Event()  # stop the shards running / start no more of them
    calling, taking = threading.Lock(), threading.Lock()
    queued: deque[tuple[Shard, Future[SegmentReport]]] = deque((shard, Future()) for shard in shards)
    futures = [future for _, future in queued]

    def image_done(image_id: str) -> None:
        if on_image is not None:
            with calling:
                on_image(image_id)

    workers = min(job.max_parallel_shards, len(shards))
    ended = threading.Condition()
    running = [workers]  # shard threads not yet ended

    def run_shards() -> None:
        try:
            while True:
                with taking:
                    if stop.is_set() or no_more.is_set() or not queued:
                        return
                    shard, future = queued.popleft()
                try:
                    future.set_result(segment_shard(job, shard, image_done, beside_others=True, stop=stop))
                except BaseException as error:  # noqa: BLE001 - raised by the calling thread
                    (no_more if isinstance(error, StoppedWriting) else stop).set()
                    future.set_exception(error)
        finally:
            with ended:
                running[0] -= 1
                ended.notify_all()

    def all_ended(timeout: float) -> bool:
        with ended:
            return ended.wait_for(lambda: running[0] == 0, timeout)

    threads = [threading.Thread(target=run_shards, name=f"cellseg-shard-{index}", daemon=True)
               for index in range(workers)]
    for thread in threads:
        thread.start()
    try:
        # A thread ends when no shard is left or the run stops. Waited for in short waits, as the
        # calling thread takes Ctrl-C only between them; not by Thread.join, which Python 3.11 marks
        # as ended when Ctrl-C interrupts it, so that a second join returns at once.
        while not all_ended(0.2):
            pass
    except BaseException:
        stop.set()
        if all_ended(STOP_GRACE):
            for thread in threads:  # past their last line: so that the caller sees none of them alive
                thread.join(1.0)
        raise
    errors = [error for future in futures if future.done() and (error := future.exception()) is not None]
    if failed := next((error for error in errors if not isinstance(error, StoppedWriting)), None):
        raise failed
    if stopped_writing := [error for error in errors if isinstance(error, StoppedWriting)]:
        written = sum(len(future.result().done) for future in futures if future.done() and not future.exception())
        raise StoppedWriting.over_run(stopped_writing, written, sum(len(shard) for shard in shards))
    return SegmentReport.combined([future.result() for future in futures], time.monotonic() - started)
