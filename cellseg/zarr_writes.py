"""Putting a new image's zarr nodes into a store in one go, and the codec its arrays are written with.

zarr's own `create_array` checks whether a node is there already, for the array and each of
its parent groups, before it writes, and `require_group` checks again for each group: on object
storage a request each, one after another (56 requests for one 512x512 image with its copy,
labels and table on SeaweedFS). A new image's group holds nothing yet, so `put_new_nodes`
writes the metadata of its groups and arrays and the chunks of its arrays directly, all at once
on zarr's event loop (12 requests together for that image). What it writes is what zarr's own
calls write (tests/test_zarr_writes.py).

The codec: zstd at level 1 (`ARRAY_CODECS`). Measured on 512x512 and 2048x2048 results
(`python -m benchmarks.storage`, docs/performance.md) it encodes a result 2 to 2.6 times faster
than zarr's default zstd level (3) at the same size within 1% (probabilities, when stored, 11%
larger); blosc's lz4 is faster but 37% larger, blosc's zstd and gzip slower and no smaller, and
blosc starts threads of its own beside the model's. The codec is recorded in each array's
metadata, so stores written with another one read and resume as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr
from zarr.abc.store import Store
from zarr.codecs import ZstdCodec
from zarr.core.array import AsyncArray
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import MemoryStore, StorePath

if TYPE_CHECKING:
    from zarr.core.array_spec import ArrayConfigParams

ARRAY_CODECS = (ZstdCodec(level=1),)  # bytes-to-bytes codecs of every array cellseg writes


@dataclass(frozen=True)
class NewArray:
    """An array to write under `path` (relative to the store's root): its data (any shape and
    dtype), chunk shape, dimension names and attributes."""

    path: str
    data: np.ndarray
    chunks: tuple[int, ...]
    dimension_names: tuple[str, ...]
    attributes: dict[str, Any] | None = None


def array_metadata(array: NewArray) -> ArrayV3Metadata:
    """The zarr v3 metadata zarr itself gives such an array (no I/O)."""
    document = {**_metadata_template(array.data.dtype, array.dimension_names), "shape": array.data.shape,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": array.chunks}},
                "attributes": array.attributes or {}}
    return ArrayV3Metadata.from_dict(document)


@lru_cache(maxsize=64)
def _metadata_template(dtype: np.dtype, dimension_names: tuple[str, ...]) -> dict[str, Any]:
    """zarr's metadata document of an array of this type and these dimensions, made once in memory
    by zarr itself (a tenth of a millisecond per array after that, instead of one)."""
    ones = (1,) * len(dimension_names)
    created = zarr.create_array(MemoryStore(), shape=ones, dtype=dtype, chunks=ones, compressors=ARRAY_CODECS,
                                dimension_names=dimension_names)
    return created.metadata.to_dict()


def put_new_nodes(store: Store, groups: Mapping[str, Mapping[str, Any]], arrays: Sequence[NewArray],
                  config: ArrayConfigParams) -> None:
    """Write groups (path -> attributes) and arrays into `store` concurrently, over whatever is at
    their keys: each object is replaced whole. Nothing is read or deleted first, so use it only
    for nodes that are new (or that may be overwritten object by object)."""
    metadata = [array_metadata(array) for array in arrays]  # before the loop: zarr's sync API blocks it
    sync(_put(store, groups, arrays, metadata, config))


async def _put(store: Store, groups: Mapping[str, Mapping[str, Any]], arrays: Sequence[NewArray],
               metadata: Sequence[ArrayV3Metadata], config: ArrayConfigParams) -> None:
    prototype = default_buffer_prototype()

    async def put_group(path: str, attributes: Mapping[str, Any]) -> None:
        document = GroupMetadata(attributes=dict(attributes)).to_buffer_dict(prototype)["zarr.json"]
        await store.set(f"{path}/zarr.json", document)

    async def put_array(array: NewArray, meta: ArrayV3Metadata) -> None:
        await store.set(f"{array.path}/zarr.json", meta.to_buffer_dict(prototype)["zarr.json"])
        await AsyncArray(meta, StorePath(store, array.path), config).setitem(..., array.data)

    tasks = [asyncio.ensure_future(put_group(path, attributes)) for path, attributes in groups.items()]
    tasks += [asyncio.ensure_future(put_array(array, meta)) for array, meta in zip(arrays, metadata, strict=True)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # The first failure is raised as it is (an OSError says whether the store can be written);
        # the other writes stop rather than go on behind a retry.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
