"""From a model's maps to cells: threshold the probability, split touching cells apart, drop
small ones. Free functions of the maps and the `PredictConfig`, shared by `cellseg predict`, the
flows, training's validation and the benchmarks.

Splitting follows the classic recipe: the distance to the background inside the cell mask has
one peak per roughly convex cell; peaks at least `split_depth` pixels higher than the saddle
to their neighbour (h-maxima) seed a watershed of the inverted distance, restricted to the mask.
Models with a distance-map output are split the same way on the map they predict, which dips
between touching cells even where the mask has no neck.

Per-pixel steps run once over the whole image with OpenCV (exact distance transform, smoothing,
local maxima, connected components); only objects with two or more candidate peaks are looked
at one by one, for their h-maxima, and all objects to split share one skimage watershed. This
replaced a scipy/skimage recipe run object by object, 3-4x slower; docs/performance.md
("Post-processing stages") gives the figures and what changed: the h-maxima are the same, the
mask's distance is now smoothed over the image instead of inside each object's box, which moves
about 1 cell pixel in 10,000 (tests/test_postprocess.py compares both recipes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage
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
    depth[~inside] = 0
    return _split_objects(components, depth, split_depth, candidates)


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
        # marker would be the whole object (see _dome_markers).
        # (`height > float32(prominence)` is `height - prominence > 0` in float32, without the copy.)
        candidates = _several_per_object(components, _tops(height, 3) & (height > np.float32(prominence)))
    return _split_objects(components, height, prominence, candidates)


def _smoothed_depth(inside: np.ndarray) -> np.ndarray:
    """Each pixel's Euclidean distance to the nearest background pixel of the boolean (H, W)
    `inside` (OpenCV's exact transform; beyond the image edge is not background), smoothed by a
    Gaussian of sigma 1 mirrored at the image edges, so that one-pixel ripples of an outline seed
    no extra cells: float32 (H, W)."""
    distance = cv2.distanceTransform(inside.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
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


def _split_objects(components: np.ndarray, height: np.ndarray, h: float, candidates: np.ndarray) -> np.ndarray:
    """Relabel `components` (1..N) with each candidate object that holds two or more domes of
    `height` (h-maxima, see `_dome_markers`) divided among them by a watershed of `-height` in
    the object; other objects stay whole. An object keeps its label for its first piece (in raster
    order of the markers); further pieces get new labels after N, object by object."""
    # Small objects are dropped before splitting, never after: the cell mask is the same with or
    # without splitting, and a split only assigns the pixels of one object to several cells.
    labels = components.copy()
    boxes = ndimage.find_objects(components)
    next_label = len(boxes) + 1
    batch: list[tuple[int, tuple[slice, slice], np.ndarray, int]] = []  # objects to flood together
    edges = np.zeros(4, dtype=np.intp)  # top, left, bottom, right of the window holding their boxes
    for index in np.flatnonzero(candidates[: len(boxes) + 1]):
        box = boxes[index - 1]
        if box is None:
            continue
        padded = (slice(max(box[0].start - 1, 0), min(box[0].stop + 1, components.shape[0])),
                  slice(max(box[1].start - 1, 0), min(box[1].stop + 1, components.shape[1])))
        cell = components[padded] == index
        markers, count = _dome_markers(np.where(cell, height[padded], height.dtype.type(0)), h, cell)
        if count < 2:
            continue
        box_edges = np.array([padded[0].start, padded[1].start, padded[0].stop, padded[1].stop])
        grown = np.r_[np.minimum(edges[:2], box_edges[:2]), np.maximum(edges[2:], box_edges[2:])]
        if not batch:
            edges = box_edges
        elif (grown[2] - grown[0]) * (grown[3] - grown[1]) <= BAND_PIXELS:
            edges = grown
        else:
            next_label = _flood(labels, components, height, batch, edges, next_label, len(boxes))
            batch, edges = [], box_edges
        batch.append((int(index), padded, markers, count))
    if batch:
        _flood(labels, components, height, batch, edges, next_label, len(boxes))
    return labels


BAND_PIXELS = 1 << 22  # pixels worked on at once: objects flooded together, rows of a maximum filter


def _flood(labels: np.ndarray, components: np.ndarray, height: np.ndarray,
           batch: list[tuple[int, tuple[slice, slice], np.ndarray, int]], edges: np.ndarray, next_label: int,
           objects: int) -> int:
    """One watershed of `-height` for all objects of `batch` (label, box, markers 1..K, K) in the
    window holding their boxes (`edges`: top, left, bottom, right), written into `labels`
    (`objects`: how many labels `components` has); the first piece of each object keeps its label,
    the others get labels from `next_label` on, which is returned advanced past them."""
    # One call for many objects instead of one each: skimage's watershed costs more to set up
    # than to flood a cell. The objects do not touch, so each is flooded only from its own markers.
    top, left, bottom, right = (int(edge) for edge in edges)
    window = (slice(top, bottom), slice(left, right))
    seeds = np.zeros((bottom - top, right - left), dtype=np.int32)
    member = np.zeros(objects + 1, dtype=bool)
    piece_label = [0]
    for index, (rows, cols), markers, count in batch:
        place = (slice(rows.start - top, rows.stop - top), slice(cols.start - left, cols.stop - left))
        seeds[place] = np.where(markers > 0, markers + (len(piece_label) - 1), seeds[place])
        piece_label += [index, *range(next_label, next_label + count - 1)]
        next_label += count - 1
        member[index] = True
    inside = member[components[window]]
    flooded = watershed(-height[window], seeds, mask=inside, connectivity=2)
    labels[window][inside] = np.asarray(piece_label, dtype=np.int32)[flooded[inside]]
    return next_label


def _dome_markers(height: np.ndarray, h: float, inside: np.ndarray) -> tuple[np.ndarray, int]:
    """One labelled marker per dome of `height` that rises at least `h` above every saddle to a
    higher dome (the h-maxima), within `inside`.

    The markers are the regional maxima (plateaus) of the h-maxima transform, the reconstruction
    of `height - h` under `height`. skimage's `h_maxima` marks the top of every such dome, so two
    equally high peaks joined by a saddle shallower than `h` (two halves of one symmetric cell)
    come out as two seeds; the plateau of the reconstruction keeps them one.

    Found without the reconstruction: each plateau of the reconstruction is the connected part of
    {height >= top - h} around some top of `height` (a plateau no lower than its neighbours)
    holding nothing higher than that top, and is a maximum unless it is the whole array (as in
    skimage's `local_maxima`). One flood per top replaces skimage's sort of every pixel; the
    markers are identical (`local_maxima(reconstruction(height - h, height)) & inside`, labelled).
    """
    tops = (height == cv2.dilate(height, _SQUARE3)).view(np.uint8)
    count, plateaus = cv2.connectedComponentsWithAlgorithm(tops, 8, cv2.CV_32S, cv2.CCL_SAUF)
    domes = np.zeros(height.shape, dtype=bool)
    if count > 1:
        # SAUF numbers plateaus in raster order: each one's first pixel is where the running
        # maximum of the labels steps up.
        first = np.flatnonzero(np.diff(np.maximum.accumulate(plateaus.ravel()), prepend=0))
        values = height.ravel()[first]
        lowest = height.min()
        highest_first = np.argsort(-values, kind="stable")
        for pixel, value in zip(first[highest_first], values[highest_first], strict=True):
            level = value - h  # in height's dtype, rounded as `height - h` is
            if domes.flat[pixel] or level <= lowest:  # inside a dome already found; or the whole array
                continue
            parts = cv2.connectedComponents((height >= level).view(np.uint8), connectivity=8, ltype=cv2.CV_32S)[1]
            part = parts == parts.flat[pixel]
            if height.max(where=part, initial=-np.inf) == value:
                domes |= part
    count, labels = cv2.connectedComponentsWithAlgorithm((domes & inside).view(np.uint8), 8, cv2.CV_32S, cv2.CCL_SAUF)
    return labels, count - 1


_SQUARE3 = np.ones((3, 3), dtype=np.uint8)
