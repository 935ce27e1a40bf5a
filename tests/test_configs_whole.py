"""Configs travel whole: every field of ModelConfig, TrainConfig and PredictConfig set in one
settings file reaches what `cellseg train` / `cellseg predict` and the train-unet /
segment-images flows (through `cellseg flow`, against a real Prefect server) do and record."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from cellseg.config import ModelConfig, PredictConfig, TrainConfig
from cellseg.registry import Registry
from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from tests.conftest import cellseg

pytestmark = pytest.mark.integration

# A value for every field, unlike its default wherever another value is cheap to run here; the
# few left at their default (in/out channels, compile, init_from) are still set in the file.
MODEL = {
    "in_channels": 1, "out_channels": 1, "depth": 2, "base_width": 4, "dropout": 0.2, "norm": "group",
    "cell_diameter": 12.0, "distance_map": True,
    "normalization": {"low_percentile": 2.0, "high_percentile": 99.0, "polarity": "keep"},
}
TRAINING = {
    "epochs": 2, "batch_size": 2, "learning_rate": 2e-3, "weight_decay": 1e-5, "lr_patience": 2, "patch_size": 48,
    "patches_per_image": 1, "patch_sampling": "by_area",
    "balance_appearance": 0.2, "loss": "bce_dice", "border_weight": 2.0, "border_sigma": 3.0,
    "init_from": None,
    "freeze_encoder_epochs": 1, "augment": False,
    "augmentation": {"flips": False, "affine_probability": 0.1, "rotation_degrees": 10.0, "max_scale": 1.1,
                     "elastic_probability": 0.1, "elastic_grid": 32, "elastic_std": 2.0, "intensity_probability": 0.1,
                     "contrast": 0.1, "brightness": 0.05, "max_gamma": 1.2, "noise_std": 0.01,
                     "dim_cells_probability": 0.1, "min_cell_contrast": 0.3},
    "val_fraction": 0.34, "seed": 3, "patience": 5, "min_delta": 0.01, "monitor": "val_loss", "max_minutes": 5.0,
    "device": "cpu", "amp": False, "loader_workers": 1, "compile": "off", "threshold": 0.4,
}
PREDICT = {
    "threshold": 0.4, "batch_size": 2, "device": "cpu", "amp": False, "compile": False, "tta": True, "tile_size": 96,
    "tile_overlap": 16, "threads": 1, "keep_freed_memory": False, "postprocess_workers": 1, "min_cell_area": 5, "cell_diameter": 14.0, "split_touching": False,
    "centre_prominence": 0.2, "split_depth": 0.7, "measure_cells": False, "store_image": False,
    "save_probabilities": True, "max_pixels": 10_000_000,
    "cell_diameter_um": None,  # not with cell_diameter
    "selection": {"channel": 0, "z": "max", "t": "all", "recursive": True},  # what a single-plane PNG has
    "blocks": {"above_pixels": 5_000_000, "block_size": 512, "overlap": 32, "empty_level": 0.2, "max_pixels": 1 << 30},
}


def test_the_file_sets_every_field():
    """A field added to a config must be added here, so that this module checks it too."""
    for config, values in ((ModelConfig, MODEL), (TrainConfig, TRAINING), (PredictConfig, PREDICT)):
        assert set(values) == set(config.model_fields), config.__name__
        assert config.model_validate(values).model_dump(mode="json") == json.loads(json.dumps(values))


@pytest.fixture(scope="module")
def settings_file(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("whole")
    write_dataset(str(root / "data"), count=6, size=96, seed=4)
    path = root / "cellseg.yaml"
    path.write_text(yaml.safe_dump({"registry_url": str(root / "registry"), "model": MODEL, "training": TRAINING,
                                    "predict": PREDICT}))
    return path


def _check_checkpoint(path: Path) -> None:
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["model_config"] == MODEL
    assert checkpoint["train_config"] == TRAINING


def _check_store(url: str) -> None:
    store = ResultStore.open(url, mode="r")
    done = sorted(store.done_ids())
    assert len(done) == 6
    for image_id in done:
        assert store.record(image_id)["model"]["predict"] == PREDICT
        assert store.has_probabilities(image_id)  # save_probabilities
        assert f"{image_id}/0" not in store.root  # store_image off: no image copy
    assert list(store.cell_rows()) == []  # measure_cells off: no per-cell table


def test_cellseg_train_and_predict_honour_every_field(settings_file):
    root = settings_file.parent
    data = root / "data"
    cellseg("train", "--images", str(data / "images"), "--masks", str(data / "labels"), "--out", str(root / "cli"),
            "--config", str(settings_file))
    _check_checkpoint(root / "cli" / "best.pt")
    history = json.loads((root / "cli" / "history.json").read_text())
    assert len(history) == 2 and history[0]["learning_rate"] == TRAINING["learning_rate"]
    assert json.loads((root / "cli" / "split.json").read_text())["val"] != []
    cellseg("predict", "--model", str(root / "cli" / "best.pt"), "--images", str(data / "images"),
            "--out", str(root / "cli.zarr"), "--config", str(settings_file))
    _check_store(str(root / "cli.zarr"))


def test_the_flows_honour_every_field(settings_file, prefect_server):
    root = settings_file.parent
    data = root / "data"
    env = {**prefect_server, "CELLSEG_CONFIG": str(settings_file)}
    cellseg("flow", "train-unet", "--images", str(data / "images"), "--masks", str(data / "labels"),
            "--cache-dir", str(root / "cache"), "--work-dir", str(root / "training"), env=env)
    registry = Registry(str(root / "registry"))
    (version,) = registry.versions()
    _check_checkpoint(Path(registry.checkpoint_url(version.version)))
    cellseg("flow", "segment-images", "--source", str(data / "images"), "--store", str(root / "flow.zarr"), env=env)
    _check_store(str(root / "flow.zarr"))
