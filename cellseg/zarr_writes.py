"""Putting a new image's zarr nodes into a store in one go, regions of whole chunks written and read
without zarr's indexing (the block-wise steps), and the codec its arrays are written with.

zarr's own `create_array` checks whether a node is there already, for the array and each of
its parent groups, before it writes, and `require_group` checks again for each group: on object
storage a request each, one after another (56 requests for one 512x512 image with its copy,
labels and table on SeaweedFS). A new image's group holds nothing yet, so `put_new_nodes`
writes the metadata of its groups and arrays and the chunks of its arrays directly: on object
storage all at once on zarr's event loop (12 requests together for that image), into a local
folder file by file from the calling thread, the chunks encoded there too. What it writes is what
zarr's own calls write, byte for byte (tests/test_zarr_writes.py); each metadata document is made
by zarr once per kind of node and attributes and reused, as the images of a run share most of theirs.

The codec: zstd at level 1 (`ARRAY_CODECS`). Measured on 512x512 and 2048x2048 results
(`python -m benchmarks.storage`, docs/performance.md) it encodes a result 2 to 2.6 times faster
than zarr's default zstd level (3) at the same size within 1% (probabilities, when stored, 11%
larger); blosc's lz4 is faster but 37% larger, blosc's zstd and gzip slower and no smaller, and
blosc starts threads of its own beside the model's. The codec is recorded in each array's
metadata, so stores written with another one read and resume as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import posixpath
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import zarr
from numcodecs.zstd import Zstd
from numcodecs.zstd import decompress as zstd_decompress
from zarr.abc.store import Store
from zarr.codecs import BytesCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
from zarr.core.group import GroupMetadata
from zarr.core.metadata import ArrayV3Metadata
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from cellseg import s3_direct
from cellseg.store_codecs import BoundedZstdCodec, zstd_content_size

ARRAY_CODECS = (BoundedZstdCodec(level=1),)  # bytes-to-bytes codecs of every array cellseg writes
# Each chunk a file beside its array's zarr.json ("c.0.0") instead of zarr's default folders
# ("c/0/0"): eight folders fewer per image, the costliest things to make on a local disk
# (docs/performance.md); any zarr v3 reader takes either from the array's metadata.
CHUNK_KEY_ENCODING = DefaultChunkKeyEncoding(separator=".")


@dataclass(frozen=True)
class NewArray:
    """An array to write under `path` (relative to the store's root): its data (any shape and
    dtype), chunk shape, dimension names and attributes."""

    path: str
    data: np.ndarray
    chunks: tuple[int, ...]
    dimension_names: tuple[str, ...]
    attributes: dict[str, Any] | None = None


def array_metadata(array: NewArray) -> tuple[ArrayV3Metadata, bytes]:
    """The zarr v3 metadata zarr itself gives such an array, and its zarr.json (no I/O)."""
    return _array_metadata(array.data.dtype, array.dimension_names, tuple(array.data.shape), tuple(array.chunks),
                           *_json_key(array.attributes or {}))


@lru_cache(maxsize=256)
def _array_metadata(dtype: np.dtype, dimension_names: tuple[str, ...], shape: tuple[int, ...], chunks: tuple[int, ...],
                    json_indent: int | None, attributes: str) -> tuple[ArrayV3Metadata, bytes]:
    """An array's metadata and its zarr.json as zarr writes it, made once per kind of array (the
    images of a run share most of theirs): zarr's JSON took 0.1-0.2 ms per document."""
    document = {**_metadata_template(dtype, dimension_names), "shape": shape,
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunks}},
                "attributes": json.loads(attributes)}
    meta = ArrayV3Metadata.from_dict(document)
    return meta, meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


@lru_cache(maxsize=256)
def _group_document(json_indent: int | None, attributes: str) -> bytes:
    """A group's zarr.json as zarr writes it, for attributes given as JSON (`_json_key`)."""
    return GroupMetadata(attributes=json.loads(attributes)).to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _json_key(attributes: Mapping[str, Any]) -> tuple[int | None, str]:
    """Attributes as a cache key: zarr's indent (which zarr reads on each call) and the attributes
    as JSON, which decodes to what zarr would write for them (zarr writes JSON too, so equal keys
    give equal documents)."""
    return zarr.config.get("json_indent"), json.dumps(attributes, allow_nan=True)


@lru_cache(maxsize=64)
def _metadata_template(dtype: np.dtype, dimension_names: tuple[str, ...]) -> dict[str, Any]:
    """zarr's metadata document of an array of this type and these dimensions, made once in memory
    by zarr itself (a tenth of a millisecond per array after that, instead of one)."""
    ones = (1,) * len(dimension_names)
    created = zarr.create_array(MemoryStore(), shape=ones, dtype=dtype, chunks=ones, compressors=ARRAY_CODECS,
                                chunk_key_encoding=CHUNK_KEY_ENCODING, dimension_names=dimension_names)
    return created.metadata.to_dict()


def put_new_nodes(store: Store, groups: Mapping[str, Mapping[str, Any]], arrays: Sequence[NewArray]) -> None:
    """Write groups (path -> attributes) and arrays into `store`, over whatever is at their keys:
    each object is replaced whole. Nothing is read or deleted first, so use it only for nodes that
    are new (or that may be overwritten object by object). Every chunk is written, also one that
    holds only the fill value (as zarr does with `write_empty_chunks`).

    The objects are written as `put_objects` writes them."""
    objects = [(f"{path}/zarr.json", _group_document(*_json_key(attributes))) for path, attributes in groups.items()]
    for array in arrays:
        meta, metadata_document = array_metadata(array)
        objects.append((f"{array.path}/zarr.json", metadata_document))
        objects += [(f"{array.path}/{key}", data) for key, data in encoded_chunks(array, meta)]
    put_objects(store, objects)


def put_objects(store: Store, objects: Sequence[tuple[str, bytes]]) -> None:
    """Write each (key, bytes) into `store`, replacing whatever is at the key. Into a local folder
    one after another from the calling thread; into an S3 bucket concurrently with obstore where it
    writes as s3fs would (`cellseg.s3_direct`); into any other store concurrently, on zarr's event
    loop."""
    if isinstance(store, LocalStore):
        # Files are written at the cost of the system calls: through zarr's event loop and its
        # thread per file the same writes cost twice the CPU time (docs/performance.md, "Writes").
        _write_files(store, objects)
        return
    sync(_put(store, objects))


def _write_files(store: LocalStore, objects: Sequence[tuple[str, bytes]]) -> None:
    """Each (key, bytes) as a file under the store's folder, as `LocalStore.set` writes one (into a
    temporary file beside it, then renamed over it: a reader sees the old file or the new one,
    never part of one), with each folder made once for all the files instead of once per file."""
    if store.read_only:
        raise ValueError(f"store '{store.root}' was opened read-only and cannot be written")
    root = os.fspath(store.root)
    os.makedirs(root, exist_ok=True)  # as an unopened LocalStore makes its folder on its first write
    folders = {posixpath.dirname(key) for key, _ in objects}
    for folder in sorted({ancestor for folder in folders if folder for ancestor in _ancestors(folder)},
                         key=lambda folder: folder.count("/")):
        with contextlib.suppress(FileExistsError):  # a file in the way fails the writes below
            os.mkdir(os.path.join(root, folder))
    for key, document in objects:
        path = os.path.join(root, key)
        temporary = f"{path}.{uuid.uuid4().hex}.partial"
        try:
            with open(temporary, "wb") as file:
                file.write(document)
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                os.unlink(temporary)
            raise


def _ancestors(folder: str) -> list[str]:
    """'a/b/c' -> ['a', 'a/b', 'a/b/c']."""
    parts = folder.split("/")
    return ["/".join(parts[: count + 1]) for count in range(len(parts))]


def encoded_chunks(array: NewArray, meta: ArrayV3Metadata) -> list[tuple[str, bytes]]:
    """Each chunk of `array` by its key under the array, encoded as zarr encodes it with
    `ARRAY_CODECS` (`meta` is `array_metadata(array)[0]`): the chunk at its full shape, edge chunks
    padded with the fill value, its bytes in C order, little-endian, zstd-compressed."""
    # Encoded here, in the caller's thread, instead of through zarr's codec pipeline: for the few
    # chunks of an image, that pipeline's tasks and thread hand-offs cost more than the compression.
    if not _own_codecs(meta):
        raise ValueError(f"'{array.path}' is not encoded with cellseg's codecs: {meta.codecs}")
    chunk_shape = array.chunks
    encode = _chunk_encoder(meta, array.data.dtype)
    encoded = []
    for coords in np.ndindex(*(-(-side // chunk) for side, chunk in zip(array.data.shape, chunk_shape, strict=True))):
        window = tuple(slice(index * chunk, (index + 1) * chunk) for index, chunk in zip(coords, chunk_shape, strict=True))
        encoded.append((meta.encode_chunk_key(coords), encode(array.data[window])))
    return encoded


def _chunk_encoder(meta: ArrayV3Metadata, dtype: np.dtype) -> Callable[[np.ndarray], bytes]:
    """Encodes one chunk's data as zarr does with `ARRAY_CODECS`: at the chunk's full shape (an
    edge chunk padded with the fill value), its bytes in C order, little-endian, zstd-compressed."""
    zstd = Zstd(level=ARRAY_CODECS[0].level, checksum=ARRAY_CODECS[0].checksum)
    little = np.dtype(dtype).newbyteorder("<")
    chunk_shape = tuple(meta.chunks)

    def encode(part: np.ndarray) -> bytes:
        if part.shape != chunk_shape:
            full = np.full(chunk_shape, meta.fill_value, dtype=little)
            full[tuple(slice(0, side) for side in part.shape)] = part
            part = full
        return zstd.encode(np.ascontiguousarray(part, dtype=little))

    return encode


async def _put(store: Store, objects: Sequence[tuple[str, bytes]]) -> None:
    writer = await s3_direct.direct_writer(store)
    if writer is not None and await writer.write(objects):
        return
    prototype = default_buffer_prototype()
    tasks = [asyncio.ensure_future(store.set(key, prototype.buffer.from_bytes(document))) for key, document in objects]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # The first failure is raised as it is (an OSError says whether the store can be written);
        # the other writes stop rather than go on behind a retry.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


# Regions of whole chunks ----------------------------------------------------------------------------
# The block-wise steps (`cellseg.blocks`) write and read back regions of their arrays that are
# whole chunks. Through zarr's indexing each such call is a round trip to its event loop, its
# codec pipeline and a thread per chunk: 1.5 ms per call before any data, and about twice the
# time of encoding and writing the same chunks here (docs/performance.md, "Images bigger than
# memory"). Arrays written with other codecs, and regions that are not whole chunks, go through zarr.


def _own_codecs(meta: Any) -> bool:
    """Whether `meta` is zarr v3 metadata of an array encoded as cellseg encodes its arrays."""
    if not isinstance(meta, ArrayV3Metadata):
        return False
    bytes_codec, *compressors = meta.codecs
    return isinstance(bytes_codec, BytesCodec) and compressors == list(ARRAY_CODECS)


def _chunk_span(array: zarr.Array, start: Sequence[int], shape: Sequence[int]) -> list[range] | None:
    """The chunk indices along each axis of the region at `start` of `shape`, or None when the
    region does not begin and end on chunk edges (or the array's end) or leaves the array."""
    spans = []
    for first, size, side, chunk in zip(start, shape, array.shape, array.chunks, strict=True):
        end = first + size
        if first < 0 or size <= 0 or end > side or first % chunk or (end % chunk and end != side):
            return None
        spans.append(range(first // chunk, -(-end // chunk)))
    return spans


def write_region(array: zarr.Array, start: Sequence[int], data: np.ndarray) -> None:
    """`array[start : start + data.shape] = data`, every chunk written (as `write_empty_chunks`);
    a region of whole chunks of an array with cellseg's codecs is encoded in the calling thread and
    written as `put_objects` writes (the array's edge chunks padded with its fill value)."""
    meta = array.metadata
    spans = _chunk_span(array, start, data.shape) if len(start) == data.ndim == array.ndim else None
    if spans is None or not _own_codecs(meta):
        array[tuple(slice(first, first + size) for first, size in zip(start, data.shape, strict=True))] = data
        return
    assert isinstance(meta, ArrayV3Metadata)
    chunk_shape = tuple(array.chunks)
    encode = _chunk_encoder(meta, array.dtype)
    objects = []
    for coords in np.ndindex(*(len(span) for span in spans)):
        index = tuple(span[position] for span, position in zip(spans, coords, strict=True))
        window = tuple(slice(position * chunk, position * chunk + chunk)
                       for position, chunk in zip(coords, chunk_shape, strict=True))
        objects.append((f"{array.path}/{meta.encode_chunk_key(index)}", encode(data[window])))
    put_objects(array.store, objects)


def read_region(array: zarr.Array, start: Sequence[int], shape: Sequence[int]) -> np.ndarray:
    """`array[start : start + shape]` as numpy; from an array with cellseg's codecs, the chunks that
    cover the region are read and decoded in the calling thread (a chunk not stored reads as the
    fill value). A chunk that is no zstd frame, whose header declares another size than its
    shape's (checked before it is decoded), or whose frame does not decode raises UndecodableChunk."""
    meta = array.metadata
    region = tuple(slice(first, first + size) for first, size in zip(start, shape, strict=True))
    inside = len(region) == array.ndim and all(0 <= part.start < part.stop <= side
                                                for part, side in zip(region, array.shape, strict=True))
    if not inside or not _own_codecs(meta):
        return np.asarray(array[region])
    assert isinstance(meta, ArrayV3Metadata)
    dtype = np.dtype(array.dtype).newbyteorder("<")
    chunk_shape = tuple(array.chunks)
    expected = int(np.prod(chunk_shape)) * dtype.itemsize
    indices = list(itertools.product(*(range(part.start // chunk, -(-part.stop // chunk))
                                       for part, chunk in zip(region, chunk_shape, strict=True))))
    keys = [f"{array.path}/{meta.encode_chunk_key(index)}" for index in indices]
    out = np.empty(tuple(shape), dtype=np.dtype(array.dtype))
    decoded = np.empty(expected, dtype=np.uint8)
    for index, key, document in zip(indices, keys, get_objects(array.store, keys), strict=True):
        # The part of the region in this chunk: where it goes in `out`, and where it is in the chunk.
        lows = [max(part.start, position * chunk) for part, position, chunk in zip(region, index, chunk_shape, strict=True)]
        highs = [min(part.stop, (position + 1) * chunk) for part, position, chunk in zip(region, index, chunk_shape, strict=True)]
        target = tuple(slice(low - part.start, high - part.start) for low, high, part in zip(lows, highs, region, strict=True))
        if document is None:
            out[target] = meta.fill_value
            continue
        if (declared := zstd_content_size(document)) is None:
            raise UndecodableChunk(key, "it is no zstd frame that declares its size")
        if declared != expected:  # checked before a byte is allocated for it
            raise UndecodableChunk(key, f"it holds {declared} bytes, not the {expected} of its shape {chunk_shape}")
        try:
            chunk = np.frombuffer(zstd_decompress(document, decoded), dtype=dtype).reshape(chunk_shape)
        except RuntimeError as error:  # a frame torn or garbled after its header
            raise UndecodableChunk(key, str(error)) from error
        out[target] = chunk[tuple(slice(low - position * size, high - position * size)
                                  for low, high, position, size in zip(lows, highs, index, chunk_shape, strict=True))]
    return out


class UndecodableChunk(ValueError):
    """A stored chunk whose bytes do not decode to its array's chunk (torn, garbled, another codec's)."""

    def __init__(self, key: str, problem: str):
        super().__init__(f"chunk '{key}' cannot be decoded: {problem}")
        self.key = key

    def __reduce__(self) -> tuple[Any, ...]:  # the key kept across processes (Dask)
        return type(self), (self.key, str(self).split(": ", 1)[1])


def missing_chunks(array: zarr.Array, indices: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Those of the chunks at `indices` of `array` that are not stored (zarr would read them as its
    fill value): one listing of the array's keys."""
    if not indices:
        return []
    prefix = f"{array.path}/" if array.path else ""

    async def listed() -> set[str]:
        return {key[len(prefix):] async for key in array.store.list_prefix(prefix)}

    stored = sync(listed())
    meta = array.metadata
    assert isinstance(meta, ArrayV3Metadata)
    return [tuple(index) for index in indices if meta.encode_chunk_key(tuple(index)) not in stored]


def get_objects(store: Store, keys: Sequence[str]) -> list[bytes | None]:
    """The bytes at each key of `store` (None where nothing is): files of a local folder read from
    the calling thread, any other store's objects concurrently on zarr's event loop."""
    if isinstance(store, LocalStore):
        root = os.fspath(store.root)
        found: list[bytes | None] = []
        for key in keys:
            try:
                with open(os.path.join(root, key), "rb") as file:
                    found.append(file.read())
            except (FileNotFoundError, NotADirectoryError):
                found.append(None)
        return found
    return sync(_get(store, keys))


async def _get(store: Store, keys: Sequence[str]) -> list[bytes | None]:
    prototype = default_buffer_prototype()
    buffers = await asyncio.gather(*(store.get(key, prototype) for key in keys))
    return [None if buffer is None else buffer.to_bytes() for buffer in buffers]
