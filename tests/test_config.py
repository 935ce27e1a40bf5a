"""Tests for cellseg/config.py: validation of flow settings, URLs, Dask addresses and normalisation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cellseg.config import ModelConfig, NormalizationConfig, PredictConfig, TrainConfig
from cellseg.jobs import SegmentJob, TrainJob

SEGMENT = {"source_url": "data/incoming", "store_url": "runs/nightly.zarr"}
TRAIN = {"images_url": "data/images", "masks_url": "data/masks"}


def rejected(model, **fields) -> tuple[list[tuple], str]:
    """The locations of the validation errors and the full message."""
    with pytest.raises(ValidationError) as raised:
        model(**fields)
    return [error["loc"] for error in raised.value.errors()], str(raised.value)


# --- defaults -----------------------------------------------------------------------------


def test_segment_settings_defaults():
    settings = SegmentJob(**SEGMENT)

    assert (settings.source_url, settings.store_url) == ("data/incoming", "runs/nightly.zarr")
    assert settings.registry_url == "runs/registry"
    assert settings.model_version == "current"
    assert (settings.shard_size, settings.max_parallel_shards, settings.dask_address) == (32, 2, None)
    assert settings.predict == PredictConfig()
    assert (settings.predict.threshold, settings.predict.batch_size, settings.predict.min_cell_area) == (None, None, 10)  # threshold: the model's
    assert (settings.predict.tile_size, settings.predict.tile_overlap) == (1024, 128)


def test_train_settings_defaults():
    settings = TrainJob(**TRAIN)

    assert (settings.registry_url, settings.cache_dir, settings.work_dir) == (
        "runs/registry", "runs/cache", "runs/training",
    )
    assert settings.promote is True
    assert settings.model == ModelConfig()
    assert (settings.model.depth, settings.model.base_width, settings.model.norm) == (4, 16, "instance")
    assert settings.training == TrainConfig()
    assert (settings.training.epochs, settings.training.patch_size, settings.training.monitor) == (60, 256, "val_dice")


def test_normalization_defaults():
    config = NormalizationConfig()

    assert (config.low_percentile, config.high_percentile, config.polarity) == (1.0, 99.8, "auto")


# --- SegmentJob ----------------------------------------------------------------------


@pytest.mark.parametrize("shard_size", [0, -1, -32])
def test_shard_size_must_be_positive(shard_size):
    locations, message = rejected(SegmentJob, **SEGMENT, shard_size=shard_size)

    assert locations == [("shard_size",)]
    assert "greater than or equal to 1" in message


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.1, 1.5])
def test_threshold_must_be_inside_zero_one(threshold):
    locations, _ = rejected(PredictConfig, threshold=threshold)
    assert locations == [("threshold",)]

    # Given as data (as a flow parameter arrives), the error names the nested field.
    locations, _ = rejected(SegmentJob, **SEGMENT, predict={"threshold": threshold})
    assert locations == [("predict", "threshold")]


@pytest.mark.parametrize("threshold", [0.01, 0.5, 0.99])
def test_threshold_inside_zero_one_is_accepted(threshold):
    assert SegmentJob(**SEGMENT, predict=PredictConfig(threshold=threshold)).predict.threshold == threshold


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("foo://x", "unknown storage protocol 'foo://'"),
        ("s3://", "names no bucket or path"),
        ("s3:///", "names no bucket or path"),
        ("", "must not be empty"),
        ("   ", "must not be empty"),
    ],
)
@pytest.mark.parametrize("field", ["source_url", "store_url", "registry_url"])
def test_segment_urls_are_checked(field, url, expected):
    locations, message = rejected(SegmentJob, **{**SEGMENT, field: url})

    assert locations == [(field,)]
    assert expected in message


@pytest.mark.parametrize(
    "url", ["s3://bucket", "s3://bucket/images/", "file:///data/images", "data/images", "/abs/images", "memory://x"]
)
def test_supported_urls_are_accepted(url):
    assert SegmentJob(source_url=url, store_url=url).source_url == url
    assert TrainJob(images_url=url, masks_url=url, registry_url=url).images_url == url


@pytest.mark.parametrize("address", ["localhost:8786", "127.0.0.1:8786", "http://127.0.0.1:8786", "tcp://", "tcp://a b"])
def test_malformed_dask_address_is_refused(address):
    locations, message = rejected(SegmentJob, **SEGMENT, dask_address=address)

    assert locations == [("dask_address",)]
    assert f"'{address}' is not a Dask scheduler address" in message


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:8786", "tcp://scheduler:8786", "tls://scheduler", None])
def test_dask_address_is_accepted(address):
    assert SegmentJob(**SEGMENT, dask_address=address).dask_address == address


@pytest.mark.parametrize(("config", "field"), [
    (PredictConfig, "cell_diameter"), (PredictConfig, "split_depth"), (ModelConfig, "cell_diameter"),
    (TrainConfig, "learning_rate"), (TrainConfig, "max_minutes"),
])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_infinite_or_nan_settings_are_refused(config, field, value):
    """`--cell-diameter inf` passed its > 0 check and was silently dropped as null on the way to the
    shards (JSON has no infinity); `--split-depth inf` failed there as 'got None'."""
    with pytest.raises(ValidationError, match=rf"{field}(\.[a-z-]+)?\n  Input should be a finite number"):
        config(**{field: value})


def test_segment_settings_refuse_unknown_fields():
    locations, message = rejected(SegmentJob, **SEGMENT, shard_szie=8)

    assert locations == [("shard_szie",)]
    assert "Extra inputs are not permitted" in message


def test_empty_model_version_is_refused():
    locations, _ = rejected(SegmentJob, **SEGMENT, model_version="")
    assert locations == [("model_version",)]


def test_missing_required_urls_are_named():
    locations, _ = rejected(SegmentJob)
    assert sorted(locations) == [("source_url",), ("store_url",)]


# --- TrainJob --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [("foo://x", "unknown storage protocol"), ("s3://", "names no bucket or path"), ("", "must not be empty")],
)
@pytest.mark.parametrize("field", ["images_url", "masks_url", "registry_url"])
def test_train_urls_are_checked(field, url, expected):
    locations, message = rejected(TrainJob, **{**TRAIN, field: url})

    assert locations == [(field,)]
    assert expected in message


def test_train_settings_refuse_unknown_fields():
    locations, _ = rejected(TrainJob, **TRAIN, epochs=3)  # belongs in training=
    assert locations == [("epochs",)]

    locations, _ = rejected(TrainJob, **TRAIN, training={"epochs": 3, "lr": 0.1})
    assert locations == [("training", "lr")]


@pytest.mark.parametrize("field", ["cache_dir", "work_dir"])
def test_train_directories_must_not_be_empty(field):
    locations, _ = rejected(TrainJob, **TRAIN, **{field: ""})
    assert locations == [(field,)]


def test_an_empty_init_from_is_refused():
    """'' (CELLSEG_TRAINING__INIT_FROM= ) trained from scratch while `train` said "fine-tuned from  (asked
    for: from scratch)"; None is from scratch, a name or URL fine-tunes."""
    locations, _ = rejected(TrainConfig, init_from="")
    assert locations == [("init_from",)]
    assert TrainConfig(init_from=None).init_from is None and TrainConfig(init_from="nuclei").init_from == "nuclei"


def test_nested_training_values_are_validated():
    locations, _ = rejected(TrainJob, **TRAIN, training={"epochs": 0})
    assert locations == [("training", "epochs")]


# --- NormalizationConfig ------------------------------------------------------------------


@pytest.mark.parametrize(("low", "high"), [(50.0, 50.0), (60.0, 40.0), (99.8, 1.0)])
def test_normalization_refuses_low_not_below_high(low, high):
    _, message = rejected(NormalizationConfig, low_percentile=low, high_percentile=high)

    assert f"low_percentile ({low}) must be below high_percentile ({high})" in message


def test_normalization_accepts_ordered_percentiles():
    config = NormalizationConfig(low_percentile=0.0, high_percentile=100.0)
    assert (config.low_percentile, config.high_percentile) == (0.0, 100.0)


def test_settings_are_frozen():
    settings = SegmentJob(**SEGMENT)
    with pytest.raises(ValidationError, match="frozen"):
        settings.shard_size = 4


def test_jobs_take_folders_given_as_pathlib_paths(tmp_path):
    """A notebook names folders with pathlib: `TrainJob(images_url=Path(...))` was refused ("Input should be a valid string")."""
    from cellseg.job_config import SegmentJob, TrainJob

    job = TrainJob(images_url=tmp_path / "images", masks_url=tmp_path / "masks")
    assert job.images_url == str(tmp_path / "images") and job.masks_url == str(tmp_path / "masks")
    assert SegmentJob(source_url=tmp_path / "in", store_url=tmp_path / "r.zarr").store_url == str(tmp_path / "r.zarr")


def test_a_device_cellseg_does_not_run_on_is_refused_saying_which_it_does():
    """`device = "gpu"` was refused with the raw pattern '^(auto|cpu|cuda(:[0-9]+)?)$'."""
    from cellseg.config import PredictConfig, TrainConfig

    with pytest.raises(ValueError, match=r"'gpu' is no device cellseg runs on: give 'auto' \(CUDA when present\), "
                                         r"'cpu', 'cuda' or 'cuda:N'"):
        PredictConfig(device="gpu")
    assert [TrainConfig(device=name).device for name in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda",
                                                                                                  "cuda:1"]
