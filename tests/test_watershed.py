"""The compiled steps of splitting one object: markers equal skimage's, ties included; the flood
equals skimage's except that equally high seed pixels leave in raster order."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.segmentation import watershed

from benchmarks.postprocess_stages import reference_dome_markers
from cellseg.watershed import dome_markers, flood_from_markers


def random_heights(rng: np.random.Generator, shape: tuple[int, int], case: int) -> np.ndarray:
    """Few levels (plateaus and ties everywhere), smooth domes, noise, or signed zeros."""
    kind = case % 4
    if kind == 0:
        return rng.integers(0, 4, shape).astype(np.float32)
    if kind == 1:
        return (ndimage.gaussian_filter(rng.random(shape), 1.5) * 8).astype(np.float32)
    if kind == 2:
        return (rng.random(shape) - 0.5).astype(np.float32)
    return (rng.integers(0, 2, shape) * -1.0 * 0.0).astype(np.float32)  # +0.0 and -0.0


def test_flood_is_skimages_watershed_pixel_for_pixel_where_no_two_seed_pixels_tie():
    rng = np.random.default_rng(0)
    for case in range(1200):
        shape = tuple(int(side) for side in rng.integers(1, 40, 2))
        height = random_heights(rng, shape, case)
        inside = rng.random(shape) < 0.8
        markers = np.zeros(shape, np.int32)
        where = rng.choice(height.size, min(int(rng.integers(1, 8)), height.size), replace=False)
        markers.ravel()[where] = rng.integers(1, 4, where.size)  # a label may have several seeds
        markers[~inside] = 0
        seeds = np.flatnonzero(markers)
        # Seed pixels of one height each (other pixels keep their plateaus and ties, resolved by
        # the order they are reached in, as skimage resolves them).
        height.ravel()[seeds] = rng.permutation(np.linspace(-1.25, 4.25, seeds.size, dtype=np.float32))
        theirs = watershed(-height.astype(np.float64), markers, mask=inside, connectivity=2)
        np.testing.assert_array_equal(flood_from_markers(height, markers, inside), theirs, err_msg=f"case {case}")


def test_flood_parts_seed_pixels_of_one_height_in_raster_order():
    """skimage leaves equally high seed pixels in its heap's order; here the first in raster
    order leaves first and takes the pixels both border."""
    height = np.array([[1, 0, 1], [0, 0, 0]], np.float32)
    inside = np.ones(height.shape, bool)
    for first, second in ((5, 9), (9, 5)):
        markers = np.array([[first, 0, second], [0, 0, 0]], np.int32)
        np.testing.assert_array_equal(flood_from_markers(height, markers, inside),
                                      [[first, first, second], [first, first, second]])


def test_flood_leaves_unreached_pixels_and_the_outside_at_zero():
    inside = np.zeros((5, 9), bool)
    inside[1:4, 1:4] = inside[1:4, 5:8] = True  # two squares, a seed in the first only
    markers = np.zeros((5, 9), np.int32)
    markers[2, 2] = 7
    labels = flood_from_markers(np.ones((5, 9), np.float32), markers, inside)
    expected = np.zeros((5, 9), np.int32)
    expected[1:4, 1:4] = 7
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(labels, expected)
    assert flood_from_markers(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32), np.zeros((0, 3), bool)).shape == (0, 3)


def test_dome_markers_are_skimages_h_maxima_on_random_heights():
    rng = np.random.default_rng(0)
    for case in range(300):
        shape = tuple(rng.integers(3, 25, 2))
        steps = (2, 4, 10, 1000)[case % 4]  # few levels: plateaus and ties everywhere
        height = (rng.integers(0, steps, shape) / steps).astype(np.float32 if case % 2 else np.float64)
        if case % 3 == 0:
            height = ndimage.gaussian_filter(height, 1.0)
        if case % 5 == 0:
            height -= 0.3  # below zero in places
        inside = rng.random(shape) < 0.8
        h = (0.05, 0.1, 0.25, 0.5)[case % 4]
        ours, count = dome_markers(height, h, inside)
        theirs, their_count = reference_dome_markers(height, h, inside)
        assert count == their_count, f"case {case}"
        np.testing.assert_array_equal(ours, theirs, err_msg=f"case {case}")


def test_a_flat_box_has_no_dome_and_one_peak_has_one():
    inside = np.ones((6, 6), bool)
    assert dome_markers(np.ones((6, 6), np.float32), 0.5, inside)[1] == 0  # a plateau filling the box
    peak = np.zeros((6, 6), np.float32)
    peak[2, 3] = 1.0
    labels, count = dome_markers(peak, 0.5, inside)
    assert count == 1 and labels[2, 3] == 1 and labels.sum() == 1


def test_boxes_of_other_shapes_or_types_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        flood_from_markers(np.zeros((4, 4), np.float32), np.zeros((4, 5), np.int32), np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="float32 or float64"):
        dome_markers(np.zeros((4, 4), np.int16), 0.5, np.ones((4, 4), bool))
