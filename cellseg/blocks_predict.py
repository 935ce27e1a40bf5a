"""Step 2 of a block-wise image (`cellseg.blocks`), per block: its window predicted, its core
written (image copy, mask, probabilities, scratch labels under block-local numbers), with the
labels of its core's edge bands and its view of the ring around its core kept for the stitch."""

from __future__ import annotations

import numpy as np
from numba import njit

from cellseg.blocks_scratch import Scratch
from cellseg.blocks_source import Source, region
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.postprocess import CellMaps, cell_labels
from cellseg.stitch import EMPTY, PREDICTED, TODO, BlockGrid, pack_edges, pack_ring
from cellseg.store import ResultStore
from cellseg.store_layout import CELLS_PATH, IMAGE_PATH, MASK_PATH, PROBABILITIES_PATH
from cellseg.zarr_writes import write_region


def window_tile(grid: BlockGrid, config: PredictConfig) -> int:
    """The tile side for the blocks' windows: a block whose core fits a tile (`block_size` at most
    `tile_size`) is its own tile, its window predicted in one pass; split further, its overlap
    ring would make four tiles of a window hardly larger than one (2.5 times the passes' pixels
    of a 1024-pixel core's 1152-pixel window, against 1.27)."""
    return grid.block + 2 * grid.overlap if grid.block <= config.tile_size else config.tile_size


def window_maps(predictor: Predictor, window: np.ndarray, cell_diameter: float | None, tile: int) -> CellMaps:
    """The Predictor's maps of one normalised window (in tiles of at most `tile`, `tiling.predict_tiled`)."""
    return predictor.normalised_cell_maps([window], [cell_diameter], tile)[0]


def predict_block(store: ResultStore, image_id: str, index: int, source: Source, predictor: Predictor) -> str:
    """Predict one block and write its core; 'predicted', 'empty', or 'done before' (an earlier
    attempt recorded it)."""
    scratch = Scratch.open(store, image_id)
    scratch.still_ours(predictor)
    if scratch.block_state(index)[0] != TODO:
        return "done before"
    scratch.mark_active()
    config, grid = scratch.config, scratch.grid
    core, window = grid.core(index), grid.window(index)
    origin = (core[0], core[2])
    if index in scratch.attrs["empty"]:
        if config.store_image:
            write_region(scratch.image_array(IMAGE_PATH), origin, region(source, core))
        for path in [MASK_PATH, CELLS_PATH] + ([PROBABILITIES_PATH] if config.save_probabilities else []):
            array = scratch.image_array(path)  # scratch labels stay unwritten: zeros
            write_region(array, origin, np.zeros((core[1] - core[0], core[3] - core[2]), dtype=array.dtype))
        scratch.set_state(index, EMPTY)
        return "empty"
    inner = (slice(core[0] - window[0], core[1] - window[0]), slice(core[2] - window[2], core[3] - window[2]))
    pixels = region(source, window)
    scale = scratch.attrs["scale"] or {}
    maps = window_maps(predictor, scratch.levels.normalise(pixels, scratch.lut()), scale.get("cell_diameter"),
                 window_tile(grid, config))
    local, core_labels, total = _local_numbers(cell_labels(maps, config), inner)
    if config.store_image:
        write_region(scratch.image_array(IMAGE_PATH), origin, pixels[inner])
    if config.save_probabilities:
        write_region(scratch.image_array(PROBABILITIES_PATH), origin, maps.probability[inner].astype(np.float16))
    write_region(scratch.image_array(MASK_PATH), origin, (local[inner] > 0).astype(np.uint8))
    write_region(scratch.array("labels"), origin, local[inner])
    scratch.set_block_slot("edges", index, pack_edges(grid, index, local[inner]))
    scratch.set_block_slot("ring", index, pack_ring(grid, index, local, window))
    scratch.set_state(index, PREDICTED, core_labels, total)
    return "predicted"


def _local_numbers(labels: np.ndarray, core: tuple[slice, slice]) -> tuple[np.ndarray, int, int]:
    """(labels renumbered, cells in the core, cells in all): those with pixels in the core first,
    1..k, then those only around it, k+1..n."""
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative")
    lookup, in_core, total = _core_first_lookup(labels, core[0].start, core[0].stop, core[1].start, core[1].stop)
    renumbered = np.empty_like(labels)
    _apply_lookup(labels, lookup, renumbered)
    return renumbered, int(in_core), int(total)


@njit(cache=True, nogil=True)
def _core_first_lookup(labels, top, bottom, left, right):  # pragma: no cover - compiled; tested through _local_numbers
    """(lookup from label to its new number, labels with pixels in rows top:bottom and columns
    left:right, labels present), numbering the first ones first, each group in label order."""
    size = labels.max() + 1 if labels.size else 1
    present = np.zeros(size, dtype=np.bool_)
    in_core = np.zeros(size, dtype=np.bool_)
    height, width = labels.shape
    for row in range(height):
        inside_rows = top <= row < bottom
        for col in range(width):
            value = labels[row, col]
            present[value] = True
            if inside_rows and left <= col < right:
                in_core[value] = True
    lookup = np.zeros(size, dtype=np.int32)
    number = 0
    for value in range(1, size):
        if in_core[value]:
            number += 1
            lookup[value] = number
    core_count = number
    for value in range(1, size):
        if present[value] and not in_core[value]:
            number += 1
            lookup[value] = number
    return lookup, core_count, number


@njit(cache=True, nogil=True)
def _apply_lookup(labels, lookup, out):  # pragma: no cover - compiled; tested through _local_numbers
    flat, target = labels.ravel(), out.ravel()
    for index in range(flat.size):
        target[index] = lookup[flat[index]]
