"""Writing one image's result into a store: its arrays, NGFF metadata and done mark (last), a
failure, or the withdrawal of a damaged image's done mark; never deleting a concurrent writer's files."""

from __future__ import annotations

import logging
import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import zarr
from fsspec.core import split_protocol
from zarr.abc.store import Store
from zarr.errors import ContainsArrayError, ContainsGroupError

from cellseg.json_values import dumps, finite_json
from cellseg.redact import redact, redact_text, redact_url
from cellseg.store_checks import DONE, FAILED, StoreError, describe, validate_image_id
from cellseg.store_layout import (
    CELL_TABLE,
    CELLS_NAME,
    CELLS_PATH,
    CHUNK_SIDE,
    IMAGE_PATH,
    MASK_NAME,
    MASK_PATH,
    METADATA_ERRORS,
    PROBABILITIES_PATH,
    TABLE_CHUNK_ROWS,
    WRITE_CONFIG,
    now,
)
from cellseg.store_ngff import NGFF_VERSION, ngff_label, ngff_multiscales
from cellseg.store_records import StoreRecords
from cellseg.zarr_writes import ARRAY_CODECS, CHUNK_KEY_ENCODING, NewArray, put_new_nodes, put_objects

logger = logging.getLogger("cellseg.store")  # the store's one logger, whichever of its modules speaks


def recorded_source(url: str) -> str:
    """`url` as a result records it: redacted, and a local path made absolute, since a relative
    one names nothing once read from another directory."""
    return redact_url(url if split_protocol(url)[0] else os.path.abspath(url))


def _cellseg_attrs(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """The node's "cellseg" attribute ({} when it has none, or a damaged one that is no JSON object)."""
    record = node.attrs.get("cellseg", {})
    return record if isinstance(record, dict) else {}


def _new_array(path: str, data: np.ndarray) -> NewArray:
    """An image-shaped (y, x) array, in tiles of up to CHUNK_SIDE x CHUNK_SIDE."""
    return NewArray(path, data, tuple(min(side, CHUNK_SIDE) for side in data.shape), ("y", "x"))


def _put_group(store: Store, path: str, attributes: dict[str, Any]) -> None:
    """Write fresh zarr v3 group metadata at `path` of `store` over whatever zarr.json is there;
    nothing under it is touched (zarr's own overwrite would delete the group's arrays)."""
    document = {"zarr_format": 3, "node_type": "group", "attributes": attributes}
    key = f"{path}/zarr.json" if path else "zarr.json"
    put_objects(store, [(key, dumps(document).encode())])


class NotAnImageGroup(StoreError):
    """Something other than a group (an array) is where an image's group belongs."""


class StoreWrites(StoreRecords):
    """Writing results into a zarr results store (`cellseg.store.ResultStore`)."""

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
        arrays.append(_new_array(f"{image_id}/labels/{MASK_NAME}/0", mask.astype(np.uint8, copy=False)))
        if cells is not None:
            arrays.append(_new_array(f"{image_id}/labels/{CELLS_NAME}/0", cells.astype(np.int32, copy=False)))
        if probabilities is not None:
            arrays.append(_new_array(f"{image_id}/{PROBABILITIES_PATH}", probabilities.astype(np.float16)))
        if cell_table is not None:
            columns, rows = cell_table
            arrays.append(NewArray(f"{image_id}/{CELL_TABLE}", rows.astype(np.float64, copy=False),
                                   (max(1, min(len(rows), TABLE_CHUNK_ROWS)), len(columns)), ("cell", "column"),
                                   {"columns": list(columns)}))
        label_names = [CELLS_NAME, MASK_NAME] if cells is not None else [MASK_NAME]
        pixel_size = (source or {}).get("pixel_size_yx_um")
        labels = {f"{image_id}/labels/{name}": {"ome": ngff_label(name, source_image=image is not None,
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
        attributes: dict[str, Any] = {"ome": ngff_multiscales(image_id, pixel_size)} if image is not None else {}
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
            "written": now(),
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

    def record_failure(self, image_id: str, source_url: str, error: str, model: Mapping[str, Any]) -> None:
        """Note that an image could not be segmented; a later run tries it again.

        A result that is already done (written by another run meanwhile) is kept, never replaced
        by a failure. Where an array is in the image's place the failure is said, not recorded.
        """
        try:
            group = self._require_group(validate_image_id(image_id, source_url))
        except NotAnImageGroup as refused:
            logger.warning("the failure of '%s' is not recorded in the store: %s", redact_url(source_url), refused)
            return
        if _cellseg_attrs(group).get("status") == DONE:
            return
        group.attrs["cellseg"] = {
            "status": FAILED,
            "source_url": recorded_source(source_url),
            "error": redact_text(error),
            "model": redact(dict(model)),
            "written": now(),
        }

    def mark_damaged(self, image_id: str, problem: str) -> None:
        """Withdraw a damaged image's done mark: record it failed ("damaged: <problem>"), replacing
        metadata that cannot be read, so that the next run segments it again. Its arrays stay for
        that run to overwrite."""
        group = self._require_group(validate_image_id(image_id))
        previous = _cellseg_attrs(group)
        group.attrs["cellseg"] = {
            "status": FAILED,
            "source_url": previous.get("source_url"),
            "error": f"damaged: {problem}",
            "model": previous.get("model") if isinstance(previous.get("model"), dict) else {},
            "written": now(),
        }
        self.damaged.pop(image_id, None)

    def _existing_group(self, image_id: str) -> zarr.Group | zarr.Array | None:
        """The node at `image_id` before it is written; metadata that cannot be read is replaced
        by an empty group's (the image is written anew)."""
        try:
            return self.root.get(image_id)
        except METADATA_ERRORS as error:
            return self._replace_metadata(image_id, error)

    def _require_group(self, path: str) -> zarr.Group:
        """The group at `path`, created if missing; metadata there that cannot be read is replaced
        by an empty group's. An array there is refused (NotAnImageGroup naming it): cellseg does not
        remove what it did not write. Any other refusal is raised as it is."""
        try:
            return self.root.require_group(path)
        except METADATA_ERRORS as error:
            try:
                node = self.root.get(path)
            except METADATA_ERRORS:
                return self._replace_metadata(path, error)
            if isinstance(node, zarr.Array):
                raise NotAnImageGroup(f"'{path}' in '{redact_url(self.url)}' is a zarr array, not an image's group: "
                                      "move or remove it (cellseg leaves what it did not write), then run again"
                                      ) from error
            raise

    def _replace_metadata(self, path: str, error: BaseException) -> zarr.Group:
        """Write empty group metadata over the unreadable zarr.json at `path`, and say so."""
        logger.warning("'%s/%s/zarr.json' cannot be read (%s): replaced by empty group metadata", redact_url(self.url), path,
                       describe(error))
        _put_group(self.root.store, f"{self.root.path}/{path}" if self.root.path else path, {})
        return self.root.require_group(path)
