"""The pure parts of block-wise segmentation (`cellseg.blocks`): the block grid, the ring of
pixels around a block's core, matching labels across seams, joining them into one label per
cell, and halving a region for the pyramid. Arrays in, arrays out; no I/O."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

Box = tuple[int, int, int, int]  # (top, bottom, left, right): rows [top, bottom), columns [left, right)
SIDES = 4  # the strips of a ring: top, bottom, left, right
MIN_JOIN_IOU = 0.5  # labels of two blocks are one cell when they overlap at least this much in their seam
# ... and when that seam holds at least this share of the view label's ring: a sliver where two blocks
# disagree at a corner is no evidence (a cell on a corner of four blocks has about a third in each).
MIN_SEAM_SHARE = 0.1
# The scratch's arrays, in the plan: a run left by a cellseg with other ones starts over (2: `edges`).
SCRATCH_LAYOUT = 2
TODO, PREDICTED, EMPTY, MEASURED = 0, 1, 2, 3  # a block's stage, column 0 of the scratch `state` (cellseg.blocks)
FINAL_CHUNK = 1 << 20  # labels per chunk of the scratch `final`, the stitch's lookup


@dataclass(frozen=True)
class BlockGrid:
    """An (H, W) image cut into square cores of `block` pixels in raster order (the last row and
    column of blocks smaller), each read on a window reaching `overlap` pixels past its core on
    every side, clipped to the image."""

    shape: tuple[int, int]
    block: int
    overlap: int

    @property
    def rows(self) -> int:
        return -(-self.shape[0] // self.block)

    @property
    def cols(self) -> int:
        return -(-self.shape[1] // self.block)

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def core(self, index: int) -> Box:
        """The pixels block `index` owns and writes."""
        row, col = divmod(index, self.cols)
        top, left = row * self.block, col * self.block
        return top, min(top + self.block, self.shape[0]), left, min(left + self.block, self.shape[1])

    def window(self, index: int) -> Box:
        """The pixels block `index` reads: its core and `overlap` more on every side, within the image."""
        top, bottom, left, right = self.core(index)
        reach = self.overlap
        return max(top - reach, 0), min(bottom + reach, self.shape[0]), max(left - reach, 0), min(right + reach, self.shape[1])

    def neighbourhood(self, index: int) -> list[int]:
        """Block `index` and the (up to 8) blocks around it, in raster order."""
        row, col = divmod(index, self.cols)
        return [r * self.cols + c for r in range(max(row - 1, 0), min(row + 2, self.rows))
                for c in range(max(col - 1, 0), min(col + 2, self.cols))]

    def parts(self, box: Box) -> Iterator[tuple[int, Box]]:
        """(block, the part of `box` in its core) for each block whose core `box` crosses, in raster order."""
        top, bottom, left, right = box
        for row in range(top // self.block, -(-bottom // self.block)):
            for col in range(left // self.block, -(-right // self.block)):
                owner = row * self.cols + col
                core = self.core(owner)
                yield owner, (max(top, core[0]), min(bottom, core[1]), max(left, core[2]), min(right, core[3]))

    def ring(self, index: int) -> list[Box]:
        """The strips around block `index`'s core, `overlap` wide, within the image (top and bottom
        with the corners, then left and right); an empty box where the core meets the image edge."""
        top, bottom, left, right = self.core(index)
        height, width = self.shape
        reach = self.overlap
        wide = (max(left - reach, 0), min(right + reach, width))
        return [(max(top - reach, 0), top, *wide), (bottom, min(bottom + reach, height), *wide),
                (top, bottom, max(left - reach, 0), left), (top, bottom, right, min(right + reach, width))]

    @property
    def ring_slot(self) -> tuple[int, int, int]:
        """Shape of one block's ring as stored: (SIDES, overlap, block + 2 overlap), the left and
        right strips transposed."""
        return SIDES, self.overlap, self.block + 2 * self.overlap

    def edges(self, index: int) -> list[Box]:
        """The bands of block `index`'s core that its neighbours' rings cover: the `overlap`
        pixels inside each side of the core (fewer in a narrower core), top and bottom across the
        core, then left and right."""
        top, bottom, left, right = self.core(index)
        reach = self.overlap
        return [(top, min(top + reach, bottom), left, right), (max(bottom - reach, top), bottom, left, right),
                (top, bottom, left, min(left + reach, right)), (top, bottom, max(right - reach, left), right)]

    @property
    def edge_slot(self) -> tuple[int, int, int]:
        """Shape of one block's edge bands as stored: (SIDES, overlap, block), the left and right
        bands transposed."""
        return SIDES, self.overlap, self.block


def scratch_chunks(grid: BlockGrid, state: np.ndarray, chunk: int, stitched: Mapping[str, Any] | None
                   ) -> dict[str, list[tuple[int, ...]]]:
    """The chunks of each scratch array of `cellseg.blocks` (by name) that the blocks' recorded
    progress says are stored, each as its index: every block past TODO and not EMPTY wrote its
    core's `labels` (chunks of `chunk`), its `ring` and its `edges`; once `stitched` (the stitch's
    record), the lookup `final` is whole and a MEASURED block owning cells wrote its `table` rows.
    Zarr reads a chunk that is not stored as zeros, so a lost one would silently drop cells."""
    stages = state[:, 0]
    written = np.flatnonzero(np.isin(stages, (PREDICTED, MEASURED)))
    labels: dict[tuple[int, ...], None] = {}
    for index in written.tolist():
        top, bottom, left, right = grid.core(index)
        labels.update(dict.fromkeys((row, col) for row in range(top // chunk, -(-bottom // chunk))
                                    for col in range(left // chunk, -(-right // chunk))))
    expected: dict[str, list[tuple[int, ...]]] = {
        "labels": list(labels), "ring": [(index, 0, 0, 0) for index in written.tolist()],
        "edges": [(index, 0, 0, 0) for index in written.tolist()]}
    if stitched is not None:
        size = int(stitched["offsets"][-1]) + 1  # the lookup's length: every block-local label, and 0
        expected["final"] = [(index,) for index in range(-(-size // min(size, FINAL_CHUNK)))] if size > 1 else []
        owned = np.asarray(stitched["owned"])
        expected["table"] = [(index, 0) for index in np.flatnonzero((stages == MEASURED) & (owned > 0)).tolist()]
    return expected


def pack_ring(grid: BlockGrid, index: int, labels: np.ndarray, window: Box) -> np.ndarray:
    """Block `index`'s labels over its ring, cut from its window's `labels`, as a `ring_slot` array."""
    return _pack(grid.ring(index), labels, window, grid.ring_slot)


def unpack_ring(grid: BlockGrid, index: int, slots: np.ndarray) -> Iterator[tuple[Box, np.ndarray]]:
    """(box, labels) of each non-empty strip of a ring that `pack_ring` stored."""
    return _unpack(grid.ring(index), slots)


def pack_edges(grid: BlockGrid, index: int, core_labels: np.ndarray) -> np.ndarray:
    """Block `index`'s labels over its edge bands, cut from its core's `core_labels`, as an
    `edge_slot` array: all that its neighbours need of its core to stitch and measure."""
    return _pack(grid.edges(index), core_labels, grid.core(index), grid.edge_slot)


def written_labels(grid: BlockGrid, box: Box, edges_of: Callable[[int], np.ndarray]) -> np.ndarray:
    """(h, w) int32: the labels that the blocks owning the pixels of `box` wrote in their cores,
    from their edge bands (`edges_of(block)`: what `pack_edges` stored). `box` must lie within
    `overlap` of a side of each core it crosses, as every strip of a ring does."""
    top, bottom, left, right = box
    labels = np.zeros((bottom - top, right - left), dtype=np.int32)
    for owner, part in grid.parts(box):
        for band, strip in _unpack(grid.edges(owner), edges_of(owner)):
            if band[0] <= part[0] and part[1] <= band[1] and band[2] <= part[2] and part[3] <= band[3]:
                labels[part[0] - top: part[1] - top, part[2] - left: part[3] - left] = \
                    strip[part[0] - band[0]: part[1] - band[0], part[2] - band[2]: part[3] - band[2]]
                break
        else:
            raise ValueError(f"pixels {part} of block {owner} lie outside its edge bands")
    return labels


def owners_of(grid: BlockGrid, box: Box) -> np.ndarray:
    """(h, w) int64: the block whose core holds each pixel of `box`."""
    owners = np.empty((box[1] - box[0], box[3] - box[2]), dtype=np.int64)
    for owner, (top, bottom, left, right) in grid.parts(box):
        owners[top - box[0]: bottom - box[0], left - box[2]: right - box[2]] = owner
    return owners


def numbered_across_blocks(grid: BlockGrid, box: Box, labels: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """(h, w) int64: the block-local `labels` over `box` numbered across blocks, label k of the
    block owning a pixel becoming offsets[block] + k. Background (0) becomes its block's offset:
    mask it where `labels` is 0."""
    numbered = np.array(labels, dtype=np.int64)
    for owner, (top, bottom, left, right) in grid.parts(box):
        part = numbered[top - box[0]: bottom - box[0], left - box[2]: right - box[2]]
        np.add(part, offsets[owner], out=part)
    return numbered


def _pack(boxes: list[Box], labels: np.ndarray, origin: Box, shape: tuple[int, int, int]) -> np.ndarray:
    """The strips `boxes` of `labels` (whose first pixel is `origin`'s corner) in slots of `shape`,
    the third and fourth transposed."""
    slots = np.zeros(shape, dtype=np.int32)
    for side, (top, bottom, left, right) in enumerate(boxes):
        strip = labels[top - origin[0]: bottom - origin[0], left - origin[2]: right - origin[2]]
        strip = strip if side < 2 else strip.T
        slots[side, : strip.shape[0], : strip.shape[1]] = strip
    return slots


def _unpack(boxes: list[Box], slots: np.ndarray) -> Iterator[tuple[Box, np.ndarray]]:
    """(box, labels) of each non-empty strip that `_pack` stored."""
    for side, box in enumerate(boxes):
        height, width = box[1] - box[0], box[3] - box[2]
        if height and width:
            yield box, slots[side, :height, :width] if side < 2 else slots[side, :width, :height].T


def seam_pairs(view: np.ndarray, written: np.ndarray, owners: np.ndarray) -> np.ndarray:
    """(K, 2) pairs (view label, written label) that are one cell, from two labellings of the same
    pixels (1-D, 0 = background): one block's `view` of the ring around its core, and the labels
    its neighbours `written` there, `owners` naming the neighbour whose core holds each pixel.
    Each neighbour's part of the ring is a seam of its own: a pair is joined when each is the
    other's largest overlap there, their intersection over union, counted in that part, is at
    least MIN_JOIN_IOU, and that part holds at least MIN_SEAM_SHARE of the view label's pixels in
    the ring. Counted over the whole ring instead, a cell at a corner of four blocks, whose view
    reaches into three neighbours, would match none of its three parts."""
    both = (view > 0) & (written > 0)
    if not both.any():
        return np.zeros((0, 2), dtype=np.int64)
    _, seam = np.unique(owners, return_inverse=True)
    seams = int(seam.max()) + 1
    view_in_seam = view.astype(np.int64) * seams + seam  # a view label in one neighbour's part
    view_sizes = np.bincount(view_in_seam)
    ring_sizes = np.bincount(view)
    present = written[written > 0]
    lowest = int(present.min())
    written_sizes = np.bincount(present - lowest)  # the labels of the (up to 8) neighbours around
    span = len(written_sizes)
    # One sort of 1-D keys, in the order of (view label in a seam, written) pairs; a written label
    # lies in one neighbour's core, so in one seam.
    keys, overlaps = np.unique(view_in_seam[both] * span + (written[both] - lowest), return_counts=True)
    pairs = np.stack([keys // span, keys % span + lowest])
    best_for_view = _largest(pairs[0], overlaps)
    best_for_written = _largest(pairs[1], overlaps)
    mutual = best_for_view & best_for_written
    union = view_sizes[pairs[0]] + written_sizes[pairs[1] - lowest] - overlaps
    chosen = mutual & (overlaps >= MIN_JOIN_IOU * union) & (
        view_sizes[pairs[0]] >= MIN_SEAM_SHARE * ring_sizes[pairs[0] // seams])
    return np.stack([pairs[0, chosen] // seams, pairs[1, chosen]], axis=1)


def _largest(keys: np.ndarray, overlaps: np.ndarray) -> np.ndarray:
    """Whether each pair is the largest overlap of its key (ties: the first pair in order)."""
    order = np.lexsort((-overlaps, keys))
    first = np.r_[True, keys[order][1:] != keys[order][:-1]]
    chosen = np.zeros(len(keys), dtype=bool)
    chosen[order[first]] = True
    return chosen


def join_labels(total: int, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Final labels of block labels 1..`total` joined by `pairs` ((K, 2) of labels that are one
    cell): (lookup of shape (total + 1,), 0 -> 0; whether each label is its cell's first). Each
    joined set is one cell, numbered 1..N in the order of its smallest label (union-find)."""
    parent = np.arange(total + 1, dtype=np.int64)

    def find(label: int) -> int:
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = int(parent[label])
        return label

    for first, second in pairs.tolist():
        a, b = find(first), find(second)
        if a != b:
            parent[max(a, b)] = min(a, b)  # every link points down, so a set's root is its smallest label
    while True:  # pointer jumping: every label straight to its root
        jumped = parent[parent]
        if np.array_equal(jumped, parent):
            break
        parent = jumped
    first_of_cell = parent == np.arange(total + 1)
    first_of_cell[0] = False
    lookup = np.cumsum(first_of_cell)[parent]
    lookup[0] = 0
    return lookup, first_of_cell


def halve(region: np.ndarray, average: bool) -> np.ndarray:
    """One pyramid step of an (h, w) region, to (ceil(h/2), ceil(w/2)): every second pixel (labels,
    masks: never a value that was not there), or with `average` the mean of each 2x2 square
    (an image; an odd last row or column is averaged with itself), in the region's dtype, an
    integer mean rounded half to even."""
    if not average:
        return region[::2, ::2]
    height, width = region.shape
    if height % 2 or width % 2:
        region = np.pad(region, ((0, height % 2), (0, width % 2)), mode="edge")
    if region.dtype.kind in "iub" and region.dtype.itemsize <= 4:
        # Summed exactly in integers: a tenth of the time of a float mean of the region.
        total = region[0::2, 0::2].astype(np.int32 if region.dtype.itemsize <= 2 else np.int64)
        for row, col in ((1, 0), (0, 1), (1, 1)):
            np.add(total, region[row::2, col::2], out=total)
        odd_quarter = np.bitwise_and(np.right_shift(total, 2), 1)
        return np.right_shift(total + 1 + odd_quarter, 2).astype(region.dtype)  # total / 4, half to even
    mean = region.astype(np.float64).reshape(region.shape[0] // 2, 2, region.shape[1] // 2, 2).mean(axis=(1, 3))
    return (np.rint(mean) if region.dtype.kind in "iub" else mean).astype(region.dtype)


def pyramid_shapes(shape: tuple[int, int], chunk: int) -> list[tuple[int, int]]:
    """The shape of each pyramid level, level 0 first, halving until the image fits one chunk."""
    shapes = [shape]
    while max(shapes[-1]) > chunk:
        shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
    return shapes
