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

import os

from cellseg.io import StorageOptions
from cellseg.store_blockwise import BlockwiseWrites
from cellseg.store_layout import StoreMode
from cellseg.store_open import open_root
from cellseg.store_tables import StoreTables


class ResultStore(BlockwiseWrites, StoreTables):
    """Read and write segmentation results in a zarr store at an fsspec URL (local path by default):
    its records (`store_records`), arrays (`store_arrays`) and tables (`store_tables`) read, results
    written (`store_writes`), block-wise images region by region (`store_blockwise`)."""

    @classmethod
    def open(cls, url: str | os.PathLike[str], mode: StoreMode = "a", storage_options: StorageOptions = None
             ) -> ResultStore:
        """Open `url` (a URL or a local path), creating the store when `mode` allows it; refuses
        groups that are not cellseg stores and, for writing, targets where a store would keep
        nothing or take over other data (`check_store_target`)."""
        url = os.fspath(url)
        return cls(open_root(url, mode, storage_options), url)
