"""Zarr planes (`cellseg.formats`): an OME-Zarr image (read by bioio-ome-zarr) or a bare zarr array
whose `dimension_names` say which axis is which."""

from __future__ import annotations

from math import prod
from typing import Any

import numpy as np
import zarr

from cellseg.config import SelectionConfig
from cellseg.formats_bioio import OME_ZARR_PLUGIN, open_bioio
from cellseg.formats_plane import Plane, choose_plane, one_line, project_z
from cellseg.io import ImageReadError, StorageOptions
from cellseg.plates import is_plate, ngff_attributes
from cellseg.zarr_stores import bounded_store


def open_zarr(url: str, selection: SelectionConfig, time_point: int | None, storage_options: StorageOptions) -> Plane:
    """An OME-Zarr image (through bioio-ome-zarr) or a bare zarr array."""
    try:
        node = zarr.open(bounded_store(url, "r", zarr_storage_options(storage_options), input_image=True), mode="r")
    except FileNotFoundError as error:
        raise ImageReadError(f"'{url}': no zarr array or group there") from error
    except Exception as error:  # zarr raises many types on what is not a zarr store
        raise ImageReadError(f"'{url}': not a readable zarr store ({one_line(error)})") from error
    if isinstance(node, zarr.Array):
        return _zarr_array_plane(node, url, selection, time_point)
    if is_plate(node):
        raise ImageReadError(f"'{url}' is an HCS plate: give the folder holding it as the source, so that each "
                             "well's fields are listed (cellseg.formats.list_sources)")
    if "multiscales" not in ngff_attributes(node):
        raise ImageReadError(f"'{url}' is a zarr group without NGFF multiscales: not an OME-Zarr image")
    return open_bioio(url, OME_ZARR_PLUGIN, selection, time_point, storage_options)


def zarr_storage_options(storage_options: StorageOptions) -> dict[str, Any] | None:
    """`storage_options` as zarr's openers take them: a dict, None where there are none."""
    return dict(storage_options) if storage_options else None


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
    choice = choose_plane(url, {axis: shape.get(axis, 1) for axis in "TCZ"}, [], selection, time_point, "zarr")

    def read_region(rows: slice, columns: slice) -> np.ndarray:
        def read_z(z: int) -> np.ndarray:
            picked: dict[str, int | slice] = {"T": choice.t, "C": choice.channel, "Z": z, "Y": rows, "X": columns}
            return np.asarray(array[tuple(picked[axis] for axis in axes)])

        return project_z(read_z, choice, shape.get("Z", 1))

    return Plane((shape["Y"], shape["X"]), np.dtype(array.dtype), None, choice.record, read_region,
                 chunk_bytes=prod(array.chunks) * array.dtype.itemsize)
