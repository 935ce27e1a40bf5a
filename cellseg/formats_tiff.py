"""OME-TIFF and plain (Big)TIFF planes (`cellseg.formats`): series 0 read tile by tile through
tifffile's zarr view; channel names and pixel size from the OME-XML or an ImageJ calibration."""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable
from math import prod
from typing import IO, Any, cast

import numpy as np
import tifffile
import zarr

from cellseg.config import SelectionConfig
from cellseg.formats_plane import Plane, choose_plane, one_line, pixel_sizes, project_z
from cellseg.io import ImageReadError, _check_tiff_page, _luma
from cellseg.redact import redact_url

logger = logging.getLogger("cellseg.formats")  # the formats' one logger, whichever of their modules speaks

# Keys in NFKC form (`_unit_um`): the micro sign (U+00B5) and the Greek mu (U+03BC) that writers
# use for it are one letter there, as are the angstrom sign (U+212B) and Å (U+00C5); lower case.
_UNITS_UM = {"μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0, "micrometer": 1.0, "micrometre": 1.0,
             "nm": 1e-3, "nanometer": 1e-3, "nanometre": 1e-3, "pm": 1e-6, "picometer": 1e-6,
             "mm": 1e3, "millimeter": 1e3, "millimetre": 1e3, "cm": 1e4, "centimeter": 1e4, "m": 1e6,
             "meter": 1e6, "metre": 1e6, "å": 1e-4, "angstrom": 1e-4}


def open_tiff_plane(file: IO[bytes], url: str, selection: SelectionConfig, time_point: int | None,
                    checked: tuple[bytes, int] | None, close: Callable[[], None] | None = None) -> Plane:
    """`tiff_plane` of the TIFF in `file` (an open file, or a file's bytes in a BytesIO). What
    tifffile cannot parse, or `tiff_plane` refuses, is an ImageReadError naming the file (tifffile
    raises many types on malformed input), after `close` (the file's) is called."""
    try:
        return tiff_plane(tifffile.TiffFile(file), url, selection, time_point, checked, close)
    except Exception as error:
        if close is not None:
            close()
        if isinstance(error, ImageReadError):
            raise
        raise ImageReadError(f"'{url}': not a readable TIFF ({one_line(error)})") from error


def tiff_plane(tif: tifffile.TiffFile, url: str, selection: SelectionConfig, time_point: int | None,
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
    names, physical = _ome_metadata(tif, url) if tif.is_ome else ([], imagej_pixel_size(tif, url))
    samples_as_luma = channel_axis == "S" and selection.channel is None and sizes["C"] in (3, 4)
    if samples_as_luma:
        sizes["C"] = 1
    if channel_axis is None and stack_axis is not None and selection.channel not in (None, 0):
        planes = shape[stack_axis]
        raise ImageReadError(f"'{url}': no channel {selection.channel!r}: it has no channel axis, and its {planes} "
                             f"pages are read as z planes (--z 0..{planes - 1} picks one, --z max projects them)")
    choice = choose_plane(url, sizes, names, selection, time_point, "ome-tiff" if tif.is_ome else "tiff")
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
        try:
            region = np.asarray(array[tuple(index)])
        except (tifffile.TiffFileError, ValueError, OSError, MemoryError) as error:
            # tifffile's word for a strip that inflates to another size than declared, and the like
            raise ImageReadError(f"'{url}': a tile or strip of this TIFF cannot be read ({type(error).__name__}: "
                                 f"{str(error)[:200]})") from error
        return _luma(_samples_last(region, axes)) if samples_as_luma else region

    def read_region(rows: slice, columns: slice) -> np.ndarray:
        return project_z(lambda z: read_z(z, rows, columns), choice, sizes["Z"])

    pixel_size, yx, size_notes = pixel_sizes(*physical)
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


# The most bytes one compressed tile or strip of a TIFF read block by block may declare: each block
# read decodes every segment it touches whole, so one 100000 x 100000 deflate strip of 43 MB took
# 10 GB, again for each block. An uncompressed strip takes no more than the file holds.
LAZY_SEGMENT_BYTES = 256 * 2**20
_UNCOMPRESSED = 1


class OversizedSegment(ImageReadError):
    """A TIFF too large to read whole whose compressed tiles or strips are too large to read block
    by block; `shape` is its (H, W), so that the block path takes it and records this error."""

    def __init__(self, message: str, shape: tuple[int, int]):
        super().__init__(message)
        self.shape = shape


def _check_lazy_tiff(page: tifffile.TiffPage, url: str) -> None:
    """Refuse what lazy reads cannot bound: sample types and compressions cellseg does not decode,
    and tiles or strips larger than LAZY_SEGMENT_BYTES."""
    from cellseg.io import TIFF_COMPRESSIONS, _tiff_name

    if page.dtype is None or page.dtype.kind not in "biuf":
        raise ImageReadError(f"'{url}': TIFF samples of {page.bitspersample} bits are not supported "
                             "(expected integers or floats)")
    if page.compression not in TIFF_COMPRESSIONS:
        raise ImageReadError(f"'{url}': TIFF compression {_tiff_name(page.compression)} is not supported")
    segment = prod(page.chunks) * page.dtype.itemsize
    if segment > LAZY_SEGMENT_BYTES and page.compression != _UNCOMPRESSED:
        raise OversizedSegment(
            f"'{url}': one tile or strip ({' x '.join(map(str, page.chunks))} {page.dtype} samples) takes {segment} "
            f"bytes, over the {LAZY_SEGMENT_BYTES // 2**20} MiB that an image read block by block may decode at once "
            "(each block would decode it again): save it tiled, e.g. tifffile.imwrite(..., tile=(1024, 1024))",
            (page.imagelength, page.imagewidth))


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


def imagej_pixel_size(tif: tifffile.TiffFile, url: str) -> tuple[float | None, float | None]:
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
