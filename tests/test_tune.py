"""Hyper-parameter search: trial planning, picking the best, and the tune-unet flow end to end."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cellseg.config import ModelConfig, SearchSpace, TrainConfig
from cellseg.jobs import TuneJob, run_trial, with_settings
from cellseg.registry import Registry
from cellseg.settings import load_settings
from cellseg.tune import (
    TrialResult,
    best_trial,
    check_tuning_dataset,
    plan_trials,
    trial_rows,
    unused_settings,
)

TINY_SPACE = SearchSpace(
    learning_rate=[1e-3, 3e-3], base_width=[8], depth=[2], dropout=[0.0], loss=["bce"], augmentation=["flips"],
    border_weight=[0.0],
)
TINY_TRAINING = TrainConfig(epochs=2, patch_size=64, patches_per_image=1, device="cpu", max_minutes=None)


def test_a_small_grid_is_tried_whole_in_order():
    trials = plan_trials(TINY_SPACE, count=10)
    assert [trial.params["learning_rate"] for trial in trials] == [1e-3, 3e-3]
    assert [trial.training.learning_rate for trial in trials] == [1e-3, 3e-3]
    assert all(trial.model.base_width == 8 and trial.model.depth == 2 for trial in trials)


def test_trials_are_distinct_seeded_draws_that_set_every_searched_value():
    space = SearchSpace()
    first, again, other = plan_trials(space, 6, seed=1), plan_trials(space, 6, seed=1), plan_trials(space, 6, seed=2)
    assert [t.params for t in first] == [t.params for t in again]
    assert [t.params for t in first] != [t.params for t in other]
    assert len({tuple(sorted(t.params.items())) for t in first}) == 6
    for trial in first:
        assert trial.model.base_width == trial.params["base_width"]
        assert trial.model.depth == trial.params["depth"]
        assert trial.model.dropout == trial.params["dropout"]
        assert trial.training.loss == trial.params["loss"]
        assert trial.training.border_weight == trial.params["border_weight"]
        strong = trial.training.augmentation.elastic_probability > 0
        assert strong == (trial.params["augmentation"] == "strong")


def test_search_space_and_settings_are_validated():
    with pytest.raises(ValidationError):
        SearchSpace(learning_rate=[])
    with pytest.raises(ValidationError):
        SearchSpace(depth=[9])
    with pytest.raises(ValidationError, match="val_fraction"):
        TuneJob(images_url="a", masks_url="b", training=TrainConfig(val_fraction=0.0))
    assert SearchSpace().size() == 3 * 2 * 3 * 3 * 2 * 2 * 1


def test_a_search_that_could_not_do_what_it_says_is_refused_before_any_trial_trains(tmp_path, caplog):
    data = {"images_url": "a", "masks_url": "b"}
    # A trial starting from a model takes that model's architecture, not the point's.
    for init_from in ("nuclei", "s3://lab/models/best.pt"):
        with pytest.raises(ValidationError, match=f"training.init_from '{init_from}': tuning compares architectures"):
            TuneJob(**data, training=TrainConfig(init_from=init_from))
    assert TuneJob(**data, training=TrainConfig(init_from=None)).training.init_from is None
    # A settings file's starting model, there for training, is left out of a search with a warning.
    (tmp_path / "lab.toml").write_text('[training]\ninit_from = "general"\nepochs = 3\n')
    job = with_settings(TuneJob(**data), load_settings(str(tmp_path / "lab.toml")))
    assert job.training.init_from == "auto" and job.training.epochs == 3
    assert "the settings' training.init_from 'general' is not used by tune: every trial trains from scratch" in caplog.text
    # A point the model cannot be built at fails the search whichever points are drawn, so the grid is checked whole.
    with pytest.raises(ValidationError, match="the search space's base_width 512 with depth 3: base_width 512 at depth 3 "
                                              "gives 4096 channels"):
        TuneJob(**data, space=SearchSpace(base_width=[4, 512], depth=[2, 3]))
    with pytest.raises(ValidationError, match="greater than or equal to 0"):
        TuneJob(**data, seed=-1)
    # A value given twice is one point, not two identical trials.
    space = SearchSpace(learning_rate=[1e-3, 0.001, 3e-3], augmentation=["flips", "flips"], loss=["bce"], depth=[3],
                        dropout=[0.0], base_width=[16])
    assert space.learning_rate == [1e-3, 3e-3] and space.augmentation == ["flips"] and space.size() == 2
    assert len(plan_trials(space, 4)) == 2


def test_training_settings_the_search_sets_are_said_and_every_point_augments_as_it_names():
    given = TrainConfig(learning_rate=0.5, border_weight=10.0, augment=False, epochs=3)
    assert unused_settings(ModelConfig(depth=3, distance_map=True), given) == {
        "model.depth": "--depth", "training.learning_rate": "--lr", "training.border_weight": "--border-weight",
        "training.augment false": "--augmentation"}
    assert unused_settings(ModelConfig(), TrainConfig(epochs=3)) == {}
    flips, strong = plan_trials(SearchSpace(augmentation=["flips", "strong"], learning_rate=[1e-3], base_width=[8],
                                            depth=[2], dropout=[0.0], loss=["bce"]), 2, training=given)
    assert flips.training.augment and strong.training.augment  # augment=False made the two presets one
    assert strong.training.augmentation.elastic_probability > 0 == flips.training.augmentation.elastic_probability
    assert flips.training.learning_rate == 1e-3 and flips.training.epochs == 3
    with pytest.raises(ValueError, match="tuning needs at least 2 image/mask pairs, one to train on and one to score "
                                         "the trials by \\(validation Dice\\); the dataset has 1"):
        check_tuning_dataset(1)
    check_tuning_dataset(2)


def test_best_trial_is_the_highest_validation_dice_and_failures_are_listed():
    done = [
        TrialResult(number=1, params={}, status="done", val_dice=0.8),
        TrialResult(number=2, params={}, status="failed", error="RuntimeError: out of memory"),
        TrialResult(number=3, params={}, status="done", val_dice=0.9),
    ]
    assert best_trial(done).number == 3
    assert [row["trial"] for row in trial_rows(done)] == [3, 1, 2]
    assert trial_rows(done)[-1]["status"] == "failed: RuntimeError: out of memory"
    with pytest.raises(ValueError, match="out of memory"):
        best_trial([done[1]])


def test_a_failing_trial_is_reported_not_raised(synthetic_dataset, tmp_path):
    job = TuneJob(images_url=str(synthetic_dataset / "images"), masks_url=str(synthetic_dataset / "masks"))
    trial = plan_trials(TINY_SPACE, 1, training=TINY_TRAINING.model_copy(update={"init_from": str(tmp_path / "no.pt")}))[0]
    result = run_trial(job, trial, tmp_path / "t")
    assert result.status == "failed"
    assert "no.pt" in result.error


@pytest.mark.integration
def test_tune_unet_trains_trials_in_parallel_and_registers_the_best(prefect_harness, synthetic_dataset, tmp_path):
    from prefect.artifacts import Artifact

    from cellseg.flows.tune import tune_unet

    result = tune_unet(TuneJob(
        images_url=str(synthetic_dataset / "images"), masks_url=str(synthetic_dataset / "labels"),
        registry_url=str(tmp_path / "registry"), cache_dir=str(tmp_path / "cache"), work_dir=str(tmp_path / "tuning"),
        trials=2, max_parallel_trials=2, space=TINY_SPACE, model=ModelConfig(depth=2, base_width=8),
        training=TINY_TRAINING,
    ))
    trials = result["trials"]
    assert sorted(row["trial"] for row in trials) == [1, 2]
    assert all(row["status"] == "done" and row["epochs"] == 2 for row in trials)
    best_dice = max(row["val_dice"] for row in trials)
    assert result["best"]["val_dice"] == best_dice
    assert trials[0]["val_dice"] == best_dice  # best first

    registry = Registry(str(tmp_path / "registry"))
    versions = registry.versions()
    assert [meta.version for meta in versions] == [result["version"]]
    assert versions[0].metrics["val_dice"] == pytest.approx(best_dice)
    assert versions[0].train_config["learning_rate"] == result["best"]["params"]["learning_rate"]
    assert registry.current() is None  # registered, not promoted, by default

    table = Artifact.get("tune-unet-trials")
    assert table is not None and "learning_rate" in table.data
    assert float(Artifact.get("tune-unet-progress").data) == 100.0
    summary = Artifact.get("tune-unet-summary")
    assert result["version"] in summary.data


@pytest.mark.integration
def test_cellseg_tune_runs_the_flow_and_prints_every_trial(prefect_harness, synthetic_dataset, tmp_path, capsys):
    from cellseg.cli import main

    code = main([
        "tune", "--images", str(synthetic_dataset / "images"), "--masks", str(synthetic_dataset / "masks"),
        "--registry", str(tmp_path / "registry"), "--cache-dir", str(tmp_path / "cache"),
        "--work-dir", str(tmp_path / "tuning"), "--promote", "--trials", "1", "--parallel", "1",
        "--lr", "1e-3", "--base-width", "8", "--depth", "2", "--dropout", "0.2", "--loss", "bce_dice",
        "--augmentation", "strong", "--border-weight", "5",
        "--training-json", '{"epochs": 1, "patch_size": 64, "patches_per_image": 1, "device": "cpu"}',
    ])
    assert code == 0
    printed = capsys.readouterr().out
    assert "best: trial 1" in printed and "made current" in printed
    registry = Registry(str(tmp_path / "registry"))
    meta = registry.versions()[0]
    assert registry.current() == meta.version
    assert meta.architecture["dropout"] == 0.2
    assert meta.train_config["loss"] == "bce_dice" and meta.train_config["border_weight"] == 5.0
    assert meta.train_config["augmentation"]["elastic_probability"] > 0


@pytest.mark.integration
def test_cellseg_tune_without_a_prefect_server_starts_one_for_itself_and_its_trials(synthetic_dataset, tmp_path):
    """The trials run in processes of their own: each started a temporary server of its own, and
    a 2-trial tune took 84-90 s here against 49-51 s with one server for all."""
    from tests.conftest import cellseg

    run = cellseg(
        "tune", "--images", str(synthetic_dataset / "images"), "--masks", str(synthetic_dataset / "masks"),
        "--registry", str(tmp_path / "registry"), "--cache-dir", str(tmp_path / "cache"),
        "--work-dir", str(tmp_path / "tuning"), "--trials", "2", "--parallel", "2", "--base-width", "8", "--depth", "2",
        "--training-json", '{"epochs": 1, "patch_size": 64, "patches_per_image": 1, "device": "cpu"}',
        env={"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect")},
    )
    assert "best: trial" in run.stdout
    assert run.stderr.count("Starting temporary server") == 1, run.stderr
    assert run.stderr.count("Stopping temporary server") == 1
