"""The first steps of a segmentation job: the model it names, pinned (`pin_model`), and the plan
(`plan_segmentation`): the images not yet done, in even shards, and those to segment block by block."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from cellseg.blocks import blockwise_shape
from cellseg.formats import list_sources
from cellseg.job_config import SegmentJob
from cellseg.model_source import ModelSource, shared_predictor
from cellseg.segment import images_by_id, model_record, pending_images
from cellseg.storage_errors import storage_call
from cellseg.store import ResultStore
from cellseg.store_checks import DONE, FAILED, NoStore, check_store_creatable, check_store_target, invalid_image_id

Shard = list[tuple[str, str]]


def model_source(job: SegmentJob) -> ModelSource:
    """The model a segmentation job names: its checkpoint file, else its registry version."""
    return ModelSource(job.registry_url, job.model_version, job.checkpoint_url)


@dataclass
class SegmentPlan:
    """The images of a source not yet done in the store, in shards, and those too large to read
    whole (`large`, segmented block by block: `LargeImage`); and those already done or unusable."""

    shards: list[Shard]
    skipped: list[str]
    rejected: list[dict[str, str]]
    large: Shard = field(default_factory=list)

    @property
    def pending(self) -> int:
        return sum(len(shard) for shard in self.shards) + len(self.large)


def pin_model(job: SegmentJob) -> SegmentJob:
    """The job with its model version fixed ('current' resolved now), so that every shard uses
    one model even if another is promoted mid-run; a missing model fails here, before any work."""
    pinned = model_source(job).pinned()
    return job if pinned.version == job.model_version else job.model_copy(update={"model_version": pinned.version})


def plan_segmentation(job: SegmentJob, on_record: Callable[[str], None] | None = None,
                      images: list[str] | None = None) -> SegmentPlan:
    """Images under `job.source_url` (or `images`, listed from it already) that the store does not
    hold yet, in shards of at most `job.shard_size` (`even_shards`), each with its id (an image in a
    subfolder of the source has their path in it: `segment.images_by_id`). Files that cannot be images of
    the store (clashing or invalid ids) are listed as rejected; files that share an image id are
    recorded failed under it."""
    # First: a source that cannot be read leaves no new store behind. OME-Zarr folders, plate fields
    # and, with --t all, time points are listed as images of their own (cellseg.formats).
    if images is None:
        images = list_sources(job.source_url, job.predict.selection)
    if not images:  # nothing to segment (a misspelt folder, a day without images) makes no store,
        with storage_call(job.store_url):  # but one that could not be written is refused all the same
            check_store_target(job.store_url)
            try:
                ResultStore.open(job.store_url, mode="r+")  # an existing one: checked as a run opens it
            except NoStore:
                check_store_creatable(job.store_url)
        return SegmentPlan([], [], [], [])
    store = ResultStore.open(job.store_url)
    rejected: list[dict[str, str]] = []

    def model() -> dict[str, Any]:
        return model_record(shared_predictor(model_source(job), job.predict), model_source(job).location())

    todo, skipped = pending_images(images, store, rejected, on_record=on_record, model=model, root=job.source_url)
    recorded: set[str] = set()
    for problem in rejected:
        image_id = problem["image_id"]
        if image_id not in recorded and not invalid_image_id(image_id):  # an invalid id has no place: listed only
            store.record_failure(image_id, problem["source_url"], problem["error"], model())
            recorded.add(image_id)
    large = large_images(todo, job)
    todo = [pair for pair in todo if pair not in large]
    return SegmentPlan(even_shards(todo, job.shard_size, job.max_parallel_shards), skipped, rejected, large)


@dataclass(frozen=True)
class SegmentPreview:
    """What a segmentation job would do, found without loading its model or writing anything: the
    images it would segment (of them, `retried`: failed in an earlier run; `blockwise`: read block
    by block), those already done and skipped, and the files it would reject."""

    model: str  # in words (`ModelSource.described`)
    found: int  # images listed under the source
    store_exists: bool
    to_segment: list[str]
    retried: list[str]
    blockwise: list[str]
    skipped: list[str]
    rejected: list[dict[str, str]]
    shards: int


def preview_segmentation(job: SegmentJob) -> SegmentPreview:
    """The plan of `job` as `plan_segmentation` would make it, read only: the model is found (not
    loaded), the source listed, the store read or, when there is none yet, its place checked."""
    model = model_source(job).pinned()  # a missing model fails here, as it would fail the run
    images = list_sources(job.source_url, job.predict.selection)
    try:
        store: ResultStore | None = ResultStore.open(job.store_url, mode="r")
    except NoStore:
        with storage_call(job.store_url):  # as the run checks it: unreachable, denied, timed out in one line
            check_store_target(job.store_url)
            check_store_creatable(job.store_url)  # a folder that cannot be made, a bucket that does not exist
        store = None
    rejected: list[dict[str, str]] = []
    by_id = images_by_id(images, rejected, job.source_url)
    statuses = {image_id: record.get("status") for image_id, record in store.records(among=by_id)} if store else {}
    todo = [(image_id, url) for image_id, url in sorted(by_id.items()) if statuses.get(image_id) != DONE]
    large = {image_id for image_id, _ in large_images(todo, job)}
    return SegmentPreview(
        model=model.described(), found=len(images), store_exists=store is not None,
        to_segment=[image_id for image_id, _ in todo],
        retried=[image_id for image_id, _ in todo if statuses.get(image_id) == FAILED],
        blockwise=sorted(large), skipped=sorted(image_id for image_id in by_id if statuses.get(image_id) == DONE),
        rejected=rejected, shards=len(even_shards([pair for pair in todo if pair[0] not in large], job.shard_size,
                                                  job.max_parallel_shards)))


def even_shards(images: Shard, shard_size: int, parallel: int) -> list[Shard]:
    """`images` in order, cut into shards of at most `shard_size` that differ by one image at
    most, as many as a multiple of `parallel` where there are enough images: 200 images in shards
    of 32 on two workers make eight shards of 25, not six of 32 and a last one of 8 that would run
    alone while the other worker waited."""
    if not images:
        return []
    count = -(-len(images) // shard_size)
    count = min(len(images), -(-count // parallel) * parallel)
    size, extra = divmod(len(images), count)
    bounds = [index * size + min(index, extra) for index in range(count + 1)]
    return [images[start:end] for start, end in itertools.pairwise(bounds)]


HEADER_READERS = 16  # image headers read at once when looking for images to segment block by block


def large_images(images: Shard, job: SegmentJob) -> Shard:
    """The images to segment block by block (`blocks.blockwise_shape`: read region by region, above
    `predict.blocks.above_pixels`); only TIFF and microscopy formats have their header read."""
    with ThreadPoolExecutor(max_workers=HEADER_READERS) as pool:
        shapes = list(pool.map(lambda pair: blockwise_shape(pair[1], job.predict), images))
    return [pair for pair, shape in zip(images, shapes, strict=True) if shape is not None]
