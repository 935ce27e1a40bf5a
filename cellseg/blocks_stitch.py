"""Step 3 of a block-wise image (`cellseg.blocks`), once: the labels that are one cell across a seam
joined (the stitching rule of `cellseg.blocks`), every cell numbered, the owner of each recorded."""

from __future__ import annotations

from typing import Any

import numpy as np

from cellseg.blocks_scratch import EdgeReader, Scratch, table_columns
from cellseg.stitch import (
    EMPTY,
    FINAL_CHUNK,
    TODO,
    join_labels,
    numbered_across_blocks,
    owners_of,
    seam_pairs,
    unpack_ring,
    written_labels,
)
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError


def stitch_image(store: ResultStore, image_id: str) -> dict[str, Any]:
    """Join the labels that are one cell across seams and number the cells (the module's rule);
    returns what it recorded: each block's first label, cells owned and label offset."""
    scratch = Scratch.open(store, image_id)
    if "stitch" in scratch.attrs:
        return dict(scratch.attrs["stitch"])
    scratch.mark_active()
    grid, state = scratch.grid, scratch.state()
    if unfinished := [int(index) for index in np.flatnonzero(state[:, 0] == TODO)]:
        raise StoreError(f"image '{image_id}': blocks {unfinished[:10]} are not predicted yet; stitching needs them all")
    core_labels = state[:, 1]
    offsets = np.concatenate([[0], np.cumsum(core_labels)])
    total = int(offsets[-1])
    edges = EdgeReader(scratch, grid.cols)
    joined = []
    for index in np.flatnonzero(state[:, 0] != EMPTY):
        edges.forget_rows_above(int(index) // grid.cols - 1)
        views, written, owners = [], [], []
        for box, view in unpack_ring(grid, int(index), scratch.block_slot("ring", int(index))):
            local = written_labels(grid, box, edges)
            views.append(view.ravel())
            written.append(np.where(local > 0, numbered_across_blocks(grid, box, local, offsets), 0).ravel())
            owners.append(owners_of(grid, box).ravel())
        if views:
            pairs = seam_pairs(np.concatenate(views), np.concatenate(written), np.concatenate(owners))
            pairs = pairs[pairs[:, 0] <= core_labels[index]]  # labels only around the core have no pixels to join
            joined.append(np.stack([pairs[:, 0] + offsets[index], pairs[:, 1]], axis=1))
    pairs = np.concatenate(joined) if joined else np.zeros((0, 2), dtype=np.int64)
    lookup, first_of_cell = join_labels(total, pairs)
    cells = int(lookup.max(initial=0))
    if cells >= np.iinfo(np.int32).max:
        raise StoreError(f"image '{image_id}' has {cells} cells, more than its int32 labels can number")
    firsts = np.cumsum(first_of_cell)  # cells numbered up to each label
    owned = [int(firsts[offsets[b + 1]] - firsts[offsets[b]]) for b in range(grid.count)]
    starts = [int(firsts[offsets[b]]) + 1 for b in range(grid.count)]
    # Another run on the same plan may have stitched while this one did, and be measuring blocks into
    # the table: the stitch is the same for both (same blocks, same rule), so its record and arrays
    # are kept, never blanked under it.
    if "stitch" in (now := Scratch.open(store, image_id)).attrs:
        return dict(now.attrs["stitch"])
    store.blank_array(f"{image_id}/blocks/final", lookup.shape, np.int64, (min(len(lookup), FINAL_CHUNK),), every_chunk=False,
                      dimension_names=("label",), keep=True)[...] = lookup
    rows = max([*owned, 1])
    columns = table_columns(scratch.config.measure_cells)
    store.blank_array(f"{image_id}/blocks/table", (grid.count * rows, len(columns)), np.float64, (rows, len(columns)),
                      every_chunk=False, dimension_names=("cell", "column"), keep=True)
    record = {"offsets": [int(offset) for offset in offsets], "starts": starts, "owned": owned, "cells": cells,
              "rows": rows, "joined": len(pairs)}
    scratch.update(stitch=record)
    return record
