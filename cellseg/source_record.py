"""What a result records about the plane it was segmented from (the selection and the pixel size),
and what that pixel size converts: a cell diameter in µm to pixels, cell areas to µm²."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cellseg.formats_plane import Plane
from cellseg.io import ImageReadError


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
