"""Cells, not just pixels: split touching cells into instances, and score instances the way the
field does (matching at an IoU threshold; the DSB2018 score).

Splitting follows the classic recipe: the distance to the background inside the cell mask has
one peak per roughly convex cell; peaks at least `split_depth` pixels higher than the saddle
to their neighbour (h-maxima) seed a watershed of the inverted distance, restricted to the mask.
Models with a distance-map output are split the same way on the map they predict, which dips
between touching cells even where the mask has no neck.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import watershed

from cellseg.stats import label_cells

ERROR_CLASSES = ("merged", "split", "missed", "extra")  # see error_breakdown
# The figures of summarise_instance_scores that reports show (the training flow's metrics, the
# quality benchmark's summary).
HEADLINE_CELL_SCORES = ("f1_mean", "f1_pooled", "dsb_score_mean", "count_error_median", "true_cells_total",
                        *(f"{name}_total" for name in ERROR_CLASSES))
IOU_THRESHOLDS = tuple(round(0.5 + 0.05 * step, 2) for step in range(10))  # 0.5, 0.55, ..., 0.95


def split_touching_cells(mask: np.ndarray, min_cell_area: int = 0, split_depth: float = 0.5) -> np.ndarray:
    """Instance labels (int32, 0 = background, 1..N) for a boolean cell mask.

    Objects (connected components) smaller than `min_cell_area` pixels are dropped; touching
    cells are then separated where the mask narrows between them (a neck at least `split_depth`
    pixels shallower than both cells' centres). `split_depth=0` gives the connected components.

    Each object is handled inside its own bounding box, so time and memory follow the objects,
    not the image: a 8192x8192 image costs no more per cell than a small one.
    """
    components = label_cells(mask, min_cell_area)[0]
    if split_depth <= 0:
        return components
    smallest_pair = 2 * np.pi * split_depth**2  # two discs deep enough to count as cells

    def split(cell: np.ndarray, _: tuple[slice, ...]) -> np.ndarray | None:
        return None if cell.sum() < smallest_pair else _split_at_necks(cell, split_depth)

    return _split_objects(components, split)


def split_at_distance_peaks(
    mask: np.ndarray, distance: np.ndarray, min_cell_area: int = 0, prominence: float = 0.1
) -> np.ndarray:
    """Instance labels (int32, 0 = background, 1..N) for a boolean cell mask, touching cells
    parted by a predicted distance map (`ModelConfig.distance_map`: about 1 at each cell's centre,
    falling to 0 at its outline, also where it meets a neighbour).

    Objects smaller than `min_cell_area` pixels are dropped, as in `split_touching_cells`. In each
    object, the peaks of the (lightly smoothed) map that rise at least `prominence` above the
    saddle to a higher one (h-maxima) seed a watershed of the inverted map; an object with one
    such peak stays one cell. The mask is the same as without splitting.
    """
    if distance.shape != mask.shape:
        raise ValueError(f"distance map is {distance.shape}, mask is {mask.shape}")
    components = label_cells(mask, min_cell_area)[0]
    smooth = ndimage.gaussian_filter(distance.astype(np.float32, copy=False), sigma=1.0)

    def split(cell: np.ndarray, box: tuple[slice, ...]) -> np.ndarray | None:
        peaks = np.where(cell, smooth[box], 0.0)
        markers, count = _dome_markers(peaks, prominence, cell)
        return watershed(-peaks, markers, mask=cell, connectivity=2) if count >= 2 else None

    return _split_objects(components, split)


def _split_objects(
    components: np.ndarray, split: Callable[[np.ndarray, tuple[slice, ...]], np.ndarray | None]
) -> np.ndarray:
    """Relabel `components` (1..N) with each object replaced by the pieces (1..K) that
    `split(object mask, its window)` returns for it; None keeps the object whole. The window is the
    object's bounding box grown by one pixel; new labels follow N."""
    # Small objects are dropped before splitting, never after: the cell mask is the same with or
    # without splitting, and a split only assigns the pixels of one object to several cells.
    labels = components.copy()
    next_label = int(components.max(initial=0)) + 1
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        padded = tuple(slice(max(side.start - 1, 0), side.stop + 1) for side in box)
        pieces = split(components[padded] == index, padded)
        if pieces is not None:
            region = labels[padded]
            extra = pieces > 1
            region[extra] = pieces[extra] + (next_label - 2)
            next_label += int(pieces.max()) - 1
    return labels


def _split_at_necks(cell: np.ndarray, split_depth: float) -> np.ndarray | None:
    """Watershed pieces (1..K) of one object, or None when it is one cell."""
    # A little smoothing keeps one-pixel ripples of the outline from seeding extra cells.
    distance = ndimage.gaussian_filter(ndimage.distance_transform_edt(cell), sigma=1.0)
    # Cheap test first: an object with one local maximum of the distance is one cell. Only peaks
    # at least `split_depth` deep can be h-maxima; the 5x5 window ignores ripples along ridges.
    peaks = (distance == ndimage.maximum_filter(distance, size=5)) & (distance >= split_depth) & cell
    if ndimage.label(peaks, structure=_EIGHT)[1] < 2:
        return None
    markers, count = _dome_markers(distance, split_depth, cell)
    if count < 2:
        return None
    # connectivity=2 (8-neighbours), like the components, so every object pixel is reached.
    return watershed(-distance, markers, mask=cell, connectivity=2)


def _dome_markers(height: np.ndarray, h: float, inside: np.ndarray) -> tuple[np.ndarray, int]:
    """One labelled marker per dome of `height` that rises at least `h` above every saddle to a
    higher dome (the h-maxima), within `inside`.

    The markers are the regional maxima (plateaus) of the h-maxima transform, the reconstruction
    of `height - h` under `height`. skimage's `h_maxima` marks the top of every such dome, so two
    equally high peaks joined by a saddle shallower than `h` (two halves of one symmetric cell)
    come out as two seeds; the plateau of the reconstruction keeps them one.
    """
    domes = reconstruction(height - h, height, method="dilation")
    return ndimage.label(local_maxima(domes) & inside, structure=_EIGHT)


_EIGHT = np.ones((3, 3), dtype=bool)


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
