"""From a model's maps to cells: threshold the probability, split touching cells apart, drop
small ones. Free functions of the maps and the `PredictConfig`, shared by `cellseg predict`, the
flows, training's validation and the benchmarks.

Splitting follows the classic recipe: the distance to the background inside the cell mask has
one peak per roughly convex cell; peaks at least `split_depth` pixels higher than the saddle
to their neighbour (h-maxima) seed a watershed of the inverted distance, restricted to the mask.
Models with a distance-map output are split the same way on the map they predict, which dips
between touching cells even where the mask has no neck.

Per-pixel steps run once over the whole image: the exact distance transform (compiled,
`cellseg.distance`), then smoothing, local maxima and connected components with OpenCV; only
objects with two or more candidate peaks are looked at one by one, in their boxes: their
h-maxima and the watershed that grows them into cells are compiled (`cellseg.watershed`;
skimage's markers and flood, equally high seeds taken in raster order). This replaced a
scipy/skimage recipe run object by object, 4-5x slower; docs/performance.md ("Post-processing
stages") gives the figures and what changed: the h-maxima and the flood are the same, the mask's
distance is now smoothed over the image instead of inside each object's box, which moves about 1
cell pixel in 10,000 (tests/test_postprocess.py compares both recipes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from cellseg.config import DEFAULT_CENTRE_PROMINENCE, PredictConfig
from cellseg.distance import inside_distance
from cellseg.stats import label_cells
from cellseg.watershed import split_objects


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
    An undecided `split_touching`, `threshold` or `centre_prominence` (None, resolved by `Predictor`
    from its checkpoint) splits, at 0.5, with centres `DEFAULT_CENTRE_PROMINENCE` high."""
    mask = threshold_probabilities(maps.probability, 0.5 if config.threshold is None else config.threshold)
    split = config.split_touching is not False
    if maps.distance is not None and split:
        prominence = DEFAULT_CENTRE_PROMINENCE if config.centre_prominence is None else config.centre_prominence
        return split_at_distance_peaks(mask, maps.distance, config.min_cell_area, prominence)
    split_depth = config.split_depth if split else 0.0
    return split_touching_cells(mask, config.min_cell_area, split_depth)


def unused_split_settings(given: PredictConfig, model_splits: bool, distance_map: bool) -> list[str]:
    """The settings of how touching cells are split that `given` sets and that would change nothing
    for a model that splits them or not (`model_splits`, decided at its training) and does or does
    not predict a distance map: each said with why, so that a value silently ignored is not taken
    for one that made no difference."""
    depth_set = given.split_depth != PredictConfig.model_fields["split_depth"].default
    prominence_set = given.centre_prominence is not None
    if not (model_splits if given.split_touching is None else given.split_touching):
        why = ("split_touching is off (--no-split)" if given.split_touching is False else
               "this model keeps touching cells whole, as decided at its training (--split splits them)")
        return [f"{name} {value} is not used: {why}" for name, value, is_set in (
            ("split_depth", given.split_depth, depth_set), ("centre_prominence", given.centre_prominence, prominence_set),
        ) if is_set]
    if distance_map and depth_set:
        return [f"split_depth {given.split_depth} is not used: this model splits touching cells at the peaks of its "
                "distance map, as high as centre_prominence says (--centre-prominence)"]
    if not distance_map and prominence_set:
        return [f"centre_prominence {given.centre_prominence} is not used: this model has no distance map and splits "
                "touching cells where the mask narrows, as deep as split_depth says (--split-depth)"]
    return []


def split_touching_cells(mask: np.ndarray, min_cell_area: int = 0, split_depth: float = 0.5) -> np.ndarray:
    """Instance labels (int32, 0 = background, 1..N) for a boolean cell mask.

    Objects (connected components) smaller than `min_cell_area` pixels are dropped; touching
    cells are then separated where the mask narrows between them (a neck at least `split_depth`
    pixels shallower than both cells' centres). `split_depth=0` gives the connected components.
    """
    components, areas = label_cells(mask, min_cell_area)
    if split_depth <= 0 or not len(areas):
        return components
    inside = components > 0
    depth = _smoothed_depth(inside)
    # Cheap test first: an object with one local maximum of the depth is one cell. Only peaks at
    # least `split_depth` deep can be h-maxima; the 5x5 window ignores ripples along ridges.
    candidates = _several_per_object(components, _tops(depth, 5) & (depth >= split_depth) & inside)
    candidates[1:] &= areas >= 2 * np.pi * split_depth**2  # two discs deep enough to count as cells
    # The blur spread some depth outside the objects; split_objects reads none of it (each object
    # is worked on as its own pixels' heights, 0 around them).
    return split_objects(components, depth, split_depth, candidates)


def split_at_distance_peaks(
    mask: np.ndarray, distance: np.ndarray, min_cell_area: int = 0, prominence: float = DEFAULT_CENTRE_PROMINENCE
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
    components, areas = label_cells(mask, min_cell_area)
    if not len(areas):
        return components
    inside = components > 0
    height = cv2.GaussianBlur(np.ascontiguousarray(distance, dtype=np.float32), (9, 9), 1.0, borderType=cv2.BORDER_REFLECT)
    height[~inside] = 0
    if height.min() < 0:  # a map below zero: every object is examined
        candidates = np.ones(len(areas) + 1, dtype=bool)
    else:
        # An object can hold two h-maxima only with two tops (plateaus no lower than their
        # neighbours) higher than `prominence`: with the map at 0 around the object, a lower top's
        # marker would be the whole object (see `dome_markers`).
        # (`height > float32(prominence)` is `height - prominence > 0` in float32, without the copy.)
        candidates = _several_per_object(components, _tops(height, 3) & (height > np.float32(prominence)))
    return split_objects(components, height, prominence, candidates)


def _smoothed_depth(inside: np.ndarray) -> np.ndarray:
    """Each pixel's Euclidean distance to the nearest background pixel of the boolean (H, W)
    `inside` (exact, `cellseg.distance`; beyond the image edge is not background), smoothed by a
    Gaussian of sigma 1 mirrored at the image edges, so that one-pixel ripples of an outline seed
    no extra cells: float32 (H, W)."""
    distance = inside_distance(inside)
    return cv2.GaussianBlur(distance, (9, 9), 1.0, dst=distance, borderType=cv2.BORDER_REFLECT)


def _tops(values: np.ndarray, size: int) -> np.ndarray:
    """Boolean (H, W): the pixels of `values` no lower than any other in their size x size
    neighbourhood within the image; computed in bands of rows, so that no second (H, W) float
    array is held for a large image."""
    reach, height = size // 2, values.shape[0]
    tops = np.empty(values.shape, dtype=bool)
    band = max(1, BAND_PIXELS // max(values.shape[1], 1))
    for top in range(0, height, band):
        bottom = min(top + band, height)
        first, last = max(top - reach, 0), min(bottom + reach, height)
        highest = cv2.dilate(values[first:last], np.ones((size, size), dtype=np.uint8))
        tops[top:bottom] = values[top:bottom] == highest[top - first : bottom - first]
    return tops


def _several_per_object(components: np.ndarray, marks: np.ndarray) -> np.ndarray:
    """Boolean per label 0..N of `components`: True where the object holds two or more 8-connected
    groups of `marks` (which lie inside objects)."""
    count, groups = cv2.connectedComponents(marks.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    where = np.flatnonzero(marks)
    owner = np.zeros(count, dtype=np.intp)
    owner[groups.ravel()[where]] = components.ravel()[where]
    several = np.bincount(owner[1:], minlength=int(components.max(initial=0)) + 1) >= 2
    several[0] = False
    return several


BAND_PIXELS = 1 << 22  # rows of a maximum filter worked on at once
