"""Per-cell measurements, the CellProfiler-style table: shape, position and intensity of each cell.

The columns are those of `skimage.measure.regionprops` with the same definitions (perimeter
with 4-connected borders and the Benkrid-Crookes weights, moment-based axes and eccentricity,
solidity against the pixel-rasterised convex hull), computed for all cells at once from
per-pixel label arrays instead of one Python object per region; only the convex hulls behind
solidity are still taken cell by cell, with skimage's `convex_hull_image`. tests/test_measure.py
checks every column against regionprops_table.
Intensities are in the image's own units. Lengths and areas are in pixels; coordinates are
(row, column) = (y, x) with the origin at the top-left pixel; bounding boxes are half-open.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_image

CELL_COLUMNS = (
    "label", "area", "perimeter", "centroid_y", "centroid_x", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x",
    "eccentricity", "solidity", "major_axis_length", "minor_axis_length", "equivalent_diameter",
    "intensity_mean", "intensity_min", "intensity_max", "intensity_integrated",
)
INTEGER_COLUMNS = frozenset({"label", "area", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"})

# skimage.measure.perimeter: a border pixel's code is 1 + 2 per 4-neighbour and 10 per diagonal
# neighbour on the same border; the code says how much contour the pixel contributes.
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = np.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + np.sqrt(2)) / 2
_NEIGHBOURS = [((-1, 0), 2), ((1, 0), 2), ((0, -1), 2), ((0, 1), 2), ((-1, -1), 10), ((-1, 1), 10), ((1, -1), 10), ((1, 1), 10)]


def cell_measurements(cells: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(N, len(CELL_COLUMNS)) float64 table, one row per cell of `cells` (int labels, 0 = background)
    in label order, measured on the raw `image` of the same shape."""
    if cells.shape != image.shape:
        raise ValueError(f"cell labels are {cells.shape}, the image {image.shape}")
    cells = np.asarray(cells, dtype=np.int64)
    if not cells.any():
        return np.zeros((0, len(CELL_COLUMNS)))
    size = int(cells.max()) + 1
    rows, cols = np.nonzero(cells)
    owner = cells[rows, cols]
    counts = np.bincount(owner, minlength=size).astype(np.float64)
    labels = np.flatnonzero(counts)
    area = counts[labels]

    centre_y = np.bincount(owner, rows, size) / np.maximum(counts, 1)  # indexed by label
    centre_x = np.bincount(owner, cols, size) / np.maximum(counts, 1)
    slices = ndi.find_objects(cells)
    boxes = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in (slices[k - 1] for k in labels)], dtype=np.float64)

    # Central second moments -> inertia tensor [[mu02, -mu11], [-mu11, mu20]] / area -> eigenvalues.
    dy, dx = rows - centre_y[owner], cols - centre_x[owner]
    mu20 = np.bincount(owner, dy * dy, size)[labels] / area
    mu02 = np.bincount(owner, dx * dx, size)[labels] / area
    mu11 = np.bincount(owner, dy * dx, size)[labels] / area
    half_sum, half_difference = (mu20 + mu02) / 2, (mu02 - mu20) / 2
    spread = np.sqrt(half_difference**2 + mu11**2)
    major, minor = np.clip(half_sum + spread, 0, None), np.clip(half_sum - spread, 0, None)
    eccentricity = np.sqrt(1 - np.divide(minor, major, out=np.ones_like(major), where=major > 0))

    perimeters = _perimeters(cells, size)
    values = image[rows, cols].astype(np.float64)
    integrated = np.bincount(owner, values, size)[labels]
    order = np.argsort(owner, kind="stable")  # pixels grouped by cell, cells in label order
    starts = np.searchsorted(owner[order], labels)
    table = {
        "label": labels.astype(np.float64),
        "area": area,
        "perimeter": perimeters[labels],
        "centroid_y": centre_y[labels],
        "centroid_x": centre_x[labels],
        "bbox_min_y": boxes[:, 0], "bbox_min_x": boxes[:, 1], "bbox_max_y": boxes[:, 2], "bbox_max_x": boxes[:, 3],
        "eccentricity": eccentricity,
        "solidity": area / _convex_areas(cells, labels, slices),
        "major_axis_length": 4 * np.sqrt(major),
        "minor_axis_length": 4 * np.sqrt(minor),
        "equivalent_diameter": np.sqrt(4 * area / np.pi),
        "intensity_mean": integrated / area,
        "intensity_min": np.minimum.reduceat(values[order], starts),
        "intensity_max": np.maximum.reduceat(values[order], starts),
        "intensity_integrated": integrated,
    }
    return np.stack([table[name] for name in CELL_COLUMNS], axis=1)


def _perimeters(cells: np.ndarray, size: int) -> np.ndarray:
    """skimage's 4-connected perimeter of every label at once (indexed by label)."""
    padded = np.pad(cells, 1)
    centre = padded[1:-1, 1:-1]

    def shifted(array: np.ndarray, dy: int, dx: int) -> np.ndarray:
        return array[1 + dy: array.shape[0] - 1 + dy, 1 + dx: array.shape[1] - 1 + dx]

    interior = centre > 0
    for (dy, dx), _ in _NEIGHBOURS[:4]:
        interior &= shifted(padded, dy, dx) == centre
    border = (centre > 0) & ~interior
    padded_border = np.pad(border, 1)
    code = border.astype(np.int64)
    for (dy, dx), weight in _NEIGHBOURS:
        code += weight * (shifted(padded_border, dy, dx) & (shifted(padded, dy, dx) == centre))
    contribution = _PERIMETER_WEIGHTS[np.where(border, code, 0)]
    return np.bincount(cells[border], contribution[border], size)


def _convex_areas(cells: np.ndarray, labels: np.ndarray, slices: list) -> np.ndarray:
    """Pixels in the convex hull of each cell, as regionprops' `area_convex` counts them (the
    hull of the pixels' edge midpoints, rasterised with its border): skimage's own
    `convex_hull_image` on each cell's box, the one per-cell loop left."""
    return np.array([np.count_nonzero(convex_hull_image(cells[slices[label - 1]] == label)) for label in labels],
                    dtype=np.float64)
