"""A done image's arrays read back: mask, cell labels, source image copy, probabilities and cell
table, each checked for missing or undecodable chunks (DamagedImage)."""

from __future__ import annotations

from collections.abc import Iterator
from math import prod
from typing import Any

import numpy as np
import zarr

from cellseg.stats import label_cells
from cellseg.store_checks import DamagedImage, StoreError, describe
from cellseg.store_layout import (
    ARRAYS,
    CELL_TABLE,
    CELLS_PATH,
    CHUNK_ERRORS,
    IMAGE_PATH,
    MASK_PATH,
    METADATA_ERRORS,
    PROBABILITIES_PATH,
)
from cellseg.store_records import StoreRecords


def _read(array: zarr.Array, step: int = 1) -> np.ndarray:
    """The array as numpy, every `step`-th row and column of it (zarr types a read as any array-like
    or scalar); zarr decodes chunk by chunk into the result, so a step bounds the memory it takes."""
    if step == 1:
        return np.asarray(array[...])
    return np.asarray(array[slice(None, None, step), slice(None, None, step)])


def _declared_shape_problem(array: zarr.Array, path: str, record: dict[str, Any]) -> str | None:
    """Why an array's declared shape cannot be its image's (None when it may be; `verify` compares
    it exactly): a pixel array larger than the image's record says, a cell table of more rows than
    the image has pixels, more than MAX_CHUNKS chunks, a chunk of more than MAX_CHUNK_BYTES (a record
    may lie as its arrays do). A zarr.json declaring 2**40 x 2**40 took zarr's walk over its chunks
    to a MemoryError, a cell table of 2**50 rows its read, and one chunk of 100,000 x 100,000
    pixels, its record saying so too, a read of 37 GiB."""
    shape, chunks = array.shape, array.nchunks
    image = record.get("shape")
    if isinstance(image, list) and len(image) == 2 and all(isinstance(side, int) for side in image):
        pixels = prod(image)
        rows = max(pixels, MIN_TABLE_ROWS_ALLOWED)
        if path == CELL_TABLE and (len(shape) != 2 or shape[0] > rows or shape[1] > MAX_TABLE_COLUMNS):
            return (f"declares shape {list(shape)}, not that of a cell table of an image of {pixels} pixels (at most "
                    f"{rows} rows and {MAX_TABLE_COLUMNS} columns)")
        if path != CELL_TABLE and prod(shape) > MAX_PLANES * pixels:
            return f"declares shape {list(shape)}, larger than its image's {image}"
    if chunks > MAX_CHUNKS:
        return f"declares {chunks} chunks, over the {MAX_CHUNKS} an image's array may have"
    chunk = array.shards or array.chunks  # a shard is read whole
    if (chunk_bytes := prod(chunk) * array.dtype.itemsize) > MAX_CHUNK_BYTES:
        return (f"declares chunks of {list(chunk)} ({chunk_bytes} bytes), over the {MAX_CHUNK_BYTES} bytes "
                "cellseg writes at most")
    return None


MAX_TABLE_COLUMNS = 256  # the cell table has some 20; a zarr.json may declare anything
MIN_TABLE_ROWS_ALLOWED = 2**20  # rows a table may have whatever its image's size (a cell per pixel bounds the rest)
MAX_CHUNKS = 2**24  # a 100,000-pixel-square image in chunks of 1024 has some 10,000
MAX_CHUNK_BYTES = 2**28  # cellseg's largest chunks: 65,536 table rows of 256 columns (128 MiB); pixels 16 MiB
MAX_PLANES = 4  # an image copy's channels beside height and width (RGB(A)); the other arrays have none


class StoreArrays(StoreRecords):
    """The arrays of a store's done images (`cellseg.store.ResultStore`)."""

    def array(self, image_id: str, path: str, record: dict[str, Any] | None = None) -> zarr.Array | None:
        """The array at `path` (an ARRAYS key) of a done image, or None when it was written
        without it. DamagedImage when the image's or the array's metadata cannot be read, or the
        array is missing (the mask, or one its record lists) or lacks chunks: an image records
        the arrays it was written with, each with every chunk stored, so a missing chunk is
        damage, never an empty tile (zarr would read it as zeros). Costs one listing per array."""
        record = self._done_record(image_id) if record is None else record
        what = ARRAYS[path][0]
        recorded = path in record.get("arrays", ())
        if "arrays" in record and not recorded and path != MASK_PATH:
            return None  # not written with this result, whatever an earlier one left there
        try:
            node = self.root.get(f"{image_id}/{path}")
        except METADATA_ERRORS as error:
            raise DamagedImage(self.url, image_id, f"the metadata of its {what}, '{image_id}/{path}/zarr.json', "
                                                   f"cannot be read ({describe(error)})") from error
        if not isinstance(node, zarr.Array):
            if recorded or path == MASK_PATH:
                raise DamagedImage(self.url, image_id, f"its {what} '{image_id}/{path}' is missing")
            return None
        if problem := _declared_shape_problem(node, path, record):  # before zarr walks its chunk grid
            raise DamagedImage(self.url, image_id, f"its {what} '{image_id}/{path}' {problem}")
        if recorded and (missing := node.nchunks - node.nchunks_initialized):
            raise DamagedImage(self.url, image_id,
                               f"its {what} '{image_id}/{path}' is missing {missing} of {node.nchunks} chunks")
        return node

    def array_data(self, image_id: str, path: str, array: zarr.Array, step: int = 1) -> np.ndarray:
        """The whole of one of an image's arrays, or every `step`-th row and column of it;
        DamagedImage when a chunk cannot be decoded."""
        try:
            return _read(array, step)
        except CHUNK_ERRORS as error:
            raise self._undecodable(image_id, path, error) from error

    def row_chunks(self, image_id: str, path: str, array: zarr.Array) -> Iterator[np.ndarray]:
        """One of an image's arrays a chunk's rows at a time (every column); DamagedImage when a
        chunk cannot be decoded. A cell table of millions of rows is never all in memory."""
        for index in range(array.cdata_shape[0] if array.ndim else 0):
            try:
                yield np.asarray(array.blocks[index])
            except CHUNK_ERRORS as error:
                raise self._undecodable(image_id, path, error) from error

    def _undecodable(self, image_id: str, path: str, error: Exception) -> DamagedImage:
        return DamagedImage(self.url, image_id, f"its {ARRAYS[path][0]} '{image_id}/{path}' has a chunk that cannot be "
                                                f"decoded ({describe(error)})", undecodable=True)

    def _optional_array(self, image_id: str, path: str, what: str) -> zarr.Array:
        """An array that a done image may have been written without; StoreError naming `what` if so."""
        array = self.array(image_id, path)
        if array is None:
            raise StoreError(f"image '{image_id}' in '{self.url}' was written without {what}")
        return array

    def read_mask(self, image_id: str, step: int = 1) -> np.ndarray:
        """Boolean (H, W) mask of a done image (every `step`-th row and column of it)."""
        array = self.array(image_id, MASK_PATH)
        assert array is not None  # every done image has a mask: `array` raises DamagedImage without one
        return self.array_data(image_id, MASK_PATH, array, step) > 0

    def read_cells(self, image_id: str, step: int = 1) -> np.ndarray:
        """Instance labels (int32, 0 = background, 1..N one per cell) of a done image (every
        `step`-th row and column of them); images written without them get the connected
        components of their mask."""
        array = self.array(image_id, CELLS_PATH)
        if array is not None:
            return self.array_data(image_id, CELLS_PATH, array, step)
        return label_cells(self.read_mask(image_id, step))[0]

    def read_image(self, image_id: str, step: int = 1) -> np.ndarray:
        """The copy of the source image stored with a done result (`PredictConfig.store_image`),
        every `step`-th row and column of it."""
        array = self._optional_array(image_id, IMAGE_PATH, "a copy of its source image")
        return self.array_data(image_id, IMAGE_PATH, array, step)

    def has_probabilities(self, image_id: str) -> bool:
        """Whether a done image was written with its cell probabilities (`--save-probabilities`)."""
        record = self._done_record(image_id)
        if "arrays" in record:
            return PROBABILITIES_PATH in record["arrays"]
        return self.array(image_id, PROBABILITIES_PATH, record) is not None

    def read_probabilities(self, image_id: str) -> np.ndarray:
        """float32 (H, W) cell probabilities of a done image written with `--save-probabilities`."""
        array = self._optional_array(image_id, PROBABILITIES_PATH, "probabilities (predict --save-probabilities)")
        return self.array_data(image_id, PROBABILITIES_PATH, array).astype(np.float32)

    def read_cell_table(self, image_id: str) -> tuple[list[str], np.ndarray]:
        """(column names, float64 rows) of a done image's per-cell measurements."""
        array = self._optional_array(image_id, CELL_TABLE, "per-cell measurements")
        return self.table_columns(image_id, array), self.array_data(image_id, CELL_TABLE, array)

    def checked_cell_table(self, image_id: str, record: dict[str, Any]) -> tuple[list[str], Iterator[np.ndarray]] | None:
        """(column names, its rows a chunk at a time) of a done image's cell table, every chunk of
        which decodes; None when it was written without one. DamagedImage when the table is missing,
        lacks or cannot decode a chunk, or has other columns: found before any row is given, so
        that a damaged table is left out whole. A table of several chunks is decoded twice, a
        chunk at a time, rather than held whole."""
        table = self.array(image_id, CELL_TABLE, record)
        if table is None:
            return None
        columns = self.table_columns(image_id, table)  # two dimensions, or DamagedImage
        if table.cdata_shape[0] == 1:
            return columns, iter([self.array_data(image_id, CELL_TABLE, table)])
        for _ in self.row_chunks(image_id, CELL_TABLE, table):
            pass
        return columns, self.row_chunks(image_id, CELL_TABLE, table)

    def table_columns(self, image_id: str, table: zarr.Array) -> list[str]:
        """The column names of an image's cell table; DamagedImage when they do not fit the table."""
        columns = table.attrs.get("columns")
        if not (isinstance(columns, list) and all(isinstance(name, str) for name in columns)
                and len(table.shape) == 2 and len(columns) == table.shape[1]):
            raise DamagedImage(self.url, image_id, f"its cell table '{image_id}/{CELL_TABLE}' has {table.shape} "
                                                   f"values but column names {columns!r}")
        # An export's rows are keyed by name, the image's id first: one name twice, or the id's, lost a column.
        if len(set(columns)) < len(columns) or "image_id" in columns:
            raise DamagedImage(self.url, image_id, f"its cell table '{image_id}/{CELL_TABLE}' has column names "
                                                   f"{columns!r}: one twice, or 'image_id', which the export adds")
        return columns
