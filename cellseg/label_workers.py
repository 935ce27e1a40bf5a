"""Labelling and measuring finished images, in the writer thread or in worker processes.

The touching-cell split and the cell table are compiled (numba) and release the GIL, but the
numpy and Python around them and the writes still take it, so writer threads share the GIL with
the thread that feeds a GPU (docs/performance.md "GPU"). `LabelWorkers(n)` with n > 0 runs
labelling and measuring in n processes instead; with 0, where the cores run the model anyway,
in the calling thread. `warm_up` compiles the numba steps ahead of a run's first image.
`shared_label_workers(n)` is the one pool of n processes that every shard a process segments
uses: starting fresh interpreters costs seconds, more than a shard of 32 images takes on a GPU.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import cv2
import numpy as np

from cellseg.config import PredictConfig
from cellseg.measure import CELL_COLUMNS, cell_measurements
from cellseg.postprocess import CellMaps, cell_labels
from cellseg.source_record import with_area_um2
from cellseg.stats import image_statistics


@dataclass(frozen=True)
class Measured:
    """One image's cell labels, its statistics and, when asked for, its cell table (columns, rows)."""

    labels: np.ndarray
    statistics: dict[str, Any]
    cell_table: tuple[tuple[str, ...], np.ndarray] | None


def label_and_measure(maps: CellMaps, image: np.ndarray, config: PredictConfig, source: dict[str, Any]) -> Measured:
    """Cells apart, the image's statistics and the per-cell table, as `config` says."""
    labels = cell_labels(maps, config)
    statistics = image_statistics(image, labels)
    table = with_area_um2(CELL_COLUMNS, cell_measurements(labels, image), source) if config.measure_cells else None
    return Measured(labels, statistics, table)


def warm_up() -> None:
    """Compile the post-processing's numba steps for the common image types now, or load them from
    numba's cache: an image build runs this (infra/Dockerfile), so that its workers find them
    compiled instead of spending seconds on their first image."""
    rows, columns = np.mgrid[:40, :64]
    mask = ((rows - 20) ** 2 + (columns - 20) ** 2 < 150) | ((rows - 20) ** 2 + (columns - 42) ** 2 < 150)
    distance = np.maximum(0, 1 - np.minimum(np.hypot(rows - 20, columns - 20), np.hypot(rows - 20, columns - 42)) / 12)
    for maps in (CellMaps(mask.astype(np.float32)), CellMaps(mask.astype(np.float32), distance.astype(np.float32))):
        for image_type in (np.uint8, np.uint16, np.float32):
            label_and_measure(maps, mask.astype(image_type), PredictConfig(), {})


class LabelWorkerError(RuntimeError):
    """The worker process labelling an image stopped before it answered."""


class LabelWorkers:
    """`label_and_measure` in `processes` worker processes (started on first use, with a fresh
    interpreter each: the parent may hold a GPU and threads), or in the calling thread when 0.
    A worker that dies (killed for memory, say) fails the images it held with a LabelWorkerError;
    the next image starts a new pool."""

    def __init__(self, processes: int):
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> LabelWorkers:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def run(self, maps: CellMaps, image: np.ndarray, config: PredictConfig, source: dict[str, Any]) -> Measured:
        if not self.processes:
            return label_and_measure(maps, image, config, source)
        pool = self._started()
        try:
            return pool.submit(label_and_measure, maps, image, config, source).result()
        except BrokenProcessPool as error:
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            pool.shutdown(wait=False, cancel_futures=True)
            raise LabelWorkerError(
                "the worker process labelling it stopped before it answered (out of memory?); a rerun retries it"
            ) from error

    def _started(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"),
                                                 initializer=_one_thread_each)
            return self._pool


_shared: dict[int, LabelWorkers] = {}
_shared_lock = threading.Lock()


def shared_label_workers(processes: int) -> LabelWorkers:
    """This process's `LabelWorkers(processes)`, started on first use and kept for the next shard
    (a pool broken by a dying worker is replaced by its next image); its processes end with the
    interpreter."""
    with _shared_lock:
        if processes not in _shared:
            _shared[processes] = LabelWorkers(processes)
        return _shared[processes]


def _one_thread_each() -> None:
    """The processes are the parallelism: OpenCV's own threads in each would only contend. Ctrl-C
    is the parent's to handle: a terminal sends it to the whole process group, and a worker it
    interrupted answered its image with KeyboardInterrupt, or died idle and broke the pool, so that
    the images the parent was still writing were recorded as failed."""
    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
