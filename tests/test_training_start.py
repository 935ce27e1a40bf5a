"""Where a training run starts, and why, logged once by the library's recipe (`run_training`):
`cellseg train` and the train-unet flow say it alike."""

from __future__ import annotations

import json

import pytest

from tests.conftest import cellseg

SMALL = {"depth": 2, "base_width": 4}  # not the shipped model's architecture: 'auto' trains from scratch
ONE_EPOCH = {"epochs": 1, "patch_size": 64, "patches_per_image": 1, "device": "cpu"}
FROM_SCRATCH = "start: from scratch (an architecture of its own is asked for)"


@pytest.mark.integration
def test_flow_train_unet_logs_where_training_starts_once(tmp_path, synthetic_dataset):
    trained = cellseg("flow", "train-unet", "--images", str(synthetic_dataset / "images"), "--masks",
                      str(synthetic_dataset / "masks"), "--registry", str(tmp_path / "registry"), "--work-dir",
                      str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
                      "--model-json", json.dumps(SMALL), "--training-json", json.dumps(ONE_EPOCH),
                      env={"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect")})  # not ~/.prefect

    assert [line for line in trained.stderr.splitlines() if line.endswith(FROM_SCRATCH)] == [FROM_SCRATCH]
    assert "start:" not in trained.stdout


def test_train_logs_where_training_starts_once(tmp_path, synthetic_dataset):
    trained = cellseg("train", "--images", str(synthetic_dataset / "images"), "--masks", str(synthetic_dataset / "masks"),
                      "--out", str(tmp_path / "run"), "--depth", "2", "--base-width", "4", "--epochs", "1",
                      "--patch-size", "64", "--patches-per-image", "1")

    assert [line for line in trained.stderr.splitlines() if "start:" in line] == [FROM_SCRATCH]
    assert "start:" not in trained.stdout
