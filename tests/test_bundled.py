"""The general-purpose model shipped in the package: safe to load, documented, trained on synthetic
images only, good on unseen synthetic images of both polarities, and used by `cellseg predict`
when no model is given."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellseg.build_bundled import build
from cellseg.bundled import (
    BUNDLED_CHECKPOINT,
    BUNDLED_PROVENANCE,
    BundledRecipe,
    bundled_checkpoint,
)
from cellseg.checkpoint import load_checkpoint
from cellseg.config import ModelConfig, PredictConfig, TrainConfig
from cellseg.infer import Predictor
from cellseg.io import read_image, read_mask
from cellseg.metrics import segmentation_scores
from cellseg.store import ResultStore
from cellseg.synth import write_dataset


def test_the_bundled_checkpoint_loads_safely_and_matches_its_provenance():
    provenance = json.loads(BUNDLED_PROVENANCE.read_text())
    assert hashlib.sha256(BUNDLED_CHECKPOINT.read_bytes()).hexdigest() == provenance["sha256"]
    assert provenance["command"] == "make bundled-model"
    assert "synthetic" in provenance["description"]
    assert BUNDLED_CHECKPOINT.stat().st_size < 4_000_000
    checkpoint = load_checkpoint(bundled_checkpoint())  # weights_only=True inside
    # Fields added since the model was built take their defaults, as when any older checkpoint loads.
    assert checkpoint.model_config == ModelConfig.model_validate(provenance["recipe"]["model"]).without_auto()
    assert checkpoint.dataset_manifest_hash is not None  # trained on a generated, hashed dataset


@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_the_bundled_model_segments_unseen_synthetic_images(polarity, tmp_path):
    write_dataset(str(tmp_path), count=4, size=192, seed=991, polarity=polarity, bit_depth=16)
    predictor = Predictor.from_checkpoint(bundled_checkpoint(), PredictConfig(device="cpu"))
    for name in sorted(p.name for p in (tmp_path / "images").iterdir()):
        mask = predictor.masks([read_image(str(tmp_path / "images" / name))])[0]
        dice = segmentation_scores(mask, read_mask(str(tmp_path / "masks" / name)))["dice"]
        assert dice > 0.9, f"{polarity} {name}: Dice {dice:.3f}"


@pytest.mark.integration
def test_cellseg_predict_without_a_model_uses_the_bundled_one(tmp_path):
    write_dataset(str(tmp_path / "data"), count=2, size=96, seed=5)
    command = [str(Path(sys.executable).parent / "cellseg"), "predict",
               "--images", str(tmp_path / "data" / "images"), "--out", str(tmp_path / "out.zarr")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "bundled general-purpose model" in result.stderr
    rows = ResultStore.open(str(tmp_path / "out.zarr"), mode="r").statistics()
    digest = hashlib.sha256(BUNDLED_CHECKPOINT.read_bytes()).hexdigest()[:12]
    assert [row["model_version"] for row in rows] == [f"bundled-{digest}"] * 2
    assert all(row["cell_count"] > 0 for row in rows)


def test_the_build_recipe_trains_from_generated_data_only(tmp_path):
    recipe = BundledRecipe(
        images=6, image_size=64, model=ModelConfig(depth=2, base_width=4),
        training=TrainConfig(epochs=1, patch_size=64, patches_per_image=1, device="cpu"),
    )
    result = build(tmp_path, recipe, install=False)
    assert result.best_checkpoint.is_file()
    assert len(list((tmp_path / "data" / "labels").iterdir())) == 6
    assert np.isfinite(result.result.history[0]["train_loss"])
