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
_NEIGHBOURS = [((-1, 0), 2), ((1, 0), 2), ((0, -1), 2), ((0, 1), 2), ((-1, -1), 10), ((-1, 1), 10), ((1, -1), 10), ((1, 1), 10)]


BAND_PIXELS = 1 << 22  # pixels measured at a time: temporaries stay a band's size on very large images


def cell_measurements(cells: np.ndarray, image: np.ndarray, band_rows: int | None = None) -> np.ndarray:
    """(N, len(CELL_COLUMNS)) float64 table, one row per cell of `cells` (int labels, 0 = background)
    in label order, measured on the raw `image` of the same shape.

    Sums over pixels (counts, coordinates, intensities, perimeter contributions) are taken band
    by band of `band_rows` rows (default: BAND_PIXELS pixels' worth) and added up per label, so
    memory beyond the inputs is bounded by a band, not the image."""
    if cells.shape != image.shape:
        raise ValueError(f"cell labels are {cells.shape}, the image {image.shape}")
    if not cells.any():
        return np.zeros((0, len(CELL_COLUMNS)))
    slices = ndi.find_objects(cells)
    labels = np.array([label for label, box in enumerate(slices, start=1) if box is not None])
    size = len(slices) + 1
    height, width = cells.shape
    band_rows = band_rows or max(1, BAND_PIXELS // width)
    bands = [(top, min(top + band_rows, height)) for top in range(0, height, band_rows)]

    count, sum_y, sum_x, integrated, perimeter = (np.zeros(size) for _ in range(5))
    lowest, highest = np.full(size, np.inf), np.full(size, -np.inf)
    for top, bottom in bands:
        rows, cols, owner = _foreground(cells, top, bottom)
        if not len(owner):  # no cell pixel in the band: nothing to add, its perimeter included
            continue
        count += np.bincount(owner, minlength=size)
        sum_y += np.bincount(owner, rows, size)
        sum_x += np.bincount(owner, cols, size)
        values = image[rows, cols].astype(np.float64)
        integrated += np.bincount(owner, values, size)
        order = np.argsort(owner, kind="stable")
        grouped = owner[order]
        starts = np.flatnonzero(np.r_[True, grouped[1:] != grouped[:-1]])
        present = grouped[starts]
        lowest[present] = np.minimum(lowest[present], np.minimum.reduceat(values[order], starts))
        highest[present] = np.maximum(highest[present], np.maximum.reduceat(values[order], starts))
        perimeter += _band_perimeter(cells, top, bottom, size)

    # Central second moments (a second pass, about the finished centroids) -> inertia tensor
    # [[mu02, -mu11], [-mu11, mu20]] / area -> its eigenvalues.
    centre_y, centre_x = sum_y / np.maximum(count, 1), sum_x / np.maximum(count, 1)
    mu20, mu02, mu11 = (np.zeros(size) for _ in range(3))
    for top, bottom in bands:
        rows, cols, owner = _foreground(cells, top, bottom)
        dy, dx = rows - centre_y[owner], cols - centre_x[owner]
        mu20 += np.bincount(owner, dy * dy, size)
        mu02 += np.bincount(owner, dx * dx, size)
        mu11 += np.bincount(owner, dy * dx, size)
    area = count[labels]
    mu20, mu02, mu11 = mu20[labels] / area, mu02[labels] / area, mu11[labels] / area
    half_sum, half_difference = (mu20 + mu02) / 2, (mu02 - mu20) / 2
    spread = np.sqrt(half_difference**2 + mu11**2)
    major, minor = np.clip(half_sum + spread, 0, None), np.clip(half_sum - spread, 0, None)
    eccentricity = np.sqrt(1 - np.divide(minor, major, out=np.ones_like(major), where=major > 0))
    boxes = np.array([[s[0].start, s[1].start, s[0].stop, s[1].stop] for s in (slices[k - 1] for k in labels)], dtype=np.float64)

    table = {
        "label": labels.astype(np.float64),
        "area": area,
        "perimeter": perimeter[labels],
        "centroid_y": centre_y[labels],
        "centroid_x": centre_x[labels],
        "bbox_min_y": boxes[:, 0], "bbox_min_x": boxes[:, 1], "bbox_max_y": boxes[:, 2], "bbox_max_x": boxes[:, 3],
        "eccentricity": eccentricity,
        "solidity": area / _convex_areas(cells, labels, slices),
        "major_axis_length": 4 * np.sqrt(major),
        "minor_axis_length": 4 * np.sqrt(minor),
        "equivalent_diameter": np.sqrt(4 * area / np.pi),
        "intensity_mean": integrated[labels] / area,
        "intensity_min": lowest[labels],
        "intensity_max": highest[labels],
        "intensity_integrated": integrated[labels],
    }
    return np.stack([table[name] for name in CELL_COLUMNS], axis=1)


def _foreground(cells: np.ndarray, top: int, bottom: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image rows, columns and labels of the cell pixels in rows [top, bottom)."""
    band = cells[top:bottom]
    rows, cols = np.nonzero(band)
    return rows + top, cols, band[rows, cols].astype(np.intp)


def _band_perimeter(cells: np.ndarray, top: int, bottom: int, size: int) -> np.ndarray:
    """skimage's 4-connected perimeter contributions of rows [top, bottom), summed per label.

    A pixel is on its cell's border when a 4-neighbour (outside the image counts) is not in the
    cell; its code is 1 + 2 per 4-neighbour and 10 per diagonal neighbour on the same border. The
    band is read with two rows either side, since a neighbour's border flag needs its own
    neighbours."""
    height, width = cells.shape
    rows = bottom - top
    window = np.zeros((rows + 4, width + 2), dtype=cells.dtype)  # zero = outside the image
    first, last = max(top - 2, 0), min(bottom + 2, height)
    window[first - (top - 2): last - (top - 2), 1:-1] = cells[first:last]

    def shifted(array: np.ndarray, dy: int, dx: int, margin: int) -> np.ndarray:
        return array[margin + dy: array.shape[0] - margin + dy, 1 + dx: array.shape[1] - 1 + dx]

    centre = shifted(window, 0, 0, 1)  # rows top-1 .. bottom
    interior = centre > 0
    for (dy, dx), _ in _NEIGHBOURS[:4]:
        interior &= shifted(window, dy, dx, 1) == centre
    border = np.zeros((rows + 2, width + 2), dtype=bool)
    border[:, 1:-1] = (centre > 0) & ~interior
    own = shifted(window, 0, 0, 2)  # rows top .. bottom-1
    on_border = shifted(border, 0, 0, 1)
    code = on_border.astype(np.uint8)
    for (dy, dx), weight in _NEIGHBOURS:
        code += np.uint8(weight) * (shifted(border, dy, dx, 1) & (shifted(window, dy, dx, 2) == own))
    return np.bincount(own[on_border].astype(np.intp), _PERIMETER_WEIGHTS[code[on_border]], size)
def _convex_areas(cells: np.ndarray, labels: np.ndarray, slices: list) -> np.ndarray:
    """Pixels in the convex hull of each cell, as regionprops' `area_convex` counts them (the
    hull of the pixels' edge midpoints, rasterised with its border): skimage's own
    `convex_hull_image` on each cell's box, the one per-cell loop left."""
    return np.array([np.count_nonzero(convex_hull_image(cells[slices[label - 1]] == label)) for label in labels],
                    dtype=np.float64)
