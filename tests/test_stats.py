"""Cell labelling and per-image statistics on a hand-made 20x20 scene with known areas."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.stats import STATISTIC_FIELDS, image_statistics, label_areas, label_cells, statistics_from_sums

MIN_AREA = 5


def scene() -> tuple[np.ndarray, np.ndarray]:
    """(image uint16, mask bool), both 20x20.

    cell        pixels                                  area  intensity
    A           rows 1-4, cols 1-4                      16    1000
    B+D         rows 10-12 cols 10-12 and rows 13-14    9+4   400   (touch only diagonally, (12,12)-(13,13))
                cols 13-14
    E           rows 14-18, cols 1-5                    25    100
    C (small)   rows 1-2, cols 15-16                    4     7     (below MIN_AREA)
    F (small)   (17,17) and (18,18)                     2     50    (diagonal pair, below MIN_AREA)
    background                                                 2
    """
    image = np.full((20, 20), 2, dtype=np.uint16)
    mask = np.zeros((20, 20), dtype=bool)
    for rows, cols, value in [
        (slice(1, 5), slice(1, 5), 1000),
        (slice(10, 13), slice(10, 13), 400),
        (slice(13, 15), slice(13, 15), 400),
        (slice(14, 19), slice(1, 6), 100),
        (slice(1, 3), slice(15, 17), 7),
    ]:
        mask[rows, cols] = True
        image[rows, cols] = value
    for point in [(17, 17), (18, 18)]:
        mask[point] = True
        image[point] = 50
    return image, mask


def test_scene_is_what_the_docstring_says():
    _, mask = scene()
    assert mask.sum() == 16 + 13 + 25 + 4 + 2


def test_label_cells_without_minimum_joins_diagonal_neighbours():
    _, mask = scene()
    labels, areas = label_cells(mask)
    assert sorted(areas.tolist()) == [2, 4, 13, 16, 25]
    assert labels.dtype == np.int32
    assert labels[12, 12] == labels[13, 13] != 0  # B and D are one cell
    assert labels[17, 17] == labels[18, 18] != 0  # the diagonal pair is one cell
    assert labels[0, 0] == 0


def test_label_cells_drops_small_cells_and_renumbers():
    _, mask = scene()
    labels, areas = label_cells(mask, min_cell_area=MIN_AREA)
    assert sorted(areas.tolist()) == [13, 16, 25]
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    assert np.bincount(labels.ravel())[1:].tolist() == areas.tolist()  # areas[i] is label i + 1
    assert labels[1, 15] == 0 and labels[17, 17] == 0  # C and F are background now


def test_min_cell_area_is_inclusive():
    _, mask = scene()
    _, areas = label_cells(mask, min_cell_area=2)
    assert sorted(areas.tolist()) == [2, 4, 13, 16, 25]  # F (2 pixels) kept at exactly 2
    _, areas = label_cells(mask, min_cell_area=3)
    assert sorted(areas.tolist()) == [4, 13, 16, 25]


def test_image_statistics_of_the_scene():
    image, mask = scene()
    labels, _ = label_cells(mask, min_cell_area=MIN_AREA)
    stats = image_statistics(image, labels)
    assert set(stats) == set(STATISTIC_FIELDS)
    assert stats["cell_count"] == 3
    assert stats["total_cell_area"] == 54
    assert stats["mean_cell_area"] == pytest.approx(18.0)  # (16 + 13 + 25) / 3
    assert stats["median_cell_area"] == pytest.approx(16.0)
    assert stats["foreground_fraction"] == pytest.approx(54 / 400)
    # inside: 16 * 1000 + 13 * 400 + 25 * 100 over 54 pixels, in raw units (not normalised)
    assert stats["mean_intensity_inside"] == pytest.approx(23700 / 54)
    # outside: dropped C (4 x 7) and F (2 x 50) count as background, plus 340 pixels of 2
    assert stats["mean_intensity_outside"] == pytest.approx((4 * 7 + 2 * 50 + 340 * 2) / 346)


def test_image_statistics_median_of_an_even_count():
    image, mask = scene()
    labels, _ = label_cells(mask)  # all five cells: 2, 4, 13, 16, 25
    labels[labels == labels[18, 18]] = 0  # remove F: areas 4, 13, 16, 25
    stats = image_statistics(image, labels)
    assert stats["cell_count"] == 4
    assert stats["median_cell_area"] == pytest.approx((13 + 16) / 2)
    assert stats["mean_cell_area"] == pytest.approx(58 / 4)


def test_statistics_values_are_plain_python_types():
    image, mask = scene()
    stats = image_statistics(image, label_cells(mask, MIN_AREA)[0])
    assert type(stats["cell_count"]) is int and type(stats["total_cell_area"]) is int
    assert all(type(stats[name]) is float for name in STATISTIC_FIELDS[2:])


def test_empty_mask_has_no_cells_and_none_means():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4)
    labels, areas = label_cells(np.zeros((3, 4), bool), min_cell_area=MIN_AREA)
    assert areas.size == 0
    stats = image_statistics(image, labels)
    assert stats == {
        "cell_count": 0,
        "total_cell_area": 0,
        "mean_cell_area": None,
        "median_cell_area": None,
        "foreground_fraction": 0.0,
        "mean_intensity_inside": None,
        "mean_intensity_outside": pytest.approx(5.5),  # mean of 0..11
    }


def test_all_foreground_has_no_outside_mean():
    image = np.array([[1, 2], [3, 6]], dtype=np.uint16)
    labels, areas = label_cells(np.ones((2, 2), bool))
    assert areas.tolist() == [4]
    stats = image_statistics(image, labels)
    assert stats["cell_count"] == 1
    assert stats["foreground_fraction"] == 1.0
    assert stats["mean_intensity_inside"] == pytest.approx(3.0)
    assert stats["mean_intensity_outside"] is None


def test_every_cell_below_minimum_is_like_an_empty_mask():
    image, mask = scene()
    labels, areas = label_cells(mask, min_cell_area=100)
    assert areas.size == 0 and not labels.any()
    stats = image_statistics(image, labels)
    assert stats["cell_count"] == 0 and stats["mean_cell_area"] is None
    assert stats["mean_intensity_outside"] == pytest.approx(float(image.astype(float).mean()))


def test_statistics_from_sums_are_those_of_the_image_in_memory():
    # An image segmented block by block (cellseg.blocks_finish) has only its cells' table rows
    # (areas as floats) and its blocks' intensity sums; they give the same figures.
    image, mask = scene()
    for minimum in (MIN_AREA, 100):  # cells, and none
        labels, _ = label_cells(mask, min_cell_area=minimum)
        areas = np.bincount(labels.ravel())[1:].astype(np.float64)
        inside, total = float(image[labels > 0].sum(dtype=np.float64)), float(image.sum(dtype=np.float64))
        from_sums = statistics_from_sums(areas, image.size, inside, total - inside)
        assert from_sums == image_statistics(image, labels)
        assert list(map(type, from_sums.values())) == list(map(type, image_statistics(image, labels).values()))


def test_shape_mismatch_raises_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        image_statistics(np.zeros((4, 5)), np.zeros((5, 4), np.int32))


def test_label_cells_numbers_components_like_scipy():
    # The labels are numbered in raster order of each component's first pixel, as
    # scipy.ndimage.label numbers them, also on an image large enough for OpenCV to use threads.
    from scipy import ndimage

    rng = np.random.default_rng(4)
    for shape, density in [((1, 1), 0.5), ((7, 300), 0.4), ((64, 64), 0.2), ((300, 7), 0.6), ((1500, 1200), 0.45)]:
        mask = rng.random(shape) < density
        labels, areas = label_cells(mask)
        expected, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
        np.testing.assert_array_equal(labels, expected, err_msg=str(shape))
        assert areas.tolist() == np.bincount(expected.ravel(), minlength=count + 1)[1:].tolist()
    assert label_cells(np.zeros((0, 4), bool))[0].shape == (0, 4)


def test_integer_images_take_the_compiled_sums_and_agree_with_float_ones():
    image, mask = scene()
    labels, _ = label_cells(mask, min_cell_area=MIN_AREA)
    as_integers = image_statistics(image, labels)  # one compiled pass, int64 sums
    assert image_statistics(image.astype(np.float64), labels) == as_integers  # numpy's float means
    assert image_statistics((image // 8).astype(np.uint8), labels)["mean_intensity_inside"] == pytest.approx(
        (16 * 125 + 13 * 50 + 25 * 12) / 54)


def test_label_areas_are_bincounts_of_any_labels_and_refuse_negative_ones():
    rng = np.random.default_rng(5)
    for shape, highest in [((1, 1), 0), ((9, 31), 3), ((200, 150), 70), ((3, 4, 5), 9)]:
        labels = rng.integers(0, highest + 1, shape, dtype=np.int32)
        labels[..., : shape[-1] // 2] = np.sort(labels[..., : shape[-1] // 2], axis=-1)  # runs of one label too
        for typed in (labels, labels.astype(np.int64), labels.astype(np.uint16), labels[:, ::-1]):
            assert label_areas(typed).tolist() == np.bincount(typed.ravel()).tolist(), (shape, typed.dtype)
    assert label_areas(np.zeros(0, dtype=np.int32)).tolist() == []
    with pytest.raises(ValueError, match="non-negative"):
        label_areas(np.array([[0, 3], [-1, 2]], dtype=np.int32))


def test_small_components_are_dropped_and_the_rest_renumbered_in_order():
    rng = np.random.default_rng(6)
    mask = rng.random((400, 300)) < 0.45
    labels, areas = label_cells(mask, min_cell_area=4)
    everything, all_areas = label_cells(mask)
    kept = np.flatnonzero(all_areas >= 4) + 1
    assert areas.tolist() == all_areas[kept - 1].tolist()
    lookup = np.zeros(len(all_areas) + 1, dtype=np.int32)
    lookup[kept] = np.arange(1, len(kept) + 1)
    np.testing.assert_array_equal(labels, lookup[everything])
