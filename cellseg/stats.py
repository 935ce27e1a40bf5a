"""Cell labelling and per-image cell statistics from a binary mask."""

from __future__ import annotations

import cv2
import numpy as np
from numba import njit

STATISTIC_FIELDS = (
    "cell_count",
    "total_cell_area",
    "mean_cell_area",
    "median_cell_area",
    "foreground_fraction",
    "mean_intensity_inside",
    "mean_intensity_outside",
)


def label_cells(mask: np.ndarray, min_cell_area: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a boolean (H, W) mask, dropping those below `min_cell_area` pixels.

    Diagonal neighbours belong to the same cell (8-connectivity). Returns (labels, areas): int32
    labels numbered 1..N in raster order of each component's first pixel (as `scipy.ndimage.label`
    numbers them) with 0 for background, and the N areas.
    """
    if not mask.size:
        return np.zeros(mask.shape, dtype=np.int32), np.zeros(0, dtype=np.intp)
    # OpenCV's SAUF labelling numbers components in scan order, like scipy, at a fraction of its cost.
    pixels = np.ascontiguousarray(mask, dtype=bool).view(np.uint8)
    count, labels = cv2.connectedComponentsWithAlgorithm(pixels, 8, cv2.CV_32S, cv2.CCL_SAUF)
    count -= 1  # label 0 is the background
    areas = label_areas(labels)[1:]  # every label 1..count has a pixel
    keep = areas >= min_cell_area
    if not keep.all():
        lookup = np.zeros(count + 1, dtype=np.int32)
        lookup[1:][keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
        _relabel(labels, lookup)
        areas = areas[keep]
    return labels.astype(np.int32, copy=False), areas


def cell_areas(labels: np.ndarray) -> np.ndarray:
    """Pixel count of each cell (label > 0) present in `labels`, in label order."""
    areas = label_areas(labels)[1:]
    return areas[areas > 0]


def label_areas(labels: np.ndarray) -> np.ndarray:
    """Pixels of each label 0..max of non-negative integer labels (any shape): `np.bincount` of
    them. For int32 labels in one compiled pass, in under half of bincount's time (bincount
    first copies the labels to int64)."""
    if labels.dtype != np.int32 or not labels.size:
        return np.bincount(labels.ravel())
    areas = _areas(np.ascontiguousarray(labels).ravel())
    if areas is None:
        raise ValueError("labels must be non-negative")
    return areas


@njit(cache=True, nogil=True)
def _areas(flat):  # pragma: no cover - compiled; tested through label_areas
    if flat.min() < 0:
        return None
    areas = np.zeros(flat.max() + 1, dtype=np.intp)
    # Counted by runs of one label: a count per pixel would wait on the previous pixel's, which
    # is nearly always the same label's.
    current, run = flat[0], 0
    for value in flat:
        if value == current:
            run += 1
        else:
            areas[current] += run
            current, run = value, 1
    areas[current] += run
    return areas


@njit(cache=True, nogil=True)
def _relabel(labels, lookup):  # pragma: no cover - compiled; tested through label_cells
    """labels[...] = lookup[labels], in place."""
    flat = labels.ravel()
    for index in range(flat.size):
        flat[index] = lookup[flat[index]]


def image_statistics(image: np.ndarray, labels: np.ndarray) -> dict[str, float | int | None]:
    """Statistics of one image given its cell labels; both (H, W).

    Areas are in pixels; intensities are in the image's own units (raw, not normalised).
    Means over an empty set (no cells, or no background) are None (`statistics_from_sums`).
    """
    if image.shape != labels.shape:
        raise ValueError(f"image is {image.shape}, labels are {labels.shape}")
    if image.dtype.kind in "ub" and labels.dtype.kind in "iu":
        # Integer intensities add up exactly in int64, so one compiled pass gives numpy's means.
        inside, total = _inside_and_total(np.ascontiguousarray(image), np.ascontiguousarray(labels))
        outside = total - inside
    else:
        cells = labels > 0
        pixels = image.astype(np.float64, copy=False)
        inside, outside = pixels[cells].sum(), pixels[~cells].sum()  # the sums numpy's means divide
    return statistics_from_sums(cell_areas(labels), labels.size, inside, outside)


def statistics_from_sums(areas: np.ndarray, pixels: int, inside: float, outside: float
                         ) -> dict[str, float | int | None]:
    """The statistics of an image (STATISTIC_FIELDS) from its cells' areas (one per cell, in
    pixels), its pixel count and the sums of its raw intensities inside cells and outside them.
    The one definition for an image in memory (`image_statistics`) and one measured block by
    block (`cellseg.blocks_finish`, from its blocks' sums), so that both mean the same.

    Means are over cells (areas) or over pixels (intensities); a mean over an empty set (no
    cells, or no background) is None."""
    cell_pixels = int(areas.sum())
    return {
        "cell_count": len(areas),
        "total_cell_area": cell_pixels,
        "mean_cell_area": float(areas.mean()) if len(areas) else None,
        "median_cell_area": float(np.median(areas)) if len(areas) else None,
        "foreground_fraction": cell_pixels / pixels,
        "mean_intensity_inside": float(inside / cell_pixels) if cell_pixels else None,
        "mean_intensity_outside": float(outside / (pixels - cell_pixels)) if cell_pixels < pixels else None,
    }


@njit(cache=True, nogil=True)
def _inside_and_total(image, labels):  # pragma: no cover - compiled; tested through image_statistics
    """Sums of an unsigned-integer image's pixels inside cells (labels > 0) and over all pixels."""
    inside, total = 0, 0
    for index in range(image.size):
        value = np.int64(image.flat[index])
        total += value
        if labels.flat[index] > 0:
            inside += value
    return inside, total
