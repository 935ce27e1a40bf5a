"""Cells scored the way the field scores them: instances matched at an IoU threshold, F1, the
DSB2018 score (mean over IoU thresholds 0.5-0.95), the cell count error, and why cells did not
match (merged, split, missed, extra; Caicedo et al. 2019); and regions scored the way EM
scores them, by the adapted Rand error (`region_scores`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

ERROR_CLASSES = ("merged", "split", "missed", "extra")  # see error_breakdown
# The figures of summarise_instance_scores that reports show (the training flow's metrics, the
# quality benchmark's summary).
HEADLINE_CELL_SCORES = ("f1_mean", "f1_pooled", "dsb_score_mean", "count_error_median", "true_cells_total",
                        *(f"{name}_total" for name in ERROR_CLASSES))
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * step, 2) for step in range(10))  # 0.5, 0.55, ..., 0.95



# Above this many (predicted + 1) x (true + 1) label pairs the overlaps are counted pair by pair
# (a sort of the pixels) instead of in a dense table: a label image with a cell per pixel would
# otherwise need one number per predicted cell per pixel (gigabytes for a 512x512 image).
DENSE_PAIRS_LIMIT = 1 << 22


@dataclass(frozen=True)
class Overlaps:
    """Pixels shared by predicted instances (P of them, indexed 0..P-1 in label order) and true
    instances (T, 0..T-1), kept only for the pairs that share any: `predicted[k]` and `true[k]`
    share `shared[k]` pixels. Label numbers absent from an image get no index; the memory taken
    is bounded by the pixels, whatever the label numbers."""

    predicted: np.ndarray
    true: np.ndarray
    shared: np.ndarray
    predicted_area: np.ndarray  # (P,) pixels of each predicted cell
    true_area: np.ndarray  # (T,)

    @classmethod
    def of(cls, predicted: np.ndarray, truth: np.ndarray) -> Overlaps:
        if predicted.shape != truth.shape:
            raise ValueError(f"predicted labels are {predicted.shape}, true labels are {truth.shape}")
        predicted_index, predicted_area = _compact(predicted)
        true_index, true_area = _compact(truth)
        both = (predicted_index >= 0) & (true_index >= 0)
        predicted_index, true_index = predicted_index[both], true_index[both]
        n_true = len(true_area)
        if (len(predicted_area) + 1) * (n_true + 1) <= DENSE_PAIRS_LIMIT:
            table = np.bincount(predicted_index * n_true + true_index, minlength=len(predicted_area) * n_true)
            pairs = np.flatnonzero(table)
            shared = table[pairs]
        else:
            pairs, shared = np.unique(predicted_index * n_true + true_index, return_counts=True)
        return cls(pairs // max(n_true, 1), pairs % max(n_true, 1), shared, predicted_area, true_area)

    @property
    def iou(self) -> np.ndarray:
        """Each pair's intersection over union."""
        union = self.predicted_area[self.predicted] + self.true_area[self.true] - self.shared
        return self.shared / union

    def dense_iou(self) -> np.ndarray:
        """The IoU of every predicted with every true instance, as a P x T table."""
        table = np.zeros((len(self.predicted_area), len(self.true_area)))
        table[self.predicted, self.true] = self.iou
        return table


def _compact(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's index among the labels present (-1 on background), and each label's area."""
    flat = np.asarray(labels).ravel().astype(np.int64, copy=False)
    if flat.size and int(flat.min()) < 0:
        raise ValueError("label images hold no negative labels")
    largest = int(flat.max(initial=0))
    if largest <= 2 * flat.size:
        area = np.bincount(flat, minlength=largest + 1)
        present = np.flatnonzero(area[1:]) + 1
        lookup = np.full(largest + 1, -1, np.int64)
        lookup[present] = np.arange(len(present))
        return lookup[flat], area[present]
    numbers, index, area = np.unique(flat, return_inverse=True, return_counts=True)
    if numbers[0] == 0:
        return index - 1, area[1:]
    return index, area


def iou_matrix(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of every predicted instance (rows, the labels present in label order) with every true
    instance (columns), as a dense table: for analyses of ordinary images (`Overlaps` keeps only
    the pairs that touch)."""
    return Overlaps.of(predicted, truth).dense_iou()


def error_breakdown(overlaps: Overlaps) -> dict[str, int]:
    """Why cells fail to match (the error classes of Caicedo et al., Cytometry A 2019): true cells
    `merged` (more than half of the cell lies in one predicted cell that also holds more than half
    of another true cell), true cells `split` (two or more predicted cells lie more than half
    inside it), true cells `missed` (less than half of the cell is predicted as any cell), and
    predicted cells that are `extra` (less than half inside any true cell). A cell can be in no
    class and still fail to match at IoU 0.5 (a poor outline).
    """
    n_pred, n_true = len(overlaps.predicted_area), len(overlaps.true_area)
    # true cell j lies mostly in predicted cell i; predicted cell i lies mostly in true cell j
    mostly_in_pred = overlaps.shared * 2 > overlaps.true_area[overlaps.true]
    pred_mostly_in = overlaps.shared * 2 > overlaps.predicted_area[overlaps.predicted]
    merging = np.bincount(overlaps.predicted[mostly_in_pred], minlength=n_pred) >= 2
    predicted_inside = np.bincount(overlaps.predicted, weights=overlaps.shared, minlength=n_pred)
    true_covered = np.bincount(overlaps.true, weights=overlaps.shared, minlength=n_true)
    return {
        "merged": int(np.count_nonzero(merging[overlaps.predicted[mostly_in_pred]])),
        "split": int(np.count_nonzero(np.bincount(overlaps.true[pred_mostly_in], minlength=n_true) >= 2)),
        "missed": int(np.count_nonzero(true_covered * 2 < overlaps.true_area)),
        "extra": int(np.count_nonzero(predicted_inside * 2 < overlaps.predicted_area)),
    }


def instance_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Instance precision, recall and F1 at IoU 0.5, the DSB2018 score, the cell counts and the
    `error_breakdown` (merged, split, missed, extra).

    A predicted cell matches a true cell when their IoU exceeds the threshold (above 0.5 a cell
    can match at most one other, so no assignment problem arises). The DSB2018 score averages
    TP / (TP + FP + FN) over IoU thresholds 0.5, 0.55, ..., 0.95. With no cells in either, every
    score is 1; with cells in only one, 0.
    """
    overlaps = Overlaps.of(predicted, truth)
    n_pred, n_true = len(overlaps.predicted_area), len(overlaps.true_area)
    iou = overlaps.iou
    per_threshold = {}
    for threshold in IOU_THRESHOLDS:
        tp = len(np.unique(overlaps.predicted[iou > threshold]))
        per_threshold[threshold] = (tp, n_pred - tp, n_true - tp)
    tp, fp, fn = per_threshold[0.5]
    empty = n_pred == 0 and n_true == 0
    return {
        "true_cells": n_true,
        "predicted_cells": n_pred,
        "tp": tp, "fp": fp, "fn": fn,
        "precision": 1.0 if n_pred == 0 else tp / n_pred,
        "recall": 1.0 if n_true == 0 else tp / n_true,
        "f1": 1.0 if empty else 2 * tp / (n_pred + n_true),
        "dsb_score": 1.0 if empty else float(np.mean([t / (t + p + n) for t, p, n in per_threshold.values()])),
        **error_breakdown(overlaps),
    }


def summarise_instance_scores(per_image: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over images of F1 and DSB score, pooled precision/recall/F1, the median count error,
    and the totals of true and predicted cells and of each error class over all images."""
    if not per_image:
        return {}
    tp, fp, fn = (sum(s[key] for s in per_image) for key in ("tp", "fp", "fn"))
    totals = {key: sum(s[key] for s in per_image) for key in ("true_cells", "predicted_cells", *ERROR_CLASSES)}
    count_errors = [abs(s["predicted_cells"] - s["true_cells"]) / s["true_cells"] for s in per_image if s["true_cells"]]
    return {
        "images": len(per_image),
        "f1_mean": float(np.mean([s["f1"] for s in per_image])),
        "dsb_score_mean": float(np.mean([s["dsb_score"] for s in per_image])),
        "precision_pooled": tp / (tp + fp) if tp + fp else 1.0,
        "recall_pooled": tp / (tp + fn) if tp + fn else 1.0,
        "f1_pooled": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "count_error_median": float(np.median(count_errors)) if count_errors else None,
        **{f"{key}_total": value for key, value in totals.items()},
    }


def truth_regions(mask: np.ndarray) -> np.ndarray:
    """The true regions of a binary mask without instance labels: its 4-connected components (as
    membrane-bounded EM regions are read from an ISBI 2012 mask)."""
    regions, _ = ndimage.label(np.asarray(mask) > 0)
    return regions


def region_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Adapted Rand error, precision and recall (`skimage.metrics.adapted_rand_error`, the SNEMI3D
    definition the ISBI 2012 challenge adopted later) of predicted cell labels against true
    regions (instance labels, or `truth_regions` of a mask).

    Computed on one 2-D image: pixels of true background (label 0) are left out, as the
    challenge leaves out membranes; predicted background counts as one region. The challenge
    scored a whole 3-D stack after thinning the membranes, so its figures differ in details.
    """
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted labels are {predicted.shape}, true regions are {truth.shape}")
    if not np.any(truth):  # nothing to find: any predicted cell is wrong (error 1, precision 0), none is right
        found = bool(np.any(predicted))
        return {"adapted_rand_error": float(found), "adapted_rand_precision": float(not found),
                "adapted_rand_recall": 1.0}
    shared, true_area, predicted_area = _region_table(predicted, truth)
    # skimage.metrics.adapted_rand_error's sums, in its order and float64: the same figures, from a
    # table counted 10x faster (0.023 against 0.234 s for a 2048² image here) in a quarter of the
    # memory (its scipy.sparse table took 40 bytes a pixel); the end of training scores every choice so
    pairs = shared @ shared - shared.sum()
    true_pairs = true_area @ true_area - true_area.sum()
    predicted_pairs = predicted_area @ predicted_area - predicted_area.sum()
    precision, recall = pairs / true_pairs, pairs / predicted_pairs
    return {"adapted_rand_error": float(1.0 - pairs / (0.5 * true_pairs + 0.5 * predicted_pairs)),
            "adapted_rand_precision": float(precision), "adapted_rand_recall": float(recall)}


def _region_table(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The contingency table of the pixels of true regions (truth > 0) as float64 counts: those
    shared by each (true region, predicted label) pair that shares any, in (true, predicted)
    order, each true region's pixels, and each predicted label's among them, predicted
    background (0) counted as one label."""
    inside = np.asarray(truth).ravel() != 0
    true_index, true_area = _compact(np.asarray(truth).ravel()[inside])
    predicted_index, predicted_area = _compact(np.asarray(predicted).ravel()[inside])
    del inside
    background = predicted_index < 0
    if background.any():
        predicted_index[background] = len(predicted_area)
        predicted_area = np.append(predicted_area, np.count_nonzero(background))
    del background
    count = len(predicted_area)
    keys = true_index * count + predicted_index
    del true_index, predicted_index
    if len(true_area) * count <= DENSE_PAIRS_LIMIT:
        table = np.bincount(keys, minlength=len(true_area) * count)
        shared = table[table > 0]
    else:
        shared = np.unique(keys, return_counts=True)[1]
    return shared.astype(np.float64), true_area.astype(np.float64), predicted_area.astype(np.float64)


def summarise_region_scores(per_image: list[dict[str, Any]]) -> dict[str, float]:
    """Means over images of the `region_scores`."""
    if not per_image:
        return {}
    keys = ("adapted_rand_error", "adapted_rand_precision", "adapted_rand_recall")
    return {f"{key}_mean": float(np.mean([row[key] for row in per_image])) for key in keys}
