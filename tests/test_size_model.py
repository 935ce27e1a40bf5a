"""The size model: a ridge regression from the network's features to each image's cell size."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellseg.config import ModelConfig
from cellseg.model import UNet
from cellseg.pairs import ImagePair, LoadedPair
from cellseg.size_model import (
    MAGNIFICATION_RANGE,
    SIZE_CROP,
    SizeModel,
    central_crop,
    fit_size_model,
    network_features,
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
