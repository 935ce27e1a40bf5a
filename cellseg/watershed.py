"""Touching cells split apart, compiled with numba: `split_objects` takes each object that may
hold several cells, finds its markers (`dome_markers`, one per h-maximum) and grows them over it
with a seeded watershed (`flood_from_markers`), all in one compiled loop over the objects.

`flood_from_markers` is `skimage.segmentation.watershed(-height, markers, mask=inside,
connectivity=2)` (scikit-image 0.26): the same priority flood, pixels leaving the queue lowest
`-height` first (never below the level they were reached from), ties in the order they entered
it, each labelled when first reached. One tie is broken differently: seed pixels of exactly one
height leave in raster order, where skimage's binary heap leaves them in an order of its own
making. That decides a pixel only where two seeds of one height both border it first; on 120
of `make bench`'s images and the 45 dsb2018 images the labels are the same to the pixel, and
tests/test_watershed.py checks every other case against skimage. With that, no two items of the
queue tie, so any queue that pops the lowest level first, and of one level the earliest entry,
pops them in the same order. Here that is a list per level: the box's levels are sorted once
(a radix sort of their float32 bits in an order-preserving form), and a pixel enters the list of
its level's rank, in constant time where skimage's binary heap of a float64 and a counter takes
a logarithmic one; and no Python wrapper pads and copies the whole box three times, which cost
skimage as much as the flood on small boxes.

numba compiles each step on its first call in a process (about three seconds) and caches the
machine code beside this file, or in `NUMBA_CACHE_DIR` where that is not writable, so that later
processes load it in milliseconds.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_MAX_PIXELS = 1 << 31  # pixel counts and the flood's level ranks stay int32-safe


def split_objects(components: np.ndarray, height: np.ndarray, h: float, candidates: np.ndarray) -> np.ndarray:
    """Relabel `components` (int32, 1..N) with each `candidates` object (a boolean per label
    0..N) that holds two or more domes of `height` (float32, h-maxima of `h`, see `dome_markers`)
    divided among them by a watershed of `-height` in the object; other objects stay whole. An
    object keeps its label for its first piece (in raster order of the markers); further pieces
    get new labels after N, object by object. Each object is worked on in its bounding box with a
    pixel's margin."""
    _check_box(height, components)
    labels = np.ascontiguousarray(components, dtype=np.int32).copy()
    size = int(labels.max(initial=0)) + 1
    corners = np.empty((4, size), dtype=np.int64)
    corners[:2], corners[2:] = np.iinfo(np.int64).max, -1
    _bounding_boxes(labels, corners)
    examined = np.zeros(size, dtype=bool)
    examined[: min(len(candidates), size)] = candidates[:size]
    examined[0] = False
    wanted = np.flatnonzero(examined & (corners[2] >= 0))
    _split_all(np.ascontiguousarray(height, dtype=np.float32), np.float32(h), wanted, corners, labels, size)
    return labels


def dome_markers(height: np.ndarray, h: float, inside: np.ndarray) -> tuple[np.ndarray, int]:
    """One labelled marker per dome of `height` (float32 or float64) that rises at least `h` above every
    saddle to a higher dome (the h-maxima), within the boolean `inside`: labels (int32, 1..count
    in raster order of their first pixel, 0 elsewhere) and count.

    The markers are the regional maxima (plateaus) of the h-maxima transform, the reconstruction
    of `height - h` under `height`. skimage's `h_maxima` marks the top of every such dome, so two
    equally high peaks joined by a saddle shallower than `h` (two halves of one symmetric cell)
    come out as two seeds; the plateau of the reconstruction keeps them one.

    Found without the reconstruction: each plateau of the reconstruction is the connected part of
    {height >= top - h} around some top of `height` (a plateau no lower than its neighbours)
    holding nothing higher than that top, and is a maximum unless it is the whole box (as in
    skimage's `local_maxima`). One flood per top, highest first, replaces skimage's sort of every
    pixel; the markers are identical (`local_maxima(reconstruction(height - h, height)) & inside`,
    labelled 8-connected; tests/test_watershed.py), `height - h` taken in height's dtype as numpy
    takes it.
    """
    _check_box(height, inside)
    if height.dtype not in (np.float32, np.float64):
        raise ValueError(f"height must be float32 or float64, not {height.dtype}")
    lowest = height.min() if height.size else height.dtype.type(0)
    # A ring around the box that `_domes` needs and never reaches: no top, never as high as a level.
    ringed = np.pad(height, 1, constant_values=-np.inf)
    labels = np.zeros(ringed.shape, dtype=np.int32)
    count = _domes(ringed, height.dtype.type(h), np.pad(np.asarray(inside, dtype=bool), 1), labels, lowest)
    return labels[1:-1, 1:-1], int(count)


def _check_box(height: np.ndarray, *others: np.ndarray) -> None:
    if height.ndim != 2 or any(other.shape != height.shape for other in others):
        raise ValueError(f"expected 2-D arrays of one shape, got {[height.shape, *(other.shape for other in others)]}")
    if height.size >= _MAX_PIXELS:
        raise ValueError(f"a box of {height.size} pixels is too large to split at once (limit {_MAX_PIXELS})")


def flood_from_markers(height: np.ndarray, markers: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """Labels (int32, the shape of `height`) from a watershed of `-height` seeded by the positive
    `markers` within the boolean `inside`, 8-connected: every pixel of `inside` that a marker's
    flood reaches takes that marker's label, other pixels 0. `height` is float32 (or exactly
    representable in it) and finite. Of two equally high seed pixels, the first in raster order
    floods first."""
    _check_box(height, markers, inside)
    # -1 outside the mask, 0 inside it until flooded, the marker's label where there is one; a
    # ring of -1 around the box, which `_flood` needs.
    work = np.pad(np.where(inside, markers, -1).astype(np.int32), 1, constant_values=-1)
    _flood(np.pad(np.asarray(height, dtype=np.float32), 1), work)
    return np.maximum(work[1:-1, 1:-1], 0)


# Neighbours of a pixel, nearest first (skimage's order for the flood's ties).
_ROW_STEPS = (-1, 0, 0, 1, -1, -1, 1, 1)
_COLUMN_STEPS = (0, -1, 1, 0, -1, 1, -1, 1)


@njit(cache=True, nogil=True)
def _bounding_boxes(labels, corners):  # pragma: no cover - compiled; tested through split_objects
    """Each label's first and last row and column, into corners (4, labels)."""
    rows, columns = labels.shape
    for row in range(rows):
        for column in range(columns):
            label = labels[row, column]
            if label > 0:
                corners[0, label] = min(corners[0, label], row)
                corners[1, label] = min(corners[1, label], column)
                corners[2, label] = row
                corners[3, label] = max(corners[3, label], column)


@njit(cache=True, nogil=True)
def _split_all(height, h, wanted, corners, labels, next_label):  # pragma: no cover - compiled
    # An object's pixels keep its label until it is split, and new labels are above all old ones.
    rows, columns = labels.shape
    for index in wanted:
        top, left = max(corners[0, index] - 1, 0), max(corners[1, index] - 1, 0)
        bottom, right = min(corners[2, index] + 2, rows), min(corners[3, index] + 2, columns)
        # The object's heights in its box (0 around it), inside a ring of -inf that `_domes` and
        # `_flood` need: one pass for both arrays, the box is read once.
        cell = np.zeros((bottom - top + 2, right - left + 2), dtype=np.bool_)
        object_height = np.full(cell.shape, -np.inf, dtype=np.float32)
        lowest = np.float32(np.inf)
        for row in range(bottom - top):
            for column in range(right - left):
                inside = labels[top + row, left + column] == index
                cell[row + 1, column + 1] = inside
                value = height[top + row, left + column] if inside else np.float32(0)
                object_height[row + 1, column + 1] = value
                lowest = min(lowest, value)
        markers = np.zeros(cell.shape, dtype=np.int32)
        count = _domes(object_height, h, cell, markers, lowest)
        if count < 2:
            continue
        work = markers  # the flood's work array: -1 outside the object (the ring too), the markers inside it
        flat_work, flat_cell = work.ravel(), cell.ravel()
        for place in range(flat_work.size):
            if not flat_cell[place]:
                flat_work[place] = -1
        _flood(object_height, work)
        for row in range(bottom - top):
            for column in range(right - left):
                if cell[row + 1, column + 1]:
                    piece = work[row + 1, column + 1]
                    labels[top + row, left + column] = index if piece == 1 else next_label + piece - 2
        next_label += count - 1
    return next_label


@njit(cache=True, nogil=True)
def _domes(height, h, inside, labels, lowest):  # pragma: no cover - compiled; tested through dome_markers
    # `height` is -inf and `inside` False on the box's outermost rows and columns (a ring around
    # the pixels looked at, whose lowest height is `lowest`): the ring holds no top and no pixel
    # as high as a dome's level, so no search leaves the box, and a neighbour is the pixel's index
    # plus a fixed step, with no bounds to check.
    rows, columns = height.shape
    size = rows * columns
    flat, within = height.ravel(), inside.ravel()
    queue = np.empty(max(size, 1), dtype=np.int64)
    steps = _steps(columns)
    # The first pixel (in raster order) of each plateau no lower than its neighbours that could
    # top a dome. Adjacent tops are equally high, so a plateau is wholly above the lowest level
    # a dome may reach or wholly below it: the pixels below (the background around a cell, its
    # rim) are never tops, never filled, and never searched from.
    tops = np.zeros(size, dtype=np.bool_)
    for row in range(rows):
        for column in range(columns):
            if height[row, column] - h > lowest:
                tops[row * columns + column] = _is_top(flat, row * columns + column, steps)
    seen = np.zeros(size, dtype=np.int32)
    firsts = np.empty(max(size, 1), dtype=np.int64)
    plateaus = 0
    for start in range(size):
        if tops[start] and not seen[start]:
            firsts[plateaus] = start
            plateaus += 1
            _fill(tops, seen, start, 1, queue, steps)
    firsts = firsts[:plateaus]
    values = flat[firsts]
    domes = np.zeros(size, dtype=np.bool_)
    stamp = np.zeros(size, dtype=np.int32)
    for rank, which in enumerate(np.argsort(-values, kind="mergesort")):
        start, value = firsts[which], values[which]
        level = value - h
        if domes[start]:  # inside a dome already found
            continue
        # The connected part of {height >= level} around the top: a dome unless it holds a higher pixel.
        stamp[start] = rank + 1
        queue[0], head, tail, dome = start, 0, 1, True
        while head < tail and dome:
            place = queue[head]
            head += 1
            for step in range(8):
                neighbour = place + steps[step]
                if stamp[neighbour] != rank + 1 and flat[neighbour] >= level:
                    # A higher pixel, or one of a dome found from a higher top (an equally high
                    # top's dome would hold this top already), makes this part no dome.
                    if flat[neighbour] > value or domes[neighbour]:
                        dome = False
                        break
                    stamp[neighbour] = rank + 1
                    queue[tail] = neighbour
                    tail += 1
        if dome:
            domes[queue[:tail]] = True
    # The domes within the mask, labelled 8-connected in raster order of their first pixel.
    marks, markers = labels.ravel(), domes & within
    count = 0
    for start in range(size):
        if markers[start] and not marks[start]:
            count += 1
            _fill(markers, marks, start, count, queue, steps)
    return count


@njit(cache=True, nogil=True)
def _fill(allowed, marks, start, value, queue, steps):  # pragma: no cover - compiled
    """Set `marks` to `value` over the 8-connected part of `allowed` around `start` not marked yet
    (flat arrays of a box whose outermost pixels are not `allowed`; `steps` from `_steps`;
    `queue` holds a pixel index per pixel of the box)."""
    marks[start] = value
    queue[0], head, tail = start, 0, 1
    while head < tail:
        place = queue[head]
        head += 1
        for step in range(8):
            neighbour = place + steps[step]
            if allowed[neighbour] and not marks[neighbour]:
                marks[neighbour] = value
                queue[tail] = neighbour
                tail += 1


@njit(cache=True, nogil=True, inline="always")
def _is_top(flat_height, place, steps):  # pragma: no cover - compiled
    """Whether no 8-neighbour of a pixel off the box's outermost rows and columns is higher."""
    for step in range(8):  # noqa: SIM110 - a loop numba compiles, where all() would take a generator
        if flat_height[place + steps[step]] > flat_height[place]:
            return False
    return True


@njit(cache=True, nogil=True)
def _steps(columns):  # pragma: no cover - compiled
    """The flat index steps to a pixel's 8 neighbours in a box `columns` wide, nearest first."""
    steps = np.empty(8, dtype=np.int64)
    for step in range(8):
        steps[step] = _ROW_STEPS[step] * columns + _COLUMN_STEPS[step]
    return steps


@njit(cache=True, nogil=True)
def _flood(height, work):  # pragma: no cover - compiled; tested through flood_from_markers
    # `work` is -1 on the box's outermost rows and columns, so every neighbour of a pixel the
    # flood reaches lies in the box: a neighbour is the pixel's index plus a fixed step, with no
    # bounds to check and no division to find the pixel's row and column.
    flat_height, flat_work = height.ravel(), work.ravel()
    size = flat_work.size
    steps = _steps(height.shape[1])
    # Every pixel that can enter the queue gets the rank of its level (-height) among the box's
    # distinct levels; the queue is a list per rank, and the rank of the list popped from never
    # falls, because a pixel enters at its own level or the one it was reached from, if higher.
    places = np.empty(size, dtype=np.int64)
    keys = np.empty(size, dtype=np.uint32)
    count = 0
    for place in range(size):
        if flat_work[place] >= 0:
            places[count] = place
            keys[count] = _level_key(flat_height[place])
            count += 1
    order = _radix_order(keys[:count])
    rank = np.empty(size, dtype=np.int32)
    ranks = 0
    for position in range(count):
        item = order[position]
        if position > 0 and keys[item] != keys[order[position - 1]]:
            ranks += 1
        rank[places[item]] = ranks
    ranks += 1
    first = np.full(ranks, -1, dtype=np.int64)
    last = np.full(ranks, -1, dtype=np.int64)
    following = places  # no longer needed as such: now each queued pixel's successor in its list
    for place in range(size):
        if flat_work[place] > 0:  # the seeds, in raster order, each at the end of its level's list
            entered = rank[place]
            following[place] = -1
            if last[entered] < 0:
                first[entered] = place
            else:
                following[last[entered]] = place
            last[entered] = place
    level = 0
    while level < ranks:
        place = first[level]
        if place < 0:
            level += 1
            continue
        first[level] = following[place]
        if first[level] < 0:
            last[level] = -1
        label = flat_work[place]
        for step in range(8):
            neighbour = place + steps[step]
            if flat_work[neighbour] != 0:
                continue
            flat_work[neighbour] = label
            # At the end of its level's list (written out: as a compiled helper this loop ran 1.7x slower).
            entered = max(rank[neighbour], level)
            following[neighbour] = -1
            if last[entered] < 0:
                first[entered] = neighbour
            else:
                following[last[entered]] = neighbour
            last[entered] = neighbour


@njit(cache=True, nogil=True, inline="always")
def _level_key(height):  # pragma: no cover - compiled
    """-height as a uint32 that orders as the float does (+0.0 and -0.0 alike)."""
    bits = np.float32(np.float32(-height) + np.float32(0.0)).view(np.uint32)
    return bits ^ np.uint32(0xFFFFFFFF) if bits >> 31 else bits | np.uint32(0x80000000)


@njit(cache=True, nogil=True)
def _radix_order(keys):  # pragma: no cover - compiled
    """The positions of `keys` (uint32) in ascending order, equal keys in their order: four
    counting passes of 8 bits, a pass skipped where every key has the same byte."""
    count = keys.size
    order, spare = np.arange(count), np.empty(count, dtype=np.int64)
    counts = np.empty(257, dtype=np.int64)
    for shift in range(0, 32, 8):
        counts[:] = 0
        for item in range(count):
            counts[((keys[item] >> shift) & 255) + 1] += 1
        if counts.max() == count:
            continue
        for digit in range(256):
            counts[digit + 1] += counts[digit]
        for position in range(count):
            item = order[position]
            digit = (keys[item] >> shift) & 255
            spare[counts[digit]] = item
            counts[digit] += 1
        order, spare = spare, order
    return order
