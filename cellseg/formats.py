"""Microscopy formats: one 2-D plane of a multi-dimensional file, chosen by a SelectionConfig and
read region by region.

- OME-TIFF and plain (Big)TIFF: tifffile, tile by tile through its zarr view (tifffile also
  parses the OME-XML: channel names, physical pixel size). No extra needed (`formats_tiff`).
- OME-Zarr (local or any fsspec URL), CZI, ND2, LIF: bioio with its reader plugin, from the
  `formats` extra; without it, one line naming the extra and the file (`formats_zarr`, `formats_bioio`).
- A bare zarr array (no NGFF metadata): zarr; its `dimension_names` say which axis is which (`formats_zarr`).
- PNG/JPEG: decoded whole by `cellseg.io` (one plane, no pixel size).

`open_plane` is lazy: `plane[y0:y1, x0:x1]` reads only the tiles or chunks of that region (the
block-wise path reads huge images this way). `read_plane` reads a whole plane, bounded by
max_pixels before anything is decoded (the batch path). Time points are addressed as
`<url>#t=<index>` (`time_point_url`), which `list_sources` makes for `t='all'`.
"""

from __future__ import annotations

import io
import logging
import posixpath
from dataclasses import replace
from math import prod
from typing import Any

import numpy as np
import tifffile
import zarr

from cellseg.config import SelectionConfig
from cellseg.formats_bioio import BIOIO_PLUGINS, open_bioio
from cellseg.formats_plane import Plane, array_plane, pixel_sizes
from cellseg.formats_tiff import imagej_pixel_size, open_tiff_plane
from cellseg.formats_zarr import open_zarr, zarr_storage_options
from cellseg.io import (
    DEFAULT_MAX_PIXELS,
    MAX_BYTES_PER_PIXEL,
    ImageReadError,
    StorageOptions,
    _check_pixel_limit,
    decode_image,
    filesystem,
    float_pixel_problem,
    list_image_entries,
    masks_beside_images,
    read_colour_image,
    read_image,
    read_image_bytes,
)
from cellseg.plates import is_plate, plate_fields, split_time_point, time_point_url
from cellseg.redact import redact_url
from cellseg.source_record import source_record
from cellseg.zarr_stores import bounded_store

logger = logging.getLogger(__name__)

OME_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff")
TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIX = ".zarr"  # .ome.zarr too
VENDOR_SUFFIXES = tuple(BIOIO_PLUGINS)
MICROSCOPY_SUFFIXES = (*OME_TIFF_SUFFIXES, *VENDOR_SUFFIXES)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def open_plane(url: str, selection: SelectionConfig, storage_options: StorageOptions = None) -> Plane:
    """The plane of `url` that `selection` chooses, opened lazily (see the module docstring for
    the formats), in a sample type the pipeline takes (`widened_plane`). A `<url>#t=N` time point
    overrides `selection.t`. Raises ImageReadError (one line naming the file and, for a bad choice,
    the choices it has) and MissingReaderError when the reader for the format is not installed."""
    return widened_plane(_opened_plane(url, selection, storage_options))


def widened_plane(plane: Plane) -> Plane:
    """`plane` read as float32 where it holds float16, as float64 where it holds 64-bit integers
    (a region read lazily cannot say whether every value fits 32 bits); as it is otherwise. The
    block path's image copy and normalisation took neither."""
    wider = _wider_samples(plane.dtype)
    if wider is None:
        return plane
    read = plane.read_region
    return replace(plane, dtype=wider, read_region=lambda rows, columns: read(rows, columns).astype(wider))


def _opened_plane(url: str, selection: SelectionConfig, storage_options: StorageOptions = None) -> Plane:
    base, time_point = split_time_point(url)
    lower = base.rstrip("/").lower()
    if is_zarr_url(base):
        return open_zarr(base, selection, time_point, storage_options)
    if lower.endswith(VENDOR_SUFFIXES):
        return open_bioio(base, BIOIO_PLUGINS[posixpath.splitext(lower)[1]], selection, time_point, storage_options)
    if lower.endswith(TIFF_SUFFIXES):
        fs, path = filesystem(base, storage_options)
        try:
            handle = fs.open(path, "rb")
        except FileNotFoundError as error:
            raise ImageReadError(f"'{base}': file not found") from error
        return open_tiff_plane(handle, base, selection, time_point, None, handle.close)
    image = (read_image if selection.channel is None else read_colour_image)(base, storage_options)
    return array_plane(image, base, selection, time_point, "image")


def read_plane(
    url: str, selection: SelectionConfig, storage_options: StorageOptions = None, max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Plane:
    """`open_plane`, with the whole plane read into memory (`Plane.read` returns it without reading
    again), refused before decoding when it has more than `max_pixels` pixels. A TIFF is read
    whole into memory, bounded as `cellseg.io.read_image` bounds it, and every page it uses passes
    the same checks (sample types, compressions, decompression bombs)."""
    base, time_point = split_time_point(url)
    decoded = False  # whether `cellseg.io` decoded the pixels, refusing NaN or infinite ones
    if base.rstrip("/").lower().endswith(TIFF_SUFFIXES) and not is_zarr_url(base):
        data = read_image_bytes(base, storage_options, max_pixels)
        plane = open_tiff_plane(io.BytesIO(data), base, selection, time_point, (data, max_pixels))
    elif is_microscopy_url(base):
        plane = open_plane(url, selection, storage_options)
    else:
        notes: list[str] = []
        read = read_image if selection.channel is None else read_colour_image
        plane = array_plane(read(base, storage_options, max_pixels, notes), base, selection, time_point, "image")
        plane.warnings.extend(notes)
        decoded = True
    try:
        _check_pixel_limit(url, prod(plane.shape), max_pixels)
        if plane.chunk_bytes > max_pixels * MAX_BYTES_PER_PIXEL:
            raise ImageReadError(f"'{url}': one chunk decodes to {plane.chunk_bytes} bytes, over the limit of "
                                 f"{max_pixels * MAX_BYTES_PER_PIXEL} (max_pixels x {MAX_BYTES_PER_PIXEL}; raise "
                                 "max_pixels to allow it)")
        pixels = plane.read()
    finally:
        plane.close()
    if not decoded and (problem := float_pixel_problem(pixels)):
        raise ImageReadError(f"'{redact_url(url)}': {problem}")
    return Plane(plane.shape, pixels.dtype, plane.pixel_size_um, plane.selection,
                 lambda rows, columns: pixels[rows, columns], plane.pixel_size_yx_um, plane.warnings)


def read_source(
    url: str, selection: SelectionConfig, storage_options: StorageOptions = None,
    max_pixels: int = DEFAULT_MAX_PIXELS, warnings: list[str] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One image to segment, (H, W), and what its record keeps about where it came from: the
    selection made and the pixel size. A PNG/TIFF/JPEG with the default selection takes
    `cellseg.io.read_image`'s path (bioio is never imported for it) and records only the pixel
    size of an ImageJ/Fiji TIFF ({} for any other); any other choice is checked against the file's planes (a plain TIFF stack's
    pages are its z planes)."""
    if not is_microscopy_url(url) and selection.model_copy(update={"recursive": False}) == SelectionConfig():
        image, source = _plain_image(url, storage_options, max_pixels, warnings)
        return widened_or_narrowed(image), source
    plane = read_plane(url, selection, storage_options, max_pixels)
    if warnings is not None:
        warnings.extend(plane.warnings)
    return widened_or_narrowed(plane.read()), source_record(plane)


def widened_or_narrowed(image: np.ndarray) -> np.ndarray:
    """`image` in a sample type the pipeline and the store's image copy take: float16 as float32,
    64-bit integers as 32-bit ones where every value fits (else float64); others as they are.
    float16 stopped OpenCV's normalisation, int64 the image copy, each with an error naming no file."""
    wider = _wider_samples(image.dtype)
    if wider is None:
        return image
    if image.dtype.kind in "iu":  # all values at hand: 32 bits where they fit
        narrow = np.dtype(f"{image.dtype.kind}4")
        if image.size == 0 or (np.iinfo(narrow).min <= image.min() and image.max() <= np.iinfo(narrow).max):
            return image.astype(narrow)
    return image.astype(wider)


def _wider_samples(dtype: np.dtype[Any]) -> np.dtype[Any] | None:
    """The sample type the pipeline reads `dtype` as: float16 as float32, 64-bit integers as
    float64; None for the types it takes as they are."""
    if dtype == np.float16:
        return np.dtype(np.float32)
    if dtype.kind in "iu" and dtype.itemsize == 8:
        return np.dtype(np.float64)
    return None


def _plain_image(url: str, storage_options: StorageOptions, max_pixels: int, warnings: list[str] | None
                 ) -> tuple[np.ndarray, dict[str, Any]]:
    """A PNG/TIFF/JPEG read by `cellseg.io.decode_image`, and what its record keeps: the pixel size
    of a TIFF that ImageJ or Fiji calibrated ({} for any other). A TIFF whose axes name several
    channels or time points (an ImageJ hyperstack, tifffile's shaped metadata) is refused with its
    choices as an OME-TIFF is: its first page is one channel of one time point, chosen by nobody."""
    data = read_image_bytes(url, storage_options, max_pixels)
    source: dict[str, Any] = {}
    if data[:4] in _TIFF_MAGIC:
        several_planes, physical = _tiff_header(data, url)
        if several_planes:
            with open_tiff_plane(io.BytesIO(data), url, SelectionConfig(), None, (data, max_pixels)):
                pass
        pixel_size, yx, notes = pixel_sizes(*physical)
        if pixel_size is not None and yx is not None:
            source = {"pixel_size_um": pixel_size, "pixel_size_yx_um": list(yx)}
            if warnings is not None:
                warnings.extend(notes)
    return decode_image(data, url, max_pixels, warnings), source


def _tiff_header(data: bytes, url: str) -> tuple[bool, tuple[float | None, float | None]]:
    """Of a TIFF that is not an OME-TIFF (which says how to name it instead: cellseg.io): whether
    its first series has a channel (C) or time (T) axis of more than one plane, and its ImageJ
    calibration's (y, x) pixel size in µm."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if tif.is_ome:
                return False, (None, None)
            series = tif.series[0]
            shape = dict(zip(series.axes.upper(), series.shape, strict=True))
            return shape.get("C", 1) > 1 or shape.get("T", 1) > 1, imagej_pixel_size(tif, url)
    except Exception:  # noqa: BLE001 - a malformed file: decode_image names its problem
        return False, (None, None)


def list_sources(url: str, selection: SelectionConfig, storage_options: StorageOptions = None) -> list[str]:
    """The images under the directory `url`, sorted: its PNG/TIFF/JPEG, OME-TIFF and CZI/ND2/LIF
    files; each `.zarr` folder as one OME-Zarr image (never a folder to recurse into) or, for an
    HCS plate, each field of each well (`cellseg.plates`); a cellseg results store among them is
    skipped. With `selection.t == 'all'`, a file with several time points is listed once per
    time point (`<url>#t=<t>`). Masks kept beside their images (Cellpose's `img01_masks.tif` beside
    `img01.tif`) are listed too, with one warning saying so. With `selection.recursive`, the
    subfolders' images too (`cellseg.io.list_image_entries`; their ids: `cellseg.plates.image_id`)."""
    entries = list_image_entries(url, storage_options, microscopy=True, recursive=selection.recursive)
    _warn_of_masks_beside_images(url, [entry.url for entry in entries])
    sources: list[str] = []
    for entry in entries:
        sources += _zarr_sources(entry.url, storage_options) if is_zarr_url(entry.url) else [entry.url]
    if selection.t == "all":
        sources = [address for source in sources for address in _time_points(source, storage_options)]
    return sources


def _warn_of_masks_beside_images(url: str, listed: list[str]) -> None:
    """One warning for the files of a folder named like the masks of images beside them: they
    are segmented as images too, which in a folder laid out as Cellpose's is a mistake."""
    masks = masks_beside_images(listed)
    if not masks:
        return
    example = posixpath.basename(masks[0]) + (", …" if len(masks) > 1 else "")
    many = len(masks) > 1
    logger.warning("%d %s under '%s' %s named like %s (%s): %s segmented as %s too; keep masks in a folder of "
                   "their own", len(masks), "files" if many else "file", redact_url(url), "are" if many else "is",
                   "masks" if many else "a mask", example, "they are" if many else "it is",
                   "images" if many else "an image")


def _zarr_sources(url: str, storage_options: StorageOptions) -> list[str]:
    """The images of one `.zarr` folder: itself, or the fields of a plate; none for a results store."""
    try:
        group = zarr.open_group(bounded_store(url, "r", zarr_storage_options(storage_options), input_image=True), mode="r")
        attributes = dict(group.attrs)
    except Exception:  # noqa: BLE001 - not a group (an array, or no zarr at all): read_source says what it is
        return [url]
    if "cellseg" in attributes:
        logger.warning("skipping '%s' in the source folder: it is a cellseg results store", redact_url(url))
        return []
    if not is_plate(group):
        return [url]
    try:
        return plate_fields(group, url)
    except ValueError as error:
        logger.warning("skipping the plate '%s': %s", redact_url(url), error)
        return []


def _time_points(url: str, storage_options: StorageOptions) -> list[str]:
    """`url` once per time point when it has several, else `url` (an unreadable file too: reading
    it records why)."""
    if not reads_region_by_region(url):
        return [url]  # PNG and JPEG have one time point
    try:
        with open_plane(url, SelectionConfig(channel=0, z=0, t=0), storage_options) as plane:
            count = int(plane.selection["sizes"]["T"])
    except ImageReadError:
        return [url]
    return [time_point_url(url, t) for t in range(count)] if count > 1 else [url]


# Addresses ---------------------------------------------------------------------------------------


def is_zarr_url(url: str) -> bool:
    """Whether `url` is a zarr store or a node inside one (a path component ending in .zarr)."""
    return any(part.lower().endswith(ZARR_SUFFIX) for part in url.rstrip("/").split("/"))


def is_microscopy_url(url: str) -> bool:
    """Whether `url` is read by this module rather than as a plain PNG/TIFF/JPEG."""
    return is_zarr_url(url) or url.rstrip("/").lower().endswith(MICROSCOPY_SUFFIXES)


def reads_region_by_region(url: str) -> bool:
    """Whether `open_plane` reads `url`, or the time point `<url>#t=N` of it, region by region (a
    TIFF, an OME-Zarr image or zarr array, a CZI/ND2/LIF file) rather than decoding it whole (a
    PNG or JPEG)."""
    base, _ = split_time_point(url)
    return is_microscopy_url(base) or base.rstrip("/").lower().endswith(TIFF_SUFFIXES)
