"""Planes of the files that bioio reader plugins read (`cellseg.formats`): CZI, ND2, LIF and
OME-Zarr, from the `formats` extra; without it, one line naming the extra and the file."""

from __future__ import annotations

from contextlib import suppress
from importlib.metadata import entry_points
from math import prod
from typing import Any, cast

import numpy as np

from cellseg.config import SelectionConfig
from cellseg.formats_plane import Plane, choose_plane, one_line, pixel_sizes
from cellseg.io import ImageReadError, StorageOptions, _luma

FORMATS_EXTRA = "pip install 'cellseg[formats]'"
# The bioio reader plugin (its distribution and entry point name) of each vendor file suffix.
BIOIO_PLUGINS = {".czi": "bioio-czi", ".nd2": "bioio-nd2", ".lif": "bioio-lif"}
OME_ZARR_PLUGIN = "bioio-ome-zarr"


class MissingReaderError(ImageReadError):
    """A file whose reader (bioio or one of its plugins) is not installed."""


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


def open_bioio(url: str, plugin: str, selection: SelectionConfig, time_point: int | None,
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
        raise ImageReadError(f"'{url}': {plugin} cannot read it ({one_line(error)})") from error
    kind = plugin.removeprefix("bioio-")
    choice = choose_plane(url, sizes, names, selection, time_point, kind)
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

    pixel_size, yx, size_notes = pixel_sizes(scaled(physical.Y), scaled(physical.X))
    return Plane((int(dims.Y), int(dims.X)), np.dtype(image.dtype), pixel_size, choice.record, read_region, yx,
                 notes + size_notes, chunk_bytes=prod(data.chunksize) * data.dtype.itemsize)


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
