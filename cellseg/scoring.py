"""Cells scored the way the field scores them: instances matched at an IoU threshold, F1, the
DSB2018 score (mean over IoU thresholds 0.5-0.95), the cell count error, and why cells did not
match (merged, split, missed, extra; Caicedo et al. 2019); and regions scored the way EM
scores them, by the adapted Rand error (`region_scores`)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage
from skimage.metrics import adapted_rand_error

ERROR_CLASSES = ("merged", "split", "missed", "extra")  # see error_breakdown
# The figures of summarise_instance_scores that reports show (the training flow's metrics, the
# quality benchmark's summary).
HEADLINE_CELL_SCORES = ("f1_mean", "f1_pooled", "dsb_score_mean", "count_error_median", "true_cells_total",
                        *(f"{name}_total" for name in ERROR_CLASSES))
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * step, 2) for step in range(10))  # 0.5, 0.55, ..., 0.95



def overlap_matrix(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Pixels shared by every predicted instance (rows, labels 1..P) and every true instance
    (columns, 1..T); label numbers absent from an image get no row or column."""
    if predicted.shape != truth.shape:
        raise ValueError(f"predicted labels are {predicted.shape}, true labels are {truth.shape}")
    predicted, truth = predicted.astype(np.int64).ravel(), truth.astype(np.int64).ravel()
    n_pred, n_true = int(predicted.max(initial=0)) + 1, int(truth.max(initial=0)) + 1
    overlap = np.bincount(predicted * n_true + truth, minlength=n_pred * n_true).reshape(n_pred, n_true)
    # A label is present when its row (column) holds any pixel. Row and column 0 (background) are
    # kept: they hold each cell's pixels outside all others.
    rows, columns = overlap.sum(axis=1) > 0, overlap.sum(axis=0) > 0
    rows[0] = columns[0] = True
    return overlap[rows][:, columns]


def iou_matrix(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """IoU of every predicted instance (rows, labels 1..P) with every true instance (columns, 1..T)."""
    return _iou(overlap_matrix(predicted, truth))


def _iou(overlap: np.ndarray) -> np.ndarray:
    pred_area, true_area = overlap.sum(axis=1, keepdims=True), overlap.sum(axis=0, keepdims=True)
    union = pred_area + true_area - overlap
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, overlap / union, 0.0)
    return iou[1:, 1:]


def error_breakdown(overlap: np.ndarray) -> dict[str, int]:
    """Why cells fail to match, from an `overlap_matrix` (the error classes of Caicedo et al.,
    Cytometry A 2019): true cells `merged` (more than half of the cell lies in one predicted
    cell that also holds more than half of another true cell), true cells `split` (two or more
    predicted cells lie more than half inside it), true cells `missed` (less than half of the
    cell is predicted as any cell), and predicted cells that are `extra` (less than half inside
    any true cell). A cell can be in no class and still fail to match at IoU 0.5 (a poor outline).
    """
    cells = overlap[1:, 1:]
    pred_area, true_area = overlap.sum(axis=1)[1:], overlap.sum(axis=0)[1:]
    mostly_in_pred = cells > true_area[None, :] / 2   # true cell j lies mostly in predicted cell i
    pred_mostly_in = cells > pred_area[:, None] / 2   # predicted cell i lies mostly in true cell j
    merging = mostly_in_pred.sum(axis=1) >= 2
    return {
        "merged": int(mostly_in_pred[merging].sum()),
        "split": int((pred_mostly_in.sum(axis=0) >= 2).sum()),
        "missed": int((cells.sum(axis=0) * 2 < true_area).sum()),
        "extra": int((cells.sum(axis=1) * 2 < pred_area).sum()),
    }


def instance_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Instance precision, recall and F1 at IoU 0.5, the DSB2018 score, the cell counts and the
    `error_breakdown` (merged, split, missed, extra).

    A predicted cell matches a true cell when their IoU exceeds the threshold (above 0.5 a cell
    can match at most one other, so no assignment problem arises). The DSB2018 score averages
    TP / (TP + FP + FN) over IoU thresholds 0.5, 0.55, ..., 0.95. With no cells in either, every
    score is 1; with cells in only one, 0.
    """
    overlap = overlap_matrix(predicted, truth)
    iou = _iou(overlap)
    n_pred, n_true = iou.shape
    per_threshold = {}
    for threshold in IOU_THRESHOLDS:
        tp = int((iou > threshold).any(axis=1).sum()) if iou.size else 0
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
        **error_breakdown(overlap),
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
    if not np.any(truth):
        return {"adapted_rand_error": 0.0 if not np.any(predicted) else 1.0,
                "adapted_rand_precision": 1.0, "adapted_rand_recall": 1.0}
    error, precision, recall = adapted_rand_error(truth.astype(np.int64), predicted.astype(np.int64))
    return {"adapted_rand_error": float(error), "adapted_rand_precision": float(precision),
            "adapted_rand_recall": float(recall)}


def summarise_region_scores(per_image: list[dict[str, Any]]) -> dict[str, float]:
    """Means over images of the `region_scores`."""
    if not per_image:
        return {}
    keys = ("adapted_rand_error", "adapted_rand_precision", "adapted_rand_recall")
    return {f"{key}_mean": float(np.mean([row[key] for row in per_image])) for key in keys}
