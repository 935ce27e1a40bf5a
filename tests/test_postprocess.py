"""Touching cells split by watershed, and instance metrics on hand-made labels."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.postprocess_stages import (
    moved_pixels,
    reference_split_at_distance_peaks,
    reference_split_touching_cells,
)
from cellseg import postprocess, scoring
from cellseg.postprocess import split_at_distance_peaks, split_touching_cells
from cellseg.scoring import instance_scores, iou_matrix, summarise_instance_scores
from cellseg.stats import label_cells
from cellseg.synth import generate_sample
from cellseg.targets import normalised_distance


def disc(shape, center, radius) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def test_two_touching_discs_become_two_cells():
    mask = disc((60, 90), (30, 30), 15) | disc((60, 90), (30, 56), 15)
    assert label_cells(mask)[0].max() == 1  # one connected blob
    labels = split_touching_cells(mask)
    assert labels.max() == 2
    np.testing.assert_array_equal(labels > 0, mask)  # every mask pixel is in a cell, nothing else
    left, right = labels[30, 20], labels[30, 66]
    assert left != right and left > 0 and right > 0
    # The split runs through the neck between the centres.
    assert set(np.unique(labels[:, 43][mask[:, 43]])) <= {left, right}
    sizes = np.bincount(labels.ravel())[1:]
    assert abs(int(sizes[0]) - int(sizes[1])) <= 0.05 * sizes.sum()


def test_two_halves_of_one_symmetric_cell_are_not_split():
    # A peanut: two equally high peaks of the (smoothed) distance, 9.07 px, with a waist 0.73 px
    # lower between them. It is one cell at split depth 1 and two at 0.5.
    mask = disc((40, 60), (20, 25), 10) | disc((40, 60), (20, 35), 10)
    assert split_touching_cells(mask, split_depth=1.0).max() == 1
    assert split_touching_cells(mask, split_depth=0.5).max() == 2


def test_one_round_cell_is_not_split_and_small_specks_are_dropped():
    mask = disc((50, 50), (25, 25), 12)
    mask[2, 2] = mask[2, 3] = True
    labels = split_touching_cells(mask, min_cell_area=10)
    assert labels.max() == 1
    assert not labels[2, 2]


def test_tiny_cells_without_a_distance_peak_are_kept_whole():
    mask = np.zeros((20, 20), bool)
    mask[5:7, 5:7] = True  # too small to hold an h-maximum of depth 2
    labels = split_touching_cells(mask)
    assert labels.max() == 1 and (labels > 0).sum() == 4


def test_split_depth_zero_is_connected_components():
    mask = disc((60, 90), (30, 30), 15) | disc((60, 90), (30, 56), 15)
    np.testing.assert_array_equal(split_touching_cells(mask, split_depth=0), label_cells(mask)[0])


def test_empty_mask_has_no_cells():
    assert split_touching_cells(np.zeros((8, 8), bool)).max() == 0


def hand_labels() -> np.ndarray:
    truth = np.zeros((10, 20), np.int32)
    truth[1:5, 1:5] = 1   # 16 px
    truth[1:5, 8:12] = 2  # 16 px
    truth[6:9, 14:19] = 3  # 15 px
    return truth


def test_perfect_prediction_scores_one_whatever_the_label_numbers():
    truth = hand_labels()
    predicted = np.where(truth > 0, 10 - truth, 0)  # same cells, other numbers
    scores = instance_scores(predicted, truth)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (3, 0, 0)
    assert scores["f1"] == scores["dsb_score"] == scores["precision"] == scores["recall"] == 1.0


def test_a_missed_cell_and_a_split_cell_by_hand():
    truth = hand_labels()
    predicted = np.zeros_like(truth)
    predicted[1:5, 1:5] = 1          # cell 1 exact
    predicted[1:5, 8:10] = 2         # cell 2 split in two halves: IoU 0.5 each, not > 0.5
    predicted[1:5, 10:12] = 3
    # cell 3 missed
    scores = instance_scores(predicted, truth)
    assert (scores["predicted_cells"], scores["true_cells"]) == (3, 3)
    assert (scores["tp"], scores["fp"], scores["fn"]) == (1, 2, 2)
    assert scores["precision"] == pytest.approx(1 / 3) and scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(2 * 1 / (3 + 3))
    # Only the exact cell matches at every threshold: TP/(TP+FP+FN) = 1/5 at each.
    assert scores["dsb_score"] == pytest.approx(1 / 5)


def test_error_breakdown_names_merged_split_missed_and_extra_cells_by_hand():
    truth = np.zeros((20, 30), np.int32)
    truth[1:5, 1:5] = 1          # merged with 2 into one predicted cell
    truth[1:5, 5:9] = 2
    truth[8:16, 1:9] = 3         # split into two predicted halves
    truth[8:12, 20:24] = 4       # missed
    truth[1:5, 20:24] = 5        # found, but with a poor outline (IoU 0.48): in no class
    predicted = np.zeros_like(truth)
    predicted[1:5, 1:9] = 7
    predicted[8:16, 1:5] = 8
    predicted[8:16, 5:9] = 9
    predicted[16:20, 25:30] = 3  # extra: on background
    predicted[0:7, 20:23] = 4
    scores = instance_scores(predicted, truth)
    assert {key: scores[key] for key in ("merged", "split", "missed", "extra")} == \
        {"merged": 2, "split": 1, "missed": 1, "extra": 1}
    assert scores["tp"] == 0 and scores["fn"] == 5
    assert instance_scores(truth, truth) | dict.fromkeys(("tp", "f1")) == instance_scores(truth, truth) | {
        "merged": 0, "split": 0, "missed": 0, "extra": 0, "tp": None, "f1": None}


def test_error_classes_need_more_than_half_a_cell():
    truth = np.zeros((4, 8), np.int32)
    truth[:, :4], truth[:, 4:] = 1, 2
    predicted = np.zeros_like(truth)
    predicted[:, 2:6] = 1        # half of each true cell: neither merged nor found
    scores = instance_scores(predicted, truth)
    assert (scores["merged"], scores["missed"], scores["extra"]) == (0, 0, 0)
    predicted[:, 1:7] = 1        # three quarters of each: merged
    assert instance_scores(predicted, truth)["merged"] == 2
    predicted[:] = 0
    predicted[:, 0:1] = 1        # a quarter of cell 1 predicted: missed; the predicted cell lies in it
    assert (instance_scores(predicted, truth)["missed"], instance_scores(predicted, truth)["extra"]) == (2, 0)


def test_dsb_score_counts_a_match_only_up_to_its_iou():
    truth = np.zeros((10, 10), np.int32)
    truth[0:10, 0:5] = 1                  # 50 px
    predicted = np.zeros_like(truth)
    predicted[0:10, 0:4] = 1              # 40 px inside: IoU 0.8
    scores = instance_scores(predicted, truth)
    # Matched at thresholds 0.5 .. 0.75 (6 of 10), missed (1 FP + 1 FN) at 0.8 .. 0.95.
    assert scores["dsb_score"] == pytest.approx((6 * 1 + 4 * 0) / 10)
    assert scores["f1"] == 1.0


def test_empty_truth_and_prediction():
    empty = np.zeros((5, 5), np.int32)
    assert instance_scores(empty, empty)["dsb_score"] == 1.0
    one = empty.copy()
    one[1:3, 1:3] = 1
    assert instance_scores(one, empty)["f1"] == 0.0 and instance_scores(empty, one)["dsb_score"] == 0.0


def test_iou_matrix_skips_absent_label_numbers():
    truth = np.zeros((4, 4), np.int32)
    truth[:2] = 5
    predicted = (truth > 0).astype(np.int32)
    np.testing.assert_allclose(iou_matrix(predicted, truth), [[1.0]])
    with pytest.raises(ValueError):
        iou_matrix(predicted, truth[:3])


def pairwise_iou(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The IoU table computed the slow way: one pair of masks at a time."""
    rows, columns = np.unique(predicted[predicted > 0]), np.unique(truth[truth > 0])
    table = np.zeros((len(rows), len(columns)))
    for i, p in enumerate(rows):
        for j, t in enumerate(columns):
            a, b = predicted == p, truth == t
            table[i, j] = (a & b).sum() / (a | b).sum()
    return table


@pytest.mark.parametrize("counted", ["in a table", "pair by pair"])
def test_iou_matrix_agrees_with_masks_compared_pair_by_pair(counted, monkeypatch):
    from scipy import ndimage

    if counted == "pair by pair":
        monkeypatch.setattr(scoring, "DENSE_PAIRS_LIMIT", 0)
    rng = np.random.default_rng(3)
    for _ in range(20):
        seeds = rng.random((30, 40)) < rng.uniform(0.01, 0.2)
        truth = ndimage.label(ndimage.binary_dilation(seeds))[0] * int(rng.integers(1, 50))
        predicted = ndimage.grey_dilation(truth, size=2) * (rng.random(truth.shape) < 0.9)
        predicted[rng.random(truth.shape) < 0.02] = 7  # one scattered predicted cell
        np.testing.assert_allclose(iou_matrix(predicted, truth), pairwise_iou(predicted, truth))


def test_a_label_image_with_a_cell_per_pixel_is_scored_in_little_memory():
    import tracemalloc

    side = 256
    truth = np.arange(1, side * side + 1).reshape(side, side)  # 65,536 one-pixel cells
    predicted = np.zeros((side, side), np.int32)
    for number in range(500):  # 500 predicted 8x8 squares
        row, column = divmod(number, 25)
        predicted[row * 10:row * 10 + 8, column * 10:column * 10 + 8] = number + 1
    tracemalloc.start()
    try:
        scores = instance_scores(predicted, truth)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # A table of every predicted cell by every true one would take 500 x 65,536 x 8 bytes (262 MB).
    assert peak < 40e6, f"{peak / 1e6:.0f} MB"
    assert (scores["true_cells"], scores["predicted_cells"], scores["tp"]) == (side * side, 500, 0)
    assert scores["merged"] == 500 * 64 and scores["missed"] == side * side - 500 * 64 and scores["extra"] == 0


def test_label_numbers_in_the_billions_score_as_their_renumbered_cells():
    truth = np.zeros((20, 20), np.int64)
    truth[2:8, 2:8], truth[10:18, 10:18] = 1, 2
    predicted = np.zeros_like(truth)
    predicted[2:8, 3:8], predicted[0:2, 0:2] = 1, 2
    expected = instance_scores(predicted, truth)
    big = instance_scores(predicted * 3_000_000_000, truth * 4_000_000_000)
    assert big == expected and (expected["tp"], expected["fp"], expected["fn"]) == (1, 1, 1)


def test_summary_pools_counts_and_takes_the_median_count_error():
    no_errors = dict.fromkeys(("merged", "split", "missed", "extra"), 0)
    rows = [{"tp": 1, "fp": 1, "fn": 0, "f1": 2 / 3, "dsb_score": 0.5, "predicted_cells": 2, "true_cells": 1,
             **no_errors, "extra": 1},
            {"tp": 2, "fp": 0, "fn": 2, "f1": 0.5, "dsb_score": 0.3, "predicted_cells": 2, "true_cells": 4,
             **no_errors, "merged": 2, "missed": 1},
            {"tp": 3, "fp": 0, "fn": 0, "f1": 1.0, "dsb_score": 1.0, "predicted_cells": 3, "true_cells": 3, **no_errors}]
    summary = summarise_instance_scores(rows)
    assert (summary["true_cells_total"], summary["predicted_cells_total"]) == (8, 7)
    assert [summary[f"{key}_total"] for key in ("merged", "split", "missed", "extra")] == [2, 0, 1, 1]
    assert summary["f1_pooled"] == pytest.approx(2 * 6 / (12 + 1 + 2))
    assert summary["count_error_median"] == pytest.approx(0.5)  # errors 1.0, 0.5, 0.0
    assert summary["dsb_score_mean"] == pytest.approx(0.6)


def squares_side_by_side() -> tuple[np.ndarray, np.ndarray]:
    """Two touching 20x20 cells that together fill a 20x40 rectangle, and their true labels: a
    mask without any neck."""
    labels = np.zeros((40, 60), dtype=np.int32)
    labels[10:30, 10:30], labels[10:30, 30:50] = 1, 2
    return labels > 0, labels


def test_a_distance_map_parts_cells_that_the_mask_shape_cannot():
    from cellseg.targets import normalised_distance

    mask, labels = squares_side_by_side()
    assert split_touching_cells(mask).max() == 1  # the rectangle has no neck to cut at
    cells = split_at_distance_peaks(mask, normalised_distance(labels), min_cell_area=10)
    np.testing.assert_array_equal(cells > 0, mask)  # the mask is kept, only divided
    assert cells.max() == 2
    assert instance_scores(cells, labels)["f1"] == 1.0
    assert iou_matrix(cells, labels).max(axis=1).min() > 0.9


def test_distance_peaks_below_the_prominence_do_not_split():
    mask, _ = squares_side_by_side()
    # Two equally high centres whose saddle lies only 0.05 below them: one cell at prominence
    # 0.1, two at 0.02.
    rows, cols = np.indices(mask.shape)
    ridge = 1.0 - 0.05 * np.exp(-((cols - 30) ** 2) / 8.0) - 0.002 * (rows - 20) ** 2
    distance = np.where(mask, np.clip(ridge, 0, 1), 0).astype(np.float32)
    assert split_at_distance_peaks(mask, distance, prominence=0.1).max() == 1
    assert split_at_distance_peaks(mask, distance, prominence=0.02).max() == 2
    # Separate objects stay separate whatever the map; small ones are dropped first.
    apart = disc((40, 80), (20, 15), 8) | disc((40, 80), (20, 60), 8)
    apart[0, 0] = True
    assert split_at_distance_peaks(apart, np.zeros(apart.shape, np.float32), min_cell_area=5).max() == 2
    with pytest.raises(ValueError, match="distance map is"):
        split_at_distance_peaks(mask, distance[:10])


# The library's recipe against the scipy/skimage recipe it replaced (benchmarks.postprocess_stages).
def test_splits_agree_with_the_scipy_recipe_on_synthetic_cells():
    rng = np.random.default_rng(5)
    for _ in range(3):
        sample = generate_sample(rng, (256, 256))  # 30% of its cells touch another; some touch the edge
        distance = normalised_distance(sample.labels)
        np.testing.assert_array_equal(split_at_distance_peaks(sample.mask, distance, 10),
                                      reference_split_at_distance_peaks(sample.mask, distance, 10))
        ours, theirs = split_touching_cells(sample.mask, 10), reference_split_touching_cells(sample.mask, 10)
        assert ours.max() == theirs.max() > 20
        assert instance_scores(ours, theirs)["f1"] == 1.0
        assert moved_pixels(ours, theirs) < 0.002


@pytest.mark.realdata
def test_splits_agree_with_the_scipy_recipe_on_real_nuclei():
    from cellseg.io import list_images, read_image
    from tests.conftest import shared_dataset

    dataset = shared_dataset("dsb2018")
    tp = fp = fn = 0
    for url in list_images(str(dataset / "images"))[::3]:
        truth = read_image(str(dataset / "labels" / url.rsplit("/", 1)[-1]))
        mask, distance = truth > 0, normalised_distance(truth)
        np.testing.assert_array_equal(split_at_distance_peaks(mask, distance, 10),
                                      reference_split_at_distance_peaks(mask, distance, 10), err_msg=url)
        ours, theirs = split_touching_cells(mask, 10), reference_split_touching_cells(mask, 10)
        scores = instance_scores(ours, theirs)
        tp, fp, fn = tp + scores["tp"], fp + scores["fp"], fn + scores["fn"]
        assert moved_pixels(ours, theirs) < 0.002, url
    assert 2 * tp / (2 * tp + fp + fn) >= 0.99


def test_maximum_filters_in_bands_split_alike(monkeypatch):
    mask = generate_sample(np.random.default_rng(8), (256, 256)).mask
    whole = split_touching_cells(mask, 10)
    assert whole.max() > label_cells(mask, 10)[0].max()  # some objects were split
    monkeypatch.setattr(postprocess, "BAND_PIXELS", 400)  # maximum filters in bands of a row
    np.testing.assert_array_equal(split_touching_cells(mask, 10), whole)
