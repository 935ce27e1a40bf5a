"""Step 4 of a block-wise image (`cellseg.blocks`), per block: the final labels of its core, and the
table rows of the cells it owns, measured on its window."""

from __future__ import annotations

import numpy as np
from numba import njit

from cellseg.blocks_scratch import EdgeReader, Scratch
from cellseg.blocks_source import Source, region
from cellseg.measure import CELL_COLUMNS, cell_measurements
from cellseg.stats import label_areas
from cellseg.stitch import EMPTY, MEASURED, Box, written_labels
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError
from cellseg.store_layout import CELLS_PATH
from cellseg.zarr_writes import read_region, write_region


def measure_block(store: ResultStore, image_id: str, index: int, source: Source) -> str:
    """Write the final labels of one block's core and the table rows of the cells it owns; 'measured',
    'empty' or 'done before'."""
    scratch = Scratch.open(store, image_id)
    state = scratch.block_state(index)
    stage = state[0]
    if stage == EMPTY:
        return "empty"
    if stage == MEASURED:
        return "done before"
    scratch.mark_active()
    if "stitch" not in scratch.attrs:
        raise StoreError(f"image '{image_id}' is not stitched yet; its blocks are measured after")
    grid, stitched, config = scratch.grid, scratch.attrs["stitch"], scratch.config
    offsets = stitched["offsets"]
    core, window = grid.core(index), grid.window(index)
    local = _window_labels(scratch, index)
    # Block b's label k is label offsets[b] + k of the stitch's lookup `final`; the neighbourhood's
    # labels are one span of it (its blocks lie in three rows, in raster order).
    neighbourhood = grid.neighbourhood(index)
    first, last = offsets[neighbourhood[0]], offsets[neighbourhood[-1] + 1]
    lookup = read_region(scratch.array("final"), (first,), (last + 1 - first,)).astype(np.int32)  # stitch_image checked the range
    start, count = stitched["starts"][index], stitched["owned"][index]
    parts = list(grid.parts(window))
    boxes = np.array([(top - window[0], bottom - window[0], left - window[2], right - window[2])
                      for _, (top, bottom, left, right) in parts], dtype=np.int64)
    cells, mine = np.empty_like(local), np.empty_like(local)
    if not _final_labels(local, boxes, np.array([offsets[owner] - first for owner, _ in parts], dtype=np.int64),
                         lookup, start, count, cells, mine):
        raise StoreError(f"image '{image_id}', block {index}: its scratch labels reach past the stitched labels; "
                         "delete the image's 'blocks' group to segment it again")
    inner = (slice(core[0] - window[0], core[1] - window[0]), slice(core[2] - window[2], core[3] - window[2]))
    write_region(scratch.image_array(CELLS_PATH), (core[0], core[2]), cells[inner])
    oversized = 0
    if count:
        rows = _cell_rows(mine, region(source, window), config.measure_cells)
        if len(rows) != count:
            raise StoreError(f"image '{image_id}', block {index}: {len(rows)} of its {count} cells found in its window")
        _shift(rows, start - 1, window, config.measure_cells)
        oversized = _cut_at_window_edge(mine, window, grid.shape)
        padded = np.zeros((stitched["rows"], rows.shape[1]))  # the block's whole chunk of rows: no other block writes it
        padded[:count] = rows
        write_region(scratch.array("table"), (index * stitched["rows"], 0), padded)
    scratch.set_state(index, MEASURED, int(state[1]), int(state[2]), oversized)
    return "measured"


@njit(cache=True, nogil=True)
def _final_labels(local, boxes, offsets, lookup, start, count, cells, mine):  # pragma: no cover - compiled; tested through measure_block
    """Into `cells`, each pixel's final label: lookup[its block-local label + its block's offset]
    over each of `boxes` (one per block the window crosses, `offsets` theirs), 0 for background;
    into `mine`, cells start..start+count-1 as 1..count, others 0. False, with nothing more
    written, when a label reaches past `lookup`."""
    for part in range(boxes.shape[0]):
        top, bottom, left, right = boxes[part]
        offset = offsets[part]
        for row in range(top, bottom):
            for col in range(left, right):
                value = local[row, col]
                cell = 0
                if value:
                    position = value + offset
                    if value < 0 or position >= lookup.size:
                        return False
                    cell = lookup[position]
                cells[row, col] = cell
                mine[row, col] = cell - (start - 1) if start <= cell < start + count else 0
    return True


def _window_labels(scratch: Scratch, index: int) -> np.ndarray:
    """The labels that the blocks wrote over block `index`'s window: its core's from the scratch
    labels, the ring's from its neighbours' edge bands (a fraction of their cores' chunks)."""
    grid = scratch.grid
    core, window = grid.core(index), grid.window(index)
    labels = np.zeros((window[1] - window[0], window[3] - window[2]), dtype=np.int32)
    labels[core[0] - window[0]: core[1] - window[0], core[2] - window[2]: core[3] - window[2]] = \
        read_region(scratch.array("labels"), (core[0], core[2]), (core[1] - core[0], core[3] - core[2]))
    edges = EdgeReader(scratch, grid.cols)
    for top, bottom, left, right in grid.ring(index):
        labels[top - window[0]: bottom - window[0], left - window[2]: right - window[2]] = \
            written_labels(grid, (top, bottom, left, right), edges)
    return labels


def _cell_rows(cells: np.ndarray, image: np.ndarray, measure: bool) -> np.ndarray:
    """The table rows of cells 1..n: every CELL_COLUMNS, or only SUM_COLUMNS."""
    if measure:
        return cell_measurements(cells, image)
    counts = label_areas(cells)
    present = np.flatnonzero(counts[1:]) + 1
    areas = counts[present]
    integrated = np.bincount(cells.ravel(), weights=image.ravel().astype(np.float64))[present]
    return np.stack([present.astype(np.float64), areas.astype(np.float64), integrated], axis=1)


def _shift(rows: np.ndarray, label_offset: int, window: Box, measure: bool) -> None:
    """Rows measured in a window, moved to final labels and image coordinates (in place)."""
    rows[:, 0] += label_offset
    if measure:
        for name, offset in (("centroid_y", window[0]), ("centroid_x", window[2]), ("bbox_min_y", window[0]),
                             ("bbox_min_x", window[2]), ("bbox_max_y", window[0]), ("bbox_max_x", window[2])):
            rows[:, CELL_COLUMNS.index(name)] += offset


def _cut_at_window_edge(cells: np.ndarray, window: Box, shape: tuple[int, int]) -> int:
    """How many cells touch an edge of the window that is not the image's (measured only in part)."""
    edges = [cells[0] if window[0] > 0 else None, cells[-1] if window[1] < shape[0] else None,
             cells[:, 0] if window[2] > 0 else None, cells[:, -1] if window[3] < shape[1] else None]
    touching = np.concatenate([edge for edge in edges if edge is not None] or [np.zeros(0, dtype=np.int32)])
    return len(np.unique(touching[touching > 0]))
