"""Segment a list of image files into a results store: read, predict, measure, write, record failures.

This is the unit of work of one shard in the `segment-images` flow and of `cellseg predict`.
Reading runs on threads ahead of the model (`cellseg.read_ahead`), so I/O overlaps with compute,
and only a bounded number of images is held in memory at once. `segment_arrays` does the same to
images already in memory and hands the results back instead of storing them.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from pydantic import ValidationError

from cellseg import __version__
from cellseg.config import PredictConfig
from cellseg.formats import read_source
from cellseg.infer import MAX_CALL_PIXELS, Predictor, checked_images
from cellseg.io import StorageOptions
from cellseg.label_workers import LabelWorkers, Measured, label_and_measure, shared_label_workers
from cellseg.measure import INTEGER_COLUMNS
from cellseg.pairs import group_by_stem
from cellseg.plates import relative_source
from cellseg.postprocess import CellMaps
from cellseg.read_ahead import ReadAhead
from cellseg.redact import redact_text, redact_url
from cellseg.runtime import CoreShare, set_threads
from cellseg.source_record import cell_diameter_pixels
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError, StoreWriteError, unwritable, validate_image_id

logger = logging.getLogger(__name__)


@dataclass
class SegmentReport:
    """Outcome of one segmentation run or shard."""

    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)  # {image_id, source_url, warning} of done images
    seconds: float = 0.0
    pixels: int = 0
    # CPU seconds this process's threads spent per stage (CPU_STAGES): where an image's time goes,
    # over the `cpu_images` done images they were counted for (not those segmented block by block).
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    cpu_images: int = 0

    def summary(self) -> dict[str, Any]:
        return {
            "done": len(self.done),
            "skipped": len(self.skipped),
            "failed": len(self.failed),
            "warnings": len(self.warnings),
            "seconds": round(self.seconds, 2),
            "images_per_second": round(len(self.done) / self.seconds, 3) if self.seconds else None,
            "megapixels_per_second": round(self.pixels / 1e6 / self.seconds, 3) if self.seconds else None,
            "cpu_ms_per_image": cpu_ms_per_image(self.cpu_seconds, self.cpu_images),
        }

    def add_cpu(self, seconds: Mapping[str, float]) -> None:
        for stage, spent in seconds.items():
            self.cpu_seconds[stage] = self.cpu_seconds.get(stage, 0.0) + spent

    @classmethod
    def combined(cls, reports: Sequence[SegmentReport], seconds: float) -> SegmentReport:
        """One report of shards that ran side by side for `seconds` in all."""
        total = cls(seconds=seconds)
        for report in reports:
            total.done += report.done
            total.skipped += report.skipped
            total.failed += report.failed
            total.warnings += report.warnings
            total.pixels += report.pixels
            total.add_cpu(report.cpu_seconds)
            total.cpu_images += report.cpu_images
        return total


# The stages whose CPU time a run counts, in the threads that run them: decoding images (reader
# threads), the model (the calling thread: normalising, the forward pass, its maps), labelling
# and measuring cells (writer threads; in worker processes on CUDA, where only the wait is
# counted here) and writing results.
CPU_STAGES = ("read", "model", "labels", "write")

SourceRead = tuple[np.ndarray, list[str], dict[str, Any]]
"""An image read for segmenting: its pixels, its reader's warnings and its source record."""
ImageRead = tuple[str, str, np.ndarray, list[str], dict[str, Any]]
"""(image id, URL, *`SourceRead`)."""


def cpu_line(per_image: Mapping[str, float]) -> str:
    """`cpu_ms_per_image` for a log line: 'model 125 ms, labels 20 ms, write 9 ms, read 3 ms'."""
    return ", ".join(f"{stage} {per_image[stage]:.0f} ms" for stage in ("model", "labels", "write", "read")
                     if stage in per_image)


@contextmanager
def _counting_cpu(totals: dict[str, float], stage: str, lock: threading.Lock | None = None) -> Iterator[None]:
    """Add the CPU seconds this thread spends in the block to `totals[stage]` (under `lock` where
    other threads add to the same stage)."""
    started = time.thread_time()
    try:
        yield
    finally:
        spent = time.thread_time() - started
        with lock or nullcontext():
            totals[stage] = totals.get(stage, 0.0) + spent


def cpu_ms_per_image(cpu_seconds: Mapping[str, float], images: int) -> dict[str, float]:
    """CPU milliseconds per done image of each stage, in CPU_STAGES order ({} before any image)."""
    if not images:
        return {}
    return {stage: round(cpu_seconds.get(stage, 0.0) * 1e3 / images, 2) for stage in CPU_STAGES}


@dataclass(frozen=True)
class SegmentedImage:
    """One image's cells, as a store would hold them: `labels` (H, W) int32 (0 = background, 1..N
    one per cell), the image's `statistics` (the figures of its `ResultStore.statistics` row), the per-cell table
    `cells` (column name -> (N,) array, row i the cell labelled i + 1: `pandas.DataFrame(cells)`;
    empty when `PredictConfig.measure_cells` is off), the model's `maps` and their `warnings`."""

    labels: np.ndarray
    statistics: dict[str, Any]
    cells: dict[str, np.ndarray]
    maps: CellMaps
    warnings: tuple[str, ...] = ()

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool: the pixels of any cell."""
        return self.labels > 0


def segment_arrays(
    predictor: Predictor, images: Sequence[np.ndarray], cell_diameters: Sequence[float | None] | None = None,
) -> list[SegmentedImage]:
    """One `SegmentedImage` per raw (H, W) image, in order: the maps of `Predictor.cell_maps` (which
    refuses images that are not 2-D, are empty or hold NaN), labelled and measured as `cellseg
    predict` does with `predictor.config`; nothing is written."""
    images = checked_images(images)
    results = []
    for image, maps in zip(images, predictor.checked_cell_maps(images, cell_diameters), strict=True):
        measured = label_and_measure(maps, image, predictor.config, {})
        columns, rows = measured.cell_table if measured.cell_table is not None else ((), np.zeros((0, 0)))
        cells = {name: rows[:, index].astype(np.int64 if name in INTEGER_COLUMNS else np.float64)
                 for index, name in enumerate(columns)}
        results.append(SegmentedImage(measured.labels, measured.statistics, cells, maps, maps.warnings))
    return results


def pending_images(
    image_urls: Sequence[str], store: ResultStore, rejected: list[dict[str, str]] | None = None,
    on_record: Callable[[str], None] | None = None, model: Callable[[], Mapping[str, Any]] | None = None,
    root: str | None = None,
) -> tuple[list[tuple[str, str]], list[str]]:
    """Split image URLs into (id, url) still to segment and ids already done in `store`; `root`,
    the source folder they were listed under, gives images in its subfolders their ids (`images_by_id`).

    A file whose name cannot be an image id (say '..png'), or that shares its stem with another
    file (a.png and a.tif), has no place in the store: with a `rejected` list it is appended
    there as a failure naming the file and the run goes on; without one, StoreError is raised.
    With `model` (the run's `model_record`, asked for only when images are done), images done
    with another model or other result settings are named in a warning: they stay as they are.
    """
    by_id = images_by_id(image_urls, rejected, root)
    done = store.done_records(on_record, among=by_id.keys())  # the store's other images are not read
    todo = [(image_id, url) for image_id, url in sorted(by_id.items()) if image_id not in done]
    skipped = sorted(done.keys() & by_id.keys())
    if skipped and model is not None:
        _warn_of_other_results({image_id: done[image_id] for image_id in skipped}, model())
    return todo, skipped


def images_by_id(image_urls: Sequence[str], rejected: list[dict[str, str]] | None = None,
                 root: str | None = None) -> dict[str, str]:
    """The image URLs by the id each takes in a store: its stem (`cellseg.plates.image_id`), after
    the path of its subfolders of `root` (the source folder listed) joined with `_`. Files that
    cannot take one (an invalid id, or one shared with another file: a.png and a.tif, a_b/c.png and
    a/b_c.png) are appended to `rejected` as failures naming the file; without a `rejected` list,
    StoreError is raised for them."""
    problems: list[dict[str, str]] = []
    by_id: dict[str, str] = {}
    for image_id, urls in group_by_stem(image_urls, root).items():
        if len(urls) > 1:
            names = ", ".join(relative_source(url, root) for url in urls)
            problems += [{"image_id": image_id, "source_url": redact_url(url),
                          "error": f"files {names} share the image id {image_id!r}; rename all but one"} for url in urls]
            continue
        try:
            by_id[validate_image_id(image_id, urls[0])] = urls[0]
        except StoreError as error:
            problems.append({"image_id": image_id, "source_url": redact_url(urls[0]), "error": redact_text(str(error))})
    if problems and rejected is None:
        raise StoreError("; ".join(f"'{problem['source_url']}': {problem['error']}" for problem in problems))
    if rejected is not None:
        rejected.extend(problems)
    return by_id


def _warn_of_other_results(records: Mapping[str, Mapping[str, Any]], model: Mapping[str, Any]) -> None:
    """One warning naming how many skipped images were segmented with another model, or with the
    same model and other result settings (`PredictConfig.result_settings`): a store keeps one
    result per image, so a rerun with other choices leaves them as they were."""
    version, settings = _decided_by(model)
    others: Counter[str] = Counter()
    for record in records.values():
        earlier, earlier_settings = _decided_by(record.get("model") or {})
        if earlier != version:
            others[f"model {earlier}"] += 1
        elif earlier_settings != settings:
            others[f"model {earlier} with other settings"] += 1
    if others:
        logger.warning("%d of the images already done were segmented with %s, not as this run would: they are "
                       "skipped, as a store keeps one result per image; segment into a new store to compare or "
                       "replace them", others.total(),
                       ", ".join(f"{what} ({count})" for what, count in others.most_common()))


def _decided_by(model: Mapping[str, Any]) -> tuple[Any, Any]:
    """(model version, result settings) of a `model_record`; the settings of an older cellseg's
    record as they were when they do not validate any more."""
    settings = model.get("predict")
    with suppress(ValidationError):
        settings = PredictConfig.model_validate(settings).result_settings()
    return model.get("version"), settings


def model_record(predictor: Predictor, checkpoint_url: str) -> dict[str, Any]:
    """What the store records about the model and settings behind each result."""
    return {
        "version": predictor.model_version,
        "checkpoint": redact_url(checkpoint_url),
        "predict": predictor.config.model_dump(mode="json"),
        "model_config": predictor.checkpoint.model_config.model_dump(mode="json"),
        "cellseg_version": __version__,
    }


class StopFlag(Protocol):
    """What tells a loop to stop: a `threading.Event`, or a flag read from elsewhere (a run's
    `distributed.Event` on its Dask cluster, `cellseg.flows.dask_stop.ClusterStop`)."""

    def is_set(self) -> bool: ...


def segment_images(
    images: Sequence[tuple[str, str]],
    store: ResultStore,
    predictor: Predictor,
    model: dict[str, Any],
    storage_options: StorageOptions = None,
    on_image: Callable[[str], None] | None = None,
    cores: CoreShare | None = None,
    stop: StopFlag | None = None,
) -> SegmentReport:
    """Segment (id, url) pairs into `store`; an unreadable image is recorded as failed and skipped.
    The warnings of a done image (only page 0 of a multi-page file used, an image without
    contrast given no cells) are stored with its result and listed in the report.

    Three stages overlap: reader threads fetch and decode the next images (`ReadAhead`: two
    batches ahead, more while they hold little memory, each read given up after READ_TIMEOUT),
    the calling thread runs the model on the images of one `cell_maps` call
    (`Predictor.images_per_call`: one batch on CPU, several batches' worth of fewer than
    MAX_CALL_PIXELS on CUDA, so that images resampled to one shape share passes), and writer
    threads label cells, measure and write the images before (at most twice the batch size or
    the writer count held, or one call's worth), so memory is bounded by those and the
    read-ahead's byte limit, not by the number of images. With
    `Predictor.postprocess_workers` > 0 (on CUDA by default) as many worker processes label and
    measure for as many writer threads (`cellseg.label_workers`; one pool per process, kept for
    the next shard); with 0 (on CPU, where the cores run the model) one writer thread does it all.

    With `cores` and no thread count in the predictor's settings, the model's threads are this
    loop's share of the process's cores, taken again before each call (`CoreShare`). Once `stop` is
    set, no more images are predicted: those predicted are written and the report lists them.
    """
    report = SegmentReport()
    started = time.monotonic()
    # The predictor's torch threads, for this thread's passes: torch keeps a count per thread, and a
    # new thread (each run's shard threads) takes the process's count of the moment, which a cached
    # predictor's construction no longer decides once anything else in the process has set it.
    set_threads(predictor.config.threads)
    share: AbstractContextManager[Callable[[], int] | None] = (
        cores.taking_part() if cores is not None and predictor.config.threads is None else nullcontext(None))
    writers = max(1, predictor.postprocess_workers)
    ahead = 2 * max(predictor.batch_size, writers)
    writes: deque[Future[tuple[str, str, str | None, int, dict[str, float]]]] = deque()
    stopped: list[StoreWriteError] = []  # the store cannot be written: the run ends, nothing more is tried
    reading = threading.Lock()  # reader threads add their CPU time under it

    def settle(outcome: tuple[str, str, str | None, int, dict[str, float]]) -> None:
        image_id, url, error, pixels, cpu = outcome
        report.add_cpu(cpu)
        if error == NOT_WRITTEN:
            return
        if error == DONE_ELSEWHERE:
            report.skipped.append(image_id)
        elif error is None:
            report.done.append(image_id)
            report.cpu_images += 1
            report.pixels += pixels
        else:
            report.failed.append({"image_id": image_id, "source_url": redact_url(url), "error": error})
        if on_image:
            on_image(image_id)

    def warn(image_id: str, url: str, warnings: Sequence[str]) -> None:
        for warning in warnings:
            logger.warning("'%s': %s", redact_url(url), warning)
            report.warnings.append({"image_id": image_id, "source_url": redact_url(url), "warning": warning})

    def finish(image_id: str, url: str, image: np.ndarray | None, maps: CellMaps | None,
               error: str | None, notes: Sequence[str] = (), source: dict[str, Any] | None = None,
               ) -> tuple[str, str, str | None, int, dict[str, float]]:
        cpu: dict[str, float] = {}
        if stopped:
            return image_id, url, NOT_WRITTEN, 0, cpu
        try:
            if error is None and image is not None and maps is not None:
                warnings = [*notes, *maps.warnings]
                error = _write_result(store, predictor, model, image_id, url, image, maps, warnings, source or {},
                                      labelling, cpu)
                if error is None:
                    warn(image_id, url, warnings)
            if error == DONE_ELSEWHERE:
                logger.info("'%s' was finished by another run meanwhile; its result is kept", redact_url(url))
            elif error is not None:
                logger.warning("failed to segment '%s': %s", redact_url(url), error)
                _record_failure(store, image_id, url, error, model)
        except StoreWriteError as cannot_write:  # the image stays not done, so a rerun does it
            stopped.append(cannot_write)
            return image_id, url, NOT_WRITTEN, 0, cpu
        return image_id, url, error, 0 if image is None else image.size, cpu

    def read(url: str) -> SourceRead:
        with _counting_cpu(report.cpu_seconds, "read", reading):
            return _read(url, storage_options, predictor.config)

    labelling = shared_label_workers(predictor.postprocess_workers)
    with share as take_threads, ReadAhead(images, read, lambda result: result[0].nbytes, min_ahead=ahead) as reads, \
            ThreadPoolExecutor(max_workers=writers, thread_name_prefix="cellseg-write") as writer:

        def write(*outcome: Any) -> Future[tuple[str, str, str | None, int, dict[str, float]]]:
            # In this thread's context: what the writers log (a failed image, an image's warnings)
            # then reaches whatever log this thread's records go to, a flow run's included.
            return writer.submit(contextvars.copy_context().run, finish, *outcome)

        while not stopped and not (stop is not None and stop.is_set()):
            call, unreadable = take_call(reads, predictor)
            if not call and not unreadable:
                break
            if take_threads is not None:
                take_threads()
            for image_id, url, error in unreadable:
                writes.append(write(image_id, url, None, None, error))
            if call:
                with _counting_cpu(report.cpu_seconds, "model"):
                    outcomes = _predict_call(predictor, [image for _, _, image, _, _ in call],
                                             [source.get("cell_diameter") for *_, source in call])
                for (image_id, url, image, notes, source), (image_maps, failure) in zip(call, outcomes, strict=True):
                    writes.append(write(image_id, url, image, image_maps, failure, notes, source))
            while len(writes) > max(ahead, len(call)):  # a whole call may wait to be written (take_call bounds its pixels)
                settle(writes.popleft().result())
        while writes:
            settle(writes.popleft().result())
    report.seconds = time.monotonic() - started
    if stopped:
        raise StoppedWriting(stopped[0], len(report.done), len(images))
    return report


class StoppedWriting(StoreWriteError):
    """A run that stopped because its store cannot be written: the cause, and how many of its
    images it had written (the others are not done, so a rerun does them)."""

    def __init__(self, cause: StoreWriteError, written: int, images: int):
        super().__init__(f"{cause}; {written} of {images} images written before that, the others are not done: "
                         "once the store can be written, rerun to complete it")
        self.cause, self.written, self.images = cause, written, images

    def __reduce__(self) -> tuple[Any, ...]:  # raised in a Dask worker, it reaches the flow whole
        return (type(self), (self.cause, self.written, self.images))

    @classmethod
    def over_run(cls, stopped: Sequence[StoppedWriting], written_by_the_others: int, images: int) -> StoppedWriting:
        """One error for a run whose shards ran side by side, some of them `stopped`: the images
        written counted over the whole run, as one loop would have counted them."""
        return cls(stopped[0].cause, written_by_the_others + sum(error.written for error in stopped), images)


def take_call(
    reads: ReadAhead[SourceRead], predictor: Predictor
) -> tuple[list[ImageRead], list[tuple[str, str, str]]]:
    """The images of the next `cell_maps` call, read, and the (id, url, error) of those that could
    not be read: up to `predictor.images_per_call` items, taken a batch at a time while the
    images hold fewer than MAX_CALL_PIXELS."""
    read: list[ImageRead] = []
    unreadable: list[tuple[str, str, str]] = []
    pixels = 0
    while (room := predictor.images_per_call - len(read) - len(unreadable)) > 0 and pixels < MAX_CALL_PIXELS:
        taken = reads.take(min(predictor.batch_size, room))
        if not taken:
            break
        for image_id, url, result in taken:
            try:
                image, notes, source = result()
            except Exception as error:  # noqa: BLE001 - an unreadable image is recorded and the run goes on
                unreadable.append((image_id, url, _describe(error)))
                continue
            read.append((image_id, url, image, notes, source))
            pixels += image.size
    return read, unreadable


def _predict_call(
    predictor: Predictor, images: list[np.ndarray], diameters: list[float | None]
) -> list[tuple[CellMaps | None, str | None]]:
    """(maps, None) or (None, error) for each image of a call. When the call fails, its images
    are predicted one at a time, so that only an image that fails alone is recorded as failed; a
    call that ran out of device memory also halves the predictor's later batches."""
    try:
        # Their pixels were checked as they were read (`_read`: cellseg.io, cellseg.formats).
        return [(maps, None) for maps in predictor.checked_cell_maps(images, diameters)]
    except Exception as error:  # noqa: BLE001 - an image that fails is recorded as failed and the run goes on
        if len(images) == 1:
            return [(None, _describe(error))]
        if isinstance(error, torch.OutOfMemoryError):
            batch_size = predictor.batch_size
            predictor.batch_size = max(1, min(batch_size, len(images)) // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("a batch of up to %d images ran out of device memory; predicting these %d one at a time, "
                           "and batches of %d from now on", batch_size, len(images), predictor.batch_size)
        else:
            logger.warning("a call of %d images failed (%s); predicting them one at a time",
                           len(images), _describe(error))
        return [outcome for image, diameter in zip(images, diameters, strict=True)
                for outcome in _predict_call(predictor, [image], [diameter])]


def _read(url: str, storage_options: StorageOptions, config: PredictConfig) -> SourceRead:
    """One image, decoded as `config.selection` chooses, the warnings of its reader (passed back,
    as readers run in threads) and its source record (`cellseg.formats.read_source`), with the
    cell diameter in pixels when it is given in µm."""
    warnings: list[str] = []
    image, source = read_source(url, config.selection, storage_options, config.max_pixels, warnings)
    diameter = cell_diameter_pixels(config.cell_diameter_um, source, url)
    return image, warnings, source if diameter is None else {**source, "cell_diameter": diameter}


def _write_result(
    store: ResultStore, predictor: Predictor, model: dict[str, Any], image_id: str, url: str,
    image: np.ndarray, maps: CellMaps, warnings: Sequence[str] = (), source: dict[str, Any] | None = None,
    labelling: LabelWorkers | None = None, cpu: dict[str, float] | None = None,
) -> str | None:
    """Label, measure and store one image; returns an error description instead of raising. The
    CPU seconds this thread spent labelling and writing are added to `cpu` ("labels", "write").

    Two runs writing the same new image at once can still trip over each other's files (a
    chunk or metadata file replaced mid-write); such a write is tried once more, now over arrays
    that exist and are overwritten in place, unless the other run has finished the image.
    """
    config = predictor.config
    spent = cpu if cpu is not None else {}
    with _counting_cpu(spent, "labels"):
        try:
            measured = (labelling.run if labelling else label_and_measure)(maps, image, config, source or {})
        except Exception as error:  # noqa: BLE001 - a bad image is recorded as failed and the run goes on
            return _describe(error)
    with _counting_cpu(spent, "write"):
        return _store_result(store, config, model, image_id, url, image, maps, measured, warnings, source)


def _store_result(
    store: ResultStore, config: PredictConfig, model: dict[str, Any], image_id: str, url: str, image: np.ndarray,
    maps: CellMaps, measured: Measured, warnings: Sequence[str], source: dict[str, Any] | None,
) -> str | None:
    """`_write_result`'s write of a labelled and measured image: None, DONE_ELSEWHERE or an error."""
    labels, statistics, cell_table = measured.labels, measured.statistics, measured.cell_table
    for attempt in (1, 2):
        try:
            written = store.write_result(
                image_id, labels > 0, statistics, url, model,
                probabilities=maps.probability if config.save_probabilities else None, replace=False, cells=labels,
                cell_table=cell_table, image=image if config.store_image else None, scale=maps.scale,
                warnings=warnings, source=source or None,
            )
            return None if written else DONE_ELSEWHERE
        except (OSError, KeyError) as error:
            if cannot_write := unwritable(store.url, error):
                raise cannot_write from error
            if store.is_done(image_id):
                return DONE_ELSEWHERE
            if attempt == 2:
                return _describe(error)
        except Exception as error:  # noqa: BLE001 - a failed write is recorded and the run goes on
            return _describe(error)
    return None


DONE_ELSEWHERE = "done by another run"  # an outcome of _write_result that is not a failure
NOT_WRITTEN = "not written: the store cannot be written"  # an image left for the rerun, not a failure


def _record_failure(store: ResultStore, image_id: str, url: str, error: str, model: dict[str, Any]) -> None:
    """`ResultStore.record_failure`, raising StoreWriteError when the store cannot be written."""
    try:
        store.record_failure(image_id, url, error, model)
    except OSError as failed:
        if cannot_write := unwritable(store.url, failed):
            raise cannot_write from failed
        raise


def _describe(error: Exception) -> str:
    """An error as recorded and reported: its type and message, credentials masked."""
    return redact_text(f"{type(error).__name__}: {error}")
