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

import json
import logging
import os
import posixpath
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
import zarr
from fsspec.core import split_protocol, strip_protocol
from fsspec.implementations.local import LocalFileSystem
from zarr.abc.store import Store
from zarr.core.sync import sync
from zarr.errors import ContainsArrayError, ContainsGroupError

from cellseg import __version__
from cellseg.io import StorageOptions, filesystem
from cellseg.json_values import finite_json
from cellseg.measure import CELL_COLUMNS, INTEGER_COLUMNS
from cellseg.plates import same_columns, source_columns
from cellseg.redact import redact, redact_text, redact_url
from cellseg.stats import STATISTIC_FIELDS, label_cells
from cellseg.stitch import BlockGrid, scratch_chunks
from cellseg.storage_errors import StorageError, credentials_refused, storage_error, unexplained_denial
from cellseg.store_checks import (
    DONE,
    RESERVED_IDS,
    WRITE_MODES,
    DamagedImage,
    DamagedStore,
    StoreError,
    check_store_target,
    describe,
    record_problem,
    repair_hint,
    store_metadata_problem,
    unwritable,
    validate_image_id,
)
from cellseg.zarr_writes import (
    ARRAY_CODECS,
    CHUNK_KEY_ENCODING,
    NewArray,
    missing_chunks,
    put_new_nodes,
    put_objects,
)

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

LAYOUT_VERSION = 1
MASK_NAME = "mask"
CELLS_NAME = "cells"
CHUNK_SIDE = 1024
CELL_TABLE = "tables/cells"
TABLE_CHUNK_ROWS = 65536
NGFF_VERSION = "0.5"
IMAGE_PATH = "0"
PROBABILITIES_PATH = "probabilities/0"

StoreMode = Literal["r", "r+", "a", "w", "w-"]  # zarr's access modes
# The columns of `cell_rows` and `statistics` that every store has (pixel sizes and plates add
# more): the header of an exported table without rows.
CELL_ROW_COLUMNS = ("image_id", *CELL_COLUMNS)
IMAGE_ROW_COLUMNS = ("image_id", "source_url", "model_version", *STATISTIC_FIELDS, "status")


def _ngff_multiscales(name: str, pixel_size_yx_um: Sequence[float] | None = None, levels: int = 1) -> dict[str, Any]:
    """NGFF 0.5 metadata of a 2-D (y, x) image whose pixels are at "0"; with the physical pixel
    size (y, x) in micrometres, its scale and axis units say so. With `levels`, a pyramid: level k
    at "k", each half the size of the one before (a block-wise image, `cellseg.blocks`)."""
    unit = {"unit": "micrometer"} if pixel_size_yx_um else {}
    scale = [float(size) for size in pixel_size_yx_um] if pixel_size_yx_um else [1.0, 1.0]
    return {
        "version": NGFF_VERSION,
        "multiscales": [{
            "name": name,
            "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit}],
            "datasets": [{"path": str(level), "coordinateTransformations": [
                {"type": "scale", "scale": [side * 2**level for side in scale]}]} for level in range(levels)],
        }],
    }


# The display colours of the mask's two values (NGFF `image-label.colors`, RGBA 0-255, which the
# spec says a label image SHOULD carry): background clear, cells opaque cyan. The cell labels carry
# none: one entry per cell would grow with the image, and viewers colour labels they do not list.
MASK_COLORS = ({"label-value": 0, "rgba": [0, 0, 0, 0]}, {"label-value": 1, "rgba": [0, 255, 255, 255]})


def _ngff_label(name: str, source_image: bool, pixel_size_yx_um: Sequence[float] | None = None,
                levels: int = 1) -> dict[str, Any]:
    """NGFF 0.5 metadata of a label image under `<image>/labels/<name>`; its source is the image
    two levels up when the store keeps a copy of it, and the mask names the colours of its values."""
    meta = _ngff_multiscales(name, pixel_size_yx_um, levels)
    meta["image-label"] = {"version": NGFF_VERSION, **({"source": {"image": "../../"}} if source_image else {}),
                           **({"colors": [dict(color) for color in MASK_COLORS]} if name == MASK_NAME else {})}
    return meta




def lost_scratch_chunks(path: str, array: Callable[[str], zarr.Array], grid: BlockGrid, state: np.ndarray,
                        stitched: Mapping[str, Any] | None) -> list[str]:
    """What a block-wise scratch (`cellseg.blocks`, at `path`; `array` gives each of its arrays by
    name) has lost: a chunk that its blocks' recorded progress (`state`, and the `stitched` record)
    says was written and is not stored (`stitch.scratch_chunks`), which zarr would read as zeros.
    One line per array with losses; one key listing per array."""
    expected = scratch_chunks(grid, state, min(CHUNK_SIDE, grid.block), stitched)
    return [f"its block-wise scratch '{path}/{name}' is missing {len(lost)} of the {len(indices)} chunks its blocks "
            "wrote" for name, indices in expected.items() if (lost := missing_chunks(array(name), indices))]

def recorded_source(url: str) -> str:
    """`url` as a result records it: redacted, and a local path made absolute, since a relative
    one names nothing once read from another directory."""
    return redact_url(url if split_protocol(url)[0] else os.path.abspath(url))

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _shown(text: Any) -> Any:
    """A stored URL or error as shown: stores written before cellseg redacted them may hold credentials."""
    return redact_text(text) if isinstance(text, str) else text


def _cellseg_attrs(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """The node's "cellseg" attribute ({} when it has none, or a damaged one that is no JSON object)."""
    record = node.attrs.get("cellseg", {})
    return record if isinstance(record, dict) else {}


def _read(array: zarr.Array) -> np.ndarray:
    """The whole array as numpy (zarr types a read as any array-like or scalar)."""
    return np.asarray(array[...])


def _new_array(path: str, data: np.ndarray) -> NewArray:
    """An image-shaped (y, x) array, in tiles of up to CHUNK_SIDE x CHUNK_SIDE."""
    return NewArray(path, data, tuple(min(side, CHUNK_SIDE) for side in data.shape), ("y", "x"))


# Damaged stores ----------------------------------------------------------------------------------

MASK_PATH = f"labels/{MASK_NAME}/0"
CELLS_PATH = f"labels/{CELLS_NAME}/0"
# An image's arrays by path in its group: what each holds (for messages) and its dtype (None: any).
ARRAYS: dict[str, tuple[str, str | None]] = {
    IMAGE_PATH: ("copy of the source image", None),
    MASK_PATH: ("mask", "uint8"),
    CELLS_PATH: ("cell labels", "int32"),
    PROBABILITIES_PATH: ("probabilities", "float16"),
    CELL_TABLE: ("cell table", "float64"),
}
# What zarr raises for a zarr.json it cannot parse or validate (JSONDecodeError is a ValueError).
METADATA_ERRORS = (ValueError, TypeError)
# What the codecs raise for chunk bytes they cannot decode (zstd: RuntimeError).
CHUNK_ERRORS = (RuntimeError, ValueError, TypeError)
READERS = 16  # image metadata documents read at once when listing a store
WRITE_CONFIG: ArrayConfigParams = {"write_empty_chunks": True}

logger = logging.getLogger(__name__)


def repair_store_metadata(url: str, storage_options: StorageOptions = None) -> None:
    """Write fresh cellseg root metadata over an unreadable root zarr.json, once an image group
    under it shows that it is a cellseg store; StoreError (nothing written) otherwise."""
    fs, path = filesystem(url, storage_options)
    for child in sorted(fs.ls(path, detail=False)):
        try:
            document = json.loads(fs.cat_file(posixpath.join(child, "zarr.json")))
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, ValueError):
            continue
        attributes = document.get("attributes") if isinstance(document, dict) else None
        if isinstance(attributes, dict) and isinstance(attributes.get("cellseg"), dict):
            break
    else:
        shown_url = redact_url(url)
        raise StoreError(f"'{shown_url}/zarr.json' cannot be read and no image group under '{shown_url}' is a cellseg "
                         "result: not a results store, left as it is")
    meta = {"layout": LAYOUT_VERSION, "created": None, "cellseg_version": __version__, "repaired": _now()}
    document = {"zarr_format": 3, "node_type": "group", "attributes": {"cellseg": meta}}
    fs.pipe_file(posixpath.join(path, "zarr.json"), json.dumps(document, indent=2).encode())


def _zarr_location(url: str) -> str:
    """Where zarr opens the store at `url`: a file:// URL as its local path, so that it gets
    zarr's LocalStore as a plain path does (its fsspec store makes no folders on the local disk)."""
    return strip_protocol(url) if split_protocol(url)[0] in LocalFileSystem.protocol else url


def _zarr_storage_options(url: str, storage_options: StorageOptions) -> dict[str, Any] | None:
    """fsspec options of the store's own filesystem. On s3://, each object is read in one request:
    s3fs would otherwise ask every object's size first (to split large ones), a second request
    for each zarr.json and chunk, and for a missing one a listing as well."""
    options = dict(storage_options or {})
    if url.startswith(("s3://", "s3a://")):
        options.setdefault("max_concurrency", 1)
    return options or None


def _put_group(store: Store, path: str, attributes: dict[str, Any]) -> None:
    """Write fresh zarr v3 group metadata at `path` of `store` over whatever zarr.json is there;
    nothing under it is touched (zarr's own overwrite would delete the group's arrays)."""
    document = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    key = f"{path}/zarr.json" if path else "zarr.json"
    put_objects(store, [(key, json.dumps(document).encode())])


def _child_names(group: zarr.Group) -> list[str]:
    """Names of the entries under `group` in the store's listing, without reading their metadata."""
    async def names() -> list[str]:
        return [name async for name in group.store.list_dir(group.path)]

    return sorted(name for name in sync(names()) if name not in RESERVED_IDS)


def _has_entries(group: zarr.Group, name: str) -> bool:
    """Whether anything is stored under `name` (a folder that lost its zarr.json, not a stray file)."""
    async def first() -> bool:
        async for _ in group.store.list_prefix(f"{group.path}/{name}/" if group.path else f"{name}/"):
            return True
        return False

    return sync(first())


def _check_store_attributes(url: str, meta: Any) -> None:
    """Refuse a group whose cellseg attributes (`meta`) are not those of a store of this layout,
    naming what it is instead: no cellseg group, one image's group of a store, another layout."""
    shown_url = redact_url(url)
    if not isinstance(meta, dict):
        raise StoreError(f"'{shown_url}' is a zarr group but not a cellseg results store; choose a new folder")
    if "layout" not in meta and "status" in meta:
        # `results.zarr/<image id>` is what napari and ome-zarr open, so it is an easy slip here.
        store_url = shown_url.rstrip("/").rsplit("/", 1)[0]
        raise StoreError(f"'{shown_url}' is one image of a results store, not a store: give the store, '{store_url}'")
    if meta.get("layout") != LAYOUT_VERSION:
        raise StoreError(f"store '{shown_url}' has layout {meta.get('layout')}, this cellseg reads {LAYOUT_VERSION}")


class ResultStore:
    """Read and write segmentation results in a zarr store at an fsspec URL (local path by default)."""

    def __init__(self, root: zarr.Group, url: str):
        self.root = root
        self.url = url
        self.damaged: dict[str, str] = {}  # image id -> problem, of the images found damaged so far

    @classmethod
    def open(cls, url: str | os.PathLike[str], mode: StoreMode = "a", storage_options: StorageOptions = None
             ) -> ResultStore:
        """Open `url` (a URL or a local path), creating the store when `mode` allows it; refuses
        groups that are not cellseg stores and, for writing, targets where a store would keep
        nothing or take over other data (`check_store_target`)."""
        url = os.fspath(url)
        location = _zarr_location(url)
        # zarr refuses fsspec options beside a local path.
        options = _zarr_storage_options(url, storage_options) if location == url else None
        # A new store gets its cellseg attributes in the same write as its group: a store that is
        # being created is never seen without them, so a group without them is never ours.
        attributes: dict[str, Any] = {"cellseg": {"layout": LAYOUT_VERSION, "created": _now(), "cellseg_version": __version__}}
        try:
            if mode in WRITE_MODES:
                check_store_target(url, storage_options)
            try:
                root = zarr.open_group(location, mode=mode, zarr_format=3, storage_options=options,
                                       attributes=attributes)
            except ContainsGroupError:
                # Another run created the store between zarr's check and its create: open that one.
                root = zarr.open_group(location, mode=mode, zarr_format=3, storage_options=options)
        except FileNotFoundError as error:
            if translated := storage_error(url, error):  # a missing bucket
                raise translated from error
            if mode in WRITE_MODES:  # a folder above it that cannot be made (/proc/x.zarr)
                raise StoreError(f"cannot create a results store at '{redact_url(url)}': {error}") from error
            raise StoreError(f"no results store at '{redact_url(url)}'") from error
        except PermissionError as error:
            if refused := credentials_refused(url, error):
                raise refused from error
            raise StorageError(f"access denied opening the results store '{redact_url(url)}': {error}"
                               f"{unexplained_denial(error)}") from error
        except OSError as error:
            if translated := storage_error(url, error):  # timed out, connection refused
                raise translated from error
            if mode not in WRITE_MODES:
                raise
            if cannot_write := unwritable(url, error):
                raise cannot_write from error
            if isinstance(error, (NotADirectoryError, FileExistsError, IsADirectoryError)):
                raise StoreError(f"cannot create a results store at '{redact_url(url)}': {error}") from error
            raise
        except (StoreError, StorageError):
            raise
        except ContainsArrayError as error:
            raise StoreError(f"'{redact_url(url)}' is a zarr array, not a results store: give the store's folder, "
                             "the one holding the image groups") from error
        except METADATA_ERRORS as error:
            if translated := storage_error(url, error):  # a storage option the filesystem refuses (a TypeError)
                raise translated from error
            if problem := store_metadata_problem(url, storage_options):
                raise DamagedStore(f"the results store's own metadata '{redact_url(url)}/zarr.json' cannot be read ({problem}); "
                                   f"{repair_hint(url)} rewrites it") from error
            raise
        except Exception as error:
            if translated := storage_error(url, error):  # botocore's: no credentials, unreachable, timed out
                raise translated from error
            raise
        _check_store_attributes(url, root.attrs.get("cellseg"))
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
        warnings: Sequence[str] = (),
        source: Mapping[str, Any] | None = None,
    ) -> bool:
        """Write one image's mask (and optional probabilities, cell labels, cell table and a copy of
        the source image), its NGFF metadata, then mark it done with its statistics (and, for a
        model at a cell size, the `scale` the image was seen at: `CellMaps.scale`; and the
        `warnings` its result comes with, such as "uses page 0 of 3"; and the `source` record of a
        microscopy file: the plane chosen and the pixel size, `cellseg.formats.source_record`,
        whose `pixel_size_yx_um` becomes the NGFF scale, in micrometres).

        With `replace=False` an image that is already done (e.g. by a run working on the same
        store at the same time) is left as it is and False is returned; otherwise True.
        """
        validate_image_id(image_id, source_url)
        existing = self._existing_group(image_id)
        if isinstance(existing, zarr.Group) and _cellseg_attrs(existing).get("status") == DONE:
            if not replace:
                return False
            # Replacing a finished result: withdraw the mark first so no reader mixes old and new.
            existing.attrs["cellseg"] = {"status": "writing", "source_url": recorded_source(source_url)}
        arrays: list[NewArray] = []
        if image is not None:
            if image.shape != mask.shape:
                raise StoreError(f"image '{image_id}' has shape {image.shape} but its mask {mask.shape}")
            arrays.append(_new_array(f"{image_id}/{IMAGE_PATH}", image))
        arrays.append(_new_array(f"{image_id}/labels/{MASK_NAME}/0", mask.astype(np.uint8)))
        if cells is not None:
            arrays.append(_new_array(f"{image_id}/labels/{CELLS_NAME}/0", cells.astype(np.int32)))
        if probabilities is not None:
            arrays.append(_new_array(f"{image_id}/{PROBABILITIES_PATH}", probabilities.astype(np.float16)))
        if cell_table is not None:
            columns, rows = cell_table
            arrays.append(NewArray(f"{image_id}/{CELL_TABLE}", rows.astype(np.float64),
                                   (max(1, min(len(rows), TABLE_CHUNK_ROWS)), len(columns)), ("cell", "column"),
                                   {"columns": list(columns)}))
        label_names = [CELLS_NAME, MASK_NAME] if cells is not None else [MASK_NAME]
        pixel_size = (source or {}).get("pixel_size_yx_um")
        labels = {f"{image_id}/labels/{name}": {"ome": _ngff_label(name, source_image=image is not None,
                                                                  pixel_size_yx_um=pixel_size)}
                  for name in label_names}
        labels[f"{image_id}/labels"] = {"ome": {"version": NGFF_VERSION, "labels": label_names}}
        if existing is None:
            self._put_new_image(image_id, arrays, labels)
        else:
            for array in arrays:
                self._write_array(array.path, array.data, True, array.chunks, array.attributes, array.dimension_names)
            # require_group, not root[...]: a concurrent writer's array can appear before its parent
            # groups' metadata does (zarr writes them side by side).
            for path, label_attributes in labels.items():
                self._require_group(path).attrs.update(label_attributes)
            self._require_group(image_id)  # refuses an array in the image's place
        attributes: dict[str, Any] = {"ome": _ngff_multiscales(image_id, pixel_size)} if image is not None else {}
        written = ((IMAGE_PATH, image), (MASK_PATH, mask), (CELLS_PATH, cells), (PROBABILITIES_PATH, probabilities),
                   (CELL_TABLE, cell_table))
        attributes["cellseg"] = {
            "status": DONE,
            "source_url": recorded_source(source_url),  # the store keeps no credentials (cellseg.redact)
            "shape": list(mask.shape),
            "model": redact(dict(model)),
            "statistics": finite_json(dict(statistics)),
            # Every chunk of these arrays is stored (write_empty_chunks): a missing one is damage.
            "arrays": [path for path, data in written if data is not None],
            "written": _now(),
        }
        if scale is not None:
            attributes["cellseg"]["scale"] = finite_json(dict(scale))
        if warnings:
            attributes["cellseg"]["warnings"] = list(warnings)
        if source:
            attributes["cellseg"]["source"] = finite_json(dict(source))
        # One metadata write: the NGFF image (or none) and the done mark together, last.
        _put_group(self.root.store, self._key(image_id), attributes)
        return True

    def _key(self, path: str) -> str:
        """A path under the store as a key of its zarr store."""
        return f"{self.root.path}/{path}" if self.root.path else path

    def _put_new_image(self, image_id: str, arrays: Sequence[NewArray], labels: Mapping[str, dict[str, Any]]) -> None:
        """Write a new image's arrays and groups at once (`cellseg.zarr_writes`): its group first,
        so that a crash never leaves data without it, then every other node (concurrently on object
        storage, file by file into a local folder)."""
        store = self.root.store
        put_new_nodes(store, {self._key(image_id): {}}, ())
        groups: dict[str, Mapping[str, Any]] = {self._key(posixpath.dirname(array.path)): {} for array in arrays}
        groups.pop(self._key(image_id), None)
        groups.update((self._key(path), attributes) for path, attributes in labels.items())
        keyed = [replace(array, path=self._key(array.path)) for array in arrays]
        put_new_nodes(store, groups, keyed)

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
        # Every chunk is written, even one equal to the fill value (zarr skips those by default), so
        # that a missing chunk of a done image always means damage (`array`).
        def create(overwrite: bool) -> None:
            self.root.create_array(path, data=data, overwrite=overwrite, chunks=chunks, compressors=ARRAY_CODECS,
                                   chunk_key_encoding=CHUNK_KEY_ENCODING, dimension_names=dimension_names,
                                   attributes=attributes, config=WRITE_CONFIG)

        try:
            array = self.root.get(path) if may_exist else None
        except METADATA_ERRORS:  # a damaged array's metadata: nothing in it is worth keeping
            create(overwrite=True)
            return
        if array is None:
            # Nothing there yet, but maybe the folder of a concurrent writer's array, its files on
            # the way: created without overwriting, which would delete them under that writer.
            try:
                create(overwrite=False)
                return
            except (ContainsArrayError, ContainsGroupError):  # another run created it just now
                try:
                    array = self.root.get(path)
                except METADATA_ERRORS:
                    array = None
        if isinstance(array, zarr.Array) and (array.shape, array.dtype, array.chunks) == (data.shape, data.dtype, chunks):
            array.with_config(WRITE_CONFIG)[...] = data
            if attributes and dict(array.attrs) != attributes:
                array.attrs.put(attributes)
            return
        create(overwrite=True)

    # Block-wise images (cellseg.blocks): arrays written region by region, one task per block ---------

    def blank_array(
        self, path: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...], every_chunk: bool = True,
        attributes: dict[str, Any] | None = None, dimension_names: tuple[str, ...] = ("y", "x"),
    ) -> zarr.Array:
        """A new array of zeros at `path` (what was there is replaced), for region writes; with
        `every_chunk` each write stores every chunk it covers, all-zero ones too, as the arrays of a
        done image must have them (`array`)."""
        array = self.root.create_array(path, shape=shape, dtype=dtype, chunks=chunks, fill_value=0, overwrite=True,
                                       compressors=ARRAY_CODECS, chunk_key_encoding=CHUNK_KEY_ENCODING, attributes=attributes,
                                       dimension_names=dimension_names)
        return array.with_config(WRITE_CONFIG) if every_chunk else array

    def region_array(self, path: str, every_chunk: bool = True) -> zarr.Array:
        """The array at `path`, opened for region writes as `blank_array` made it."""
        array = self.root[path]
        if not isinstance(array, zarr.Array):
            raise StoreError(f"'{self.url}/{path}' is a group, not an array")
        return array.with_config(WRITE_CONFIG) if every_chunk else array

    def write_blockwise_result(
        self, image_id: str, shape: tuple[int, int], arrays: Sequence[str], levels: int, record: Mapping[str, Any],
    ) -> bool:
        """Mark a block-wise image done once its `arrays` (paths of level 0) and the `levels` of their
        pyramid are written: the NGFF metadata of its labels and image, then the done mark with
        `record` (source_url, model, statistics, and scale, warnings, source, blocks when given), in
        one metadata write as `write_result` does. An image another run finished meanwhile is kept
        (False)."""
        if self.is_done(image_id):
            return False
        pixel_size = (record.get("source") or {}).get("pixel_size_yx_um")
        image_stored = IMAGE_PATH in arrays
        label_names = [CELLS_NAME, MASK_NAME] if CELLS_PATH in arrays else [MASK_NAME]
        for name in label_names:
            self._require_group(f"{image_id}/labels/{name}").attrs["ome"] = _ngff_label(
                name, source_image=image_stored, pixel_size_yx_um=pixel_size, levels=levels)
        self._require_group(f"{image_id}/labels").attrs["ome"] = {"version": NGFF_VERSION, "labels": label_names}
        attributes: dict[str, Any] = {"ome": _ngff_multiscales(image_id, pixel_size, levels)} if image_stored else {}
        attributes["cellseg"] = {
            "status": DONE, "source_url": recorded_source(str(record["source_url"])), "shape": list(shape),
            "model": redact(dict(record["model"])), "statistics": finite_json(dict(record["statistics"])),
            "arrays": list(arrays), "written": _now(),
            **{key: finite_json(record[key]) for key in ("scale", "warnings", "source", "blocks") if record.get(key)},
        }
        self._require_group(image_id).attrs.put(attributes)
        return True

    def record_failure(self, image_id: str, source_url: str, error: str, model: Mapping[str, Any]) -> None:
        """Note that an image could not be segmented; a later run tries it again.

        A result that is already done (written by another run meanwhile) is kept, never replaced
        by a failure.
        """
        group = self._require_group(validate_image_id(image_id, source_url))
        if _cellseg_attrs(group).get("status") == DONE:
            return
        group.attrs["cellseg"] = {
            "status": "failed",
            "source_url": recorded_source(source_url),
            "error": redact_text(error),
            "model": redact(dict(model)),
            "written": _now(),
        }

    def mark_damaged(self, image_id: str, problem: str) -> None:
        """Withdraw a damaged image's done mark: record it failed ("damaged: <problem>"), replacing
        metadata that cannot be read, so that the next run segments it again. Its arrays stay for
        that run to overwrite."""
        group = self._require_group(validate_image_id(image_id))
        previous = _cellseg_attrs(group)
        group.attrs["cellseg"] = {
            "status": "failed",
            "source_url": previous.get("source_url"),
            "error": f"damaged: {problem}",
            "model": previous.get("model") if isinstance(previous.get("model"), dict) else {},
            "written": _now(),
        }
        self.damaged.pop(image_id, None)

    def records(self, on_record: Callable[[str], None] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """(image id, cellseg attrs) for every image entry, in id order; `on_record(image id)` is
        called as each image's metadata is read (a progress bar for large stores).

        An image whose metadata cannot be read (or is not a cellseg record) is left out with a
        warning and noted in `damaged`: one broken image never hides the others."""
        for image_id, record, problem in self.entries(on_record):
            if problem is not None:
                self._note_damage(image_id, problem)
            elif record is not None:
                yield image_id, record

    def entries(self, on_record: Callable[[str], None] | None = None) -> Iterator[tuple[str, dict[str, Any] | None, str | None]]:
        """(name, cellseg attrs, problem) for every entry under the store, in name order, its
        metadata read by READERS threads at once (`scan`)."""
        names = _child_names(self.root)
        with ThreadPoolExecutor(max_workers=min(READERS, max(1, len(names)))) as pool:
            for name, (record, problem) in zip(names, pool.map(self.scan, names), strict=True):
                if on_record:
                    on_record(name)
                yield name, record, problem

    def scan(self, name: str) -> tuple[dict[str, Any] | None, str | None]:
        """(cellseg attrs, None) of the entry `name`, or (None, what is wrong with it); (None, None)
        for a stray object that is no image."""
        try:
            node = self.root.get(name)
        except METADATA_ERRORS as error:
            return None, f"its metadata '{name}/zarr.json' cannot be read ({describe(error)})"
        if node is None:  # a stray object, or a group another run is creating right now
            return None, None
        if not isinstance(node, zarr.Group):
            return None, f"'{name}' is an array, not an image group"
        record = node.attrs.get("cellseg", {})
        if problem := record_problem(record):
            return None, problem
        return dict(cast("dict[str, Any]", record)), None

    def _note_damage(self, image_id: str, problem: str) -> None:
        """Remember and log an image that cannot be used."""
        if self.damaged.get(image_id) != problem:
            logger.warning("image '%s' in '%s' is damaged and left out: %s", image_id, redact_url(self.url), problem)
        self.damaged[image_id] = problem

    def done_ids(self, on_record: Callable[[str], None] | None = None) -> set[str]:
        """Ids of images whose mask and statistics are completely written."""
        return set(self.done_records(on_record))

    def done_records(self, on_record: Callable[[str], None] | None = None) -> dict[str, dict[str, Any]]:
        """The records of the images whose mask and statistics are completely written, by id."""
        return {image_id: record for image_id, record in self.records(on_record) if record.get("status") == DONE}

    def record(self, image_id: str) -> dict[str, Any]:
        """The cellseg attrs of one image; DamagedImage when they cannot be read."""
        try:
            node = self.root[image_id]
        except KeyError as error:
            raise StoreError(f"store '{self.url}' has no image '{image_id}'") from error
        except METADATA_ERRORS as error:
            raise DamagedImage(self.url, image_id, f"its metadata '{image_id}/zarr.json' cannot be read "
                                                   f"({describe(error)})") from error
        record = node.attrs.get("cellseg", {}) if isinstance(node, zarr.Group) else None
        if problem := ("it is an array, not an image group" if record is None else record_problem(record)):
            raise DamagedImage(self.url, image_id, problem)
        return dict(cast("dict[str, Any]", record))

    def is_done(self, image_id: str) -> bool:
        """Whether one image is completely written; reads only that image's metadata."""
        try:
            return self.record(image_id).get("status") == DONE
        except StoreError:
            return False

    def done_among(self, image_ids: Sequence[str]) -> set[str]:
        """Those of `image_ids` completely written, their metadata read by READERS threads at once
        (on object storage each read is a round trip)."""
        if len(image_ids) <= 1:
            return {image_id for image_id in image_ids if self.is_done(image_id)}
        with ThreadPoolExecutor(max_workers=min(READERS, len(image_ids))) as pool:
            return {image_id for image_id, done in zip(image_ids, pool.map(self.is_done, image_ids), strict=True) if done}

    def read_cells(self, image_id: str) -> np.ndarray:
        """Instance labels (int32, 0 = background, 1..N one per cell) of a done image; images
        written without them get the connected components of their mask."""
        array = self.array(image_id, CELLS_PATH)
        if array is not None:
            return self.array_data(image_id, CELLS_PATH, array)
        return label_cells(self.read_mask(image_id))[0]

    def read_cell_table(self, image_id: str) -> tuple[list[str], np.ndarray]:
        """(column names, float64 rows) of a done image's per-cell measurements."""
        array = self._optional_array(image_id, CELL_TABLE, "per-cell measurements")
        return self.table_columns(image_id, array), self.array_data(image_id, CELL_TABLE, array)

    def cell_rows(self) -> Iterator[dict[str, Any]]:
        """Every cell of every done image that has measurements, as {"image_id", column: value} rows.
        A damaged image is left out with a warning and noted in `damaged`."""
        for image_id, record in self.records():
            if record.get("status") != DONE:
                continue
            try:
                table = self._cell_table(image_id, record)
            except DamagedImage as error:
                self._note_damage(image_id, error.problem)
                continue
            if table is None:
                continue
            columns, rows = table
            for row in rows:
                yield {"image_id": image_id, **{name: int(value) if name in INTEGER_COLUMNS else float(value)
                                                for name, value in zip(columns, row, strict=True)}}

    def _cell_table(self, image_id: str, record: dict[str, Any]) -> tuple[list[str], np.ndarray] | None:
        """(column names, rows) of a done image's cell table, None when it was written without one;
        DamagedImage when the table is missing, lacks or cannot decode a chunk, or has other columns."""
        table = self.array(image_id, CELL_TABLE, record)
        if table is None:
            return None
        return self.table_columns(image_id, table), self.array_data(image_id, CELL_TABLE, table)

    def read_image(self, image_id: str) -> np.ndarray:
        """The copy of the source image stored with a done result (`PredictConfig.store_image`)."""
        return self.array_data(image_id, IMAGE_PATH, self._optional_array(image_id, IMAGE_PATH, "a copy of its source image"))

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

    def _optional_array(self, image_id: str, path: str, what: str) -> zarr.Array:
        """An array that a done image may have been written without; StoreError naming `what` if so."""
        array = self.array(image_id, path)
        if array is None:
            raise StoreError(f"image '{image_id}' in '{self.url}' was written without {what}")
        return array

    def read_mask(self, image_id: str) -> np.ndarray:
        """Boolean (H, W) mask of a done image."""
        array = self.array(image_id, MASK_PATH)
        assert array is not None  # every done image has a mask: `array` raises DamagedImage without one
        return self.array_data(image_id, MASK_PATH, array) > 0

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
        if recorded and (missing := node.nchunks - node.nchunks_initialized):
            raise DamagedImage(self.url, image_id,
                               f"its {what} '{image_id}/{path}' is missing {missing} of {node.nchunks} chunks")
        return node

    def array_data(self, image_id: str, path: str, array: zarr.Array) -> np.ndarray:
        """The whole of one of an image's arrays; DamagedImage when a chunk cannot be decoded."""
        try:
            return _read(array)
        except CHUNK_ERRORS as error:
            raise DamagedImage(self.url, image_id, f"its {ARRAYS[path][0]} '{image_id}/{path}' has a chunk that "
                                                   f"cannot be decoded ({describe(error)})", undecodable=True) from error

    def table_columns(self, image_id: str, table: zarr.Array) -> list[str]:
        """The column names of an image's cell table; DamagedImage when they do not fit the table."""
        columns = table.attrs.get("columns")
        if not (isinstance(columns, list) and all(isinstance(name, str) for name in columns)
                and len(table.shape) == 2 and len(columns) == table.shape[1]):
            raise DamagedImage(self.url, image_id, f"its cell table '{image_id}/{CELL_TABLE}' has {table.shape} "
                                                   f"values but column names {columns!r}")
        return columns

    def _done_record(self, image_id: str) -> dict[str, Any]:
        """The record of a done image; StoreError when it is not done, DamagedImage when unreadable."""
        record = self.record(image_id)
        if record.get("status") != DONE:
            raise StoreError(f"image '{image_id}' in '{self.url}' is not completely written")
        return record

    def _existing_group(self, image_id: str) -> zarr.Group | zarr.Array | None:
        """The node at `image_id` before it is written; metadata that cannot be read is replaced
        by an empty group's (the image is written anew)."""
        try:
            return self.root.get(image_id)
        except METADATA_ERRORS as error:
            return self._replace_metadata(image_id, error)

    def _require_group(self, path: str) -> zarr.Group:
        """The group at `path`, created if missing; metadata there that cannot be read is replaced
        by an empty group's. Any other refusal (an array there, say) is raised as it is."""
        try:
            return self.root.require_group(path)
        except METADATA_ERRORS as error:
            try:
                self.root.get(path)
            except METADATA_ERRORS:
                return self._replace_metadata(path, error)
            raise

    def _replace_metadata(self, path: str, error: BaseException) -> zarr.Group:
        """Write empty group metadata over the unreadable zarr.json at `path`, and say so."""
        logger.warning("'%s/%s/zarr.json' cannot be read (%s): replaced by empty group metadata", redact_url(self.url), path,
                       describe(error))
        _put_group(self.root.store, f"{self.root.path}/{path}" if self.root.path else path, {})
        return self.root.require_group(path)

    def orphans(self) -> list[str]:
        """Entries under the store that hold data but no zarr.json (a group whose metadata was lost)."""
        def lost(name: str) -> bool:
            try:
                return self.root.get(name) is None and _has_entries(self.root, name)
            except METADATA_ERRORS:  # unreadable, not lost: `records` reports it
                return False

        return [name for name in _child_names(self.root) if lost(name)]

    def statistics(self, on_record: Callable[[str], None] | None = None,
                   read_cell_tables: bool = False) -> list[dict[str, Any]]:
        """The per-image statistics table: one row per done image. With `read_cell_tables`, an image
        whose cell table is damaged is left out as `cell_rows` leaves it out (with a warning, noted in
        `damaged`), so that the two tables join: its statistics would count cells it has no row of."""
        rows = []
        for image_id, record in self.records(on_record):
            if record.get("status") != DONE:
                continue
            if read_cell_tables:
                try:
                    self._cell_table(image_id, record)
                except DamagedImage as error:
                    self._note_damage(image_id, error.problem)
                    continue
            rows.append(_statistics_row(image_id, record))
        return same_columns(rows)

    def failures(self) -> list[dict[str, Any]]:
        """Images whose last attempt failed, with the error."""
        return self.summary().failures

    def unfinished(self) -> list[dict[str, Any]]:
        """Images neither done nor failed, with their status ("writing", or None for a group with no
        record yet): being written by a run now, or left so by a run that stopped; the next run into
        the store segments them (a block-wise one from the blocks it finished)."""
        return self.summary().unfinished

    def summary(self, on_record: Callable[[str], None] | None = None) -> StoreSummary:
        """`statistics()`, `failures()` and `unfinished()` from one pass over the images' metadata
        (on object storage, each image's metadata is a request)."""
        rows: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        unfinished: list[dict[str, Any]] = []
        for image_id, record in self.records(on_record):
            status, source_url = record.get("status"), _shown(record.get("source_url"))
            if status == DONE:
                rows.append(_statistics_row(image_id, record))
            elif status == "failed":
                failures.append({"image_id": image_id, "source_url": source_url, "error": _shown(record.get("error"))})
            else:
                unfinished.append({"image_id": image_id, "source_url": source_url, "status": status})
        return StoreSummary(same_columns(rows), failures, unfinished)


@dataclass(frozen=True)
class StoreSummary:
    """A store's images by status, as `ResultStore.statistics`, `failures` and `unfinished` list them."""

    statistics: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    unfinished: list[dict[str, Any]]


def _statistics_row(image_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """The statistics table's row of a done image, from its record."""
    model = record.get("model", {})
    return {
        "image_id": image_id,
        "source_url": _shown(record.get("source_url")),
        "model_version": model.get("version"),
        **record.get("statistics", {}),
        **source_columns(image_id, record.get("source"), record.get("statistics")),
        "status": DONE,
    }

