"""Segment a list of image files into a results store: read, predict, measure, write, record failures.

This is the unit of work of one shard in the `segment-images` flow and of `cellseg predict`.
Reading runs in a small thread pool ahead of the model, so I/O overlaps with compute, and only a
bounded number of images is held in memory at once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellseg import __version__
from cellseg.data import index_by_stem
from cellseg.io import DEFAULT_MAX_PIXELS, StorageOptions, read_image
from cellseg.predict import Predictor, threshold_probabilities
from cellseg.stats import image_statistics, label_cells
from cellseg.store import ResultStore, validate_image_id

logger = logging.getLogger(__name__)


@dataclass
class SegmentReport:
    """Outcome of one segmentation run or shard."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    pixels: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "done": len(self.done),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "seconds": round(self.seconds, 2),
            "images_per_second": round(len(self.done) / self.seconds, 3) if self.seconds else None,
            "megapixels_per_second": round(self.pixels / 1e6 / self.seconds, 3) if self.seconds else None,
        }


def pending_images(image_urls: Sequence[str], store: ResultStore) -> tuple[list[tuple[str, str]], list[str]]:
    """Split image URLs into (id, url) still to segment and ids already done in `store`."""
    by_id = index_by_stem(image_urls, "image")
    for image_id, url in by_id.items():
        validate_image_id(image_id, url)
    done = store.done_ids()
    todo = [(image_id, url) for image_id, url in sorted(by_id.items()) if image_id not in done]
    return todo, sorted(done & by_id.keys())


def model_record(predictor: Predictor, checkpoint_url: str) -> dict[str, Any]:
    """What the store records about the model and settings behind each result."""
    return {
        "version": predictor.model_version,
        "checkpoint": checkpoint_url,
        "threshold": predictor.config.threshold,
        "min_cell_area": predictor.config.min_cell_area,
        "model_config": predictor.checkpoint.model_config.model_dump(mode="json"),
        "cellseg_version": __version__,
    }


def segment_images(
    images: Sequence[tuple[str, str]],
    store: ResultStore,
    predictor: Predictor,
    model: dict[str, Any],
    storage_options: StorageOptions = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    on_image: Callable[[str], None] | None = None,
) -> SegmentReport:
    """Segment (id, url) pairs into `store`; an unreadable image is recorded as failed and skipped."""
    report = SegmentReport()
    started = time.monotonic()
    batch_size = predictor.config.batch_size
    with ThreadPoolExecutor(max_workers=4) as pool:
        reads: deque[tuple[str, str, Future[np.ndarray]]] = deque()
        pending = iter(images)

        def refill() -> None:
            for image_id, url in pending:
                reads.append((image_id, url, pool.submit(read_image, url, storage_options, max_pixels)))
                if len(reads) >= 2 * batch_size:
                    return

        refill()
        while reads:
            batch = []
            while reads and len(batch) < batch_size:
                image_id, url, future = reads.popleft()
                try:
                    batch.append((image_id, url, future.result()))
                except Exception as error:
                    _record_failure(store, report, image_id, url, error, model)
                    if on_image:
                        on_image(image_id)
            refill()
            if batch:
                _segment_batch(batch, store, predictor, model, report, on_image)
    report.seconds = time.monotonic() - started
    return report


def _segment_batch(
    batch: list[tuple[str, str, np.ndarray]],
    store: ResultStore,
    predictor: Predictor,
    model: dict[str, Any],
    report: SegmentReport,
    on_image: Callable[[str], None] | None,
) -> None:
    try:
        probabilities = predictor.probabilities([image for _, _, image in batch])
    except Exception as error:
        for image_id, url, _ in batch:
            _record_failure(store, report, image_id, url, error, model)
        return
    for (image_id, url, image), probability in zip(batch, probabilities):
        try:
            labels, _ = label_cells(threshold_probabilities(probability, predictor.config.threshold),
                                    predictor.config.min_cell_area)
            statistics = image_statistics(image, labels)
            store.write_result(
                image_id,
                labels > 0,
                statistics,
                url,
                model,
                probability if predictor.config.save_probabilities else None,
            )
            report.done.append(image_id)
            report.pixels += image.size
        except Exception as error:
            _record_failure(store, report, image_id, url, error, model)
        if on_image:
            on_image(image_id)


def _record_failure(
    store: ResultStore, report: SegmentReport, image_id: str, url: str, error: Exception, model: dict[str, Any]
) -> None:
    message = f"{type(error).__name__}: {error}"
    logger.warning("failed to segment '%s': %s", url, message)
    report.failed.append({"image_id": image_id, "source_url": url, "error": message})
    store.record_failure(image_id, url, message, model)
