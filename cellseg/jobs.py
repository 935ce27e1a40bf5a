"""The one recipe of each job. The jobs themselves (`TrainJob`, `SegmentJob`, `TuneJob`, from
`cellseg.job_config`) carry their configs whole and are importable from here too.

- `run_training(TrainJob, out_dir)`: pair -> split -> load once -> decide 'auto' fields -> train
  -> pixel and cell validation -> pictures and manifest.
- `run_segmentation(SegmentJob)`: pin the model -> list what is not done -> segment -> report.

The CLI, the Prefect flows, tuning trials, the bundled-model build and the benchmarks all call
these (the flows call their steps as tasks: `plan_segmentation`, `segment_shard`), so a setting
reaches every caller the same way: inside the job's configs, never as a re-listed parameter.

Their steps, a module each: `jobs_plan` (pin the model, plan the shards), `jobs_shards` (shards
side by side), `large_image` (an image block by block), `jobs_training` (with `jobs_checkpoint`,
what the trained checkpoint records for prediction) and `jobs_tune` (one trial of a search).
"""

from __future__ import annotations

from collections.abc import Callable

from cellseg.blocks import BlockProgress
from cellseg.formats import list_sources
from cellseg.job_config import SegmentJob, TrainJob, TuneJob, with_settings
from cellseg.jobs_plan import model_source, pin_model, plan_segmentation
from cellseg.jobs_shards import segment_shards
from cellseg.jobs_training import run_training
from cellseg.jobs_tune import run_trial
from cellseg.large_image import LargeImage, with_block_threads
from cellseg.model_source import shared_predictor
from cellseg.segment import SegmentReport
from cellseg.storage_errors import storage_call
from cellseg.store_checks import check_store_target

__all__ = ["SegmentJob", "TrainJob", "TuneJob", "run_segmentation", "run_training", "run_trial", "with_settings"]


def run_segmentation(
    job: SegmentJob,
    on_record: Callable[[str], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    on_image: Callable[[str], None] | None = None,
    on_block: BlockProgress | None = None,
) -> SegmentReport:
    """Segment every image under `job.source_url` that the store does not hold yet, in this process.
    The report lists what was done, skipped (done before) and failed (rejected files included).
    Progress: `on_record` per store record scanned, `on_plan` with the number of images to
    segment, `on_image` per image finished, `on_block` per block of a large image
    (`blocks.BlockProgress`)."""
    job = pin_model(job)
    # A missing source or a store target that would be refused fails in a second, before the model
    # takes seconds to load (not at all when there is nothing to segment); a bad model fails before
    # the store is touched.
    images = list_sources(job.source_url, job.predict.selection)
    with storage_call(job.store_url):  # a storage error names the store, as ResultStore.open's do
        check_store_target(job.store_url)
    if images:
        shared_predictor(model_source(job), job.predict)
    plan = plan_segmentation(job, on_record, images)
    if on_plan is not None:
        on_plan(plan.pending)
    report = segment_shards(job, plan.shards, on_image)
    for image_id, url in plan.large:
        large = LargeImage(with_block_threads(job), image_id, url).run(job.max_parallel_shards, on_block)
        report = SegmentReport.combined([report, large], report.seconds + large.seconds)
        if on_image is not None:
            on_image(image_id)
    report.skipped[:0] = plan.skipped
    report.failed[:0] = plan.rejected
    return report
