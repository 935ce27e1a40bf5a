"""Plates, fields and time points: the flat image ids of sources that are not one file per image,
the well and field an id names, and the per-well summary of the statistics.

- A field of an OME-Zarr HCS plate, `<plate>.zarr/<row>/<column>/<field>`, is `<plate>_<row><column>_f<field>`
  (column numbers two digits wide): `plate_B03_f0`.
- A folder of fields per well holds one file per field named `<well>_f<field>.<ext>`, optionally
  after a prefix: `A01_f0.tif`, `run7_A01_f1.ome.tif`. Its id is the file's stem.
- A time point of a file, `<url>#t=<t>` (`--t all`), is `<id>_t<t>`, three digits at least: `name_t003`.
- A source in a subfolder of the folder listed (`--recursive`) has the subfolders' path before its
  id, joined with `_`: `2026-12-05/plate1/A01.tif` is `2026-12-05_plate1_A01`.

Every id that ends in `<well>_f<field>` (before any `_t<t>`) gets `well` and `field` columns.
"""

from __future__ import annotations

import posixpath
import re
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import zarr

_TIME_POINT = re.compile(r"^(?P<url>.+)#t=(?P<t>[0-9]{1,9})$")
_PLATE_FIELD = re.compile(r"(?:^|/)(?P<plate>[^/]+)\.zarr/(?P<row>[A-Za-z]{1,2})/(?P<column>[0-9]{1,3})/(?P<field>[0-9]{1,4})/?$",
                          re.IGNORECASE)
_WELL_FIELD = re.compile(r"(?:^|_)(?P<well>[A-Za-z]{1,2}[0-9]{1,3})_f(?P<field>[0-9]{1,4})(?:_t[0-9]+)?$")
# Suffixes an image id drops: the last one, and `.ome` before it (`a.ome.tif` and `a.ome.zarr` are `a`).
_OME = ".ome"


def time_point_url(url: str, t: int) -> str:
    """The address of one time point of a file (`<url>#t=<t>`)."""
    return f"{url}#t={t}"


def split_time_point(url: str) -> tuple[str, int | None]:
    """(file URL, time point) of an address made by `time_point_url`; (url, None) for any other.
    Listed files never end so: their names end in an image suffix."""
    match = _TIME_POINT.match(url)
    return (match["url"], int(match["t"])) if match else (url, None)


def plate_field_url(plate_url: str, row: str, column: str, field: str) -> str:
    """The URL of one field of an HCS plate."""
    return f"{plate_url.rstrip('/')}/{row}/{column}/{field}"


MAX_FIELDS = 100_000  # fields a plate's metadata may list


def plate_fields(plate: zarr.Group, url: str) -> list[str]:
    """The URLs of every field of every well an OME-Zarr HCS plate lists (NGFF 0.4 and 0.5
    metadata); ValueError for metadata that does not name wells and fields as `<row letters>/<column
    number>` and `<field number>`, which also keeps them inside the plate."""
    metadata = ngff_attributes(plate).get("plate")
    if not isinstance(metadata, dict):
        raise ValueError(f"its plate metadata is {type(metadata).__name__}, expected a mapping")
    wells = metadata.get("wells", [])
    if not isinstance(wells, list) or len(wells) > MAX_FIELDS:
        raise ValueError(f"its plate metadata lists {type(wells).__name__} wells, expected a list of at most {MAX_FIELDS}")
    fields: list[str] = []
    for listed in wells:
        path = listed.get("path") if isinstance(listed, dict) else None
        parts = path.split("/") if isinstance(path, str) else []
        if len(parts) != 2 or not (parts[0].isalpha() and len(parts[0]) <= 2 and parts[1].isdigit() and len(parts[1]) <= 3):
            raise ValueError(f"well path {path!r} is not '<row letters>/<column number>'")
        well = plate.get(str(path))
        if not isinstance(well, zarr.Group):
            raise ValueError(f"its well {path} is listed but not stored")
        images = ngff_attributes(well).get("well", {}).get("images", [])
        for image in images if isinstance(images, list) else []:
            field_path = str(image.get("path", "")) if isinstance(image, dict) else ""
            if not (field_path.isdigit() and len(field_path) <= 4):
                raise ValueError(f"field path {field_path!r} of well {path} is not a number")
            fields.append(plate_field_url(url, parts[0], parts[1], field_path))
            if len(fields) > MAX_FIELDS:
                raise ValueError(f"it has more than {MAX_FIELDS} fields")
    return fields


def ngff_attributes(group: zarr.Group) -> dict[str, Any]:
    """A group's NGFF attributes: under "ome" (0.5) or at the top (0.4); {} where they are not a mapping."""
    attributes: dict[str, Any] = dict(group.attrs)
    ome = attributes.get("ome", attributes)
    return ome if isinstance(ome, dict) else {}


def is_plate(group: zarr.Group) -> bool:
    """Whether a zarr group is an OME-Zarr HCS plate: its NGFF attributes have `plate` metadata
    (which `plate_fields` reads, or refuses when it is not a mapping)."""
    return "plate" in ngff_attributes(group)


def image_id(url: str, root: str | None = None) -> str:
    """The image id of a source URL: the file name without its suffix (and a `.ome` before it),
    a plate field's `<plate>_<well>_f<field>`, with `_t<t>` for a time point (module docstring).
    With `root`, the folder it was listed under, a source in a subfolder of it has the subfolders'
    path before that, joined with `_`: `2026-12-05/plate1/A01.tif` is `2026-12-05_plate1_A01`."""
    base, time_point = split_time_point(url)
    base = base.rstrip("/")
    plate = _PLATE_FIELD.search(base)
    if plate:
        stem = f"{_strip_ome(plate['plate'])}_{well_name(plate['row'], plate['column'])}_f{plate['field']}"
    else:
        stem = _strip_ome(posixpath.splitext(posixpath.basename(base))[0])
    stem = "_".join([*_folders_below(base, root), stem]) if root is not None else stem
    return stem if time_point is None else f"{stem}_t{time_point:03d}"


def relative_source(url: str, root: str | None) -> str:
    """`url`'s path below the folder `root` it was listed under (`2026-12-05/A01.tif`); its file
    name when it is not under `root`."""
    prefix = (root or "").rstrip("/") + "/"
    return url[len(prefix):] if root is not None and url.startswith(prefix) else posixpath.basename(url.rstrip("/"))


def _folders_below(url: str, root: str | None) -> list[str]:
    """The folders between `root` and the source `url` (a file, a `.zarr` folder or a field in one)."""
    prefix = (root or "").rstrip("/") + "/"
    if root is None or not url.startswith(prefix) or root.rstrip("/").lower().endswith(".zarr"):
        return []  # a plate named as the source: its fields' folders are its wells, named in the id already
    parts = url[len(prefix):].split("/")
    for index, part in enumerate(parts):
        if part.lower().endswith(".zarr"):
            return parts[:index]
    return parts[:-1]


def _strip_ome(stem: str) -> str:
    return stem[: -len(_OME)] if stem.lower().endswith(_OME) and len(stem) > len(_OME) else stem


def well_name(row: str, column: str) -> str:
    """A well's name from its plate row and column: 'B', '3' -> 'B03'."""
    return f"{row.upper()}{int(column):02d}" if column.isdigit() else f"{row.upper()}{column}"


def well_and_field(image_id: str) -> dict[str, str]:
    """{'well', 'field'} of an id that ends in `<well>_f<field>` (before any `_t<t>`), else {}."""
    match = _WELL_FIELD.search(image_id)
    return {"well": match["well"].upper(), "field": match["field"]} if match else {}


def source_columns(image_id: str, source: Any, statistics: Any) -> dict[str, Any]:
    """The statistics columns of an image's origin: `well` and `field` (from its id), the `channel`,
    `z` and `t` chosen and the pixel size, with cell areas in µm², for images that have them."""
    columns: dict[str, Any] = dict(well_and_field(image_id))
    if not isinstance(source, dict):
        return columns
    chosen = source.get("selection")
    selection: dict[str, Any] = chosen if isinstance(chosen, dict) else {}
    columns.update({name: selection[name] for name in ("channel", "z", "t") if name in selection})
    size = source.get("pixel_size_yx_um")
    if isinstance(size, list) and len(size) == 2 and all(_number(side) for side in size):
        columns["pixel_size_um"] = source.get("pixel_size_um")
        stats = statistics if isinstance(statistics, dict) else {}
        for name in ("total_cell_area", "mean_cell_area", "median_cell_area"):
            area = stats.get(name)
            columns[f"{name}_um2"] = area * size[0] * size[1] if _number(area) else None
    return columns


def same_columns(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that all have every column any of them has (None where missing), in the order the
    columns first appear: a table writer takes its columns from the first row."""
    columns = list(dict.fromkeys(name for row in rows for name in row))
    if all(len(row) == len(columns) for row in rows):
        return rows
    if "status" in columns:  # stays last
        columns.append(columns.pop(columns.index("status")))
    return [{name: row.get(name) for name in columns} for row in rows]


def by_well(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-image statistics per well, in well order: `images` (fields and time points) and
    `fields` counted, cell counts and `total_*` areas summed, `mean_cell_area*` recomputed from
    those sums, every other numeric statistic averaged over the well's images (medians are left
    out: a median of medians is not the well's). Images without a well are left out."""
    wells: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        located = {**well_and_field(str(row.get("image_id", ""))), **{k: row[k] for k in ("well", "field") if row.get(k)}}
        if located.get("well"):
            wells[str(located["well"])].append({**row, **located})
    names = list(dict.fromkeys(name for members in wells.values() for row in members for name, value in row.items()
                               if _number(value) and name not in NOT_AGGREGATED and not name.startswith("median_")))
    summary = []
    for well, members in sorted(wells.items(), key=lambda item: _well_order(item[0])):
        out: dict[str, Any] = {"well": well, "images": len(members),
                               "fields": len({str(row.get("field")) for row in members})}
        for name in names:
            values = [row[name] for row in members if _number(row.get(name))]
            if name == "cell_count" or name.startswith("total_"):
                out[name] = sum(values)
            elif name.startswith("mean_cell_area"):
                total = sum(row[name.replace("mean_", "total_", 1)] for row in members
                            if _number(row.get(name.replace("mean_", "total_", 1))))
                count = sum(row["cell_count"] for row in members if _number(row.get("cell_count")))
                out[name] = total / count if count else None
            else:
                out[name] = sum(values) / len(values) if values else None
        summary.append(out)
    return summary


NOT_AGGREGATED = frozenset({"field", "t", "z", "channel"})


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _well_order(well: str) -> tuple[str, int]:
    match = re.match(r"([A-Za-z]+)([0-9]+)$", well)
    return (match[1], int(match[2])) if match else (well, 0)
