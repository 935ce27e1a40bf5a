"""Pixel metrics on hand-made masks, every empty-mask edge case, and the two aggregates."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cellseg.metrics import (
    ISBI2012_THRESHOLDS,
    METRIC_NAMES,
    ConfusionCounts,
    MetricAccumulator,
    ThresholdSweep,
    confusion_counts,
    segmentation_scores,
)


def mask(rows: list[str]) -> np.ndarray:
    """Boolean mask from strings: '#' is cell, '.' is background."""
    return np.array([[char == "#" for char in row] for row in rows], dtype=bool)


# prediction   truth     tp: (0,0) (1,1); fp: (0,1) (0,2); fn: (1,0); tn: (1,2)
PREDICTION = mask(["###", ".#."])
TRUTH = mask(["#..", "##."])


def test_confusion_counts_of_hand_made_masks():
    assert confusion_counts(PREDICTION, TRUTH) == ConfusionCounts(tp=2, fp=2, fn=1, tn=1)


def test_scores_of_hand_made_masks():
    scores = segmentation_scores(PREDICTION, TRUTH)
    assert scores["iou"] == pytest.approx(2 / 5)  # tp / (tp + fp + fn)
    assert scores["dice"] == pytest.approx(4 / 7)  # 2tp / (2tp + fp + fn)
    assert scores["precision"] == pytest.approx(2 / 4)
    assert scores["recall"] == pytest.approx(2 / 3)


def test_scores_are_not_symmetric_in_prediction_and_truth():
    swapped = segmentation_scores(TRUTH, PREDICTION)
    assert swapped["precision"] == pytest.approx(2 / 3)
    assert swapped["recall"] == pytest.approx(2 / 4)
    assert swapped["iou"] == pytest.approx(2 / 5)


def test_perfect_prediction_scores_one():
    assert segmentation_scores(TRUTH, TRUTH.copy()) == dict.fromkeys(METRIC_NAMES, 1.0)


def test_disjoint_prediction_scores_zero():
    scores = segmentation_scores(mask(["#.", ".."]), mask(["..", ".#"]))
    assert scores == {"iou": 0.0, "dice": 0.0, "precision": 0.0, "recall": 0.0}


EMPTY = mask(["...", "..."])
SOME = mask([".#.", "##."])


@pytest.mark.parametrize(
    ("prediction", "truth", "expected"),
    [
        pytest.param(EMPTY, EMPTY, {"iou": 1.0, "dice": 1.0, "precision": 1.0, "recall": 1.0}, id="both-empty"),
        pytest.param(SOME, EMPTY, {"iou": 0.0, "dice": 0.0, "precision": 0.0, "recall": 1.0}, id="truth-empty"),
        pytest.param(EMPTY, SOME, {"iou": 0.0, "dice": 0.0, "precision": 1.0, "recall": 0.0}, id="prediction-empty"),
    ],
)
def test_empty_mask_edge_cases_follow_the_docstring_table(prediction, truth, expected):
    assert segmentation_scores(prediction, truth) == expected


def test_empty_counts_tn_only():
    assert confusion_counts(EMPTY, EMPTY) == ConfusionCounts(tp=0, fp=0, fn=0, tn=6)


def test_shape_mismatch_raises_naming_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        confusion_counts(np.zeros((2, 3), bool), np.zeros((3, 2), bool))


def test_transposed_but_same_size_is_still_a_mismatch():
    with pytest.raises(ValueError):
        segmentation_scores(np.zeros((1, 6), bool), np.zeros((6, 1), bool))


def test_torch_bool_tensors_give_the_same_counts_as_numpy():
    counts = confusion_counts(torch.from_numpy(PREDICTION), torch.from_numpy(TRUTH))
    assert counts == ConfusionCounts(tp=2, fp=2, fn=1, tn=1)
    assert all(isinstance(value, int) for value in (counts.tp, counts.fp, counts.fn, counts.tn))


def test_torch_batched_tensors_count_every_pixel():
    prediction = torch.from_numpy(np.stack([PREDICTION, EMPTY]))[:, None]  # (2, 1, 2, 3)
    truth = torch.from_numpy(np.stack([TRUTH, SOME]))[:, None]
    # second image: prediction empty, truth has 3 pixels -> fn 3, tn 3
    assert confusion_counts(prediction, truth) == ConfusionCounts(tp=2, fp=2, fn=1 + 3, tn=1 + 3)


def test_counts_add_field_by_field():
    assert ConfusionCounts(1, 2, 3, 4) + ConfusionCounts(10, 20, 30, 40) == ConfusionCounts(11, 22, 33, 44)


# Two 2x2 images: A is predicted perfectly (tp 4); B predicts one wrong pixel and misses the
# only true pixel (tp 0, fp 1, fn 1, tn 2).
IMAGE_A = (mask(["##", "##"]), mask(["##", "##"]))
IMAGE_B = (mask(["#.", ".."]), mask([".#", ".."]))


def test_mean_over_images_and_pooled_differ_as_computed_by_hand():
    accumulator = MetricAccumulator()
    accumulator.add(confusion_counts(*IMAGE_A))
    accumulator.add(confusion_counts(*IMAGE_B))
    # mean: (1 + 0) / 2 for every metric
    assert accumulator.mean() == pytest.approx({"iou": 0.5, "dice": 0.5, "precision": 0.5, "recall": 0.5})
    # pooled: tp 4, fp 1, fn 1 -> IoU 4/6, Dice 8/10, precision 4/5, recall 4/5
    assert accumulator.pooled() == pytest.approx({"iou": 4 / 6, "dice": 8 / 10, "precision": 4 / 5, "recall": 4 / 5})


def test_accumulator_built_from_counts_matches_one_built_with_add():
    counts = [confusion_counts(*IMAGE_A), confusion_counts(*IMAGE_B)]
    added = MetricAccumulator()
    for item in counts:
        added.add(item)
    assert MetricAccumulator(counts).mean() == added.mean()
    assert MetricAccumulator(iter(counts)).pooled() == added.pooled()


def test_single_image_mean_equals_pooled_equals_scores():
    accumulator = MetricAccumulator([confusion_counts(PREDICTION, TRUTH)])
    assert accumulator.mean() == pytest.approx(segmentation_scores(PREDICTION, TRUTH))
    assert accumulator.pooled() == pytest.approx(segmentation_scores(PREDICTION, TRUTH))


def test_empty_accumulator_mean_is_nan():
    assert all(math.isnan(value) for value in MetricAccumulator().mean().values())
    assert set(MetricAccumulator().mean()) == set(METRIC_NAMES)


def test_misclassified_is_the_fraction_of_wrong_pixels():
    assert confusion_counts(PREDICTION, TRUTH).misclassified == pytest.approx(3 / 6)  # fp 2 + fn 1 of 6
    assert ConfusionCounts().misclassified == 0.0
    assert MetricAccumulator([ConfusionCounts(1, 2, 3, 4), ConfusionCounts(5, 0, 0, 5)]).total() == ConfusionCounts(6, 2, 3, 9)


def test_isbi_pixel_error_takes_the_best_pooled_f_score_over_thresholds():
    assert ISBI2012_THRESHOLDS == (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    # Two images, pooled: truth cells (1) and background (0) with the probabilities below.
    sweep = ThresholdSweep((0.2, 0.5, 0.8))
    sweep.add(np.array([[0.9, 0.6, 0.3]]), np.array([[True, True, False]]))
    sweep.add(np.array([[0.7, 0.1, 0.4]]), np.array([[True, True, False]]))
    # > 0.2: tp 3 fp 2 fn 1 -> 6/9;  > 0.5: tp 3 fp 0 fn 1 -> 6/7;  > 0.8: tp 1 fp 0 fn 3 -> 2/5
    assert sweep.counts[0.5] == ConfusionCounts(tp=3, fp=0, fn=1, tn=2)
    assert sweep.best() == (0.5, pytest.approx(6 / 7))
    assert sweep.isbi_pixel_error() == pytest.approx(1 / 7)


def test_isbi_pixel_error_of_a_perfect_map_is_zero_and_ties_take_the_lowest_threshold():
    sweep = ThresholdSweep()
    sweep.add(np.array([[1.0, 0.0], [0.95, 0.05]]), np.array([[True, False], [True, False]]))
    assert sweep.isbi_pixel_error() == 0.0
    assert sweep.best()[0] == 0.1  # > 0.0 takes the 0.05 pixel; 0.1-0.9 are all perfect; > 1.0 finds nothing


def test_threshold_sweep_needs_a_threshold():
    with pytest.raises(ValueError, match="at least one threshold"):
        ThresholdSweep(())
