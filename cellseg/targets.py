"""Training targets that keep touching cells apart (U-Net paper, Ronneberger et al. 2015).

Three ingredients, each computed once per training image:

- `separated_target`: from instance labels, the cell mask with a one-pixel gap wherever two
  cells touch, so that the network learns to draw the line between them and its thresholded
  mask falls apart into one component per cell.
- `border_weight_map`: per-pixel loss weights 1 + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on
  background pixels, d1 and d2 being the distances to the nearest and second-nearest cell, so
  that the narrow background between neighbouring cells counts up to 1 + w0 times as much.
- `normalised_distance`: each cell's distance to its own outline divided by its largest, 1 at
  the cell's centre and falling towards its edge, for models with a distance-map output
  (`ModelConfig.distance_map`): where two cells touch, the map dips between their centres even
  when no background separates them, so its peaks seed one cell each.

Only background pixels are weighted: weighting the cell pixels facing a gap as well lost the
cell-level gain of the border weight (docs/quality.md has the figures).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from cellseg.stats import label_cells

_NEIGHBOURHOOD = np.ones((3, 3), dtype=bool)


def separated_target(labels: np.ndarray) -> np.ndarray:
    """Boolean cell mask of instance `labels` (0 = background) with touching cells cut apart.

    A pixel of cell k is cleared when one of its 8 neighbours belongs to a cell with a smaller
    label: the result is one pixel thinner only where cells touch, and no two cells are left
    8-connected. Cells that do not touch keep every pixel.
    """
    labels = np.asarray(labels)
    cells = labels > 0
    if not cells.any():
        return cells
    unused = labels.max() + 1
    smallest_neighbour = ndimage.minimum_filter(np.where(cells, labels, unused), footprint=_NEIGHBOURHOOD, mode="nearest")
    return cells & ~(smallest_neighbour < labels)


def border_weight_map(mask: np.ndarray, border_weight: float, sigma: float = 5.0) -> np.ndarray:
    """float32 loss weights for a boolean cell `mask` whose cells are separate components.

    1 everywhere, plus `border_weight` * exp(-(d1 + d2)^2 / (2 sigma^2)) on background pixels,
    where d1 and d2 are the Euclidean distances to the nearest and the second-nearest cell.
    Contributions are computed in a window of 4 sigma around each cell (beyond it the term is
    below 3e-4 of `border_weight`), so the cost grows with the cells, not with their number
    squared.
    """
    weights = np.ones(mask.shape, dtype=np.float32)
    cells, _ = label_cells(mask)
    if border_weight <= 0 or cells.max() < 2:
        return weights
    reach = math.ceil(4 * sigma)
    nearest = np.full(mask.shape, np.inf, dtype=np.float32)
    second = np.full(mask.shape, np.inf, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(cells), start=1):
        if box is None:
            continue
        window = tuple(slice(max(side.start - reach, 0), side.stop + reach) for side in box)
        distance = ndimage.distance_transform_edt(cells[window] != index).astype(np.float32)
        near, far = nearest[window], second[window]
        closer = distance < near
        far[:] = np.where(closer, near, np.minimum(far, distance))
        near[:] = np.where(closer, distance, near)
    background = ~mask & np.isfinite(second)
    gap = nearest[background] + second[background]
    weights[background] += border_weight * np.exp(-(gap**2) / (2 * sigma**2))
    return weights


def normalised_distance(labels: np.ndarray) -> np.ndarray:
    """float32 map of instance `labels`: in each cell, the Euclidean distance to the nearest pixel
    outside that cell (another cell or background) divided by the cell's largest such distance,
    so 1 at the centre; 0 on background. Computed per cell in its bounding box."""
    labels = np.asarray(labels)
    distance = np.zeros(labels.shape, dtype=np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        cell = labels[box] == index
        inside = ndimage.distance_transform_edt(np.pad(cell, 1))[1:-1, 1:-1]
        view = distance[box]
        view[cell] = (inside / inside.max())[cell]
    return distance
