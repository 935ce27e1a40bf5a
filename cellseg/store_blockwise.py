"""A block-wise image's arrays in a store (`cellseg.blocks`): written region by region, one task
per block, marked done once all are written; the chunks its scratch has lost."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import zarr

from cellseg.json_values import finite_json
from cellseg.redact import redact
from cellseg.stitch import BlockGrid, scratch_chunks
from cellseg.store_checks import DONE, StoreError
from cellseg.store_layout import (
    CELLS_NAME,
    CELLS_PATH,
    CHUNK_SIDE,
    IMAGE_PATH,
    MASK_NAME,
    METADATA_ERRORS,
    WRITE_CONFIG,
    now,
)
from cellseg.store_ngff import NGFF_VERSION, ngff_label, ngff_multiscales
from cellseg.store_writes import StoreWrites, recorded_source
from cellseg.zarr_writes import ARRAY_CODECS, CHUNK_KEY_ENCODING, missing_chunks, read_region


class BlockwiseWrites(StoreWrites):
    """Region writes of block-wise images into a zarr results store (`cellseg.store.ResultStore`)."""

    def blank_array(
        self, path: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...], every_chunk: bool = True,
        attributes: dict[str, Any] | None = None, dimension_names: tuple[str, ...] = ("y", "x"), keep: bool = False,
    ) -> zarr.Array:
        """A new array of zeros at `path` (what was there is replaced), for region writes; with
        `every_chunk` each write stores every chunk it covers, all-zero ones too, as the arrays of a
        done image must have them (`array`). With `keep`, an array already there of the same shape,
        dtype and chunks is kept with what it holds."""
        if keep:
            try:
                existing = self.root.get(path)
            except METADATA_ERRORS:  # unreadable: replaced below
                existing = None
            if (isinstance(existing, zarr.Array) and existing.shape == tuple(shape) and existing.chunks == tuple(chunks)
                    and existing.dtype == np.dtype(dtype)):
                return existing.with_config(WRITE_CONFIG) if every_chunk else existing
        array = self.root.create_array(path, shape=shape, dtype=dtype, chunks=chunks, fill_value=0, overwrite=True,
                                       compressors=ARRAY_CODECS, chunk_key_encoding=CHUNK_KEY_ENCODING, attributes=attributes,
                                       dimension_names=dimension_names)
        return array.with_config(WRITE_CONFIG) if every_chunk else array

    def region_array(self, path: str, every_chunk: bool = True) -> zarr.Array:
        """The array at `path`, opened for region writes as `blank_array` made it."""
        array = self.root[path]
        if not isinstance(array, zarr.Array):
            raise StoreError(f"'{self.url}/{path}' is a group, not an array")
        return array.with_config(WRITE_CONFIG) if every_chunk else array

    def write_blockwise_result(
        self, image_id: str, shape: tuple[int, int], arrays: Sequence[str], levels: int, record: Mapping[str, Any],
    ) -> bool:
        """Mark a block-wise image done once its `arrays` (paths of level 0) and the `levels` of their
        pyramid are written: the NGFF metadata of its labels and image, then the done mark with
        `record` (source_url, model, statistics, and scale, warnings, source, blocks when given), in
        one metadata write as `write_result` does. An image another run finished meanwhile is kept
        (False)."""
        if self.is_done(image_id):
            return False
        pixel_size = (record.get("source") or {}).get("pixel_size_yx_um")
        image_stored = IMAGE_PATH in arrays
        label_names = [CELLS_NAME, MASK_NAME] if CELLS_PATH in arrays else [MASK_NAME]
        for name in label_names:
            self._require_group(f"{image_id}/labels/{name}").attrs["ome"] = ngff_label(
                name, source_image=image_stored, pixel_size_yx_um=pixel_size, levels=levels)
        self._require_group(f"{image_id}/labels").attrs["ome"] = {"version": NGFF_VERSION, "labels": label_names}
        attributes: dict[str, Any] = {"ome": ngff_multiscales(image_id, pixel_size, levels)} if image_stored else {}
        attributes["cellseg"] = {
            "status": DONE, "source_url": recorded_source(str(record["source_url"])), "shape": list(shape),
            "model": redact(dict(record["model"])), "statistics": finite_json(dict(record["statistics"])),
            "arrays": list(arrays), "written": now(),
            **{key: finite_json(record[key]) for key in ("scale", "warnings", "source", "blocks") if record.get(key)},
        }
        self._require_group(image_id).attrs.put(attributes)
        return True


def lost_scratch_chunks(path: str, array: Callable[[str], zarr.Array], grid: BlockGrid, state: np.ndarray,
                        stitched: Mapping[str, Any] | None) -> list[str]:
    """What a block-wise scratch (`cellseg.blocks`, at `path`; `array` gives each of its arrays by
    name) has lost: a chunk that its blocks' recorded progress (`state`, and the `stitched` record)
    says was written and is not stored (`stitch.scratch_chunks`), which zarr would read as zeros.
    One line per array with losses; one key listing per array."""
    expected = scratch_chunks(grid, state, min(CHUNK_SIDE, grid.block), stitched)
    return [f"its block-wise scratch '{path}/{name}' is missing {len(lost)} of the {len(indices)} chunks its blocks "
            "wrote" for name, indices in expected.items() if (lost := missing_chunks(array(name), indices))]


STATE_COLUMNS = 4  # a block's stage, labels in its core, labels in its window, cells it measured only in part


def read_block_states(state: zarr.Array, grid: BlockGrid, max_pixels: int) -> np.ndarray:
    """(blocks, STATE_COLUMNS) int64 progress of each block of `grid` from a scratch's `state` array;
    ValueError, before anything is read, for a plan larger than `max_pixels` (`BlockConfig.max_pixels`)
    or an array of another shape than the plan's: its declared shape is what a read would allocate."""
    if grid.shape[0] * grid.shape[1] > max_pixels:
        raise ValueError(f"its plan is of a {grid.shape[0]}x{grid.shape[1]} image, more than the {max_pixels} "
                         "pixels a block-wise image may have")
    if tuple(state.shape) != (grid.count, STATE_COLUMNS):
        raise ValueError(f"its 'state' declares shape {list(state.shape)}, not the {[grid.count, STATE_COLUMNS]} of its "
                         f"plan's {grid.count} blocks")
    return read_region(state, (0, 0), state.shape)
