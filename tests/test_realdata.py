"""The CLI round trip on the real datasets in ../shared/data (skipped when absent)."""

from __future__ import annotations

import json

import pytest

from cellseg.checkpoint import load_checkpoint
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.io import list_images, read_image
from cellseg.metrics import mask_agreement
from tests.conftest import cellseg, shared_dataset

pytestmark = [pytest.mark.integration, pytest.mark.realdata]


def test_cli_round_trip_on_dsb2018(tmp_path):
    data = shared_dataset("dsb2018")
    model = tmp_path / "model"
    cellseg("train", "--images", str(data / "images"), "--masks", str(data / "masks"), "--out", str(model),
            "--epochs", "6", "--depth", "3", "--base-width", "8", "--patch-size", "128", "--patches-per-image", "4")
    split = json.loads((model / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 45

    store = str(tmp_path / "dsb.zarr")
    predicted = cellseg("predict", "--model", str(model / "best.pt"), "--images", str(data / "images"), "--out", store)
    assert "segmented 45, skipped 0" in predicted.stdout

    scores = json.loads(cellseg("evaluate", "--pred", store, "--masks", str(data / "masks"), "--json").stdout)
    assert scores["images"] == 45 and scores["missing_predictions"] == []
    # Six short epochs of a tiny model already separate nuclei from background on most images.
    assert scores["pooled"]["dice"] > 0.6

    rows = json.loads(cellseg("results", store, "--json").stdout)["statistics"]
    shapes = {row["image_id"]: row for row in rows}
    assert len(shapes) == 45
    assert sum(row["cell_count"] > 0 for row in rows) >= 40

    # The default fast path (bf16 autocast where supported) against plain fp32 on the same model.
    # This 6-epoch model leaves more pixels near the threshold than a trained one, where bf16
    # rounding can tip them; the Dice >= 0.999 is measured by `make bench` on the fully
    # trained reference models (0.9995 on dsb2018, 0.9998 on isbi2012).
    checkpoint = load_checkpoint(str(model / "best.pt"))
    images = [read_image(url) for url in list_images(str(data / "images"))]
    fast = Predictor(checkpoint, PredictConfig(device="cpu")).masks(images)
    plain = Predictor(checkpoint, PredictConfig(device="cpu", amp=False)).masks(images)
    agreement = mask_agreement(fast, plain)
    assert agreement["pixel_agreement"] >= 0.999 and agreement["dice"] >= 0.997, agreement


def test_predict_without_a_model_segments_dsb2018_nuclei_well(tmp_path):
    """The shipped nuclei model never saw these 45 test images; no flags, so each image's cell
    size is estimated."""
    data = shared_dataset("dsb2018")
    store = str(tmp_path / "shipped.zarr")
    predicted = cellseg("predict", "--images", str(data / "images"), "--out", store)
    assert "segmented 45, skipped 0" in predicted.stdout
    scores = json.loads(cellseg("evaluate", "--pred", store, "--masks", str(data / "masks"),
                                "--labels", str(data / "labels"), "--json").stdout)
    # Measured 0.811 in fp32 on a CPU without native bf16 (benchmarks.quality --model nuclei; 0.820 in
    # bf16 on the GPU it was trained on); issue 18's target is 0.80 here and 0.88 overall.
    assert scores["instances"]["f1_mean"] > 0.80, scores["instances"]


@pytest.mark.parametrize(("dataset", "masks", "fine_tunes"), [("dsb2018", "labels", True), ("isbi2012", "masks", False)])
def test_training_fine_tunes_the_shipped_model_on_nuclei_and_starts_from_scratch_on_em(dataset, masks, fine_tunes):
    """The measured rule: on dsb2018 fine-tuning the shipped model won, on isbi2012's EM slices
    training from scratch did (docs/quality.md); `training.init_from: auto` tells them apart."""
    from cellseg.config import TrainConfig
    from cellseg.job_config import TrainJob
    from cellseg.pairs import pair_images_and_masks, split_train_val
    from cellseg.starting_point import FINE_TUNE_MIN_DICE, choose_start

    data = shared_dataset(dataset)
    job = TrainJob(images_url=str(data / "images"), masks_url=str(data / masks), training=TrainConfig(device="cpu"))
    pairs = pair_images_and_masks(job.images_url, job.masks_url)
    start = choose_start(job, len(pairs), split_train_val(pairs, job.training.val_fraction, job.training.seed)[1])
    assert (start.checkpoint is not None) == fine_tunes, start.described()
    assert (start.shipped_dice >= FINE_TUNE_MIN_DICE + 0.2) if fine_tunes else (start.shipped_dice <= FINE_TUNE_MIN_DICE - 0.2)
