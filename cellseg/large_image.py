"""An image too large to read whole, segmented block by block with a job's model and settings
(`LargeImage`): the steps of `cellseg.blocks`, each a task of the segment-images flow, or all of
them in this process."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from cellseg.blocks import BlockProgress, segment_blockwise
from cellseg.blocks_finish import finish_image
from cellseg.blocks_measure import measure_block
from cellseg.blocks_plan import ImageInUse, prepare_image
from cellseg.blocks_predict import predict_block
from cellseg.blocks_scratch import mark_stopped, start_over_after
from cellseg.blocks_source import opened, plane_opener
from cellseg.blocks_stitch import stitch_image
from cellseg.infer import Predictor
from cellseg.job_config import SegmentJob
from cellseg.jobs_plan import model_source
from cellseg.model_source import shared_predictor
from cellseg.redact import redact_text, redact_url
from cellseg.runtime import available_cores
from cellseg.segment import SegmentReport, model_record
from cellseg.store import ResultStore
from cellseg.store_checks import StoreWriteError

logger = logging.getLogger("cellseg.jobs")  # the jobs' one logger, whichever of their modules speaks


@dataclass(frozen=True)
class LargeImage:
    """One image segmented block by block (`cellseg.blocks`) with a job's model and settings: its
    steps, each a task of the segment-images flow, and `run`, all of them in this process."""

    job: SegmentJob
    image_id: str
    url: str

    def prepare(self) -> tuple[int, list[int]]:
        """Plan the blocks (or take up an earlier run's): (blocks, those still to predict)."""
        with opened(plane_opener(self.url, self.job.predict)) as source:
            return prepare_image(self._store(), self.image_id, self.url, source, self._predictor())

    def predict(self, index: int) -> str:
        with opened(plane_opener(self.url, self.job.predict)) as source:
            return predict_block(self._store(), self.image_id, index, source, self._predictor())

    def stitch(self) -> None:
        stitch_image(self._store(), self.image_id)

    def measure(self, index: int) -> str:
        with opened(plane_opener(self.url, self.job.predict)) as source:
            return measure_block(self._store(), self.image_id, index, source)

    def finish(self, started: float | None = None) -> SegmentReport:
        """The cell table, statistics, pyramid and done mark; the report of the image."""
        if self._store().is_done(self.image_id):  # finished by another run meanwhile
            return self._report({}, 0.0)
        record = finish_image(self._store(), self.image_id, self._model(), self.job.max_parallel_shards)
        return self._report(record, time.monotonic() - started if started is not None else 0.0)

    def run(self, workers: int = 1, on_block: BlockProgress | None = None) -> SegmentReport:
        """Every step, the blocks on `workers` threads, `on_block` told of each; a failure is
        recorded (the run goes on)."""
        started = time.monotonic()
        try:
            record = segment_blockwise(self._store(), self.image_id, self.url, plane_opener(self.url, self.job.predict),
                                       self._predictor(), self._model(), workers, on_block)
        except StoreWriteError:
            raise
        except Exception as error:  # noqa: BLE001 - a bad image is recorded as failed and the run goes on
            return self.fail(error, time.monotonic() - started)
        return self._report(record, record.get("seconds", 0.0))

    def start_over_after(self, error: BaseException) -> bool:
        """Whether `error` shows the image's block-wise scratch damaged, now removed: the steps
        start again from `prepare` (`blocks_scratch.start_over_after`)."""
        return start_over_after(self._store(), self.image_id, self.url, error)

    def fail(self, error: BaseException, seconds: float = 0.0) -> SegmentReport:
        """Record the image as failed (its blocks done so far are kept for the next run), after
        `seconds` spent on it."""
        if self._store().is_done(self.image_id):  # another run finished it meanwhile, and removed what this one used
            return SegmentReport(skipped=[self.image_id], seconds=seconds)
        described = redact_text(f"{type(error).__name__}: {error}")
        logger.warning("failed to segment '%s' block by block: %s", redact_url(self.url), described)
        if not isinstance(error, ImageInUse):  # another run's: it goes on
            mark_stopped(self._store(), self.image_id)
        self._store().record_failure(self.image_id, self.url, described, self._model())
        return SegmentReport(failed=[{"image_id": self.image_id, "source_url": redact_url(self.url), "error": described}],
                             seconds=seconds)

    def _report(self, record: dict[str, Any], seconds: float) -> SegmentReport:
        if not record:  # another run finished it meanwhile
            return SegmentReport(skipped=[self.image_id], seconds=seconds)
        shape = record["shape"]
        warnings = [{"image_id": self.image_id, "source_url": redact_url(self.url), "warning": warning}
                    for warning in record.get("warnings", [])]
        return SegmentReport(done=[self.image_id], warnings=warnings, seconds=seconds, pixels=int(shape[0] * shape[1]))

    def _store(self) -> ResultStore:
        return ResultStore.open(self.job.store_url)

    def _predictor(self) -> Predictor:
        return shared_predictor(model_source(self.job), self.job.predict)

    def _model(self) -> dict[str, Any]:
        return model_record(self._predictor(), model_source(self.job).location())


def with_block_threads(job: SegmentJob) -> SegmentJob:
    """The job for a large image's blocks, which run `max_parallel_shards` at a time on one machine:
    without a thread count of its own, each block's passes get an equal share of the cores, so the
    blocks never oversubscribe the CPU. On Dask the workers keep their own setting."""
    if job.predict.threads is not None or job.dask_address:
        return job
    threads = max(1, available_cores() // job.max_parallel_shards)
    return job.model_copy(update={"predict": job.predict.model_copy(update={"threads": threads})})
