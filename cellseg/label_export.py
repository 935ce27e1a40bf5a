"""A results store's label images as files, one per done image, for the tools that read labels
from files (Fiji, CellProfiler, QuPath, a script with tifffile): each image's cell labels (0
background, 1..N one per cell) or its mask (0 background, 255 cells), as TIFF or 16-bit PNG.

A TIFF holds uint16 labels, or uint32 for an image of more than 65,535 cells, deflate
compressed, with the pixel size in its resolution tags when the image's metadata gave one. An
image of more than WHOLE_IMAGE_PIXELS is read from the store one tile at a time and written as a
tiled (Big)TIFF, so memory is bounded by a tile, not by the image. Every file is written whole or
not at all, and nothing already in the folder is replaced without `overwrite`."""

from __future__ import annotations

import io
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tifffile
import zarr
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from cellseg.io import (
    StorageOptions,
    file_replaced_atomically,
    filesystem,
    join_url,
    write_bytes,
    write_file_atomic,
)
from cellseg.store import ResultStore
from cellseg.store_checks import DONE, DamagedImage, describe, enclosing_zarr_store
from cellseg.store_layout import CELLS_PATH, CHUNK_ERRORS, MASK_PATH
from cellseg.tables import OutputError, output_place, write_failure

LABEL_KINDS = ("cells", "mask")
LABEL_FORMATS = {"tiff": ".tif", "png": ".png"}
WHOLE_IMAGE_PIXELS = 64 * 2**20  # read whole up to here (256 MB of int32); larger ones tile by tile (TIFF only)
TILE_SIDE = 1024  # a tiled TIFF's tiles, where the store's chunks are no TIFF tile shape
UINT16_LABELS = 65535
BIGTIFF_BYTES = 2**32 - 2**25  # a classic TIFF addresses 4 GiB; keep a margin for its tags and offsets


@dataclass(frozen=True)
class LabelFile:
    """One done image's label file to write: its image, name, shape and what its record says."""

    image_id: str
    name: str
    shape: tuple[int, int]
    cell_count: int | None
    pixel_size_yx_um: tuple[float, float] | None


def label_file_name(image_id: str, kind: str, file_format: str) -> str:
    """`<image id>_<kind>.tif` (or `.png`): Cellpose's `_masks` files are named the same way."""
    return f"{image_id}_{kind}{LABEL_FORMATS[file_format]}"


@dataclass(frozen=True)
class ExportedLabels:
    """What `export_labels` did: the file names written, and the images it had no labels for
    (failed, or not finished by a run)."""

    written: list[str]
    not_done: list[str]


def export_labels(
    store: ResultStore,
    out_url: str,
    kind: str = "cells",
    file_format: str = "tiff",
    overwrite: bool = False,
    storage_options: StorageOptions = None,
    on_image: Callable[[str], None] | None = None,
    on_plan: Callable[[int], None] | None = None,
    whole_image_pixels: int = WHOLE_IMAGE_PIXELS,
) -> ExportedLabels:
    """Write the `kind` labels ('cells' or 'mask') of every done image of `store` into the folder
    `out_url` as `file_format` ('tiff' or 'png'). The folder, the files already in it and what PNG
    cannot hold are checked before anything is written (OutputError); an image found damaged on
    reading is left out, with a warning, and noted in `store.damaged`. `on_plan` is told how many
    files are to be written, `on_image` of each image done."""
    if kind not in LABEL_KINDS or file_format not in LABEL_FORMATS:
        raise ValueError(f"labels are {' or '.join(LABEL_KINDS)}, written as {' or '.join(LABEL_FORMATS)}; "
                         f"not {kind} as {file_format}")
    fs, folder = check_output_folder(out_url, storage_options)
    records = dict(store.records())  # one pass: the done images, and those without labels to name
    files = [_label_file(image_id, record, kind, file_format)
             for image_id, record in sorted(records.items()) if record.get("status") == DONE]
    _refuse_what_png_cannot_hold(files, kind, file_format, whole_image_pixels)
    _refuse_replacing(fs, folder, out_url, [file.name for file in files], overwrite)
    if on_plan is not None:
        on_plan(len(files))
    written = []
    for file in files:
        try:
            _write_label_file(store, file, records[file.image_id], kind, file_format, join_url(out_url, file.name),
                              storage_options, whole_image_pixels)
        except DamagedImage as error:
            store.note_damage(file.image_id, error.problem)
        else:
            written.append(file.name)
        if on_image is not None:
            on_image(file.image_id)
    return ExportedLabels(written, sorted(image_id for image_id, record in records.items()
                                          if record.get("status") != DONE))


# Names that say a file: `export --labels --out cells.csv` is a table meant, not a folder of images.
FILE_SUFFIXES = frozenset({".csv", ".tsv", ".parquet", ".pq", ".xlsx", ".json", ".txt", ".tif", ".tiff", ".png",
                           ".jpg", ".jpeg", ".zip"})


def check_output_folder(url: str, storage_options: StorageOptions = None) -> tuple[Any, str]:
    """(filesystem, path) of a folder to write files into; OutputError when it is no name, a file,
    below a file, inside a zarr store or in a bucket that does not exist."""
    if not url.strip():
        raise OutputError("the output folder name is empty: name a folder to write the label images into")
    fs, path = output_place(url, storage_options, "write into")
    if fs.isfile(path):
        raise OutputError(f"'{url}' is a file: name a folder to write the label images into")
    suffix = posixpath.splitext(path.rstrip("/"))[1].lower()
    if suffix in FILE_SUFFIXES and not fs.isdir(path):
        raise OutputError(f"'{url}' is named like a {suffix} file, but the label images go into a folder, one file per "
                          f"image: name a folder ('{url.rstrip('/')[:-len(suffix)]}/'), or export a table without "
                          "--labels")
    if store := enclosing_zarr_store(fs, posixpath.join(path, "labels")):
        raise OutputError(f"'{url}' is inside the zarr store '{store}', which it would damage: write it elsewhere")
    return fs, path


def _label_file(image_id: str, record: dict[str, Any], kind: str, file_format: str) -> LabelFile:
    shape = record.get("shape")
    shape = (int(shape[0]), int(shape[1])) if isinstance(shape, list) and len(shape) == 2 else (0, 0)
    # A record edited by hand may hold anything where these objects belong: then they are not known.
    statistics, source = (value if isinstance(value := record.get(key), dict) else {} for key in ("statistics", "source"))
    count, pixel = statistics.get("cell_count"), source.get("pixel_size_yx_um")
    pixel_size = None
    if isinstance(pixel, list) and len(pixel) == 2 and all(isinstance(v, int | float) and v > 0 for v in pixel):
        pixel_size = (float(pixel[0]), float(pixel[1]))
    return LabelFile(image_id, label_file_name(image_id, kind, file_format), shape,
                     count if isinstance(count, int) else None, pixel_size)


def _refuse_what_png_cannot_hold(files: Sequence[LabelFile], kind: str, file_format: str,
                                 whole_image_pixels: int) -> None:
    if file_format != "png":
        return
    for file in files:
        if file.shape[0] * file.shape[1] > whole_image_pixels:
            raise _too_large_for_png(file.image_id, file.shape, whole_image_pixels)
        if kind == "cells" and (file.cell_count or 0) > UINT16_LABELS:
            raise OutputError(f"image '{file.image_id}' has {file.cell_count:,} cells, more than a 16-bit PNG "
                              f"numbers ({UINT16_LABELS:,}): use --format tiff")


def _too_large_for_png(image_id: str, shape: tuple[int, ...], whole_image_pixels: int) -> OutputError:
    return OutputError(f"image '{image_id}' is {shape[0]}x{shape[1]} pixels, more than a PNG is written from "
                       f"({whole_image_pixels:,}): use --format tiff, written tile by tile")


def _refuse_replacing(fs: Any, folder: str, url: str, names: Sequence[str], overwrite: bool) -> None:
    if overwrite or not fs.isdir(folder):
        return
    present = {posixpath.basename(entry.rstrip("/")) for entry in fs.ls(folder, detail=False)}
    if existing := [name for name in names if name in present]:
        shown = ", ".join(f"'{name}'" for name in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise OutputError(f"{len(existing)} of the {len(names)} label files are already in '{url}' ({shown}): "
                          f"pass --overwrite to replace them")


def _write_label_file(store: ResultStore, file: LabelFile, record: dict[str, Any], kind: str, file_format: str,
                      url: str, storage_options: StorageOptions, whole_image_pixels: int) -> None:
    array = store.array(file.image_id, CELLS_PATH if kind == "cells" else MASK_PATH, record)  # the record read once
    if array is not None and (array.ndim != 2 or file.shape not in ((0, 0), array.shape)):
        raise DamagedImage(store.url, file.image_id, f"its {kind} array is {'x'.join(map(str, array.shape))}, "
                                                     f"its record says {file.shape[0]}x{file.shape[1]}")
    fs, path = filesystem(url, storage_options)
    try:
        if array is not None and array.shape[0] * array.shape[1] > whole_image_pixels:
            if file_format == "png":  # a store written before records had shapes: not checked beforehand
                raise _too_large_for_png(file.image_id, array.shape, whole_image_pixels)
            _write_tiled_tiff(store, file, kind, array, fs, path)
            return
        if array is None:  # written before cell labels were stored: numbered from the mask
            data = store.read_cells(file.image_id)
        else:
            data = store.array_data(file.image_id, CELLS_PATH if kind == "cells" else MASK_PATH, array)
        encoded = _encoded(_labels(store, file, kind, data, _dtype(kind, int(data.max(initial=0)))), file, file_format)
        if isinstance(fs, LocalFileSystem):
            write_file_atomic(os.path.realpath(path), encoded)
        else:
            write_bytes(url, encoded, storage_options)  # one PUT: whole or nothing
    except OSError as error:
        raise write_failure(url, error) from error


def _dtype(kind: str, largest_label: int | None) -> type[np.unsignedinteger[Any]]:
    if kind == "mask":
        return np.uint8
    return np.uint16 if largest_label is not None and largest_label <= UINT16_LABELS else np.uint32


def _labels(store: ResultStore, file: LabelFile, kind: str, data: np.ndarray, dtype: type) -> np.ndarray:
    """`data` as the file's pixels; DamagedImage when its labels do not fit what its record says."""
    if kind == "mask":
        return np.where(data > 0, np.uint8(255), np.uint8(0))
    if data.size and (int(data.min()) < 0 or int(data.max()) > np.iinfo(dtype).max):
        raise DamagedImage(store.url, file.image_id, f"its cell labels run from {int(data.min())} to "
                                                     f"{int(data.max())}, outside 0..{np.iinfo(dtype).max}")
    return data.astype(dtype, copy=False)


def _encoded(pixels: np.ndarray, file: LabelFile, file_format: str) -> bytes:
    buffer = io.BytesIO()
    if file_format == "png":
        picture = Image.fromarray(pixels if pixels.dtype == np.uint8 else pixels.astype(np.uint16))
        pixel_size = file.pixel_size_yx_um
        dpi = {"dpi": tuple(25400.0 / size for size in reversed(pixel_size))} if pixel_size else {}
        picture.save(buffer, format="PNG", **dpi)
    else:
        tifffile.imwrite(buffer, pixels, compression="zlib", **_resolution(file))
    return buffer.getvalue()


def _resolution(file: LabelFile) -> dict[str, Any]:
    """TIFF resolution tags from the pixel size: pixels per centimetre, the finest unit TIFF names."""
    if file.pixel_size_yx_um is None:
        return {}
    y_um, x_um = file.pixel_size_yx_um
    return {"resolution": (1e4 / x_um, 1e4 / y_um), "resolutionunit": "CENTIMETER"}


def _write_tiled_tiff(store: ResultStore, file: LabelFile, kind: str, array: zarr.Array, fs: Any, path: str) -> None:
    """A large image's labels read tile by tile into a tiled TIFF: a temporary file renamed into
    place (local), or uploaded once complete (object storage)."""
    height, width = array.shape
    tile = tuple(side if side % 16 == 0 and side <= 4 * TILE_SIDE else TILE_SIDE for side in array.chunks)
    dtype = _dtype(kind, file.cell_count)
    what = CELLS_PATH if kind == "cells" else MASK_PATH

    def tiles() -> Iterator[np.ndarray]:
        for top in range(0, height, tile[0]):
            for left in range(0, width, tile[1]):
                try:
                    region = np.asarray(array[top:top + tile[0], left:left + tile[1]])
                except CHUNK_ERRORS as error:
                    raise DamagedImage(store.url, file.image_id, f"its {'cell labels' if kind == 'cells' else kind} "
                                                                 f"'{file.image_id}/{what}' has a chunk "
                                                                 f"that cannot be decoded ({describe(error)})",
                                       undecodable=True) from error
                yield _labels(store, file, kind, region, dtype)

    def write(target: str) -> None:
        tifffile.imwrite(target, tiles(), shape=(height, width), dtype=dtype, tile=tile, compression="zlib",
                         bigtiff=height * width * np.dtype(dtype).itemsize > BIGTIFF_BYTES, **_resolution(file))

    if isinstance(fs, LocalFileSystem):
        with file_replaced_atomically(os.path.realpath(path)) as temporary:
            write(temporary)
        return
    with tempfile.TemporaryDirectory(prefix="cellseg-labels-") as scratch:
        local = os.path.join(scratch, file.name)
        write(local)
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.put_file(local, path)

