"""cellseg.distance: the exact Euclidean distance transform, against scipy's to the bit."""

import numpy as np
import pytest
from scipy import ndimage

from cellseg.distance import inside_distance


def _random_masks(count: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        rows, columns = rng.integers(1, 80, 2)
        smoothed = ndimage.gaussian_filter(rng.random((rows, columns)), rng.uniform(0.5, 4))
        yield smoothed > np.quantile(smoothed, rng.uniform(0.2, 0.9))


def test_distances_are_scipys_exact_ones_rounded_to_float32():
    compared = 0
    for mask in _random_masks(400):
        if mask.all():
            continue
        expected = ndimage.distance_transform_edt(mask).astype(np.float32)
        found = inside_distance(mask)
        assert found.dtype == np.float32 and found.shape == mask.shape
        np.testing.assert_array_equal(found, expected)
        compared += 1
    assert compared > 300


@pytest.mark.parametrize("shape", [(1, 40), (40, 1), (1, 1), (3, 200)])
def test_thin_images_and_cells_touching_the_edge(shape):
    """Beyond the image edge is not background: a cell along the edge is deep there."""
    mask = np.ones(shape, dtype=bool)
    mask.flat[0] = False
    np.testing.assert_array_equal(inside_distance(mask), ndimage.distance_transform_edt(mask).astype(np.float32))


def test_masks_without_inside_or_without_outside_pixels():
    assert not inside_distance(np.zeros((6, 9), dtype=bool)).any()
    everywhere = inside_distance(np.ones((6, 9), dtype=bool))
    assert (everywhere == 6 + 9 + 1).all()  # no outside pixel: one depth, so one plateau and one cell


def test_a_mask_that_is_not_2d_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        inside_distance(np.ones((2, 3, 4), dtype=bool))
