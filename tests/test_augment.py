"""Augmentation invariants: image and mask move together; intensity changes touch the image only."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.augment import adjust_intensity, augment_pair, sampling_grid, warp
from cellseg.config import AugmentationConfig

GEOMETRY_ONLY = AugmentationConfig(affine_probability=1.0, elastic_probability=1.0, intensity_probability=0.0)


def blobs(seed: int = 0, side: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.ogrid[:side, :side]
    mask = np.zeros((side, side), bool)
    for _ in range(8):
        r, c, radius = rng.integers(10, side - 10), rng.integers(10, side - 10), rng.integers(4, 10)
        mask |= (rows - r) ** 2 + (cols - c) ** 2 <= radius**2
    return mask


@pytest.mark.parametrize("seed", range(5))
def test_image_and_mask_are_warped_identically(seed):
    mask = blobs(seed)
    image = mask.astype(np.float32)  # the image *is* the mask, so any misalignment shows
    warped_image, warped_mask = augment_pair(image, mask, GEOMETRY_ONLY, np.random.default_rng(seed))
    assert warped_image.shape == warped_mask.shape == mask.shape and warped_mask.dtype == bool
    assert not np.array_equal(warped_mask, mask)  # something did move
    disagree = (warped_image > 0.5) != warped_mask
    # Bilinear vs nearest sampling can differ only on the cells' outlines, where the image is grey.
    assert disagree.mean() < 0.02
    assert np.all((warped_image[disagree] > 0) & (warped_image[disagree] < 1))


def test_flips_only_gives_one_of_the_eight_symmetries_exactly():
    mask = blobs(1)
    image = np.random.default_rng(1).random(mask.shape, dtype=np.float32)
    symmetries = [np.rot90(image, k) for k in range(4)] + [np.rot90(image, k)[:, ::-1] for k in range(4)]
    for seed in range(10):
        out_image, out_mask = augment_pair(image, mask, AugmentationConfig.flips_only(), np.random.default_rng(seed))
        index = next(i for i, s in enumerate(symmetries) if np.array_equal(s, out_image))
        k = index % 4
        expected_mask = np.rot90(mask, k) if index < 4 else np.rot90(mask, k)[:, ::-1]
        np.testing.assert_array_equal(out_mask, expected_mask)


def test_intensity_changes_leave_the_mask_alone():
    mask = blobs(2)
    image = np.random.default_rng(2).random(mask.shape, dtype=np.float32)
    config = AugmentationConfig(flips=False, affine_probability=0.0, elastic_probability=0.0, intensity_probability=1.0)
    out_image, out_mask = augment_pair(image, mask, config, np.random.default_rng(3))
    np.testing.assert_array_equal(out_mask, mask)
    assert out_image.dtype == np.float32 and not np.allclose(out_image, image)
    # Contrast, brightness and gamma are monotonic: without noise the order of intensities stays.
    quiet = config.model_copy(update={"noise_std": 0.0})
    changed = adjust_intensity(image, quiet, np.random.default_rng(4))
    order = np.argsort(image.ravel())
    assert np.all(np.diff(changed.ravel()[order]) >= -1e-6)


def test_augmentation_is_a_function_of_the_generator_state():
    mask = blobs(3)
    image = mask.astype(np.float32)
    strong = AugmentationConfig.strong()
    first = augment_pair(image, mask, strong, np.random.default_rng([7, 1, 2]))
    again = augment_pair(image, mask, strong, np.random.default_rng([7, 1, 2]))
    other = augment_pair(image, mask, strong, np.random.default_rng([7, 1, 3]))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], other[0])


def test_zero_probabilities_draw_no_warp():
    config = AugmentationConfig(affine_probability=0.0, elastic_probability=0.0)
    assert sampling_grid((32, 32), config, np.random.default_rng(0)) is None


def test_identity_grid_warp_returns_the_input():
    mask = blobs(4, side=40)
    image = np.random.default_rng(4).random(mask.shape, dtype=np.float32)
    grid = np.stack(np.meshgrid(np.arange(40.0), np.arange(40.0), indexing="ij"))
    out_image, out_mask = warp(image, mask, grid)
    np.testing.assert_allclose(out_image, image, atol=1e-6)
    np.testing.assert_array_equal(out_mask, mask)


def test_default_is_flips_only_and_strong_adds_the_rest():
    assert AugmentationConfig() == AugmentationConfig.flips_only()
    strong = AugmentationConfig.strong()
    assert strong.flips and min(strong.affine_probability, strong.elastic_probability, strong.intensity_probability) > 0
