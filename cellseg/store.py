"""The zarr (v3) results store: one OME-Zarr (NGFF 0.5) image per image id, append-only and shard-safe.

Layout (see docs/store.md)::

    <store>/zarr.json                         root attrs: {"cellseg": {"layout": 1, ...}}
    <store>/<image id>/zarr.json              attrs["cellseg"]: status, source, model, statistics;
                                              attrs["ome"]: NGFF multiscales of the image (when stored)
    <store>/<image id>/0                      the source image (H, W), as read; optional
    <store>/<image id>/labels/zarr.json       attrs["ome"]["labels"]: ["cells", "mask"]
    <store>/<image id>/labels/mask/0          uint8 (H, W), 1 = cell, 0 = background
    <store>/<image id>/labels/cells/0         int32 (H, W), one label per cell, 0 = background
    <store>/<image id>/probabilities/0        float16 (H, W), optional
    <store>/<image id>/tables/cells           float64 (N cells, columns), attrs["columns"]: per-cell measurements

Each label group carries NGFF `multiscales` + `image-label` metadata, so ome-zarr-py and napari
open `<store>/<image id>` as an image with its label layers. Every image owns its own arrays, so two writers never touch the same chunk. An image is done
only when its group attribute `status` is "done", which is written last, after the arrays;
an interrupted write leaves a group without that mark, which is redone on the next run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any, Literal, cast

import numpy as np
import zarr
from zarr.errors import ContainsArrayError, ContainsGroupError

from cellseg import __version__
from cellseg.io import StorageOptions
from cellseg.measure import INTEGER_COLUMNS
from cellseg.stats import label_cells

LAYOUT_VERSION = 1
MASK_NAME = "mask"
CELLS_NAME = "cells"
CHUNK_SIDE = 1024
CELL_TABLE = "tables/cells"
TABLE_CHUNK_ROWS = 65536
DONE = "done"
NGFF_VERSION = "0.5"
IMAGE_PATH = "0"
PROBABILITIES_PATH = "probabilities/0"

StoreMode = Literal["r", "r+", "a", "w", "w-"]  # zarr's access modes


class StoreError(ValueError):
    """A store or image id that cannot be used; the message names it."""


# The store's own keys beside the image groups (zarr v3 metadata; v2's, which readers may look for).
RESERVED_IDS = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})


def validate_image_id(image_id: str, source: str = "") -> str:
    """Image ids become zarr node names: non-empty, no '/', not '.', '..', '__'-prefixed or one of
    the store's own keys (`zarr.json.png` would name the store's metadata file)."""
    where = f" (from '{source}')" if source else ""
    if (not image_id or image_id in (".", "..") or "/" in image_id or "\\" in image_id or image_id.startswith("__")
            or image_id in RESERVED_IDS):
        raise StoreError(f"image id {image_id!r}{where} cannot name a store entry: rename the file")
    return image_id


def _ngff_multiscales(name: str) -> dict[str, Any]:
    """NGFF 0.5 metadata of a single-resolution 2-D (y, x) image whose pixels are at "0"."""
    return {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0]}]}],
        }],
    }


def _ngff_label(name: str, source_image: bool) -> dict[str, Any]:
    """NGFF 0.5 metadata of a label image under `<image>/labels/<name>`; its source is the image
    two levels up when the store keeps a copy of it."""
    meta = _ngff_multiscales(name)
    meta["image-label"] = {"version": NGFF_VERSION, **({"source": {"image": "../../"}} if source_image else {})}
    return meta


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _cellseg_attrs(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """The node's "cellseg" attribute ({} when it has none); zarr types attributes as any JSON."""
    return cast("dict[str, Any]", node.attrs.get("cellseg", {}))


def _read(array: zarr.Array) -> np.ndarray:
    """The whole array as numpy (zarr types a read as any array-like or scalar)."""
    return np.asarray(array[...])


def _columns(table: zarr.Array) -> list[str]:
    """The column names of a cell table."""
    return list(cast("list[str]", table.attrs["columns"]))


class ResultStore:
    """Read and write segmentation results in a zarr store at an fsspec URL (local path by default)."""

    def __init__(self, root: zarr.Group, url: str):
        self.root = root
        self.url = url

    @classmethod
    def open(cls, url: str, mode: StoreMode = "a", storage_options: StorageOptions = None) -> ResultStore:
        """Open `url`, creating the store when `mode` allows it; refuses groups that are not cellseg stores."""
        options = dict(storage_options) if storage_options else None
        try:
            try:
                root = zarr.open_group(url, mode=mode, zarr_format=3, storage_options=options)
            except ContainsGroupError:
                # Another run created the store between zarr's check and its create: open that one.
                root = zarr.open_group(url, mode=mode, zarr_format=3, storage_options=options)
        except FileNotFoundError as error:
            raise StoreError(f"no results store at '{url}'") from error
        except PermissionError as error:
            raise PermissionError(f"access denied opening the results store '{url}': {error}") from error
        meta = cast("dict[str, Any] | None", root.attrs.get("cellseg"))
        if meta is None:
            if mode == "r" or any(True for _ in root.group_keys()):
                raise StoreError(f"'{url}' is a zarr group but not a cellseg results store")
            root.attrs["cellseg"] = {"layout": LAYOUT_VERSION, "created": _now(), "cellseg_version": __version__}
        elif meta.get("layout") != LAYOUT_VERSION:
            raise StoreError(f"store '{url}' has layout {meta.get('layout')}, this cellseg reads {LAYOUT_VERSION}")
        return cls(root, url)

    def write_result(
        self,
        image_id: str,
        mask: np.ndarray,
        statistics: Mapping[str, Any],
        source_url: str,
        model: Mapping[str, Any],
        probabilities: np.ndarray | None = None,
        replace: bool = True,
        cells: np.ndarray | None = None,
        cell_table: tuple[tuple[str, ...], np.ndarray] | None = None,
        image: np.ndarray | None = None,
        scale: Mapping[str, Any] | None = None,
    ) -> bool:
        """Write one image's mask (and optional probabilities, cell labels, cell table and a copy of
        the source image), its NGFF metadata, then mark it done with its statistics (and, for a
        model at a cell size, the `scale` the image was seen at: `CellMaps.scale`).

        With `replace=False` an image that is already done (e.g. by a run working on the same
        store at the same time) is left as it is and False is returned; otherwise True.
        """
        validate_image_id(image_id, source_url)
        existing = self.root.get(image_id)
        if isinstance(existing, zarr.Group) and _cellseg_attrs(existing).get("status") == DONE:
            if not replace:
                return False
            # Replacing a finished result: withdraw the mark first so no reader mixes old and new.
            existing.attrs["cellseg"] = {"status": "writing", "source_url": source_url}
        if image is not None:
            if image.shape != mask.shape:
                raise StoreError(f"image '{image_id}' has shape {image.shape} but its mask {mask.shape}")
            self._write_array(f"{image_id}/{IMAGE_PATH}", image, existing is not None)
        self._write_array(f"{image_id}/labels/{MASK_NAME}/0", mask.astype(np.uint8), existing is not None)
        if cells is not None:
            self._write_array(f"{image_id}/labels/{CELLS_NAME}/0", cells.astype(np.int32), existing is not None)
        if probabilities is not None:
            self._write_array(f"{image_id}/{PROBABILITIES_PATH}", probabilities.astype(np.float16), existing is not None)
        if cell_table is not None:
            columns, rows = cell_table
            self._write_array(
                f"{image_id}/{CELL_TABLE}", rows.astype(np.float64), existing is not None,
                chunks=(max(1, min(len(rows), TABLE_CHUNK_ROWS)), len(columns)),
                attributes={"columns": list(columns)}, dimension_names=("cell", "column"),
            )
        label_names = [CELLS_NAME, MASK_NAME] if cells is not None else [MASK_NAME]
        # require_group, not root[...]: a concurrent writer's array can appear before its parent
        # groups' metadata does (zarr writes them side by side).
        for name in label_names:
            self.root.require_group(f"{image_id}/labels/{name}").attrs["ome"] = _ngff_label(name, source_image=image is not None)
        self.root.require_group(f"{image_id}/labels").attrs["ome"] = {"version": NGFF_VERSION, "labels": label_names}
        group = self.root.require_group(image_id)
        attributes: dict[str, Any] = {"ome": _ngff_multiscales(image_id)} if image is not None else {}
        attributes["cellseg"] = {
            "status": DONE,
            "source_url": source_url,
            "shape": list(mask.shape),
            "model": dict(model),
            "statistics": dict(statistics),
            "written": _now(),
        }
        if scale is not None:
            attributes["cellseg"]["scale"] = dict(scale)
        group.attrs.put(attributes)  # one metadata write: the NGFF image (or none) and the done mark together
        return True

    def _write_array(
        self, path: str, data: np.ndarray, may_exist: bool, chunks: tuple[int, ...] | None = None,
        attributes: dict[str, Any] | None = None, dimension_names: tuple[str, ...] = ("y", "x"),
    ) -> None:
        """Write one array without ever deleting a concurrent writer's files: create it when it is
        new, else overwrite it chunk by chunk (each chunk write is atomic); only an array of a
        different shape, type or chunking is replaced as a whole."""
        chunks = chunks or tuple(min(side, CHUNK_SIDE) for side in data.shape)
        # Creating the array by path writes its parent groups' metadata on the way (one call).
        # NGFF 0.5 asks arrays to name their dimensions as the axes of the multiscales do.
        def create(overwrite: bool) -> None:
            self.root.create_array(path, data=data, overwrite=overwrite, chunks=chunks,
                                   dimension_names=dimension_names, attributes=attributes)

        if not may_exist:
            try:
                create(overwrite=False)
                return
            except (ContainsArrayError, ContainsGroupError):  # another run created it just now
                pass
        array = self.root.get(path)
        if isinstance(array, zarr.Array) and (array.shape, array.dtype, array.chunks) == (data.shape, data.dtype, chunks):
            array[...] = data
            if attributes and dict(array.attrs) != attributes:
                array.attrs.put(attributes)
            return
        create(overwrite=True)

    def record_failure(self, image_id: str, source_url: str, error: str, model: Mapping[str, Any]) -> None:
        """Note that an image could not be segmented; a later run tries it again.

        A result that is already done (written by another run meanwhile) is kept, never replaced
        by a failure.
        """
        group = self.root.require_group(validate_image_id(image_id, source_url))
        if _cellseg_attrs(group).get("status") == DONE:
            return
        group.attrs["cellseg"] = {
            "status": "failed",
            "source_url": source_url,
            "error": error,
            "model": dict(model),
            "written": _now(),
        }

    def records(self, on_record: Callable[[str], None] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(image id, cellseg attrs) for every image entry, in id order; `on_record(image id)` is
        called as each image's metadata is read (a progress bar for large stores)."""
        groups = []
        for image_id, group in self.root.groups():
            groups.append((image_id, group))
            if on_record:
                on_record(image_id)
        for image_id, group in sorted(groups, key=lambda item: item[0]):
            yield image_id, dict(_cellseg_attrs(group))

    def done_ids(self, on_record: Callable[[str], None] | None = None) -> set[str]:
        """Ids of images whose mask and statistics are completely written."""
        return {image_id for image_id, record in self.records(on_record) if record.get("status") == DONE}

    def record(self, image_id: str) -> dict[str, Any]:
        """The cellseg attrs of one image."""
        try:
            return dict(_cellseg_attrs(self.root[image_id]))
        except KeyError as error:
            raise StoreError(f"store '{self.url}' has no image '{image_id}'") from error

    def is_done(self, image_id: str) -> bool:
        """Whether one image is completely written; reads only that image's metadata."""
        try:
            return self.record(image_id).get("status") == DONE
        except StoreError:
            return False

    def read_cells(self, image_id: str) -> np.ndarray:
        """Instance labels (int32, 0 = background, 1..N one per cell) of a done image; images
        written without them get the connected components of their mask."""
        self._require_done(image_id)
        array = self.root.get(f"{image_id}/labels/{CELLS_NAME}/0")
        if isinstance(array, zarr.Array):
            return _read(array)
        return label_cells(self._read_path(f"{image_id}/labels/{MASK_NAME}/0") > 0)[0]

    def read_cell_table(self, image_id: str) -> tuple[list[str], np.ndarray]:
        """(column names, float64 rows) of a done image's per-cell measurements."""
        array = self._optional_array(image_id, CELL_TABLE, "per-cell measurements")
        return _columns(array), _read(array)

    def cell_rows(self) -> Iterator[dict[str, Any]]:
        """Every cell of every done image that has measurements, as {"image_id", column: value} rows."""
        for image_id, record in self.records():
            table = self.root.get(f"{image_id}/{CELL_TABLE}") if record.get("status") == DONE else None
            if not isinstance(table, zarr.Array):
                continue
            columns = _columns(table)
            for row in _read(table):
                yield {"image_id": image_id, **{name: int(value) if name in INTEGER_COLUMNS else float(value)
                                                for name, value in zip(columns, row, strict=True)}}

    def read_image(self, image_id: str) -> np.ndarray:
        """The copy of the source image stored with a done result (`PredictConfig.store_image`)."""
        return _read(self._optional_array(image_id, IMAGE_PATH, "a copy of its source image"))

    def has_probabilities(self, image_id: str) -> bool:
        """Whether a done image was written with its cell probabilities (`--save-probabilities`)."""
        self._require_done(image_id)
        return isinstance(self.root.get(f"{image_id}/{PROBABILITIES_PATH}"), zarr.Array)

    def read_probabilities(self, image_id: str) -> np.ndarray:
        """float32 (H, W) cell probabilities of a done image written with `--save-probabilities`."""
        array = self._optional_array(image_id, PROBABILITIES_PATH, "probabilities (predict --save-probabilities)")
        return _read(array).astype(np.float32)

    def _optional_array(self, image_id: str, path: str, what: str) -> zarr.Array:
        """An array that a done image may have been written without; StoreError naming `what` if so."""
        self._require_done(image_id)
        array = self.root.get(f"{image_id}/{path}")
        if not isinstance(array, zarr.Array):
            raise StoreError(f"image '{image_id}' in '{self.url}' was written without {what}")
        return array

    def read_mask(self, image_id: str) -> np.ndarray:
        """Boolean (H, W) mask of a done image."""
        self._require_done(image_id)
        return self._read_path(f"{image_id}/labels/{MASK_NAME}/0") > 0

    def _read_path(self, path: str) -> np.ndarray:
        """The whole array at `path` (KeyError when there is nothing there)."""
        array = self.root[path]
        if not isinstance(array, zarr.Array):
            raise StoreError(f"'{path}' in '{self.url}' is a group, not an array")
        return _read(array)

    def _require_done(self, image_id: str) -> None:
        if self.record(image_id).get("status") != DONE:
            raise StoreError(f"image '{image_id}' in '{self.url}' is not completely written")

    def statistics(self, on_record: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
        """The per-image statistics table: one row per done image."""
        rows = []
        for image_id, record in self.records(on_record):
            if record.get("status") != DONE:
                continue
            model = record.get("model", {})
            rows.append(
                {
                    "image_id": image_id,
                    "source_url": record.get("source_url"),
                    "model_version": model.get("version"),
                    **record.get("statistics", {}),
                    "status": DONE,
                }
            )
        return rows

    def failures(self) -> list[dict[str, Any]]:
        """Images whose last attempt failed, with the error."""
        return [
            {"image_id": image_id, "source_url": record.get("source_url"), "error": record.get("error")}
            for image_id, record in self.records()
            if record.get("status") == "failed"
        ]

