"""The size model: a ridge regression from the network's features to each image's cell size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellseg.bundled import shipped_checkpoint
from cellseg.checkpoint import load_checkpoint
from cellseg.config import ModelConfig
from cellseg.loaded_pairs import LoadedPair
from cellseg.model import UNet
from cellseg.normalize import normalize_image
from cellseg.pairs import ImagePair
from cellseg.scale import SCALE_TOLERANCE, median_cell_diameter, resize, scale_factor, scaled_shape
from cellseg.size_model import (
    MAGNIFICATION_RANGE,
    SIZE_CROP,
    SizeModel,
    batched_network_features,
    central_crop,
    fit_size_model,
    network_features,
    size_estimates,
    size_examples,
)
from cellseg.synth import generate_sample


def test_the_regression_recovers_a_log_linear_size_and_survives_a_round_trip():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(200, 12)) * rng.uniform(0.1, 10, size=12) + rng.normal(size=12)
    weights = rng.normal(size=12) * 0.1
    targets = (features - features.mean(axis=0)) / features.std(axis=0) @ weights + np.log(20.0)
    model = fit_size_model(features, targets)
    predicted = np.array([model.diameter(row) for row in features])
    np.testing.assert_allclose(predicted, np.exp(targets), rtol=0.02)
    again = SizeModel.from_dict(model.to_dict())
    assert again.diameter(features[0]) == pytest.approx(model.diameter(features[0]))
    with pytest.raises(ValueError, match="too few to fit a size model"):
        fit_size_model(features[:4], targets[:4])


@pytest.mark.parametrize("examples, width", [(200, 12), (30, 500)], ids=["more examples", "more features"])
def test_the_ridge_solution_is_the_textbook_one_whichever_side_is_larger(examples, width):
    """With fewer examples than features (a wide network's moments of a few dozen images) the fit
    solves the examples' system; its coefficients are still (X'X + pI)^-1 X'y."""
    rng = np.random.default_rng(1)
    features = rng.normal(size=(examples, width)) * rng.uniform(0.5, 4, size=width)
    targets = np.log(rng.uniform(8, 40, size=examples))
    model = fit_size_model(features, targets)
    x = (features - features.mean(axis=0)) / features.std(axis=0)
    textbook = np.linalg.solve(x.T @ x + model.penalty * np.eye(width), x.T @ (targets - targets.mean()))
    np.testing.assert_allclose(model.coefficients, textbook, rtol=1e-6, atol=1e-9)


def loaded_pair(seed: int) -> LoadedPair:
    sample = generate_sample(np.random.default_rng(seed), (128, 128))
    return LoadedPair(source=ImagePair(f"s{seed}", "", ""), image=sample.image.astype(np.float32) / 255,
                      mask=sample.mask, image_sha256="", mask_sha256="", dtype="uint8",
                      instances=sample.labels.astype(np.int32))


def test_each_image_is_shown_at_several_magnifications_with_its_cell_size():
    from cellseg.scale import median_cell_diameter

    pairs = [loaded_pair(seed) for seed in range(3)]
    shapes = []
    features, targets = size_examples(pairs, lambda image: (shapes.append(image.shape), np.zeros(2))[1], seed=1)
    assert features.shape == (9, 2) and len(targets) == 9
    for index, pair in enumerate(pairs):
        diameter = median_cell_diameter(pair.instances)
        for target, shape in zip(targets[3 * index : 3 * index + 3], shapes[3 * index : 3 * index + 3], strict=True):
            factor = np.exp(target) / diameter  # the magnification drawn, and the image resampled by it
            assert 1 / MAGNIFICATION_RANGE <= factor <= MAGNIFICATION_RANGE
            assert shape[0] == pytest.approx(min(SIZE_CROP, 128 * factor), abs=3)


def test_features_come_from_the_central_crop_of_the_contracting_path():
    model = UNet(ModelConfig(depth=2, base_width=4))
    features = network_features(model, torch.device("cpu"), amp=False)
    image = np.random.default_rng(0).random((700, 600)).astype(np.float32)
    assert central_crop(image).shape == (512, 512)
    vector = features(image)
    assert vector.shape == (2 * (4 + 8 + 16),)  # mean and std of each level's channels
    np.testing.assert_allclose(vector, features(central_crop(image)), rtol=1e-5)


@pytest.mark.parametrize("times_model_size", [2.0, 3.0])
def test_cells_far_from_the_model_size_are_read_again_at_the_scale_the_first_reading_asks_for(times_model_size):
    """The shipped nuclei model's size model on synthetic nuclei two and three times its cell
    size: its first reading is off (median over five samples 1.38x and 1.28x the true diameter),
    the reading of the crop resampled to it is not (1.00x and 1.09x; issue 18's target is 15%).
    Each image takes one more pass of the contracting path, all in one call."""
    checkpoint = load_checkpoint(shipped_checkpoint("nuclei"))
    model_diameter = float(checkpoint.model_config.cell_diameter)
    size_model = SizeModel.from_dict(checkpoint.size_model)
    features = batched_network_features(checkpoint.build_model(), torch.device("cpu"))
    images, true_diameters = [], []
    for seed in range(11, 16):
        sample = generate_sample(np.random.default_rng(seed), (256, 256))
        shape = scaled_shape(sample.image.shape, times_model_size * model_diameter / median_cell_diameter(sample.labels))
        images.append(normalize_image(resize(sample.image, shape, order=1), checkpoint.model_config.normalization))
        true_diameters.append(median_cell_diameter(resize(sample.labels.astype(np.int32), shape, order=0)))
    calls: list[int] = []

    def counted(batch):
        calls.append(len(batch))
        return features(batch)

    first = [size_model.diameter(row) for row in features(images)]
    estimates = size_estimates(size_model, counted, model_diameter)(images)
    far = sum(abs(scale_factor(diameter, model_diameter, image.shape) - 1.0) >= SCALE_TOLERANCE
              for diameter, image in zip(first, images, strict=True))
    assert calls == [5, far] and far >= 4
    first_ratio = float(np.median(np.divide(first, true_diameters)))
    ratio = float(np.median(np.divide(estimates, true_diameters)))
    assert abs(np.log(ratio)) < abs(np.log(first_ratio)), (first_ratio, ratio)
    assert ratio == pytest.approx(1.0, abs=0.15), (first_ratio, ratio)


def constant_size_model(features: int, diameter: float) -> dict:
    """A size model that reads every image's cells as `diameter` pixels across."""
    return {"coefficients": [0.0] * features, "intercept": float(np.log(diameter)), "feature_mean": [0.0] * features,
            "feature_scale": [1.0] * features, "penalty": 10.0}


def test_the_size_model_that_reads_the_validation_images_best_is_kept(tmp_path, caplog):
    import logging

    from cellseg.jobs_checkpoint import choose_size_model
    from cellseg.loaded_pairs import load_pairs
    from cellseg.model import feature_count
    from cellseg.pairs import pair_images_and_masks
    from cellseg.synth import write_dataset

    write_dataset(str(tmp_path / "data"), count=4, size=96, seed=2)
    config = ModelConfig(depth=2, base_width=4, cell_diameter=19.0)
    pairs = load_pairs(pair_images_and_masks(str(tmp_path / "data/images"), str(tmp_path / "data/labels")),
                       config.normalization)
    true = float(np.median([median_cell_diameter(pair.instances) for pair in pairs]))
    near, far = constant_size_model(feature_count(config), true), constant_size_model(feature_count(config), 4 * true)
    features = batched_network_features(UNet(config).eval(), torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="cellseg"):
        assert choose_size_model({"far": far, "near": near}, features, 19.0, pairs, seed=0) == near
        assert choose_size_model({"near": near, "far": far}, features, 19.0, pairs, seed=0) == near
    assert "size model, near: validation images' cell size within 25% on" in caplog.text and "; not far:" in caplog.text
    assert choose_size_model({"far": far, "near": near}, features, 19.0, [], seed=0) == far  # no validation: the first


def test_fine_tuning_on_too_few_images_for_a_size_model_keeps_the_starting_models(tmp_path, caplog):
    """Two training images fit no size model: the fine-tuned model used to lose its start's and
    measure every image's cells by first passes."""
    import logging

    from cellseg.config import TrainConfig
    from cellseg.job_config import TrainJob
    from cellseg.jobs import run_training
    from cellseg.synth import write_dataset
    from tests.conftest import narrow_nuclei_checkpoint

    start = narrow_nuclei_checkpoint(tmp_path / "start.pt")
    write_dataset(str(tmp_path / "data"), count=3, size=64, seed=1)
    job = TrainJob(images_url=str(tmp_path / "data/images"), masks_url=str(tmp_path / "data/labels"),
                   training=TrainConfig(epochs=1, patch_size=48, device="cpu", val_fraction=0.34, init_from=str(start)))
    with caplog.at_level(logging.INFO, logger="cellseg"):
        outcome = run_training(job, tmp_path / "run")
    assert "masks read as 3 instance label images (one value per cell)\n" in caplog.text  # no "and 0 binary masks"
    assert outcome.train_images == 2
    assert load_checkpoint(str(outcome.result.best_checkpoint)).size_model == load_checkpoint(str(start)).size_model


def test_fine_tuning_without_validation_images_keeps_the_starting_models_size_model_and_post_processing(
        tmp_path, caplog):
    """With --val-fraction 0 nothing can tell a size model fitted on a few training images from the
    starting model's, nor choose a threshold: the fitted one used to be kept (45% off on 4 images)
    and the threshold reset to 0.5."""
    import dataclasses
    import logging

    from cellseg.checkpoint import save_checkpoint
    from cellseg.config import TrainConfig
    from cellseg.job_config import TrainJob
    from cellseg.jobs import run_training
    from cellseg.synth import write_dataset
    from tests.conftest import narrow_nuclei_checkpoint

    start_url = str(narrow_nuclei_checkpoint(tmp_path / "start.pt"))
    start = dataclasses.replace(load_checkpoint(start_url), split_touching=True, threshold=0.45, centre_prominence=0.12)
    save_checkpoint(start, start_url)
    write_dataset(str(tmp_path / "data"), count=5, size=64, seed=1)
    job = TrainJob(images_url=str(tmp_path / "data/images"), masks_url=str(tmp_path / "data/labels"),
                   training=TrainConfig(epochs=1, patch_size=48, device="cpu", val_fraction=0.0, init_from=start_url))
    with caplog.at_level(logging.INFO, logger="cellseg"):
        outcome = run_training(job, tmp_path / "run")
    assert outcome.train_images == 5
    tuned = load_checkpoint(str(outcome.result.best_checkpoint))
    assert tuned.size_model == start.size_model
    assert (tuned.split_touching, tuned.threshold, tuned.centre_prominence) == (True, 0.45, 0.12)
    assert "size model: the starting model's (no validation images to compare the candidates on)" in caplog.text
    assert ("post-processing: no validation images to choose it on, so the starting model's is kept "
            "(split touching True, threshold 0.45, centre prominence 0.12)") in caplog.text
