"""Per-cell measurements, the CellProfiler-style table: shape, position and intensity of each cell.

The columns are those of `skimage.measure.regionprops` with the same definitions (perimeter
with 4-connected borders and the Benkrid-Crookes weights, moment-based axes and eccentricity,
solidity against the pixel-rasterised convex hull), computed for all cells at once from
per-pixel label arrays instead of one Python object per region. Solidity's convex hulls are
OpenCV's, one call per cell on the ends of the cell's rows, and their pixels are counted row by
row in exact integer arithmetic, as skimage's `convex_hull_image` rasterises them.
tests/test_measure.py checks every column against regionprops_table.
Intensities are in the image's own units. Lengths and areas are in pixels; coordinates are
(row, column) = (y, x) with the origin at the top-left pixel; bounding boxes are half-open.
"""

from __future__ import annotations

import itertools

import cv2
import numpy as np

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


BAND_PIXELS = 1 << 20  # pixels measured at a time: temporaries stay a band's size on very large images


def cell_measurements(cells: np.ndarray, image: np.ndarray, band_rows: int | None = None) -> np.ndarray:
    """(N, len(CELL_COLUMNS)) float64 table, one row per cell of `cells` (int labels, 0 = background)
    in label order, measured on the raw `image` of the same shape.

    Sums over pixels (counts, coordinates, intensities, perimeter contributions) are taken band
    by band of `band_rows` rows (default: BAND_PIXELS pixels' worth) and added up per label, in one
    pass, so memory beyond the inputs is bounded by a band, not the image (plus 16 bytes per row of
    each cell, the ends of its rows, for the convex hulls)."""
    if cells.shape != image.shape:
        raise ValueError(f"cell labels are {cells.shape}, the image {image.shape}")
    if not cells.any():
        return np.zeros((0, len(CELL_COLUMNS)))
    size = int(cells.max()) + 1
    height, width = cells.shape
    band_rows = band_rows or max(1, BAND_PIXELS // width)

    # Per label: pixel count; sums of dy, dx, dy^2, dx^2, dy*dx about the label's first pixel (its
    # reference, so that the central moments lose no precision to large coordinates); intensity
    # sum, minimum, maximum; bounding box; perimeter.
    count, sum_y, sum_x, sum_yy, sum_xx, sum_xy, integrated, perimeter = (np.zeros(size) for _ in range(8))
    lowest, highest = np.full(size, np.inf), np.full(size, -np.inf)
    reference = np.full((2, size), -1, dtype=np.int64)
    box_low, box_high = np.full((2, size), np.iinfo(np.int64).max), np.full((2, size), -1, dtype=np.int64)
    row_ends: list[np.ndarray] = []  # (owner, row, first column, last column) of each row of each cell
    for top in range(0, height, band_rows):
        bottom = min(top + band_rows, height)
        rows, cols, owner = _foreground(cells, top, bottom)
        if not len(owner):  # no cell pixel in the band: nothing to add, its perimeter included
            continue
        # Pixels grouped by label, each group in raster order (a stable radix sort for 16-bit labels).
        order = np.argsort(owner.astype(np.uint16) if size <= 1 << 16 else owner, kind="stable")
        owner, rows, cols = owner[order], rows[order], cols[order]
        values = image[rows, cols].astype(np.float64)
        starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
        present = owner[starts]
        unseen = reference[0, present] < 0
        reference[0, present[unseen]], reference[1, present[unseen]] = rows[starts[unseen]], cols[starts[unseen]]
        dy, dx = (rows - reference[0, owner]).astype(np.float64), (cols - reference[1, owner]).astype(np.float64)
        count[present] += np.diff(np.r_[starts, len(owner)])
        for total, terms in ((sum_y, dy), (sum_x, dx), (sum_yy, dy * dy), (sum_xx, dx * dx), (sum_xy, dy * dx),
                             (integrated, values)):
            total[present] += np.add.reduceat(terms, starts)
        lowest[present] = np.minimum(lowest[present], np.minimum.reduceat(values, starts))
        highest[present] = np.maximum(highest[present], np.maximum.reduceat(values, starts))
        for axis, coordinate in enumerate((rows, cols)):
            box_low[axis, present] = np.minimum(box_low[axis, present], np.minimum.reduceat(coordinate, starts))
            box_high[axis, present] = np.maximum(box_high[axis, present], np.maximum.reduceat(coordinate, starts))
        row_ends.append(_row_ends(owner, rows, cols))
        perimeter += _band_perimeter(cells, top, bottom, size)

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
    boxes = np.concatenate([box_low[:, labels], box_high[:, labels] + 1]).astype(np.float64).T

    table = {
        "label": labels.astype(np.float64),
        "area": area,
        "perimeter": perimeter[labels],
        "centroid_y": reference[0, labels] + mean_y,
        "centroid_x": reference[1, labels] + mean_x,
        "bbox_min_y": boxes[:, 0], "bbox_min_x": boxes[:, 1], "bbox_max_y": boxes[:, 2], "bbox_max_x": boxes[:, 3],
        "eccentricity": eccentricity,
        "solidity": area / convex_areas(np.concatenate(row_ends, axis=1), size)[labels],
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
    # Codes of the border pixels of rows top .. bottom-1 only, read from flat indices: `border` row
    # i is `window` row i + 1, and both have a column of padding either side.
    stride = width + 2
    at = np.flatnonzero(border[1:-1]) + stride
    flat_border, flat_window = border.ravel(), window.ravel()
    own = flat_window[at + stride]
    code = np.ones(len(at), dtype=np.uint8)
    for (dy, dx), weight in _NEIGHBOURS:
        step = dy * stride + dx
        code += np.uint8(weight) * (flat_border[at + step] & (flat_window[at + stride + step] == own))
    return np.bincount(own.astype(np.intp), _PERIMETER_WEIGHTS[code], size)


def _row_ends(owner: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(4, R) int32: owner, row, first and last column of each run of equal (owner, row) in pixels
    sorted by owner, then in raster order."""
    start = np.flatnonzero(np.r_[True, (owner[1:] != owner[:-1]) | (rows[1:] != rows[:-1])])
    last = np.r_[start[1:], len(owner)] - 1
    return np.stack([owner[start], rows[start], cols[start], cols[last]]).astype(np.int32)


def convex_areas(row_ends: np.ndarray, size: int) -> np.ndarray:
    """Pixels in the convex hull of each cell 0..size-1 given the ends of its rows (`_row_ends`,
    in any order of cells, rows in order within a cell), as regionprops' `area_convex` counts them:
    the hull of the midpoints of the pixels' edges, its pixel centres counted inside or on it
    (skimage's `convex_hull_image`). float64 (size,), 0 for absent cells.

    Coordinates are doubled so that every hull vertex is a whole number; each row's span of the
    hull is then found in exact integer arithmetic, so no pixel centre on an edge is lost to
    rounding. Cells are taken HULL_ROWS rows at a time, which bounds the temporaries."""
    row_ends = row_ends[:, np.argsort(row_ends[0], kind="stable")]
    owner = row_ends[0]
    areas = np.zeros(size)
    start = 0
    while start < len(owner):
        stop = len(owner)
        if start + HULL_ROWS < stop:  # end the chunk with a whole cell
            stop = max(int(np.searchsorted(owner, owner[start + HULL_ROWS])),
                       int(np.searchsorted(owner, owner[start], side="right")))
        areas += _hull_pixels(row_ends[:, start:stop].astype(np.int64), size)
        start = stop
    return areas


HULL_ROWS = 1 << 16  # rows of cells whose convex hulls are counted together


def _hull_pixels(row_ends: np.ndarray, size: int) -> np.ndarray:
    """`convex_areas` of the cells in `row_ends` (grouped by cell)."""
    owner, row, first, last = row_ends
    # The hull of a cell is the hull of the edge midpoints of its rows' end pixels (x = 2 col, y = 2 row).
    points = np.stack([
        np.stack([2 * first, 2 * row - 1], axis=1), np.stack([2 * first, 2 * row + 1], axis=1),
        np.stack([2 * first - 1, 2 * row], axis=1), np.stack([2 * last, 2 * row - 1], axis=1),
        np.stack([2 * last, 2 * row + 1], axis=1), np.stack([2 * last + 1, 2 * row], axis=1),
    ], axis=1).astype(np.int32)
    bounds = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1], True])
    hulls = [cv2.convexHull(points[start:stop].reshape(-1, 2))[:, 0] for start, stop in itertools.pairwise(bounds)]
    sides = np.array([len(hull) for hull in hulls])
    vertices = np.concatenate(hulls).astype(np.int64)
    following = np.arange(len(vertices)) + 1  # each vertex's successor around its own hull
    following[np.cumsum(sides) - 1] = np.cumsum(sides) - sides
    x0, y0 = vertices[:, 0], vertices[:, 1]
    x1, y1 = vertices[following, 0], vertices[following, 1]
    cell = np.repeat(owner[bounds[:-1]], sides)
    slanted = y0 != y1  # a level edge's ends are also ends of its neighbouring edges
    x0, y0, x1, y1, cell = x0[slanted], y0[slanted], x1[slanted], y1[slanted], cell[slanted]
    # Rows r (y = 2r) that each edge spans, one entry per (edge, row).
    low, high = -(-np.minimum(y0, y1) // 2), np.maximum(y0, y1) // 2
    spans = np.maximum(high - low + 1, 0)
    edge = np.repeat(np.arange(len(spans)), spans)
    row_of = low[edge] + np.arange(len(edge)) - np.repeat(np.cumsum(spans) - spans, spans)
    # The edge crosses y = 2r at x = x0 + (2r - y0)(x1 - x0)/(y1 - y0) = numerator / denominator.
    rise = y1[edge] - y0[edge]
    sign = np.sign(rise)
    numerator = (x0[edge] * rise + (2 * row_of - y0[edge]) * (x1[edge] - x0[edge])) * sign
    denominator = 2 * rise * sign  # columns are x / 2
    leftmost, rightmost = -(-numerator // denominator), numerator // denominator
    # Each row's span: from the leftmost to the rightmost crossing of the edges that reach it.
    cell_row = cell[edge] * (1 << 32) + row_of
    by_row = np.argsort(cell_row, kind="stable")
    row_start = np.flatnonzero(np.r_[True, cell_row[by_row][1:] != cell_row[by_row][:-1]])
    widths = np.maximum.reduceat(rightmost[by_row], row_start) - np.minimum.reduceat(leftmost[by_row], row_start) + 1
    return np.bincount(cell[edge][by_row][row_start], widths, size)
