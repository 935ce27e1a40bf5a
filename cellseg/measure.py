"""Per-cell measurements, the CellProfiler-style table: shape, position and intensity of each cell.

The columns are those of `skimage.measure.regionprops` with the same definitions (perimeter
with 4-connected borders and the Benkrid-Crookes weights, moment-based axes and eccentricity,
solidity against the pixel-rasterised convex hull), computed for all cells at once in two
compiled passes over the labels (numba) instead of one Python object per region: the first adds
up each cell's pixels, coordinates, intensities and perimeter, the second finds the ends of each
of its rows. A cell's convex hull is the hull of the edge midpoints of its rows' end pixels; its
pixels are counted row by row in exact integer arithmetic, as skimage's `convex_hull_image`
rasterises them. tests/test_measure.py checks every column against regionprops_table.
Intensities are in the image's own units. Lengths and areas are in pixels; coordinates are
(row, column) = (y, x) with the origin at the top-left pixel; bounding boxes are half-open.
"""

from __future__ import annotations

import numpy as np
from numba import njit

CELL_COLUMNS = (
    "label", "area", "perimeter", "centroid_y", "centroid_x", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x",
    "eccentricity", "solidity", "major_axis_length", "minor_axis_length", "equivalent_diameter",
    "intensity_mean", "intensity_min", "intensity_max", "intensity_integrated",
)
INTEGER_COLUMNS = frozenset({"label", "area", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"})
# The skimage.measure.regionprops_table properties these columns equal, and the name of each
# column it returns in CELL_COLUMNS (intensity_integrated is intensity_mean * area): for the
# equivalence test and the speed benchmark against regionprops.
REGIONPROPS_PROPERTIES = (
    "label", "area", "perimeter", "centroid", "bbox", "eccentricity", "solidity", "axis_major_length",
    "axis_minor_length", "equivalent_diameter_area", "intensity_mean", "intensity_min", "intensity_max",
)
REGIONPROPS_COLUMNS = {
    "label": "label", "area": "area", "perimeter": "perimeter", "centroid-0": "centroid_y", "centroid-1": "centroid_x",
    "bbox-0": "bbox_min_y", "bbox-1": "bbox_min_x", "bbox-2": "bbox_max_y", "bbox-3": "bbox_max_x",
    "eccentricity": "eccentricity", "solidity": "solidity", "axis_major_length": "major_axis_length",
    "axis_minor_length": "minor_axis_length", "equivalent_diameter_area": "equivalent_diameter",
    "intensity_mean": "intensity_mean", "intensity_min": "intensity_min", "intensity_max": "intensity_max",
}

# skimage.measure.perimeter: a border pixel's code is 1 + 2 per 4-neighbour and 10 per diagonal
# neighbour on the same border; the code says how much contour the pixel contributes.
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2
_MAX_LABEL = np.iinfo(np.int32).max


def cell_measurements(cells: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(N, len(CELL_COLUMNS)) float64 table, one row per cell of `cells` (int labels, 0 = background)
    in label order, measured on the raw `image` of the same shape.

    Memory beyond the inputs: a few numbers per label and two per row of each cell, never a
    per-pixel temporary, so a whole-slide image is measured in place."""
    if cells.shape != image.shape or cells.ndim != 2:
        raise ValueError(f"cell labels are {cells.shape}, the image {image.shape}: expected one 2-D shape")
    lowest_label, highest_label = int(cells.min(initial=0)), int(cells.max(initial=0))
    if lowest_label < 0 or highest_label > _MAX_LABEL:
        raise ValueError(f"cell labels must lie in 0..{_MAX_LABEL}, not {lowest_label}..{highest_label}")
    if not highest_label:
        return np.zeros((0, len(CELL_COLUMNS)))
    cells = np.ascontiguousarray(cells, dtype=np.int32)
    if image.dtype.kind not in "uif":
        raise ValueError(f"the image must hold numbers, not {image.dtype}")
    image = np.ascontiguousarray(image)
    size = highest_label + 1
    # Per label: pixel count; sums of dy, dx, dy^2, dx^2, dy*dx about the label's first pixel (its
    # reference, so that the central moments lose no precision to large coordinates); intensity
    # sum, minimum, maximum; perimeter; the first pixel; the bounding box.
    sums = np.zeros((8, size))
    extremes = np.empty((2, size))
    extremes[0], extremes[1] = np.inf, -np.inf
    corners = np.empty((4, size), dtype=np.int64)
    corners[:2], corners[2:] = np.iinfo(np.int64).max, -1
    reference = np.full((2, size), -1, dtype=np.int64)
    _pixel_sums(cells, image, sums, extremes, reference, corners, _PERIMETER_WEIGHTS)
    count, sum_y, sum_x, sum_yy, sum_xx, sum_xy, integrated, perimeter = sums
    lowest, highest = extremes
    convex_area = _convex_areas(cells, corners)

    # Central second moments -> inertia tensor [[mu02, -mu11], [-mu11, mu20]] / area -> its eigenvalues.
    labels = np.flatnonzero(count)
    area = count[labels]
    mean_y, mean_x = sum_y[labels] / area, sum_x[labels] / area
    mu20 = sum_yy[labels] / area - mean_y**2
    mu02 = sum_xx[labels] / area - mean_x**2
    mu11 = sum_xy[labels] / area - mean_y * mean_x
    half_sum, half_difference = (mu20 + mu02) / 2, (mu02 - mu20) / 2
    spread = np.sqrt(half_difference**2 + mu11**2)
    major, minor = np.clip(half_sum + spread, 0, None), np.clip(half_sum - spread, 0, None)
    eccentricity = np.sqrt(1 - np.divide(minor, major, out=np.ones_like(major), where=major > 0))
    boxes = np.concatenate([corners[:2, labels], corners[2:, labels] + 1]).astype(np.float64).T

    table = {
        "label": labels.astype(np.float64),
        "area": area,
        "perimeter": perimeter[labels],
        "centroid_y": reference[0, labels] + mean_y,
        "centroid_x": reference[1, labels] + mean_x,
        "bbox_min_y": boxes[:, 0], "bbox_min_x": boxes[:, 1], "bbox_max_y": boxes[:, 2], "bbox_max_x": boxes[:, 3],
        "eccentricity": eccentricity,
        "solidity": area / convex_area[labels],
        "major_axis_length": 4 * np.sqrt(major),
        "minor_axis_length": 4 * np.sqrt(minor),
        "equivalent_diameter": np.sqrt(4 * area / np.pi),
        "intensity_mean": integrated[labels] / area,
        "intensity_min": lowest[labels],
        "intensity_max": highest[labels],
        "intensity_integrated": integrated[labels],
    }
    return np.stack([table[name] for name in CELL_COLUMNS], axis=1)


def _convex_areas(cells: np.ndarray, corners: np.ndarray) -> np.ndarray:
    """Pixels in each label's convex hull (float64 per label, 0 for absent ones), as regionprops'
    `area_convex` counts them, from the labels and their bounding boxes (`_pixel_sums`)."""
    rows = np.maximum(corners[2] - corners[0] + 1, 0)
    first_row = np.cumsum(rows) - rows  # where each label's rows start in the arrays below
    ends = np.empty((2, int(rows.sum())), dtype=np.int64)
    ends[0], ends[1] = np.iinfo(np.int64).max, -1
    _row_ends(cells, corners[0], first_row, ends)
    areas = np.zeros(len(rows))
    _hull_pixels(corners[0], rows, first_row, ends, areas)
    return areas


@njit(cache=True, nogil=True)
def _is_border(cells, row, column, label):  # pragma: no cover - compiled; tested through cell_measurements
    """Whether a pixel of `label` has a 4-neighbour outside it (the outside of the image included)."""
    height, width = cells.shape
    return (row == 0 or row == height - 1 or column == 0 or column == width - 1
            or cells[row - 1, column] != label or cells[row + 1, column] != label
            or cells[row, column - 1] != label or cells[row, column + 1] != label)


@njit(cache=True, nogil=True)
def _pixel_sums(cells, image, sums, extremes, reference, corners, weights):  # pragma: no cover - compiled
    height, width = cells.shape
    for row in range(height):
        for column in range(width):
            label = cells[row, column]
            if label == 0:
                continue
            if sums[0, label] == 0:
                reference[0, label], reference[1, label] = row, column
                corners[0, label] = row
            dy, dx = np.float64(row - reference[0, label]), np.float64(column - reference[1, label])
            value = np.float64(image[row, column])
            sums[0, label] += 1
            sums[1, label] += dy
            sums[2, label] += dx
            sums[3, label] += dy * dy
            sums[4, label] += dx * dx
            sums[5, label] += dy * dx
            sums[6, label] += value
            extremes[0, label] = min(extremes[0, label], value)
            extremes[1, label] = max(extremes[1, label], value)
            corners[1, label] = min(corners[1, label], column)
            corners[2, label] = row
            corners[3, label] = max(corners[3, label], column)
            if _is_border(cells, row, column, label):
                # skimage's perimeter code: 1, + 2 per 4-neighbour and 10 per diagonal one on the same border.
                code = 1
                for step_row in (-1, 0, 1):
                    for step_column in (-1, 0, 1):
                        next_row, next_column = row + step_row, column + step_column
                        if ((step_row or step_column) and 0 <= next_row < height and 0 <= next_column < width
                                and cells[next_row, next_column] == label
                                and _is_border(cells, next_row, next_column, label)):
                            code += 10 if step_row and step_column else 2
                sums[7, label] += weights[code]


@njit(cache=True, nogil=True)
def _row_ends(cells, top, first_row, ends):  # pragma: no cover - compiled
    """The first and last column of each row of each label, at first_row[label] + row - top[label]."""
    height, width = cells.shape
    for row in range(height):
        for column in range(width):
            label = cells[row, column]
            if label == 0:
                continue
            at = first_row[label] + row - top[label]
            ends[0, at] = min(ends[0, at], column)
            ends[1, at] = max(ends[1, at], column)


@njit(cache=True, nogil=True)
def _hull_pixels(top, rows, first_row, ends, areas):  # pragma: no cover - compiled
    """Count each label's convex hull pixels into `areas`.

    The hull is that of the edge midpoints of the rows' end pixels, with coordinates doubled so
    that every point is whole: (x, y) = (2 column, 2 row -+ 1) and (2 first - 1, 2 row) on the
    left, (2 last + 1, 2 row) on the right. Its left side at each height y is the lower convex
    envelope of the left points (x as a function of y), its right side the upper envelope of the
    right ones; a row's hull pixels run from ceil(left / 2) to floor(right / 2), both found in
    exact integer arithmetic, so no pixel centre on an edge is lost to rounding."""
    for label in range(len(rows)):
        count = rows[label]
        if count == 0:
            continue
        start = first_row[label]
        # Heights y = 2 row - 1 .. 2 row + 1 of the label's rows, index y - (2 top - 1); at each the
        # leftmost and the rightmost point (an odd height is shared by two neighbouring rows).
        heights = 2 * count + 1
        left = np.full(heights, np.iinfo(np.int64).max, dtype=np.int64)
        right = np.full(heights, np.iinfo(np.int64).min, dtype=np.int64)
        for index in range(count):
            first, last = ends[0, start + index], ends[1, start + index]
            if last < 0:  # a row the label skips (its pixels need not be connected)
                continue
            for offset, left_x, right_x in ((0, 2 * first, 2 * last), (1, 2 * first - 1, 2 * last + 1),
                                            (2, 2 * first, 2 * last)):
                at = 2 * index + offset
                left[at] = min(left[at], left_x)
                right[at] = max(right[at], right_x)
        lower = _envelope(left, 1)
        upper = _envelope(right, -1)
        total = 0
        for index in range(count):
            y = 2 * index + 1  # the row's centre, in the heights' index
            total += _floor_at(upper, right, y) - _ceil_at(lower, left, y) + 1
        areas[label] = total


@njit(cache=True, nogil=True)
def _envelope(values, side):  # pragma: no cover - compiled
    """Indices (heights) of the convex envelope of the points (y, values[y]) present (not at the
    int64 extremes): the lower one (side 1, for the left side of a hull) or the upper one (-1)."""
    chain = np.empty(len(values), dtype=np.int64)
    size = 0
    for y in range(len(values)):
        if values[y] == np.iinfo(np.int64).max or values[y] == np.iinfo(np.int64).min:
            continue
        while size >= 2:
            a, b = chain[size - 2], chain[size - 1]
            turn = (b - a) * (values[y] - values[a]) - (values[b] - values[a]) * (y - a)
            if turn * side > 0:
                break
            size -= 1
        chain[size] = y
        size += 1
    return chain[:size]


@njit(cache=True, nogil=True)
def _crossing(chain, values, y):  # pragma: no cover - compiled
    """The envelope's x at height y as a fraction numerator / denominator (denominator > 0) of
    doubled coordinates; y lies within the chain's span."""
    for step in range(len(chain) - 1):
        a, b = chain[step], chain[step + 1]
        if a <= y <= b:
            return values[a] * (b - a) + (y - a) * (values[b] - values[a]), b - a
    return values[chain[0]], 1


@njit(cache=True, nogil=True)
def _ceil_at(chain, values, y):  # pragma: no cover - compiled
    numerator, denominator = _crossing(chain, values, y)
    return -((-numerator) // (2 * denominator))


@njit(cache=True, nogil=True)
def _floor_at(chain, values, y):  # pragma: no cover - compiled
    numerator, denominator = _crossing(chain, values, y)
    return numerator // (2 * denominator)
