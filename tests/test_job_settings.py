"""A job takes what its giver left unset from the settings (`with_settings`): the job's own fields,
then the settings', then the defaults; and a job can be read from a Prefect variable."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from pydantic import ValidationError

from cellseg.job_config import SegmentJob, TrainJob, TuneJob, with_settings
from cellseg.paths import DEFAULT_CACHE_DIR, DEFAULT_TUNING_DIR
from cellseg.settings import describe_invalid, load_settings


@pytest.fixture(autouse=True)
def no_developer_settings(monkeypatch):
    for name in [name for name in os.environ if name.startswith("CELLSEG_")]:
        monkeypatch.delenv(name)


@pytest.fixture()
def worker_settings(tmp_path):
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump({
        "registry_url": "s3://lab-models/registry", "local_root": "/srv/cellseg",
        "predict": {"threshold": 0.3, "split_depth": 2.5, "save_probabilities": True},
        "training": {"epochs": 7}, "model": {"base_width": 16},
    }))
    return load_settings(str(path))


def test_fields_the_job_sets_win_then_the_settings_then_the_defaults(worker_settings):
    job = SegmentJob.model_validate({"source_url": "in", "store_url": "out.zarr", "predict": {"threshold": 0.6}})
    completed = with_settings(job, worker_settings)
    assert completed.predict.threshold == 0.6  # the job's own
    assert (completed.predict.split_depth, completed.predict.save_probabilities) == (2.5, True)  # the worker's
    assert completed.predict.tile_size == 1024 and completed.shard_size == 32  # defaults
    assert completed.registry_url == "s3://lab-models/registry"
    given = SegmentJob.model_validate({"source_url": "in", "store_url": "out.zarr", "registry_url": "s3://other/reg"})
    assert with_settings(given, worker_settings).registry_url == "s3://other/reg"


def test_local_root_moves_the_default_folders_only(worker_settings):
    train = with_settings(TrainJob(images_url="i", masks_url="m"), worker_settings)
    assert (train.cache_dir, train.work_dir) == ("/srv/cellseg/cache", "/srv/cellseg/training")
    assert (train.training.epochs, train.model.base_width) == (7, 16)
    stated = with_settings(TrainJob(images_url="i", masks_url="m", cache_dir="/scratch/cache"), worker_settings)
    assert stated.cache_dir == "/scratch/cache"
    tune = with_settings(TuneJob(images_url="i", masks_url="m"), worker_settings)
    assert tune.work_dir == "/srv/cellseg/tuning"
    plain = with_settings(TuneJob(images_url="i", masks_url="m"), load_settings())
    assert (plain.cache_dir, plain.work_dir) == (DEFAULT_CACHE_DIR, DEFAULT_TUNING_DIR)


def test_a_tuning_job_given_some_training_fields_keeps_tunings_defaults():
    job = TuneJob.model_validate({"images_url": "i", "masks_url": "m", "training": {"epochs": 3}})
    assert (job.training.epochs, job.training.max_minutes, job.training.patience) == (3, 10.0, 8)
    assert TuneJob(images_url="i", masks_url="m").training.max_minutes == 10.0


@pytest.mark.parametrize("training", [None, {"epochs": 3}], ids=["no-training", "some-training"])
def test_a_tuning_jobs_defaults_fill_only_what_neither_the_job_nor_the_settings_give(tmp_path, training):
    """A tune job giving any training field had tuning's patience 8 and 10 minutes override the
    worker's settings for those two fields."""
    path = tmp_path / "worker.yaml"
    path.write_text(yaml.safe_dump({"training": {"patience": 20, "min_delta": 0.01}}))
    given = {"images_url": "i", "masks_url": "m"} | ({"training": training} if training else {})

    tune = with_settings(TuneJob.model_validate(given), load_settings(str(path)))

    assert (tune.training.patience, tune.training.min_delta, tune.training.max_minutes) == (20, 0.01, 10.0)
    assert tune.training.epochs == (training or {}).get("epochs", TrainJob(images_url="i", masks_url="m").training.epochs)
    stated = TuneJob.model_validate({**given, "training": {"epochs": 3, "patience": 4}})
    assert with_settings(stated, load_settings(str(path))).training.patience == 4  # the job's own wins


def test_settings_without_a_file_leave_the_job_as_given():
    job = SegmentJob.model_validate({"source_url": "in", "store_url": "out.zarr", "predict": {"tta": True}})
    assert with_settings(job, load_settings()) == job


def test_environment_settings_count_as_set(monkeypatch):
    monkeypatch.setenv("CELLSEG_PREDICT__TILE_OVERLAP", "32")
    job = with_settings(SegmentJob(source_url="in", store_url="out.zarr"), load_settings())
    assert job.predict.tile_overlap == 32


@pytest.mark.parametrize(("fields", "refusal"), [
    ({"predict": {"treshold": 0.4}},
     "predict.treshold: Extra inputs are not permitted (did you mean predict.threshold?) (got 0.4)"),
    ({"shard_szie": 8}, "shard_szie: Extra inputs are not permitted (did you mean shard_size?) (got 8)"),
    ({"tta": True}, "tta: Extra inputs are not permitted (did you mean predict.tta?) (got True)"),
    ({"predict": {"selection": {"z": "min"}}}, "predict.selection.z: Input should be a valid integer, unable to "
                                               "parse string as an integer or Input should be 'max' (got 'min')"),
], ids=["misspelt", "misspelt-top", "outside-its-section", "union"])
def test_a_refused_job_names_the_field_it_meant(fields, refusal):
    """What a deployment run's parameters or a Prefect variable hold is refused in these words."""
    with pytest.raises(ValidationError) as refused:
        SegmentJob.model_validate({"source_url": "in", "store_url": "out.zarr", **fields})
    assert describe_invalid(refused.value) == refusal


@pytest.mark.integration
def test_segment_images_reads_its_job_from_a_prefect_variable(prefect_harness, tiny_checkpoint, tmp_path):
    from prefect.variables import Variable

    from cellseg.flows.segment import segment_images_flow
    from cellseg.store import ResultStore
    from cellseg.synth import write_dataset

    write_dataset(str(tmp_path / "new"), count=2, size=64, seed=1)
    name = f"cellseg_nightly_{tmp_path.name.replace('-', '_')}"
    with pytest.raises(ValueError, match=f"the Prefect variable '{name}' is not set: prefect variable set {name}"):
        segment_images_flow(job_variable=name)
    Variable.set(name, json.dumps({"source_url": str(tmp_path / "new/images"), "shard_size": 0}))
    with pytest.raises(ValueError, match=f"'{name}' is not a SegmentJob .*store_url: Field required.*shard_size"):
        segment_images_flow(job_variable=name)
    Variable.set(name, {"source_url": str(tmp_path / "new/images"), "store_url": str(tmp_path / "n.zarr"),
                        "checkpoint_url": str(tiny_checkpoint)}, overwrite=True)
    summary = segment_images_flow(job_variable=name)
    assert summary["done"] == 2 and sorted(ResultStore.open(str(tmp_path / "n.zarr"), mode="r").done_ids()) == [
        "synth_0000", "synth_0001"]
    # Neither, or both (a job given to the nightly deployment), said apart, each with the backfill's command.
    with pytest.raises(ValueError, match=r"^segment-images needs a job, the images to segment and the store: prefect "
                                         r"deployment run 'segment-images/backfill' --param job="):
        segment_images_flow()
    with pytest.raises(ValueError, match=rf"^segment-images takes a job or job_variable, not both: this run reads its "
                                         rf"job from the Prefect variable '{name}' .*'segment-images/backfill'"):
        segment_images_flow(job=SegmentJob(source_url="in", store_url="out.zarr"), job_variable=name)
