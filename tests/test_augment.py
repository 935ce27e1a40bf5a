"""Augmentation invariants: image and mask move together; intensity changes, dimmed cells
included, touch the image only."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.augment import adjust_intensity, augment_pair, dim_some_cells, sampling_grid, warp
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


def separate_disks(side: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Sixteen bright disks (labels 1-16) on a grey background, none touching."""
    rows, cols = np.ogrid[:side, :side]
    labels = np.zeros((side, side), np.int32)
    for index in range(16):
        r, c = 16 + 32 * (index // 4), 16 + 32 * (index % 4)
        labels[(rows - r) ** 2 + (cols - c) ** 2 <= 8**2] = index + 1
    return np.where(labels > 0, 0.9, 0.1).astype(np.float32), labels


def test_dimmed_cells_keep_part_of_their_contrast_and_the_background_its_level():
    image, labels = separate_disks()
    config = AugmentationConfig(dim_cells_probability=1.0, min_cell_contrast=0.2)
    out = dim_some_cells(image, labels > 0, config, np.random.default_rng(0))
    centres = np.array([out[16 + 32 * (i // 4), 16 + 32 * (i % 4)] for i in range(16)])
    kept = (centres - 0.1) / 0.8
    dimmed = kept < 0.99
    assert 3 <= dimmed.sum() <= 13  # about half the cells, drawn
    assert kept.min() >= 0.2 - 1e-3 and kept.max() <= 1 + 1e-6  # within [min_cell_contrast, 1]
    np.testing.assert_allclose(kept[~dimmed], 1.0, atol=1e-6)  # the others untouched, at their centres
    far = np.ones_like(labels, bool)
    for index in range(16):  # beyond the dimmed rim, the background is as it was
        r, c = 16 + 32 * (index // 4), 16 + 32 * (index % 4)
        far[max(r - 13, 0) : r + 14, max(c - 13, 0) : c + 14] = False
    np.testing.assert_allclose(out[far], 0.1, atol=1e-6)
    assert out.dtype == np.float32


def test_dimming_draws_nothing_when_off_so_earlier_recipes_see_the_same_samples():
    image, labels = separate_disks()
    off = AugmentationConfig(dim_cells_probability=0.0)
    rng, untouched = np.random.default_rng(5), np.random.default_rng(5)
    assert dim_some_cells(image, labels > 0, off, rng) is image
    assert rng.random() == untouched.random()


def test_augment_pair_dims_the_cells_of_a_target_stack_and_leaves_the_targets():
    image, labels = separate_disks()
    stack = np.stack([(labels > 0).astype(np.float32), np.zeros(labels.shape, np.float32)])
    config = AugmentationConfig(flips=False, dim_cells_probability=1.0)
    out_image, out_stack = augment_pair(image, stack, config, np.random.default_rng(1))
    np.testing.assert_array_equal(out_stack, stack)
    assert out_image[labels > 0].mean() < image[labels > 0].mean() - 0.02
