"""What each job is given: `TrainJob`, `SegmentJob` and `TuneJob`, pydantic models whose nested
sections are the configs whole. `cellseg.jobs` runs them; the CLI, the flows and the deployments
build them (a deployment run passes one as its `job` parameter)."""

from __future__ import annotations

import itertools
import logging
import re
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cellseg.config import ModelConfig, PredictConfig, SearchSpace, TrainConfig, Url
from cellseg.paths import DEFAULT_CACHE_DIR, DEFAULT_REGISTRY_URL, DEFAULT_TRAINING_DIR, DEFAULT_TUNING_DIR, LOCAL_ROOT
from cellseg.settings import CellsegSettings, merged
from cellseg.tune import Trial

logger = logging.getLogger(__name__)


def _check_dask_address(address: str | None) -> str | None:
    if address is not None and not re.fullmatch(r"(tcp|tls|ucx|inproc)://[^\s/]+(:\d+)?", address):
        raise ValueError(f"'{address}' is not a Dask scheduler address like tcp://host:8786")
    return address


DaskAddress = Annotated[str | None, AfterValidator(_check_dask_address)]


class _Job(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class TrainJob(_Job):
    """A training run: where the pairs are, where the model goes, and the model and training configs."""

    images_url: Url = Field(description="directory URL of the images")
    masks_url: Url = Field(description="directory URL of the masks or instance label images (same stems)")
    registry_url: Url = Field(DEFAULT_REGISTRY_URL, description="model registry URL, shared by every worker")
    cache_dir: str = Field(DEFAULT_CACHE_DIR, min_length=1, description="local content-addressed dataset cache")
    work_dir: str = Field(DEFAULT_TRAINING_DIR, min_length=1, description="local directory for training runs")
    promote: bool = Field(True, description="mark the new version current")
    model: ModelConfig = ModelConfig()
    training: TrainConfig = TrainConfig()
    predict: PredictConfig = Field(
        PredictConfig(), description="how the validation images are segmented for the cell scores (as `predict` would)"
    )


class SegmentJob(_Job):
    """A segmentation run: the images, the store, the model and how to predict."""

    source_url: Url = Field(description="directory URL of the images to segment")
    store_url: Url = Field(description="zarr results store URL")
    registry_url: Url = Field(DEFAULT_REGISTRY_URL, description="model registry URL, shared by every worker")
    model_version: str = Field(
        "current", min_length=1,
        description="a registered version, 'current', or a model shipped in the package: 'bundled' (the default "
                    "one) or its name ('nuclei', 'general')",
    )
    checkpoint_url: Url | None = Field(None, description="a checkpoint file to use instead of the registry")
    shard_size: int = Field(32, ge=1, description="most images per parallel task (shards are evened out, and "
                                                   "their number made a multiple of max_parallel_shards)")
    max_parallel_shards: int = Field(2, ge=1, description="shards run at once on the local thread pool")
    dask_address: DaskAddress = Field(None, description="run shards on this Dask scheduler instead")
    predict: PredictConfig = PredictConfig()


TUNE_TRAINING_DEFAULTS: dict[str, Any] = {"max_minutes": 10.0, "patience": 8}


class TuneJob(_Job):
    """A hyper-parameter search: trials of the search space trained like `TrainJob`s, the best registered."""

    images_url: Url
    masks_url: Url
    registry_url: Url = Field(DEFAULT_REGISTRY_URL, description="model registry URL, shared by every worker")
    cache_dir: str = Field(DEFAULT_CACHE_DIR, min_length=1, description="local content-addressed dataset cache")
    work_dir: str = Field(DEFAULT_TUNING_DIR, min_length=1, description="local directory, one sub-directory per trial")
    promote: bool = Field(False, description="mark the best trial's model current (off: register only)")
    trials: int = Field(8, ge=1, description="points of the search grid to train (the whole grid when it is smaller)")
    max_parallel_trials: int = Field(2, ge=1, description="trials trained at once, each in its own process")
    seed: int = Field(0, ge=0, description="which grid points are drawn")
    dask_address: DaskAddress = Field(None, description="train trials on this Dask scheduler instead")
    space: SearchSpace = SearchSpace()
    model: ModelConfig = ModelConfig()
    training: TrainConfig = Field(
        TrainConfig(**TUNE_TRAINING_DEFAULTS),
        description="settings of every trial that the search space does not set (default: 10 minutes, patience 8)",
    )
    predict: PredictConfig = PredictConfig()

    @field_validator("training", mode="before")
    @classmethod
    def _tuning_defaults(cls, training: Any) -> Any:
        # Fields given leave the others at tuning's defaults, not plain training's (auto: 15 or 25 minutes;
        # patience 15). The defaults filled in are not counted as given (`model_fields_set`), so that
        # `with_settings` lets the settings' training section fill them first, as it does for any job.
        if not isinstance(training, dict):
            return training
        config = TrainConfig.model_validate(TUNE_TRAINING_DEFAULTS | training)
        return TrainConfig.model_construct(_fields_set=set(training), **dict(config))

    @model_validator(mode="after")
    def _searchable(self) -> TuneJob:
        if self.training.val_fraction <= 0:
            raise ValueError("tuning picks the best trial by validation Dice: training.val_fraction must be above 0")
        if self.training.init_from not in (None, "auto"):
            # Fine-tuning takes the starting model's architecture: every trial would train that one.
            raise ValueError(f"training.init_from {self.training.init_from!r}: tuning compares architectures, each "
                             "trained from scratch, and a trial starting from a model would take that model's "
                             "architecture instead of the one searched; leave init_from unset (or 'auto'), or "
                             "fine-tune with cellseg train --init-from")
        for width, depth in itertools.product(self.space.base_width, self.space.depth):
            try:
                ModelConfig.model_validate(self.model.model_dump() | {"base_width": width, "depth": depth})
            except ValidationError as error:  # found before any trial trains, whichever points are drawn
                reason = "; ".join(str(problem["msg"]).removeprefix("Value error, ") for problem in error.errors())
                raise ValueError(f"the search space's base_width {width} with depth {depth}: {reason}") from None
        return self

    def trial_job(self, trial: Trial) -> TrainJob:
        """The training job of one trial: this search's data with the trial's configs."""
        return TrainJob(images_url=self.images_url, masks_url=self.masks_url, registry_url=self.registry_url,
                        cache_dir=self.cache_dir, work_dir=self.work_dir, promote=False,
                        model=trial.model, training=trial.training, predict=self.predict)


Job = TypeVar("Job", TrainJob, SegmentJob, TuneJob)
FROM_SETTINGS = ("registry_url", "model", "training", "predict")  # job fields a settings file may give


def with_settings(job: Job, settings: CellsegSettings) -> Job:
    """`job` with what its giver left unset taken from `settings` (a settings file, CELLSEG_*
    variables): fields the job sets win, then fields the settings set, then the job's defaults.

    A deployment run is given a few fields; the rest follow the settings of the worker it runs on,
    as a `cellseg` command's do. `local_root` moves the job's default cache and work folders."""
    fields = type(job).model_fields
    from_settings = settings.model_dump(exclude_unset=True, include={name for name in FROM_SETTINGS if name in fields})
    if isinstance(job, TuneJob) and (training := from_settings.get("training", {})).get("init_from") not in (None, "auto"):
        # A settings file's starting model is for training; a search trains every trial from scratch.
        logger.warning("the settings' training.init_from %r is not used by tune: every trial trains from scratch",
                       training.pop("init_from"))
    if "local_root" in settings.model_fields_set:
        for name in ("cache_dir", "work_dir"):
            if name in fields:
                from_settings[name] = settings.local_root + str(fields[name].default).removeprefix(LOCAL_ROOT)
    return type(job).model_validate(merged(from_settings, job.model_dump(exclude_unset=True)))
