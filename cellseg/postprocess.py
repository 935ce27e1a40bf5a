"""From a model's maps to cells: threshold the probability, split touching cells apart, drop
small ones. Free functions of the maps and the `PredictConfig`, shared by `cellseg predict`, the
flows, training's validation and the benchmarks.

Splitting follows the classic recipe: the distance to the background inside the cell mask has
one peak per roughly convex cell; peaks at least `split_depth` pixels higher than the saddle
to their neighbour (h-maxima) seed a watershed of the inverted distance, restricted to the mask.
Models with a distance-map output are split the same way on the map they predict, which dips
between touching cells even where the mask has no neck.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import watershed

from cellseg.config import PredictConfig
from cellseg.stats import label_cells


@dataclass(frozen=True)
class CellMaps:
    """What a model says about one image, on the image's own grid: the cell probability (H, W)
    and, from a model with a distance-map output, each cell's normalised distance (H, W). From a
    model at a cell size, `scale` says how the image was seen: its cells' median diameter in
    pixels (`cell_diameter`, None when none were found), whether that was `measured` by a first
    pass or stated, and the `factor` the image was resampled by. `warnings` say what the caller
    should know about the maps (an image without contrast gets empty maps and says so)."""

    probability: np.ndarray
    distance: np.ndarray | None = None
    scale: dict[str, Any] | None = None
    warnings: tuple[str, ...] = ()


def maps_from_output(output: np.ndarray, distance_map: bool) -> CellMaps:
    """`CellMaps` of one (C, H, W) model output: channel 0, and the last for a distance-map model."""
    return CellMaps(output[0], output[-1] if distance_map else None)


def threshold_probabilities(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Boolean cell mask: probability strictly above `threshold`."""
    return probabilities > threshold


def cell_labels(maps: CellMaps, config: PredictConfig) -> np.ndarray:
    """One label per cell (int32, 0 = background), as `cellseg predict` stores them: the probability
    thresholded, touching cells split apart unless `split_touching` is off (at the peaks of the
    distance map when there is one, else at necks of the mask), cells below `min_cell_area` dropped.
    An undecided `split_touching` or `threshold` (None, resolved by `Predictor` from its
    checkpoint) splits, at 0.5."""
    mask = threshold_probabilities(maps.probability, 0.5 if config.threshold is None else config.threshold)
    split = config.split_touching is not False
    if maps.distance is not None and split:
        return split_at_distance_peaks(mask, maps.distance, config.min_cell_area, config.centre_prominence)
    split_depth = config.split_depth if split else 0.0
    return split_touching_cells(mask, config.min_cell_area, split_depth)


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
