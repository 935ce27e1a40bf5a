"""The one recipe of each job. The jobs themselves (`TrainJob`, `SegmentJob`, `TuneJob`, from
`cellseg.job_config`) carry their configs whole and are importable from here too.

- `run_training(TrainJob, out_dir)`: pair -> split -> load once -> decide 'auto' fields -> train
  -> pixel and cell validation -> pictures and manifest.
- `run_segmentation(SegmentJob)`: pin the model -> list what is not done -> segment -> report.

The CLI, the Prefect flows, tuning trials, the bundled-model build and the benchmarks all call
these (the flows call their steps as tasks: `plan_segmentation`, `segment_shard`), so a setting
reaches every caller the same way: inside the job's configs, never as a re-listed parameter.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellseg.blocks import BlockProgress, blockwise_shape, segment_blockwise
from cellseg.blocks_finish import finish_image
from cellseg.blocks_measure import measure_block
from cellseg.blocks_plan import ImageInUse, prepare_image
from cellseg.blocks_predict import predict_block
from cellseg.blocks_scratch import mark_stopped, start_over_after
from cellseg.blocks_source import opened, plane_opener
from cellseg.blocks_stitch import stitch_image
from cellseg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellseg.config import PredictConfig
from cellseg.dataset_errors import DatasetError
from cellseg.evaluate import choose_postprocessing, validation_cell_scores
from cellseg.formats import list_sources
from cellseg.infer import Predictor
from cellseg.io import IMAGE_SUFFIXES, MICROSCOPY_FILE_SUFFIXES
from cellseg.job_config import SegmentJob, TrainJob, TuneJob, with_settings
from cellseg.loaded_pairs import LoadedPair, load_pairs, manifest_hash
from cellseg.model_source import ModelSource, shared_predictor
from cellseg.pairs import ImagePair, pair_images_and_masks, split_train_val
from cellseg.redact import redact_text, redact_url
from cellseg.report import CURVES_FILE, GALLERY_FILE, training_pictures
from cellseg.runtime import SHARD_CORES, available_cores, resolve_device, set_threads
from cellseg.segment import SegmentReport, StoppedWriting, model_record, pending_images, segment_images
from cellseg.size_model import (
    MAGNIFICATIONS,
    MIN_EXAMPLES,
    SizeModel,
    batched_network_features,
    fit_size_model,
    magnified_examples,
    network_features,
    size_estimates,
    size_examples,
)
from cellseg.starting_point import Start, choose_start
from cellseg.storage_errors import storage_call
from cellseg.store import ResultStore
from cellseg.store_checks import StoreWriteError, check_store_target, invalid_image_id
from cellseg.train import BEST_CHECKPOINT, HISTORY_FILE, LAST_CHECKPOINT, STOP_FILE, TrainResult, train
from cellseg.tune import Trial, TrialResult

__all__ = ["SegmentJob", "TrainJob", "TuneJob", "run_segmentation", "run_training", "run_trial", "with_settings"]

logger = logging.getLogger(__name__)

Shard = list[tuple[str, str]]


# Training ----------------------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    """How a training run ended: the loop's result, the validation cell scores of its best
    checkpoint (instance label masks only), the pictures it drew and the dataset it saw."""

    result: TrainResult
    dataset_hash: str
    train_images: int
    val_images: int
    cells: dict[str, Any] = field(default_factory=dict)
    pictures: list[str] = field(default_factory=list)
    start: Start | None = None

    @property
    def best_checkpoint(self) -> Path:
        return self.result.best_checkpoint

    @property
    def best_metrics(self) -> dict[str, float]:
        return self.result.best_metrics

    @property
    def history_path(self) -> Path:
        return self.result.history_path

    @property
    def validation(self) -> dict[str, float]:
        """The best checkpoint's validation metrics on whole images, without the `val_` prefix."""
        return {key.removeprefix("val_"): value for key, value in self.best_metrics.items() if key.startswith("val_")}

    def summary(self) -> dict[str, Any]:
        """Plain data for reports and flow results."""
        return {
            "best_checkpoint": str(self.best_checkpoint),
            "history_path": str(self.history_path),
            "best_epoch": self.result.best_epoch,
            "best_described": self.result.best_described,
            "start_metrics": self.result.start_metrics,
            "epochs_run": len(self.result.history),
            "stop_reason": self.result.stop_reason,
            "dataset_hash": self.dataset_hash,
            "metrics": self.validation | {f"cells_{name}": value for name, value in self.cells.items()},
            "pictures": self.pictures,
            "start": self.start.summary() if self.start else None,
        }


def run_training(
    job: TrainJob,
    out_dir: str | Path,
    pairs: Sequence[ImagePair] | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    overwrite: bool = False,
) -> TrainOutcome:
    """Train a model as `job` says into `out_dir` (best.pt, last.pt, history.json, manifest.json,
    split.json and the pictures), on `pairs` or else the pairs found at the job's URLs. A run
    already in `out_dir` is continued with `resume`, replaced with `overwrite`, else refused
    (`check_run_dir`).

    Fine-tuning (`training.init_from`; 'auto' is decided by `cellseg.starting_point.choose_start`,
    logged as "start: ..." and recorded in the outcome's `start`) takes the model config of that checkpoint. The split is deterministic (`training.seed`), every image is decoded and
    normalised once, the best checkpoint gets what prediction needs beyond its weights
    (`finish_checkpoint`), and it is scored on the validation images at cell level (with instance
    label masks) exactly as `cellseg predict` would segment them with `job.predict`.
    """
    out = check_run_dir(out_dir, resume, overwrite)
    if overwrite and not resume and (stop := out / STOP_FILE).is_file():
        stop.unlink()  # it asked the replaced run to stop: left there, it would end the new one before epoch 1
        logger.info("removed %s, which the run being replaced left", stop)
    if pairs is None:
        pairs = pair_images_and_masks(job.images_url, job.masks_url)
    model_config, training = job.model, job.training
    train_pairs, val_pairs = split_train_val(pairs, training.val_fraction, training.seed)
    start = choose_start(job, len(pairs), val_pairs, out, resume)
    logger.info("start: %s", start.described())
    training = training.model_copy(update={"init_from": start.checkpoint})
    if training.init_from:
        model_config = load_checkpoint(training.init_from).model_config
    logger.info("loading %d image/mask pairs", len(pairs))
    loaded_train = load_pairs(train_pairs, model_config.normalization)
    loaded_val = load_pairs(val_pairs, model_config.normalization)
    labelled = sum(pair.instances is not None for pair in loaded_train + loaded_val)
    kinds = {"instance label images (one value per cell)": labelled, "binary masks": len(pairs) - labelled}
    logger.info("masks read as %s", " and ".join(f"{count} {kind}" for kind, count in kinds.items() if count))
    if not any(pair.mask.any() for pair in loaded_train):
        raise DatasetError(f"none of the {len(loaded_train)} training masks (under "
                           f"'{redact_url(job.masks_url)}') has a cell pixel: there is nothing to "
                           "learn; masks mark cells with any value above 0 on a 0 background")
    if resume:
        check_resumed_dataset(out, manifest_hash(loaded_train + loaded_val))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(f"cannot create the training folder '{out}' ({error.strerror or error})") from error
    dataset_hash = _write_manifest(out, loaded_train, loaded_val)
    result = train(loaded_train, loaded_val, out, model_config, training, dataset_hash, resume=resume, on_epoch=on_epoch)
    checkpoint = finish_checkpoint(str(result.best_checkpoint), job, loaded_train, loaded_val, training.init_from)
    predictor = Predictor(checkpoint, job.predict.model_copy(update={"device": training.device}))
    cells = validation_cell_scores(predictor, loaded_val)
    pictures = training_pictures(out, result.history, loaded_val, predictor, start=result.start_metrics,
                                 best_epoch=result.best_epoch)
    return TrainOutcome(result, dataset_hash, len(loaded_train), len(loaded_val), cells, pictures, start)


class RunFolderError(ValueError):
    """A training folder that cannot be used as asked; the message names it and what is there."""


RUN_FILES = (BEST_CHECKPOINT, LAST_CHECKPOINT, HISTORY_FILE)  # what makes a folder hold a training run


def check_run_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """`out_dir` as a Path if a training run may write there: not a file; with `resume`, a run to
    continue; without it, no run that the new one would replace unless `overwrite` says so. The
    old run's files are then replaced as the new run writes its own, never deleted up front."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"training folder '{out}' is an existing file, not a folder")
    if images := sorted(path.name for path in out.glob("*") if path.suffix.lower() in IMAGE_SUFFIXES + MICROSCOPY_FILE_SUFFIXES
                        and path.name not in (CURVES_FILE, GALLERY_FILE) and path.is_file()):
        raise RunFolderError(f"training folder '{out}' holds images ({', '.join(images[:3])}"
                             f"{', …' if len(images) > 3 else ''}): a run's pictures would go among them, and be "
                             "read as images by a later run on that folder; choose another folder")
    present = [name for name in RUN_FILES if (out / name).is_file()]
    if resume and LAST_CHECKPOINT not in present:
        raise RunFolderError(f"nothing to resume in '{out}': it holds no {LAST_CHECKPOINT}"
                             + ("; start afresh there with --overwrite" if present else ""))
    if present and not (resume or overwrite):
        try:
            count = len(json.loads((out / HISTORY_FILE).read_text()))
            epochs = f", {count} epoch{'s' if count != 1 else ''} of history"
        except (OSError, ValueError, TypeError):
            epochs = ""
        resumable = "continue it (--resume), " if LAST_CHECKPOINT in present else ""  # stopped before its first epoch ended
        raise RunFolderError(f"'{out}' already holds a training run ({', '.join(present)}{epochs}) that a new run "
                             f"would replace; {resumable}replace it (--overwrite) or choose another folder")
    return out


def check_resumed_dataset(out: Path, dataset_hash: str) -> None:
    """Refuse to resume the run in `out` on other images or masks than it began with: its epochs,
    split and best score would mix two datasets, and its manifest.json would be replaced."""
    recorded = load_checkpoint(str(out / LAST_CHECKPOINT)).dataset_manifest_hash
    if recorded is not None and recorded != dataset_hash:
        raise RunFolderError(f"'{out / LAST_CHECKPOINT}' was trained on dataset {recorded[:12]} (its manifest.json), "
                             f"but these images and masks are dataset {dataset_hash[:12]}: resume with the ones the "
                             "run began with, or start afresh (--overwrite, or another folder)")


def finish_checkpoint(
    checkpoint_url: str, job: TrainJob, train_pairs: Sequence[LoadedPair], val_pairs: Sequence[LoadedPair],
    start_checkpoint: str | None = None,
) -> Checkpoint:
    """Record in the trained checkpoint what prediction needs beyond the weights, and return it:

    - for a model at a cell size, its size model (`cellseg.size_model`): fitted on the training
      images shown at random magnifications or, for a model fine-tuned from `start_checkpoint`,
      that model's own size model where it reads the validation images' cell sizes better, or
      where there are no validation images to tell (a few images fit a poor one: `choose_size_model`);
    - whether `predict` separates touching cells by default, its probability threshold and, for a
      model with a distance map, how prominent a centre must be (`choose_postprocessing` on the
      validation images, unless `job.predict` says them; without validation images, the starting
      model's choice).
    """
    checkpoint = load_checkpoint(checkpoint_url)
    start = load_checkpoint(start_checkpoint) if start_checkpoint else None
    device = resolve_device(job.training.device)
    if checkpoint.model_config.cell_diameter is not None:
        model = checkpoint.inference_model(device)
        candidates: dict[str, dict[str, Any]] = {}
        examples = size_examples(train_pairs, network_features(model, device, job.training.amp), job.training.seed)
        images = len(examples[1]) // MAGNIFICATIONS
        # The starting model's comes first: chosen on ties and when no validation images can tell.
        if start is not None and start.size_model is not None and start.model_config == checkpoint.model_config:
            candidates["the starting model's"] = start.size_model
        if len(examples[1]) >= MIN_EXAMPLES:
            candidates[f"the one fitted on {images} training images"] = fit_size_model(*examples, seed=job.training.seed).to_dict()
        if not candidates:
            logger.warning("%d training images with cells are too few for a size model: the cell size of each "
                           "image will be measured by first passes", images)
        else:
            checkpoint.size_model = choose_size_model(
                candidates, batched_network_features(model, device, job.training.amp),
                float(checkpoint.model_config.cell_diameter), val_pairs, job.training.seed)
    decide_postprocessing(checkpoint, job.predict, val_pairs, job.training.device, start)
    save_checkpoint(checkpoint, checkpoint_url)
    return checkpoint


def choose_size_model(
    candidates: dict[str, dict[str, Any]], features: Callable[[Sequence[np.ndarray]], np.ndarray],
    model_diameter: float, val_pairs: Sequence[LoadedPair], seed: int,
) -> dict[str, Any]:
    """Of the named size models, the one that reads the validation images' median cell size
    best from the network's `features` (each image at one random magnification drawn from
    `seed`; most within 25%, then the lowest median error, the first on ties), logged with how
    each did; the first without validation images."""
    held_out = list(magnified_examples(val_pairs, seed + 1, magnifications=1))
    if not held_out:
        name = next(iter(candidates))
        logger.info("size model: %s (no validation images to compare %s on)", name,
                    "it" if len(candidates) == 1 else "the candidates")
        return candidates[name]
    scores = {}
    for name, size_model in candidates.items():
        estimate = size_estimates(SizeModel.from_dict(size_model), features, model_diameter)
        errors = np.abs([estimate([image])[0] / np.exp(target) - 1 for image, target in held_out])
        scores[name] = (float(np.mean(errors <= 0.25)), -float(np.median(errors)))
    chosen = max(scores, key=lambda name: scores[name])

    def scored(name: str) -> str:
        within, error = scores[name]
        return f"{name}: validation images' cell size within 25% on {100 * within:.0f}%, median error {-100 * error:.0f}%"

    logger.info("size model, %s", "; not ".join(scored(name) for name in sorted(scores, key=lambda name: name != chosen)))
    return candidates[chosen]


def decide_postprocessing(
    checkpoint: Checkpoint, given: PredictConfig, val_pairs: Sequence[LoadedPair], device: str,
    start: Checkpoint | None = None,
) -> None:
    """Set `checkpoint`'s default split, threshold and centre prominence: as `given` states them,
    the ones it leaves undecided chosen on the validation images (`choose_postprocessing`), or
    without validation images kept from the `start` model it was fine-tuned from."""
    if not val_pairs:
        given = _undecided_kept_from(given, start)
    if given.split_touching is not None and given.threshold is not None and given.centre_prominence is not None:
        checkpoint.split_touching, checkpoint.threshold = given.split_touching, given.threshold
        checkpoint.centre_prominence = given.centre_prominence
        return
    predictor = Predictor(checkpoint, given.model_copy(update={"device": device}))
    choice, scores = choose_postprocessing(predictor, val_pairs, given)
    checkpoint.split_touching, checkpoint.threshold, checkpoint.centre_prominence = choice
    if scores:
        split, threshold, prominence = choice
        # the measure `choose_postprocessing` chose by: cell F1 with instance labels, else the adapted Rand error
        measure = "f1_mean" if any(pair.instances is not None for pair in val_pairs) else "adapted_rand_error_mean"
        logger.info("post-processing: touching cells %s, threshold %g, centre prominence %g (validation %s %.4f)",
                    "split" if split else "kept whole", threshold, prominence, measure, scores[choice][measure])



def _undecided_kept_from(given: PredictConfig, start: Checkpoint | None) -> PredictConfig:
    """`given` with the post-processing it leaves undecided taken from the `start` model, logged;
    without one, unchanged (`choose_postprocessing` then keeps the defaults)."""
    undecided = [name for name in ("split_touching", "threshold", "centre_prominence") if getattr(given, name) is None]
    if not undecided:
        return given
    if start is None:
        logger.info("post-processing: no validation images to choose it on, so the defaults are kept")
        return given
    kept = {name: getattr(start, name) for name in undecided}
    logger.info("post-processing: no validation images to choose it on, so the starting model's is kept (%s)",
                ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in kept.items()))
    return given.model_copy(update=kept)


def _write_manifest(out: Path, loaded_train: list[LoadedPair], loaded_val: list[LoadedPair]) -> str:
    """manifest.json (the pairs' files and checksums) and split.json into `out`; returns the dataset hash."""
    dataset_hash = manifest_hash(loaded_train + loaded_val)
    entries = [pair.manifest_entry() for pair in loaded_train + loaded_val]
    (out / "manifest.json").write_text(json.dumps({"hash": dataset_hash, "entries": entries}, indent=1))
    split = {"train": [pair.id for pair in loaded_train], "val": [pair.id for pair in loaded_val]}
    (out / "split.json").write_text(json.dumps(split, indent=1))
    return dataset_hash


def run_trial(job: TuneJob, trial: Trial, out_dir: str | Path, pairs: Sequence[ImagePair] | None = None,
              threads: int | None = None) -> TrialResult:
    """Train one trial of a search (`run_training` with the trial's configs) into `out_dir`. A
    trial that raises is reported as failed with its error, so one bad point does not end the search."""
    set_threads(threads)
    started = time.monotonic()
    try:
        outcome = run_training(job.trial_job(trial), out_dir, pairs)
    except Exception as error:  # noqa: BLE001 - reported in the trial table; the search goes on
        described = redact_text(f"{type(error).__name__}: {error}")  # shown in the trial table and artifacts
        logger.warning("trial %d %s failed: %s", trial.number, trial.params, described)
        return TrialResult(number=trial.number, params=trial.params, status="failed", error=described)
    result = outcome.result
    return TrialResult(
        number=trial.number,
        params=trial.params,
        status="done",
        val_dice=result.best_metrics.get("val_dice"),
        metrics={k: v for k, v in result.best_metrics.items() if k.startswith("val_")},
        best_epoch=result.best_epoch,
        epochs_run=len(result.history),
        stop_reason=result.stop_reason,
        seconds=round(time.monotonic() - started, 1),
        checkpoint=str(result.best_checkpoint),
    )


# Segmentation ------------------------------------------------------------------------------------


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
    hold yet, in shards of at most `job.shard_size` (`even_shards`). Files that cannot be images of
    the store (clashing or invalid ids) are listed as rejected; files that share an image id are
    recorded failed under it."""
    # First: a source that cannot be read leaves no new store behind. OME-Zarr folders, plate fields
    # and, with --t all, time points are listed as images of their own (cellseg.formats).
    if images is None:
        images = list_sources(job.source_url, job.predict.selection)
    store = ResultStore.open(job.store_url)
    rejected: list[dict[str, str]] = []

    def model() -> dict[str, Any]:
        return model_record(shared_predictor(model_source(job), job.predict), model_source(job).location())

    todo, skipped = pending_images(images, store, rejected, on_record=on_record, model=model)
    recorded: set[str] = set()
    for problem in rejected:
        image_id = problem["image_id"]
        if image_id not in recorded and not invalid_image_id(image_id):  # an invalid id has no place: listed only
            store.record_failure(image_id, problem["source_url"], problem["error"], model())
            recorded.add(image_id)
    large = large_images(todo, job)
    todo = [pair for pair in todo if pair not in large]
    return SegmentPlan(even_shards(todo, job.shard_size, job.max_parallel_shards), skipped, rejected, large)


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


def segment_shard(job: SegmentJob, shard: Shard, on_image: Callable[[str], None] | None = None,
                  beside_others: bool = False, stop: threading.Event | None = None) -> SegmentReport:
    """Segment one shard into the store with the job's (pinned) model, loaded once per process.

    Images done meanwhile (by an earlier attempt, or another run on the same store) are skipped;
    bad images are recorded in the store and in the report, and the shard carries on.
    `beside_others`: the shard runs beside others in this process (a run's thread pool); without a
    thread count in the job, and off Dask (whose workers keep their own), it takes its share of
    the process's cores before each batch (`cellseg.runtime.CoreShare`). Once `stop` is set, the
    shard ends after writing the images it has predicted.
    """
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
    passes it as `segment_shard`'s `stop` ends after writing what it has predicted."""
    stop = _stop_events[key] = threading.Event()
    try:
        yield
    except BaseException:
        stop.set()
        raise
    finally:
        _stop_events.pop(key, None)


def stop_event(key: str) -> threading.Event | None:
    """The event of `stopped_when_left_by_an_error(key)` while its block runs in this process."""
    return _stop_events.get(key)


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

    for index in range(workers):
        threading.Thread(target=run_shards, name=f"cellseg-shard-{index}", daemon=True).start()
    try:
        # A thread ends when no shard is left or the run stops. Waited for in short waits, as the
        # calling thread takes Ctrl-C only between them; not by Thread.join, which Python 3.11 marks
        # as ended when Ctrl-C interrupts it, so that a second join returns at once.
        while not all_ended(0.2):
            pass
    except BaseException:
        stop.set()
        all_ended(STOP_GRACE)
        raise
    errors = [error for future in futures if future.done() and (error := future.exception()) is not None]
    if failed := next((error for error in errors if not isinstance(error, StoppedWriting)), None):
        raise failed
    if stopped_writing := [error for error in errors if isinstance(error, StoppedWriting)]:
        written = sum(len(future.result().done) for future in futures if future.done() and not future.exception())
        raise StoppedWriting.over_run(stopped_writing, written, sum(len(shard) for shard in shards))
    return SegmentReport.combined([future.result() for future in futures], time.monotonic() - started)


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
