"""The training recipe, `run_training(TrainJob, out_dir)`: pair -> split -> load once -> decide
'auto' fields -> train -> pixel and cell validation -> pictures and manifest; and the checks of the
folder a run writes into."""

from __future__ import annotations

import json
import logging
import shlex
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fsspec.implementations.local import LocalFileSystem
from pydantic import BaseModel

from cellseg.checkpoint import Checkpoint, load_checkpoint
from cellseg.config import ModelConfig, TrainConfig
from cellseg.dataset_errors import DatasetError
from cellseg.evaluate import validation_cell_scores
from cellseg.infer import Predictor
from cellseg.io import IMAGE_SUFFIXES, MICROSCOPY_FILE_SUFFIXES
from cellseg.job_config import TrainJob
from cellseg.jobs_checkpoint import finish_checkpoint
from cellseg.loaded_pairs import LoadedPair, load_pairs, manifest_hash
from cellseg.pairs import ImagePair, pair_images_and_masks, split_train_val
from cellseg.redact import MASK, redact_url
from cellseg.report import CURVES_FILE, GALLERY_FILE, training_pictures
from cellseg.starting_point import Start, choose_start
from cellseg.store_checks import enclosing_zarr_store
from cellseg.train import (
    BEST_CHECKPOINT,
    HISTORY_FILE,
    LAST_CHECKPOINT,
    STOP_FILE,
    TrainResult,
    train,
)

logger = logging.getLogger("cellseg.jobs")  # the jobs' one logger, whichever of their modules speaks


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
    check_apart_from_data(out, job)
    last = load_checkpoint(str(out / LAST_CHECKPOINT)) if resume else None
    if last is not None:
        job = resumed_job(job, last)
    if pairs is None:
        pairs = pair_images_and_masks(job.images_url, job.masks_url)
    model_config, training = job.model, job.training
    train_pairs, val_pairs = split_train_val(pairs, training.val_fraction, training.seed)
    if last is not None:  # built as the run began, nothing scored again
        recorded = last.train_config.init_from
        start = Start(None if recorded == "auto" else recorded, "as the run began")
        model_config = resumed_model_config(last, model_config)
    else:
        start = choose_start(job, len(pairs), val_pairs)
        if start.checkpoint:
            model_config = load_checkpoint(start.checkpoint).model_config
    logger.info("start: %s", start.described())
    training = training.model_copy(update={"init_from": start.checkpoint})
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
    if loaded_val and not any(pair.mask.any() for pair in loaded_val):
        logger.warning("none of the %d validation masks (%s) has a cell pixel: any mask with a cell scores Dice 0 on "
                       "them, so best.pt and early stopping follow nothing; --seed N holds out other images, "
                       "--val-fraction sets how many", len(loaded_val), ", ".join(pair.source.id for pair in loaded_val[:5]))
    if last is not None:
        check_resumed_dataset(last, out, loaded_train + loaded_val)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(f"cannot create the training folder '{out}' ({error.strerror or error})") from error
    dataset_hash = manifest_hash(loaded_train + loaded_val)

    def start_writing() -> None:
        # The new run is about to write its first checkpoint: the run it replaces goes now, with its
        # manifest. A run refused, stopped or diverging before that leaves the old run whole, never
        # the old last.pt beside a new manifest.json.
        if overwrite and not resume and (replaced := [name for name in REPLACED_FILES if (out / name).is_file()]):
            for name in replaced:
                (out / name).unlink()
            logger.info("removed %s of the run being replaced", ", ".join(replaced))
        _write_manifest(out, job, loaded_train, loaded_val)

    result = train(loaded_train, loaded_val, out, model_config, training, dataset_hash, resume=resume, on_epoch=on_epoch,
                   on_start=start_writing)
    checkpoint = finish_checkpoint(str(result.best_checkpoint), job, loaded_train, loaded_val, training.init_from)
    predictor = Predictor(checkpoint, job.predict.model_copy(update={"device": training.device}))
    cells = validation_cell_scores(predictor, loaded_val)
    pictures = training_pictures(out, result.history, loaded_val, predictor, start=result.start_metrics,
                                 best_epoch=result.best_epoch)
    return TrainOutcome(result, dataset_hash, len(loaded_train), len(loaded_val), cells, pictures, start)


# Where a run trains, not what it learns: a resumed run takes these from the job, never from the run
# (a run begun with --device cuda:1 goes on on a machine with one GPU, or none).
MACHINE_FIELDS = ("device", "loader_workers", "compile", "amp")
# Which images a run trains on and which it scores: a resumed run keeps its own, whatever is given.
SPLIT_FIELDS = ("seed", "val_fraction")


def resumed_job(job: TrainJob, last: Checkpoint) -> TrainJob:
    """`job` as the run whose `last.pt` is `last` goes on: with the training settings the run began
    with, under those `job` was given explicitly (pydantic's `model_fields_set`), so `cellseg train
    --resume` needs no settings again and `--epochs 80` trains an ended run longer; MACHINE_FIELDS
    are the job's. The CLI gives only its flags explicitly (a settings file or CELLSEG_* variable
    written for new runs does not change a run begun before); a job whose settings were all given
    (one read back from JSON) keeps its own. The run's start (`init_from`) is its own whatever is
    given. The log names the settings taken from the run and those given that differ from it."""
    recorded, given = last.train_config, job.training
    training = given_over(recorded, given).model_copy(update={
        **{name: getattr(given, name) for name in MACHINE_FIELDS}, **{name: getattr(recorded, name) for name in SPLIT_FIELDS}})
    kept_apart = {"init_from", *MACHINE_FIELDS, *SPLIT_FIELDS}
    differing = [name for name in _differing(recorded, given) if name not in kept_apart]
    if restored := [name for name in differing if name not in given.model_fields_set]:
        logger.info("resuming with the training settings the run began with: %s",
                    ", ".join(f"{name} {_shown(getattr(recorded, name))}" for name in restored))
    if changed := [name for name in differing if name in given.model_fields_set]:
        logger.info("resuming with training settings given over the run's: %s (the run's: %s)",
                    ", ".join(f"{name} {_shown(getattr(given, name))}" for name in changed),
                    ", ".join(f"{name} {_shown(getattr(recorded, name))}" for name in changed))
    if "init_from" in given.model_fields_set and given.init_from not in (recorded.init_from, "auto"):
        logger.info("init_from %s given, not used: a resumed run keeps the start it began from", given.init_from)
    if split := [name for name in SPLIT_FIELDS if name in given.model_fields_set and getattr(given, name) != getattr(
            recorded, name)]:
        logger.warning("%s given, not used: a resumed run keeps the split of its images it began with (%s), so that "
                       "no image it trained on is scored as a validation image; --overwrite starts afresh with them",
                       ", ".join(f"{name} {getattr(given, name)}" for name in split),
                       ", ".join(f"{name} {getattr(recorded, name)}" for name in SPLIT_FIELDS))
    return job.model_copy(update={"training": training})


def given_over(base: BaseModel, given: BaseModel) -> Any:
    """`base` with the fields `given` was given explicitly, nested settings merged field by field."""
    update = {}
    for name in given.model_fields_set:
        value, under = getattr(given, name), getattr(base, name)
        both_models = isinstance(value, BaseModel) and isinstance(under, BaseModel)
        update[name] = given_over(under, value) if both_models else value
    return base.model_copy(update=update)


def _differing(recorded: BaseModel, given: BaseModel) -> list[str]:
    return sorted(name for name in type(recorded).model_fields if getattr(recorded, name) != getattr(given, name))


def _shown(value: Any) -> str:
    return "(as recorded)" if isinstance(value, BaseModel) else str(value)


def resumed_model_config(last: Checkpoint, asked: ModelConfig) -> ModelConfig:
    """The model settings of the run as its last checkpoint holds them: a resumed run goes on with
    the network it was built with, so `cellseg train --resume` needs no model flags again; settings
    given that differ are named in the log, and not used."""
    recorded = last.model_config
    if differing := _differing(recorded, asked):
        overruled = [name for name in differing if name in asked.model_fields_set]
        logger.info("resuming with the model settings the run began with: %s%s",
                    ", ".join(f"{name} {_shown(getattr(recorded, name))}" for name in differing),
                    f" (given: {', '.join(f'{name} {_shown(getattr(asked, name))}' for name in overruled)}, not "
                    "used: a resumed run keeps its network)" if overruled else "")
    return recorded


def recorded_sources(out_dir: str | Path) -> tuple[str, str]:
    """The images and masks URLs the run in `out_dir` began on, as its manifest.json records them,
    for `cellseg train --resume` given neither; the files' checksums are checked as the run loads them."""
    manifest = Path(out_dir) / "manifest.json"
    give = "give the run's --images and --masks"
    try:
        record = json.loads(manifest.read_text())
        images, masks = record["images_url"], record["masks_url"]
    except FileNotFoundError:
        raise RunFolderError(f"'{out_dir}' holds no manifest.json to say which images and masks the run began on; "
                             f"{give}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        problem = f"has no {error}" if isinstance(error, KeyError) else f"cannot be read ({type(error).__name__})"
        raise RunFolderError(f"'{manifest}' {problem}: it does not say which images and masks the run began on "
                             f"(runs of earlier versions record none); {give}") from None
    if not (isinstance(images, str) and isinstance(masks, str)) or any(MASK in url for url in (images, masks)):
        raise RunFolderError(f"'{manifest}' records the run's images and masks with their credentials masked; {give}")
    for kind, url in (("images", images), ("masks", masks)):
        if "://" not in url and not Path(url).is_dir():
            raise RunFolderError(f"the run's {kind} folder '{url}', which '{manifest}' records, does not exist here "
                                 f"(moved, or on another machine); {give}")
    return images, masks


def kept_line(run_dir: str | Path, own_folder: bool = False) -> str:
    """What a training stopped before its end kept in `run_dir`, and how to go on from it; the epoch
    is the one `last.pt` holds (history.json is written after it). `own_folder`: the run made
    `run_dir` for itself (a flow run's), so it may go when nothing was kept; a user's --out may
    hold other things."""
    last, best = Path(run_dir) / LAST_CHECKPOINT, Path(run_dir) / BEST_CHECKPOINT
    if not last.is_file() and best.is_file():  # a fine-tune's starting weights, or stopped between the two writes
        again = f"{run_dir} can go" if own_folder else "the same command with --overwrite starts it again"
        try:
            held = load_checkpoint(str(best)).epoch
        except (OSError, ValueError):
            held = 0
        if held:
            return (f"it stopped as its first epoch was saved: {best} holds epoch {held}, but no {LAST_CHECKPOINT} to "
                    f"resume from; {again}")
        return f"it stopped before its first epoch ended: {best} holds only its starting weights, nothing to resume; {again}"
    if not last.is_file():
        return f"it stopped before its first epoch ended, so nothing was kept{f' ({run_dir} can go)' if own_folder else ''}"
    try:
        epoch = f"epoch {load_checkpoint(str(last)).epoch}"
    except (OSError, ValueError):
        epoch = "its last epoch"
    return (f"{last} holds {epoch}: `cellseg train --resume --out {shlex.quote(str(run_dir))}` goes on from it, "
            "on the run's images and masks with its settings (--epochs N to train it longer)")


class RunFolderError(ValueError):
    """A training folder that cannot be used as asked; the message names it and what is there."""


RUN_FILES = (BEST_CHECKPOINT, LAST_CHECKPOINT, HISTORY_FILE)  # what makes a folder hold a training run
REPLACED_FILES = (*RUN_FILES, CURVES_FILE, GALLERY_FILE)  # what --overwrite removes of the run it replaces


def check_run_dir(out_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """`out_dir` as a Path if a training run may write there: not a file; with `resume`, a run to
    continue; without it, no run that the new one would replace unless `overwrite` says so. The
    old run's files then go just before the new run writes its first checkpoint (`run_training`)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"training folder '{out}' is an existing file, not a folder")
    if store := enclosing_zarr_store(LocalFileSystem(), str((absolute := out.resolve()) / BEST_CHECKPOINT)):
        where = "is" if store == str(absolute) else "is inside"
        raise RunFolderError(f"training folder '{out}' {where} the zarr store '{store}', which its files would "
                             "damage (read back as broken images); choose a folder outside it")
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


def check_apart_from_data(out: Path, job: TrainJob) -> None:
    """Refuse a run folder that holds the run's own images or masks (`--out data` for data/images):
    its checkpoints and pictures would go among the data, and a later run on that folder would
    read the pictures as images."""
    for kind, url in (("images", job.images_url), ("masks", job.masks_url)):
        if "://" in url and not url.startswith("file://"):
            continue
        folder = Path(url.removeprefix("file://")).resolve()
        if folder.is_relative_to(out.resolve()):
            raise RunFolderError(f"training folder '{out}' holds the run's {kind} ('{url}'): its checkpoints and "
                                 "pictures would go beside them; choose a folder outside the data (runs/NAME)")


def check_can_go_on(last: Checkpoint, training: TrainConfig, out: Path) -> None:
    """Refuse to resume a run that has run all its epochs (`cellseg train --resume`: it would train
    none; `make nuclei-model` resumes such a run on purpose, to finish and install it); warn where
    it stopped early or on its time budget, which end it again after one more epoch."""
    if last.epoch >= training.epochs:
        raise RunFolderError(f"the run in '{out}' has ended: its {LAST_CHECKPOINT} holds epoch {last.epoch} of "
                             f"{training.epochs}; resume with --epochs N (N above {last.epoch}) to train it longer")
    state = last.resume_state or {}
    stale, spent = state.get("stale_epochs"), state.get("spent_seconds")
    if isinstance(stale, int) and stale >= training.patience:
        logger.warning("the run stopped early (no improvement for %d epochs, patience %d): it trains one more epoch "
                       "and stops again unless --patience is raised", stale, training.patience)
    budget = training.time_budget(fine_tuning=bool(last.train_config.init_from))
    if isinstance(spent, int | float) and budget is not None and spent >= budget * 60:
        logger.warning("the run has spent its time budget (%.0f of %g minutes): it trains one more epoch and stops "
                       "again unless --max-minutes is raised", spent / 60, budget)


def check_resumed_dataset(last: Checkpoint, out: Path, pairs: Sequence[LoadedPair]) -> None:
    """Refuse to resume the run in `out` (its last checkpoint `last`) on other images or masks than
    it began with (`pairs`, loaded), naming the files that differ from its manifest.json: its
    epochs, split and best score would mix two datasets, and its manifest.json would be replaced."""
    recorded, dataset_hash = last.dataset_manifest_hash, manifest_hash(pairs)
    if recorded is not None and recorded != dataset_hash:
        differences = _differences_from_manifest(out / "manifest.json", recorded, pairs)
        raise RunFolderError(f"'{out / LAST_CHECKPOINT}' was trained on dataset {recorded[:12]} (its manifest.json), "
                             f"but these images and masks are dataset {dataset_hash[:12]}{differences}: resume with "
                             "the ones the run began with, or start afresh (--overwrite, or another folder)")


MAX_MANIFEST_BYTES = 64 * 2**20  # read to name the files a resumed run's data changed: about 200,000 pairs


def _differences_from_manifest(manifest: Path, recorded: str, pairs: Sequence[LoadedPair]) -> str:
    """What differs between the run's manifest (when it is the one its checkpoint records) and
    `pairs`: the files changed, the pairs added and those gone, a few of each named; '' when the
    manifest cannot say."""
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            return ""
        record = json.loads(manifest.read_text())
        if record.get("hash") != recorded:
            return ""
        before = {entry["id"]: entry for entry in record["entries"]}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return ""
    now = {pair.id: pair for pair in pairs}
    changed = [f"{kind} '{redact_url(getattr(pair.source, f'{kind}_url'))}'" for pair_id, pair in sorted(now.items())
               if pair_id in before for kind in ("image", "mask")
               if before[pair_id].get(f"{kind}_sha256") != getattr(pair, f"{kind}_sha256")]
    added, gone = sorted(now.keys() - before.keys()), sorted(before.keys() - now.keys())
    said = [f"changed since: {_first(changed)}" if changed else "",
            f"{len(added)} pair(s) added: {_first(added)}" if added else "",
            f"{len(gone)} pair(s) gone: {_first(gone)}" if gone else ""]
    return f" ({'; '.join(part for part in said if part)})" if any(said) else ""


def _first(names: Sequence[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _recorded_folder(url: str) -> str:
    """A folder URL as a run's manifest.json records it: a local path made absolute (a resume from
    another working folder finds it), credentials masked."""
    return redact_url(url) if "://" in url else str(Path(url).resolve())


def _write_manifest(out: Path, job: TrainJob, loaded_train: list[LoadedPair], loaded_val: list[LoadedPair]) -> str:
    """manifest.json (the job's folders, the pairs' files and checksums) and split.json into `out`;
    returns the dataset hash."""
    dataset_hash = manifest_hash(loaded_train + loaded_val)
    entries = [pair.manifest_entry() for pair in loaded_train + loaded_val]
    record = {"hash": dataset_hash, "images_url": _recorded_folder(job.images_url),
              "masks_url": _recorded_folder(job.masks_url), "entries": entries}
    (out / "manifest.json").write_text(json.dumps(record, indent=1))
    split = {"train": [pair.id for pair in loaded_train], "val": [pair.id for pair in loaded_val]}
    (out / "split.json").write_text(json.dumps(split, indent=1))
    return dataset_hash
