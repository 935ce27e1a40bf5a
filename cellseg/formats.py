"""Microscopy formats: one 2-D plane of a multi-dimensional file, chosen by a SelectionConfig and
read region by region.

- OME-TIFF and plain (Big)TIFF: tifffile, tile by tile through its zarr view (tifffile also
  parses the OME-XML: channel names, physical pixel size). No extra needed.
- OME-Zarr (local or any fsspec URL), CZI, ND2, LIF: bioio with its reader plugin, from the
  `formats` extra; without it, one line naming the extra and the file.
- A bare zarr array (no NGFF metadata): zarr; its `dimension_names` say which axis is which.
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
import unicodedata
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from math import prod
from typing import Any, cast

import numpy as np
import tifffile
import zarr

from cellseg.config import SelectionConfig
from cellseg.io import (
    DEFAULT_MAX_PIXELS,
    MAX_BYTES_PER_PIXEL,
    ImageReadError,
    StorageOptions,
    _check_pixel_limit,
    _check_tiff_page,
    _luma,
    decode_image,
    filesystem,
    float_pixel_problem,
    list_image_entries,
    masks_beside_images,
    read_colour_image,
    read_image,
    read_image_bytes,
)
from cellseg.plates import plate_fields, split_time_point, time_point_url
from cellseg.redact import redact_url

logger = logging.getLogger(__name__)

FORMATS_EXTRA = "pip install 'cellseg[formats]'"
OME_TIFF_SUFFIXES = (".ome.tif", ".ome.tiff")
TIFF_SUFFIXES = (".tif", ".tiff")
ZARR_SUFFIX = ".zarr"  # .ome.zarr too
# The bioio reader plugin (its distribution and entry point name) of each vendor file suffix.
BIOIO_PLUGINS = {".czi": "bioio-czi", ".nd2": "bioio-nd2", ".lif": "bioio-lif"}
OME_ZARR_PLUGIN = "bioio-ome-zarr"
VENDOR_SUFFIXES = tuple(BIOIO_PLUGINS)
MICROSCOPY_SUFFIXES = (*OME_TIFF_SUFFIXES, *VENDOR_SUFFIXES)
MAX_PLANES = 1_000_000  # channels x z x t a file's metadata may declare before it is refused
# Keys in NFKC form (`_unit_um`): the micro sign (U+00B5) and the Greek mu (U+03BC) that writers
# use for it are one letter there, as are the angstrom sign (U+212B) and Å (U+00C5); lower case.
_UNITS_UM = {"μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
             "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "pm": 1e-6, "picometer": 1e-6,
             "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6,
             "meter": 1e6, "metre": 1e6, "å": 1e-4, "angstrom": 1e-4}
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


class MissingReaderError(ImageReadError):
    """A file whose reader (bioio or one of its plugins) is not installed."""


@dataclass
class Plane:
    """One 2-D (H, W) plane of an image file, read region by region.

    `plane[y0:y1, x0:x1]` returns that region as a numpy array of `dtype`, reading only the
    tiles or chunks it covers (a maximum projection reads them on every z plane).
    `pixel_size_um` is the physical size of a pixel (the geometric mean of y and x when they
    differ; `pixel_size_yx_um` keeps both), None when the file does not say. `selection`
    records what was chosen (format, channel index and name, z, t, the file's sizes).
    """

    shape: tuple[int, int]
    dtype: np.dtype
    pixel_size_um: float | None
    selection: dict[str, Any]
    read_region: Callable[[slice, slice], np.ndarray] = field(repr=False)
    pixel_size_yx_um: tuple[float, float] | None = None
    warnings: list[str] = field(default_factory=list)
    close: Callable[[], None] = field(default=lambda: None, repr=False)
    chunk_bytes: int = 0  # decoded bytes of the largest chunk or tile a read decodes at once; 0: checked elsewhere

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(part, slice) for part in key)):
            raise TypeError(f"a Plane is read by 2-D slices, plane[y0:y1, x0:x1]; got {key!r}")
        rows, columns = (slice(*part.indices(side)) for part, side in zip(key, self.shape, strict=True))
        if rows.step != 1 or columns.step != 1:
            raise ValueError("a Plane is read by contiguous slices (step 1)")
        return np.asarray(self.read_region(rows, columns))

    def read(self) -> np.ndarray:
        """The whole (H, W) plane."""
        return self[:, :]

    def __enter__(self) -> Plane:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def open_plane(url: str, selection: SelectionConfig, storage_options: StorageOptions = None) -> Plane:
    """The plane of `url` that `selection` chooses, opened lazily (see the module docstring for
    the formats). A `<url>#t=N` time point overrides `selection.t`. Raises ImageReadError (one
    line naming the file and, for a bad choice, the choices it has) and MissingReaderError when
    the reader for the format is not installed."""
    base, time_point = split_time_point(url)
    lower = base.rstrip("/").lower()
    if is_zarr_url(base):
        return _open_zarr(base, selection, time_point, storage_options)
    if lower.endswith(VENDOR_SUFFIXES):
        return _open_bioio(base, BIOIO_PLUGINS[posixpath.splitext(lower)[1]], selection, time_point, storage_options)
    if lower.endswith(TIFF_SUFFIXES):
        fs, path = filesystem(base, storage_options)
        try:
            handle = fs.open(path, "rb")
        except FileNotFoundError as error:
            raise ImageReadError(f"'{base}': file not found") from error
        try:
            return _tiff_plane(tifffile.TiffFile(handle), base, selection, time_point, None, handle.close)
        except Exception as error:
            handle.close()
            if isinstance(error, ImageReadError):
                raise
            raise ImageReadError(f"'{base}': not a readable TIFF ({_one_line(error)})") from error
    image = (read_image if selection.channel is None else read_colour_image)(base, storage_options)
    return _array_plane(image, base, selection, time_point, "image")


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
        try:
            plane = _tiff_plane(tifffile.TiffFile(io.BytesIO(data)), base, selection, time_point, (data, max_pixels))
        except ImageReadError:
            raise
        except Exception as error:  # tifffile raises many types on malformed input
            raise ImageReadError(f"'{base}': not a readable TIFF ({_one_line(error)})") from error
    elif is_microscopy_url(base):
        plane = open_plane(url, selection, storage_options)
    else:
        notes: list[str] = []
        read = read_image if selection.channel is None else read_colour_image
        plane = _array_plane(read(base, storage_options, max_pixels, notes), base, selection, time_point, "image")
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
    selection made and the pixel size ({} for a PNG/TIFF/JPEG read as before). A PNG/TIFF/JPEG
    with the default selection takes `cellseg.io.read_image`'s path unchanged (bioio is never
    imported for it); any other choice is checked against the file's planes (a plain TIFF stack's
    pages are its z planes)."""
    if not is_microscopy_url(url) and selection == SelectionConfig():
        return _plain_image(url, storage_options, max_pixels, warnings), {}
    plane = read_plane(url, selection, storage_options, max_pixels)
    if warnings is not None:
        warnings.extend(plane.warnings)
    return plane.read(), source_record(plane)


def _plain_image(url: str, storage_options: StorageOptions, max_pixels: int, warnings: list[str] | None) -> np.ndarray:
    """A PNG/TIFF/JPEG read by `cellseg.io.decode_image`, except a TIFF whose axes name several
    channels or time points (an ImageJ hyperstack, tifffile's shaped metadata): its first page is
    one channel of one time point, chosen by nobody, so it is refused with its choices as an
    OME-TIFF is."""
    data = read_image_bytes(url, storage_options, max_pixels)
    if data[:4] in _TIFF_MAGIC and _names_channels_or_time(data):
        try:
            with _tiff_plane(tifffile.TiffFile(io.BytesIO(data)), url, SelectionConfig(), None, (data, max_pixels)):
                pass
        except ImageReadError:
            raise
        except Exception as error:  # tifffile raises many types on malformed input
            raise ImageReadError(f"'{url}': not a readable TIFF ({_one_line(error)})") from error
    return decode_image(data, url, max_pixels, warnings)


def _names_channels_or_time(data: bytes) -> bool:
    """Whether a TIFF that is not an OME-TIFF (which says how to name it instead: cellseg.io) has a
    channel (C) or time (T) axis of more than one plane in its first series."""
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if tif.is_ome:
                return False
            series = tif.series[0]
            shape = dict(zip(series.axes.upper(), series.shape, strict=True))
    except Exception:  # noqa: BLE001 - a malformed file: decode_image names its problem
        return False
    return shape.get("C", 1) > 1 or shape.get("T", 1) > 1


def source_record(plane: Plane) -> dict[str, Any]:
    """What a result records about its plane: the selection and the pixel size in µm, both
    `pixel_size_um` and `pixel_size_yx_um` None when the file gives none."""
    yx = None if plane.pixel_size_yx_um is None else list(plane.pixel_size_yx_um)
    return {"selection": plane.selection, "pixel_size_um": plane.pixel_size_um, "pixel_size_yx_um": yx}


def cell_diameter_pixels(diameter_um: float | None, source: dict[str, Any], url: str) -> float | None:
    """A cell diameter given in µm (`PredictConfig.cell_diameter_um`) in pixels of one image;
    ImageReadError when the image has no pixel size to convert it with."""
    if diameter_um is None:
        return None
    pixel_size = source.get("pixel_size_um")
    if not pixel_size:
        raise ImageReadError(f"'{url}': its metadata gives no pixel size, so a cell diameter in µm "
                             f"({diameter_um:g}) cannot be converted to pixels; give --cell-diameter in pixels")
    return float(diameter_um) / float(pixel_size)


def with_area_um2(columns: Sequence[str], rows: np.ndarray, source: dict[str, Any]) -> tuple[tuple[str, ...], np.ndarray]:
    """A per-cell table with `area_um2` (area x pixel height x pixel width) after `area`, when the
    image has a pixel size; the table as it is otherwise."""
    size = source.get("pixel_size_yx_um")
    if not size or "area" not in columns:
        return tuple(columns), rows
    at = list(columns).index("area") + 1
    area_um2 = rows[:, at - 1] * float(size[0]) * float(size[1])
    return (*columns[:at], "area_um2", *columns[at:]), np.insert(rows, at, area_um2, axis=1)


def list_sources(url: str, selection: SelectionConfig, storage_options: StorageOptions = None) -> list[str]:
    """The images under the directory `url`, sorted: its PNG/TIFF/JPEG, OME-TIFF and CZI/ND2/LIF
    files; each `.zarr` folder as one OME-Zarr image (never a folder to recurse into) or, for an
    HCS plate, each field of each well (`cellseg.plates`); a cellseg results store among them is
    skipped. With `selection.t == 'all'`, a file with several time points is listed once per
    time point (`<url>#t=<t>`). Masks kept beside their images (Cellpose's `img01_masks.tif` beside
    `img01.tif`) are listed too, with one warning saying so."""
    entries = list_image_entries(url, storage_options, microscopy=True)
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
        group = zarr.open_group(url, mode="r", storage_options=dict(storage_options) if storage_options else None)
        attributes = dict(group.attrs)
    except Exception:  # noqa: BLE001 - not a group (an array, or no zarr at all): read_source says what it is
        return [url]
    if "cellseg" in attributes:
        logger.warning("skipping '%s' in the source folder: it is a cellseg results store", redact_url(url))
        return []
    ome = attributes.get("ome", attributes)
    if not (isinstance(ome, dict) and isinstance(ome.get("plate"), dict)):
        return [url]
    try:
        return plate_fields(group, url)
    except ValueError as error:
        logger.warning("skipping the plate '%s': %s", redact_url(url), error)
        return []


def _time_points(url: str, storage_options: StorageOptions) -> list[str]:
    """`url` once per time point when it has several, else `url` (an unreadable file too: reading
    it records why)."""
    if not (is_microscopy_url(url) or url.lower().endswith(TIFF_SUFFIXES)):
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


# Choosing the plane ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Choice:
    t: int
    channel: int
    z: int | None  # None: maximum projection
    record: dict[str, Any]


def _choose(url: str, sizes: dict[str, int], channel_names: Sequence[str], selection: SelectionConfig,
            time_point: int | None, kind: str) -> _Choice:
    """Resolve `selection` against a file's sizes (T, C, Z) and channel names; ImageReadError
    names the file and its choices when a choice does not fit or is missing."""
    n_t, n_c, n_z = sizes.get("T", 1), sizes.get("C", 1), sizes.get("Z", 1)
    if n_t * n_c * n_z > MAX_PLANES:
        raise ImageReadError(f"'{url}': {n_t} time points x {n_c} channels x {n_z} z planes is more than "
                             f"{MAX_PLANES} planes")
    names = [str(name) for name in channel_names] if len(channel_names) == n_c else [str(i) for i in range(n_c)]
    listed = ", ".join(f"{i} {name!r}" for i, name in enumerate(names[:32])) + (" ..." if n_c > 32 else "")
    channel = selection.channel
    if channel is None:
        if n_c > 1:
            raise ImageReadError(f"'{url}' has {n_c} channels ({listed}): choose one with --channel INDEX or NAME")
        channel = 0
    elif isinstance(channel, str):
        if channel not in names:
            raise ImageReadError(f"'{url}': no channel named {channel!r}; its channels are {listed}")
        channel = names.index(channel)
    elif channel >= n_c:
        raise ImageReadError(f"'{url}': channel {channel} is out of range; its channels are {listed}")
    z = selection.z
    if z is None:
        if n_z > 1:
            raise ImageReadError(f"'{url}' has {n_z} z planes: choose one with --z 0..{n_z - 1} or project with --z max")
        z = 0
    elif z != "max" and z >= n_z:
        raise ImageReadError(f"'{url}': z {z} is out of range; it has {n_z} z plane{'s' * (n_z != 1)} "
                             f"(--z 0..{n_z - 1} or --z max)")
    t = selection.t if time_point is None else time_point
    if t is None or t == "all":
        if n_t > 1 and t is None:
            raise ImageReadError(f"'{url}' has {n_t} time points: choose one with --t 0..{n_t - 1} or every one "
                                 "with --t all")
        if n_t > 1:
            raise ImageReadError(f"'{url}' has {n_t} time points: list it with cellseg.formats.list_sources to "
                                 "address each one")
        t = 0
    elif t >= n_t:
        raise ImageReadError(f"'{url}': time point {t} is out of range; it has {n_t} (--t 0..{n_t - 1} or --t all)")
    record = {"format": kind, "channel": channel, "channel_name": names[channel], "z": z, "t": t,
              "sizes": {"T": n_t, "C": n_c, "Z": n_z}}
    return _Choice(t, channel, None if z == "max" else z, record)


def _project(read_z: Callable[[int], np.ndarray], choice: _Choice, n_z: int) -> np.ndarray:
    """The chosen z plane, or the maximum over z read one plane at a time (memory: two planes)."""
    if choice.z is not None:
        return read_z(choice.z)
    result = np.array(read_z(0))
    for z in range(1, n_z):
        np.maximum(result, read_z(z), out=result)
    return result


def _pixel_size(y: float | None, x: float | None) -> tuple[float | None, tuple[float, float] | None, list[str]]:
    """(pixel size, (y, x) sizes, notes) from physical sizes in µm; a missing or unusable size is None."""
    usable = [size for size in (y, x) if size is not None and np.isfinite(size) and 0 < size < 1e6]
    if not usable:
        return None, None, []
    sy, sx = (usable[0], usable[0]) if len(usable) == 1 else (float(usable[0]), float(usable[1]))
    notes = [] if abs(sy - sx) <= 0.01 * max(sy, sx) else [
        f"pixels are {sy:g} x {sx:g} µm (y x): areas in µm² use both, cell sizes their geometric mean"]
    return float(np.sqrt(sy * sx)), (sy, sx), notes


# TIFF ----------------------------------------------------------------------------------------------


def _tiff_plane(tif: tifffile.TiffFile, url: str, selection: SelectionConfig, time_point: int | None,
                checked: tuple[bytes, int] | None, close: Callable[[], None] | None = None) -> Plane:
    """A plane of series 0 of a TIFF, read through tifffile's zarr view. OME-XML (when present)
    names channels and pixel size; axes other than T, C (or samples S), Z, Y, X use index 0, except
    that `--z` addresses a plain stack's pages as z (`_stack_axis`).
    `checked`: (file bytes, max_pixels) to check every page as `cellseg.io` does before decoding;
    without it (lazy reads of huge files) inflating compressions are decoded by imagecodecs (a
    dependency), whose decoders stop at the size the header declares."""
    series = tif.series[0]
    axes = series.axes.upper()
    shape = dict(zip(axes, series.shape, strict=True))
    if "Y" not in shape or "X" not in shape:
        raise ImageReadError(f"'{url}': TIFF series with axes {series.axes} has no Y and X axes")
    channel_axis = "C" if "C" in shape else "S" if "S" in shape else None
    stack_axis = _stack_axis(axes, shape)
    z_axis = "Z" if "Z" in shape else stack_axis if selection.z is not None else None
    sizes = {"T": shape.get("T", 1), "C": shape[channel_axis] if channel_axis else 1,
             "Z": shape[z_axis] if z_axis else 1}
    names, physical = _ome_metadata(tif, url) if tif.is_ome else ([], _imagej_pixel_size(tif, url))
    samples_as_luma = channel_axis == "S" and selection.channel is None and sizes["C"] in (3, 4)
    if samples_as_luma:
        sizes["C"] = 1
    if channel_axis is None and stack_axis is not None and selection.channel not in (None, 0):
        planes = shape[stack_axis]
        raise ImageReadError(f"'{url}': no channel {selection.channel!r}: it has no channel axis, and its {planes} "
                             f"pages are read as z planes (--z 0..{planes - 1} picks one, --z max projects them)")
    choice = _choose(url, sizes, names, selection, time_point, "ome-tiff" if tif.is_ome else "tiff")
    pages = tif.pages
    if checked is not None:
        data, max_pixels = checked
        for index in range(len(pages)):
            _check_tiff_page(cast(tifffile.TiffPage, pages.get(index, cache=False, aspage=True)), data, url, max_pixels)
    else:
        _check_lazy_tiff(cast(tifffile.TiffPage, pages.get(0, aspage=True)), url)
    others = [axis for axis in axes if axis not in "TCSZYX" and axis != z_axis and shape[axis] > 1]
    notes = [_first_index_note(axis, shape[axis], axis == stack_axis) for axis in others]
    array = zarr.open_array(series.aszarr(level=0))  # read-only by nature; zarr refuses mode "r" for it

    def read_z(z: int, rows: slice, columns: slice) -> np.ndarray:
        index: list[Any] = []
        for axis in axes:
            if axis == "Y":
                index.append(rows)
            elif axis == "X":
                index.append(columns)
            elif axis == "T":
                index.append(choice.t)
            elif axis == z_axis:
                index.append(z)
            elif axis == channel_axis and not samples_as_luma:
                index.append(choice.channel)
            elif axis == channel_axis:
                index.append(slice(0, 3))
            else:
                index.append(0)
        region = np.asarray(array[tuple(index)])
        return _luma(_samples_last(region, axes)) if samples_as_luma else region

    def read_region(rows: slice, columns: slice) -> np.ndarray:
        return _project(lambda z: read_z(z, rows, columns), choice, sizes["Z"])

    pixel_size, yx, size_notes = _pixel_size(*physical)
    return Plane((shape["Y"], shape["X"]), np.dtype(series.dtype),
                 pixel_size, choice.record, read_region, yx, notes + size_notes, close or tif.close)


def _stack_axis(axes: str, shape: dict[str, int]) -> str | None:
    """The one unnamed axis of a plain stack with no Z axis (tifffile's I for a multi-page TIFF, Q
    for a shaped one such as `tifffile.imwrite` of (N, H, W)), which `--z` addresses as z; else None."""
    unnamed = [axis for axis in axes if axis not in "TCSZYX" and shape[axis] > 1]
    return unnamed[0] if "Z" not in shape and len(unnamed) == 1 and unnamed[0] in "IQ" else None


def _first_index_note(axis: str, size: int, is_stack: bool) -> str:
    """The warning for an axis read at index 0 only; a stack's pages say how `--z` reads the others."""
    hint = f": choose one with --z 0..{size - 1} or project with --z max" if is_stack else ""
    return f"uses index 0 of its {axis} axis ({size} planes){hint}"


def _samples_last(region: np.ndarray, axes: str) -> np.ndarray:
    """A region read with the sample axis kept (every other non-spatial axis indexed away), (H, W, S)."""
    kept = [axis for axis in axes if axis in "YXS"]
    return np.moveaxis(region, kept.index("S"), -1)[..., :3]


def _check_lazy_tiff(page: tifffile.TiffPage, url: str) -> None:
    """Refuse what lazy reads cannot bound: sample types and compressions cellseg does not decode."""
    from cellseg.io import TIFF_COMPRESSIONS, _tiff_name

    if page.dtype is None or page.dtype.kind not in "biuf":
        raise ImageReadError(f"'{url}': TIFF samples of {page.bitspersample} bits are not supported "
                             "(expected integers or floats)")
    if page.compression not in TIFF_COMPRESSIONS:
        raise ImageReadError(f"'{url}': TIFF compression {_tiff_name(page.compression)} is not supported")


def _ome_metadata(tif: tifffile.TiffFile, url: str) -> tuple[list[str], tuple[float | None, float | None]]:
    """(channel names, (y, x) pixel size in µm) of the first image of an OME-TIFF's OME-XML."""
    try:
        ome = tifffile.xml2dict(tif.ome_metadata or "").get("OME", {})
    except Exception as error:  # noqa: BLE001 - the pixels may still be usable; the metadata is not
        logger.warning("'%s': its OME-XML cannot be parsed (%s): no channel names or pixel size", redact_url(url), error)
        return [], (None, None)
    image = ome.get("Image", {})
    image = image[0] if isinstance(image, list) and image else image
    pixels = image.get("Pixels", {}) if isinstance(image, dict) else {}
    if not isinstance(pixels, dict):
        return [], (None, None)
    channels = pixels.get("Channel", [])
    channels = channels if isinstance(channels, list) else [channels]
    names = [str(channel.get("Name", channel.get("ID", i))) if isinstance(channel, dict) else str(i)
             for i, channel in enumerate(channels)]

    def size(axis: str) -> float | None:
        value, unit = pixels.get(f"PhysicalSize{axis}"), str(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
        if not isinstance(value, (int, float)):
            return None
        factor = _unit_um(unit)
        if factor is None:
            logger.warning("'%s': PhysicalSize%s is in %r, not a unit of length cellseg knows: no pixel size",
                           redact_url(url), axis, unit)
            return None
        return float(value) * factor

    return names, (size("Y"), size("X"))


def _imagej_pixel_size(tif: tifffile.TiffFile, url: str) -> tuple[float | None, float | None]:
    """(y, x) pixel size in µm of a TIFF written by ImageJ or Fiji: its calibration's `unit` (in its
    description, a µ written as the escape \\u00B5) and the first page's Y and X resolutions, in
    pixels per that unit; (None, None) for an uncalibrated file or any other TIFF."""
    metadata = tif.imagej_metadata if tif.is_imagej else None
    unit = str((metadata or {}).get("unit", "")).replace("\\u00B5", "µ").replace("\\u00b5", "µ")
    if not unit or unit.lower() in ("pixel", "pixels"):
        return None, None
    factor = _unit_um(unit)
    if factor is None:
        logger.warning("'%s': its ImageJ calibration is in %r, not a unit of length cellseg knows: no pixel size",
                       redact_url(url), unit)
        return None, None
    tags = tif.pages.first.tags

    def size(tag: str) -> float | None:
        found = tags.get(tag)
        numerator, denominator = found.value if found is not None else (0, 0)
        return denominator / numerator * factor if numerator and denominator else None

    return size("YResolution"), size("XResolution")


def _unit_um(unit: str) -> float | None:
    """Micrometres per `unit` (a name or symbol of a unit of length, as OME-XML or ImageJ write
    it: µm in either mu, micron, nm, ...), None for an unknown one."""
    return _UNITS_UM.get(unicodedata.normalize("NFKC", unit.strip()).lower())


# zarr and bioio ----------------------------------------------------------------------------------


def _open_zarr(url: str, selection: SelectionConfig, time_point: int | None, storage_options: StorageOptions) -> Plane:
    """An OME-Zarr image (through bioio-ome-zarr) or a bare zarr array."""
    try:
        node = zarr.open(url, mode="r", storage_options=dict(storage_options) if storage_options else None)
    except FileNotFoundError as error:
        raise ImageReadError(f"'{url}': no zarr array or group there") from error
    except Exception as error:  # zarr raises many types on what is not a zarr store
        raise ImageReadError(f"'{url}': not a readable zarr store ({_one_line(error)})") from error
    if isinstance(node, zarr.Array):
        return _zarr_array_plane(node, url, selection, time_point)
    attributes = dict(node.attrs)
    ome = attributes.get("ome", attributes)
    if isinstance(ome, dict) and "plate" in ome:
        raise ImageReadError(f"'{url}' is an HCS plate: give the folder holding it as the source, so that each "
                             "well's fields are listed (cellseg.formats.list_sources)")
    if not (isinstance(ome, dict) and "multiscales" in ome):
        raise ImageReadError(f"'{url}' is a zarr group without NGFF multiscales: not an OME-Zarr image")
    return _open_bioio(url, OME_ZARR_PLUGIN, selection, time_point, storage_options)


def _zarr_array_plane(array: zarr.Array, url: str, selection: SelectionConfig, time_point: int | None) -> Plane:
    """A bare zarr array: 2-D (y, x), or with `dimension_names` among t, c, z, y, x."""
    names = getattr(array.metadata, "dimension_names", None) or ()
    axes = "".join(str(name or "?")[0].upper() for name in names) if len(names) == array.ndim else ""
    if array.ndim == 2 and not axes:
        axes = "YX"
    if not (axes and set(axes) <= set("TCZYX") and len(set(axes)) == len(axes) and axes.endswith("YX")):
        raise ImageReadError(f"'{url}': a zarr array of shape {array.shape} needs dimension names among t, c, z, y, x "
                             f"ending in y, x (has {list(names) or 'none'})")
    shape = dict(zip(axes, array.shape, strict=True))
    choice = _choose(url, {axis: shape.get(axis, 1) for axis in "TCZ"}, [], selection, time_point, "zarr")

    def read_region(rows: slice, columns: slice) -> np.ndarray:
        def read_z(z: int) -> np.ndarray:
            picked: dict[str, int | slice] = {"T": choice.t, "C": choice.channel, "Z": z, "Y": rows, "X": columns}
            return np.asarray(array[tuple(picked[axis] for axis in axes)])

        return _project(read_z, choice, shape.get("Z", 1))

    return Plane((shape["Y"], shape["X"]), np.dtype(array.dtype), None, choice.record, read_region,
                 chunk_bytes=prod(array.chunks) * array.dtype.itemsize)


def _array_plane(image: np.ndarray, url: str, selection: SelectionConfig, time_point: int | None, kind: str) -> Plane:
    """A decoded image as a plane: a 2-D one has one channel, z plane and time point; a colour one
    (H, W, 3: `cellseg.io.decode_colour_image`) its red, green and blue samples as channels 0-2."""
    channels = image.shape[2] if image.ndim == 3 else 1
    choice = _choose(url, {"C": channels}, [], selection, time_point, kind)
    if image.ndim == 3:
        return Plane(image.shape[:2], image.dtype, None, choice.record,
                     lambda rows, columns: image[rows, columns, choice.channel])
    return Plane(image.shape, image.dtype, None, choice.record, lambda rows, columns: image[rows, columns])


def bioio_reader(plugin: str, url: str) -> type:
    """The Reader class of an installed bioio plugin (named by its distribution, e.g. 'bioio-czi');
    MissingReaderError naming the extra and `url` when bioio or the plugin is not installed."""
    try:
        import bioio  # noqa: F401

        found = [point for point in entry_points(group="bioio.readers") if point.name == plugin]
        if not found:
            raise ImportError(f"no {plugin} entry point")
        return cast(type, found[0].load().Reader)
    except ImportError as error:
        raise MissingReaderError(f"'{url}' needs the {plugin} reader, which is not installed: {FORMATS_EXTRA}") from error


def _open_bioio(url: str, plugin: str, selection: SelectionConfig, time_point: int | None,
                storage_options: StorageOptions) -> Plane:
    """A plane of scene 0 of a file that a bioio plugin reads, through its lazy dask array (TCZYX[S])."""
    reader = bioio_reader(plugin, url)
    from bioio import BioImage

    try:
        image = BioImage(url, reader=reader, fs_kwargs=dict(storage_options or {}))
        dims = image.dims
        names = [str(name) for name in (image.channel_names or [])]
        data = image.dask_data
        sizes = {axis: int(getattr(dims, axis)) for axis in "TCZ"}
        physical = image.physical_pixel_sizes
        factor = _bioio_unit_um(image)
        scenes = len(image.scenes)
    except ImageReadError:
        raise
    except FileNotFoundError as error:
        raise ImageReadError(f"'{url}': file not found") from error
    except Exception as error:  # readers raise many types on malformed or unsupported files
        raise ImageReadError(f"'{url}': {plugin} cannot read it ({_one_line(error)})") from error
    kind = plugin.removeprefix("bioio-")
    choice = _choose(url, sizes, names, selection, time_point, kind)
    samples = "S" in dims.order and int(dims.S) > 1
    notes = [f"uses scene 0 of {scenes}"] if scenes > 1 else []

    def read_region(rows: slice, columns: slice) -> np.ndarray:
        region = data[choice.t, choice.channel, slice(None) if choice.z is None else choice.z, rows, columns]
        if choice.z is None:
            region = region.max(axis=0)
        pixels = np.asarray(region.compute(scheduler="synchronous"))  # never a distributed client's workers
        return _luma(pixels[..., :3]) if samples else pixels

    def scaled(size: float | None) -> float | None:
        return None if size is None or factor is None else float(size) * factor

    pixel_size, yx, size_notes = _pixel_size(scaled(physical.Y), scaled(physical.X))
    return Plane((int(dims.Y), int(dims.X)), np.dtype(image.dtype), pixel_size, choice.record, read_region, yx,
                 notes + size_notes, chunk_bytes=prod(data.chunksize) * data.dtype.itemsize)


def _one_line(error: BaseException, limit: int = 300) -> str:
    """A reader's error as part of a one-line message: its type and first words (readers' messages
    run over several lines)."""
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bioio_unit_um(image: Any) -> float | None:
    """Micrometres per unit of the image's physical x size: from the axis unit where the reader
    gives one (OME-Zarr), else micrometres (OME's default unit, which CZI, ND2 and LIF readers use)."""
    unit = None
    with suppress(Exception):
        unit = image.dimension_properties.X.unit
    if unit is None:
        return 1.0
    with suppress(Exception):
        return float((1.0 * unit).to("micrometer").magnitude)
    return None
