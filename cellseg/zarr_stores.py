"""zarr stores whose metadata documents are read bounded in size.

zarr reads a node's metadata (zarr.json, or v2's .zarray, .zgroup, .zattrs) whole and parses it,
whatever its size: a results store or an input image with a 200 MB zarr.json took that and the
parse's several times more before anything could say the file is wrong. These stores read at most
MAX_METADATA_BYTES + 1 bytes of such a document, in the one request a whole read makes (a range
read), and refuse a longer one with a ValueError naming it, which cellseg reports as unreadable
metadata (and `cellseg verify` as damage; `FileTooLarge`). Everything else is zarr's LocalStore and FsspecStore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zarr.abc.store import ByteRequest, RangeByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from cellseg.bounded_reads import FileTooLarge, read_at_most

MAX_METADATA_BYTES = 16 * 2**20  # a results store's image zarr.json is some 2 KB, an OME-Zarr image's tens of KB
METADATA_KEYS = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})


def _is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in METADATA_KEYS


def _bounded(key: str, buffer: Buffer | None) -> Buffer | None:
    if buffer is not None and len(buffer) > MAX_METADATA_BYTES:
        raise FileTooLarge(f"'{key}' is larger than the {MAX_METADATA_BYTES // 2**20} MiB that any zarr metadata may "
                           "take; not read")
    return buffer


class BoundedLocalStore(LocalStore):
    """zarr's LocalStore, reading metadata documents bounded in size."""

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is None and _is_metadata(key):
            return _bounded(key, await super().get(key, prototype, RangeByteRequest(0, MAX_METADATA_BYTES + 1)))
        return await super().get(key, prototype, byte_range)


class BoundedFsspecStore(FsspecStore):
    """zarr's FsspecStore, reading metadata documents bounded in size."""

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        if byte_range is None and _is_metadata(key):
            return _bounded(key, await super().get(key, prototype, RangeByteRequest(0, MAX_METADATA_BYTES + 1)))
        return await super().get(key, prototype, byte_range)


def read_metadata_document(fs: Any, path: str) -> bytes:
    """The bytes of the metadata document at `path` on fsspec filesystem `fs`, read bounded as the
    stores read it (FileTooLarge past MAX_METADATA_BYTES)."""
    return read_at_most(fs, path, MAX_METADATA_BYTES, "any zarr metadata")


def bounded_store(location: str, mode: str, storage_options: dict[str, Any] | None = None) -> Store:
    """The store zarr would open at `location` (an fsspec URL, or a local path) in `mode`, as a
    bounded one: what `zarr.open_group(location, mode=mode, storage_options=...)` makes."""
    read_only = mode == "r"
    if "://" in location or "::" in location:
        async def on_zarrs_loop() -> Store:
            # Made in zarr's event loop thread, as zarr makes its own: fsspec keeps a filesystem
            # instance, and its listing cache, per thread, and the store's writers invalidate theirs.
            return BoundedFsspecStore.from_url(location, storage_options=storage_options, read_only=read_only)

        return sync(on_zarrs_loop())
    if storage_options:
        raise TypeError("storage options are only used with a URL, not with the local path "
                        f"'{location}'")
    return sync(BoundedLocalStore.open(root=Path(location), mode=mode, read_only=read_only))  # type: ignore[arg-type]
