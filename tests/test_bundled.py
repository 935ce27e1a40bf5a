"""The models shipped in the package: chosen by name, safe to load, checked against their model
cards, documented, rebuilt by one command from data they may be trained on, and used by
`cellseg predict` when no model is given."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cellseg import bundled
from cellseg.build_bundled import build_general, build_nuclei, decide_nuclei_postprocessing
from cellseg.bundled import (
    DEFAULT_SHIPPED_MODEL,
    SHIPPED_MODELS,
    GeneralRecipe,
    NucleiRecipe,
    model_card,
    shipped_checkpoint,
    shipped_name,
    shipped_paths,
)
from cellseg.checkpoint import CheckpointError, load_checkpoint
from cellseg.cli import main
from cellseg.config import ModelConfig, PredictConfig, TrainConfig
from cellseg.infer import Predictor
from cellseg.io import read_image, read_mask
from cellseg.metrics import segmentation_scores
from cellseg.model_source import ModelSource
from cellseg.store import ResultStore
from cellseg.synth import write_dataset

INSTALLED = [name for name in SHIPPED_MODELS if shipped_paths(name)[0].is_file()]


def test_bundled_means_the_default_shipped_model_and_other_names_choose_theirs():
    assert shipped_name("bundled") == DEFAULT_SHIPPED_MODEL
    assert shipped_name("general") == "general" and shipped_name("nuclei") == "nuclei"
    assert shipped_name("v0003") is None and shipped_name("current") is None
    assert DEFAULT_SHIPPED_MODEL in INSTALLED  # the default model ships in the package


@pytest.mark.parametrize("name", INSTALLED)
def test_a_shipped_checkpoint_loads_safely_and_matches_its_model_card(name):
    checkpoint_path, _ = shipped_paths(name)
    card = model_card(name)
    assert hashlib.sha256(checkpoint_path.read_bytes()).hexdigest() == card["sha256"]
    assert card["name"] == name and card["command"] == SHIPPED_MODELS[name][1]
    assert card["training_data"]["licence"] and card["trained_on"]
    assert checkpoint_path.stat().st_size < 40_000_000  # tens of MB at most
    checkpoint = load_checkpoint(shipped_checkpoint(name))  # weights_only=True inside
    # Fields added since the model was built take their defaults, as when any older checkpoint loads.
    decided = ModelConfig.model_validate(card.get("model") or card["recipe"]["model"])
    assert checkpoint.model_config == decided.without_auto()
    assert checkpoint.dataset_manifest_hash is not None  # trained on a hashed dataset


def test_an_altered_shipped_checkpoint_is_refused_naming_the_file(tmp_path, monkeypatch):
    for path in shipped_paths("general"):
        shutil.copyfile(path, tmp_path / path.name)
    monkeypatch.setattr(bundled, "MODELS_DIR", tmp_path)
    assert shipped_checkpoint("general") == str(tmp_path / "general.pt")
    data = bytearray((tmp_path / "general.pt").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "general.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"general\.pt' does not match the sha256 of its model card"):
        shipped_checkpoint("general")
    with pytest.raises(CheckpointError, match=r"general\.pt' does not match the sha256 of its model card"):
        ModelSource("no-registry", "general").load()  # loading checks the bytes it read
    (tmp_path / "general.pt").unlink()
    with pytest.raises(CheckpointError, match=r"missing from this installation.*make bundled-model"):
        shipped_checkpoint("general")
    with pytest.raises(CheckpointError, match="no shipped model named 'cyto'"):
        shipped_checkpoint("cyto")


@pytest.mark.parametrize("polarity", ["bright", "dark"])
def test_the_general_model_segments_unseen_synthetic_images(polarity, tmp_path):
    write_dataset(str(tmp_path), count=4, size=192, seed=991, polarity=polarity, bit_depth=16)
    predictor = Predictor.from_checkpoint(shipped_checkpoint("general"), PredictConfig(device="cpu"))
    for name in sorted(p.name for p in (tmp_path / "images").iterdir()):
        mask = predictor.masks([read_image(str(tmp_path / "images" / name))])[0]
        dice = segmentation_scores(mask, read_mask(str(tmp_path / "masks" / name)))["dice"]
        assert dice > 0.9, f"{polarity} {name}: Dice {dice:.3f}"


@pytest.mark.integration
def test_cellseg_predict_without_a_model_uses_the_default_shipped_one(tmp_path):
    write_dataset(str(tmp_path / "data"), count=2, size=96, seed=5)
    command = [str(Path(sys.executable).parent / "cellseg"), "predict",
               "--images", str(tmp_path / "data" / "images"), "--out", str(tmp_path / "out.zarr")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert f"using the shipped '{DEFAULT_SHIPPED_MODEL}' model" in result.stderr
    rows = ResultStore.open(str(tmp_path / "out.zarr"), mode="r").statistics()
    digest = hashlib.sha256(Path(shipped_checkpoint()).read_bytes()).hexdigest()[:12]
    assert [row["model_version"] for row in rows] == [f"{DEFAULT_SHIPPED_MODEL}-{digest}"] * 2


def test_models_list_names_the_shipped_models_and_show_prints_a_card(tmp_path, capsys):
    assert main(["models", "list", "--registry", str(tmp_path / "registry")]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in SHIPPED_MODELS) and f"{DEFAULT_SHIPPED_MODEL} (default)" in listed
    assert main(["models", "show", "general", "--registry", str(tmp_path / "registry")]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["name"] == "general" and card["sha256"] == model_card("general")["sha256"]


def test_the_general_recipe_trains_from_generated_data_only(tmp_path):
    recipe = GeneralRecipe(
        images=6, image_size=64, model=ModelConfig(depth=2, base_width=4),
        training=TrainConfig(epochs=1, patch_size=64, patches_per_image=1, device="cpu"),
    )
    result = build_general(tmp_path, recipe, install=False)
    assert result.best_checkpoint.is_file()
    assert len(list((tmp_path / "data" / "labels").iterdir())) == 6
    assert np.isfinite(result.result.history[0]["train_loss"])


@pytest.mark.parametrize("test_set", ["dsb2018", "isbi2012"])
def test_the_nuclei_recipe_refuses_the_test_sets(test_set, tmp_path):
    (tmp_path / test_set / "images").mkdir(parents=True)
    (tmp_path / test_set / "labels").mkdir()
    with pytest.raises(ValueError, match="is a test set of the shipped models"):
        build_nuclei(tmp_path / "out", NucleiRecipe(data_dir=str(tmp_path / test_set)))


def _enlarge(path: Path, factor: int) -> None:
    pixels = np.asarray(Image.open(path))
    Image.fromarray(pixels.repeat(factor, axis=0).repeat(factor, axis=1)).save(path)


def test_the_nuclei_recipe_trains_on_labelled_images_at_their_cell_size(tmp_path, caplog):
    ids = write_dataset(str(tmp_path / "data"), count=6, size=64, seed=4)
    for image_id in ids[:3]:  # two magnifications, as in DSB2018
        for folder in ("images", "masks", "labels"):
            _enlarge(tmp_path / "data" / folder / f"{image_id}.png", 3)
    recipe = NucleiRecipe(data_dir=str(tmp_path / "data"),
                          model=NucleiRecipe().model.model_copy(update={"depth": 2, "base_width": 4}),
                          training=NucleiRecipe().training.model_copy(update={"epochs": 1, "patch_size": 48,
                                                                             "device": "cpu", "val_fraction": 0.34}))
    with caplog.at_level(logging.INFO, logger="cellseg"):
        outcome = build_nuclei(tmp_path / "out", recipe)
    checkpoint = load_checkpoint(str(outcome.best_checkpoint))
    # the size model scored on the held-out images, read as prediction reads them
    assert re.search(r"size model, the one fitted on 4 training images: validation images' cell size within 25% on \d+%",
                     caplog.text)
    assert checkpoint.model_config.distance_map
    assert isinstance(checkpoint.model_config.cell_diameter, float)  # 'auto' decided from the labels
    assert outcome.cells["images"] == 2  # validation scored at cell level
    assert checkpoint.size_model is not None  # each image's cell size is estimated from the network's features
    image = read_image(str(tmp_path / "data" / "images" / f"{ids[0]}.png"))
    (maps,) = Predictor(checkpoint, PredictConfig(device="cpu")).cell_maps([image])
    assert maps.scale["measured"] and maps.scale["measured_diameter"] is not None


def test_the_nuclei_models_post_processing_is_decided_again_without_training(tmp_path, monkeypatch):
    write_dataset(str(tmp_path / "data"), count=6, size=64, seed=4)
    recipe = NucleiRecipe(data_dir=str(tmp_path / "data"),
                          model=NucleiRecipe().model.model_copy(update={"depth": 2, "base_width": 4}),
                          training=NucleiRecipe().training.model_copy(update={"epochs": 1, "patch_size": 48,
                                                                             "device": "cpu", "val_fraction": 0.34}))
    (tmp_path / "models").mkdir()
    monkeypatch.setattr(bundled, "MODELS_DIR", tmp_path / "models")
    outcome = build_nuclei(tmp_path / "out", recipe, install=True)
    checkpoint_path, card_path = shipped_paths("nuclei")
    installed = load_checkpoint(shipped_checkpoint("nuclei"))
    card = json.loads(card_path.read_text())
    card["test"] = {"dsb2018": {"images": 45}}  # figures of the weights as they were decided before
    card_path.write_text(json.dumps(card))
    weights = installed.state_dict

    assert decide_nuclei_postprocessing(recipe) == checkpoint_path
    decided = load_checkpoint(shipped_checkpoint("nuclei"))  # its card's new sha256 matches
    card = model_card("nuclei")
    assert card["post_processing"] | {"decided": None} == {"split_touching": decided.split_touching, "decided": None,
                                                          "threshold": decided.threshold,
                                                          "centre_prominence": decided.centre_prominence}
    assert (decided.split_touching, decided.threshold, decided.centre_prominence) == (
        installed.split_touching, installed.threshold, installed.centre_prominence)  # the same data decides alike
    assert all(torch.equal(weights[key], value) for key, value in decided.state_dict.items())
    assert card["test"] == {}  # measured again by benchmarks.quality --card
    assert card["validation"]["cells_images"] == outcome.cells["images"] == 2
    assert card["validation"]["cells_f1_mean"] == pytest.approx(outcome.cells["f1_mean"])


@pytest.mark.integration
def test_cellseg_predict_takes_a_shipped_model_by_name(tmp_path):
    write_dataset(str(tmp_path / "data"), count=2, size=96, seed=5)
    command = [str(Path(sys.executable).parent / "cellseg"), "predict", "--model", "general",
               "--images", str(tmp_path / "data" / "images"), "--out", str(tmp_path / "out.zarr")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    rows = ResultStore.open(str(tmp_path / "out.zarr"), mode="r").statistics()
    assert all(row["model_version"].startswith("general-") for row in rows) and len(rows) == 2
