"""Step 5 of a block-wise image (`cellseg.blocks`), once: the cell table gathered from the blocks'
rows, the statistics, the pyramid (each level half the one before), the NGFF metadata and the done
mark written; the scratch removed."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import zarr

from cellseg.blocks_scratch import Scratch, table_columns
from cellseg.source_record import with_area_um2
from cellseg.stats import statistics_from_sums
from cellseg.stitch import EMPTY, MEASURED, halve, pyramid_shapes
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError
from cellseg.store_layout import (
    CELL_TABLE,
    CELLS_PATH,
    CHUNK_SIDE,
    IMAGE_PATH,
    MASK_PATH,
    PROBABILITIES_PATH,
    TABLE_CHUNK_ROWS,
)
from cellseg.zarr_writes import read_region, write_region


def finish_image(store: ResultStore, image_id: str, model: dict[str, Any], workers: int = 1) -> dict[str, Any]:
    """Write the cell table, the statistics, the pyramid and the done mark of a measured image, and
    remove its scratch; returns its record ({} when another run finished it meanwhile)."""
    scratch = Scratch.open(store, image_id)
    scratch.mark_active()
    state, grid, config, levels = scratch.state(), scratch.grid, scratch.config, scratch.levels
    if unfinished := [int(index) for index in np.flatnonzero(~np.isin(state[:, 0], (EMPTY, MEASURED)))]:
        raise StoreError(f"image '{image_id}': blocks {unfinished[:10]} are not measured yet")
    stitched, described = scratch.attrs["stitch"], scratch.attrs["source"]
    areas, integrated = _write_table(scratch, stitched, config.measure_cells, described)
    inside = float(integrated.sum())  # outside: the rest of the sum of its blocks' cores (image_levels)
    statistics = statistics_from_sums(areas, grid.shape[0] * grid.shape[1], inside, sum(levels.block_sum) - inside)
    arrays = [path for path, kept in ((IMAGE_PATH, config.store_image), (MASK_PATH, True), (CELLS_PATH, True),
                                      (PROBABILITIES_PATH, config.save_probabilities), (CELL_TABLE, config.measure_cells))
              if kept]
    shapes = pyramid_shapes(grid.shape, min(CHUNK_SIDE, grid.block))
    _write_pyramids(store, [f"{image_id}/{path}" for path in [IMAGE_PATH, MASK_PATH, CELLS_PATH][0 if config.store_image else 1:]],
                    shapes, average=f"{image_id}/{IMAGE_PATH}", workers=workers)
    oversized = int(state[:, 3].sum())
    warnings = ["image has no contrast: no cells"] if levels.flat else []
    if oversized:
        warnings.append(f"{oversized} cells reach past the block overlap ({grid.overlap} px): measured in part; "
                        "raise predict.blocks.overlap")
    blocks = {"block_size": grid.block, "overlap": grid.overlap, "count": grid.count,
              "empty": len(scratch.attrs["empty"]), "resumed": scratch.attrs["resumed"], "joined": stitched["joined"],
              "oversized": oversized, "levels": len(shapes)}
    record = {"source_url": scratch.attrs["plan"]["source_url"], "shape": list(grid.shape), "model": model, "statistics": statistics,
              "scale": scratch.attrs["scale"], "warnings": warnings, "source": described, "blocks": blocks}
    written = store.write_blockwise_result(image_id, grid.shape, arrays, len(shapes), record)
    del store.root[f"{image_id}/blocks"]
    return record if written else {}


def _write_table(scratch: Scratch, stitched: dict[str, Any], measure: bool, described: dict[str, Any]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Gather the blocks' rows, in label order, into the image's cell table (with `measure`),
    whole chunks of rows at a time; returns every cell's area and integrated intensity."""
    columns = table_columns(measure)
    cells, stride = stitched["cells"], stitched["rows"]
    target = None
    if measure:
        named = with_area_um2(columns, np.zeros((0, len(columns))), described)[0]
        target = scratch.store.blank_array(
            f"{scratch.image_id}/{CELL_TABLE}", (cells, len(named)), np.float64,
            (max(1, min(cells, TABLE_CHUNK_ROWS)), len(named)), attributes={"columns": list(named)},
            dimension_names=("cell", "column"))
    source = scratch.array("table")
    areas: list[np.ndarray] = []
    integrated: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    written = 0

    def flush(last: bool) -> None:
        nonlocal pending, written
        rows = np.concatenate(pending) if pending else np.zeros((0, len(columns)))
        take = len(rows) if last else len(rows) // TABLE_CHUNK_ROWS * TABLE_CHUNK_ROWS
        if target is not None and take:
            target[written: written + take] = with_area_um2(columns, rows[:take], described)[1]
        written, pending = written + take, [rows[take:]]

    for index, count in enumerate(stitched["owned"]):
        if count:
            rows = read_region(source, (index * stride, 0), (count, len(columns)))
            areas.append(rows[:, columns.index("area")])
            integrated.append(rows[:, columns.index("intensity_integrated")])
            pending.append(rows)
            if sum(map(len, pending)) >= TABLE_CHUNK_ROWS:
                flush(last=False)
    flush(last=True)
    return (np.concatenate(areas) if areas else np.zeros(0)), (np.concatenate(integrated) if integrated else np.zeros(0))


def _write_pyramids(store: ResultStore, bases: Sequence[str], shapes: list[tuple[int, int]], average: str,
                    workers: int) -> None:
    """Levels 1.. of the arrays at `bases` (paths ending in "0"), each half the one before, written
    one output chunk per call, every array's chunks of a level on the `workers` threads at once;
    the array at `average` (the image) averaged, the others (labels) sampled."""

    def halve_chunk(task: tuple[zarr.Array, zarr.Array, int, int, bool]) -> None:
        source, out, top, left, averaged = task
        bottom, right = min(top + out.chunks[0], out.shape[0]), min(left + out.chunks[1], out.shape[1])
        bottom_read, right_read = min(2 * bottom, source.shape[0]), min(2 * right, source.shape[1])
        pixels = read_region(source, (2 * top, 2 * left), (bottom_read - 2 * top, right_read - 2 * left))
        write_region(out, (top, left), halve(pixels, averaged))

    previous = [store.region_array(base) for base in bases]
    for level, shape in enumerate(shapes[1:], start=1):
        targets = [store.blank_array(f"{base[:-1]}{level}", shape, source.dtype, source.chunks)
                   for base, source in zip(bases, previous, strict=True)]
        tasks = [(source, out, top, left, base == average) for base, source, out in zip(bases, previous, targets, strict=True)
                 for top in range(0, shape[0], out.chunks[0]) for left in range(0, shape[1], out.chunks[1])]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(halve_chunk, tasks))
        previous = targets
