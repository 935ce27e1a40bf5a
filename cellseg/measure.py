"""Per-cell measurements, the CellProfiler-style table: shape, position and intensity of each cell.

Computed with `skimage.measure.regionprops_table` on the cell labels and the raw image
(intensities in the image's own units). Lengths and areas are in pixels; coordinates are
(row, column) = (y, x) with the origin at the top-left pixel; bounding boxes are half-open.
"""

from __future__ import annotations

import numpy as np
from skimage.measure import regionprops_table

_PROPERTIES = (
    "label", "area", "perimeter", "centroid", "bbox", "eccentricity", "solidity", "axis_major_length",
    "axis_minor_length", "equivalent_diameter_area", "intensity_mean", "intensity_min", "intensity_max",
)
_RENAMED = {
    "centroid-0": "centroid_y", "centroid-1": "centroid_x",
    "bbox-0": "bbox_min_y", "bbox-1": "bbox_min_x", "bbox-2": "bbox_max_y", "bbox-3": "bbox_max_x",
    "axis_major_length": "major_axis_length", "axis_minor_length": "minor_axis_length",
    "equivalent_diameter_area": "equivalent_diameter",
}
CELL_COLUMNS = (
    "label", "area", "perimeter", "centroid_y", "centroid_x", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x",
    "eccentricity", "solidity", "major_axis_length", "minor_axis_length", "equivalent_diameter",
    "intensity_mean", "intensity_min", "intensity_max", "intensity_integrated",
)
INTEGER_COLUMNS = frozenset({"label", "area", "bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x"})


def cell_measurements(cells: np.ndarray, image: np.ndarray) -> np.ndarray:
    """(N, len(CELL_COLUMNS)) float64 table, one row per cell of `cells` (int labels, 0 = background)
    in label order, measured on the raw `image` of the same shape."""
    if cells.shape != image.shape:
        raise ValueError(f"cell labels are {cells.shape}, the image {image.shape}")
    if not cells.any():
        return np.zeros((0, len(CELL_COLUMNS)))
    measured = regionprops_table(cells, intensity_image=image.astype(np.float64, copy=False), properties=_PROPERTIES)
    columns = {_RENAMED.get(name, name): np.asarray(values, dtype=np.float64) for name, values in measured.items()}
    columns["intensity_integrated"] = columns["intensity_mean"] * columns["area"]
    return np.stack([columns[name] for name in CELL_COLUMNS], axis=1)
