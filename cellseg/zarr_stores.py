"""zarr stores whose metadata documents are read bounded in size.

zarr reads a node's metadata (zarr.json, or v2's .zarray, .zgroup, .zattrs, .zmetadata) whole and
parses it, whatever its size: a results store or an input image with a 1 GiB zarr.json took that
and the parse's several times more before anything could say the file is wrong. These stores
refuse a longer document than their limit with `FileTooLarge` (a ValueError naming it), which
cellseg reports as unreadable metadata (and `cellseg verify` as damage): on local disk from the
file's size, on object storage by reading at most the limit + 1 bytes in the one request a whole
read makes (a range read). Everything else is zarr's LocalStore and FsspecStore.

A results store's documents are cellseg's own, some KB each. An input's may hold an HCS plate's
consolidated metadata, about a KB per array (wells x fields x levels): its limit is larger.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from zarr.abc.store import ByteRequest, RangeByteRequest, Store
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

from cellseg.bounded_reads import FileTooLarge, read_at_most, too_large

MAX_METADATA_BYTES = 16 * 2**20  # of a results store's documents (an image's zarr.json is some 2 KB)
MAX_INPUT_METADATA_BYTES = 256 * 2**20  # of an input's: a plate of 1536 wells x 9 fields x 6 levels is some 80 MB
METADATA_KEYS = frozenset({"zarr.json", ".zarray", ".zgroup", ".zattrs", ".zmetadata"})


def _is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in METADATA_KEYS


def _too_large(key: str, limit: int) -> FileTooLarge:
    return too_large(key, limit, "any zarr metadata")


class BoundedLocalStore(LocalStore):
    """zarr's LocalStore, refusing metadata documents past `metadata_limit` bytes from their size."""

    metadata_limit: ClassVar[int] = MAX_METADATA_BYTES

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        if byte_range is None and _is_metadata(key):
            try:
                size = (self.root / key).stat().st_size
            except OSError:  # missing, or not a file: zarr's own get says what it says of it
                size = 0
            if size > self.metadata_limit:
                raise _too_large(key, self.metadata_limit)
        return await super().get(key, prototype, byte_range)


class BoundedFsspecStore(FsspecStore):
    """zarr's FsspecStore, reading metadata documents no longer than `metadata_limit` bytes."""

    metadata_limit: ClassVar[int] = MAX_METADATA_BYTES

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        prototype = prototype or default_buffer_prototype()
        if byte_range is None and _is_metadata(key):
            buffer = await super().get(key, prototype, RangeByteRequest(0, self.metadata_limit + 1))
            if buffer is not None and len(buffer) > self.metadata_limit:
                raise _too_large(key, self.metadata_limit)
            return buffer
        return await super().get(key, prototype, byte_range)


class _InputLocalStore(BoundedLocalStore):
    metadata_limit = MAX_INPUT_METADATA_BYTES


class _InputFsspecStore(BoundedFsspecStore):
    metadata_limit = MAX_INPUT_METADATA_BYTES


def read_metadata_document(fs: Any, path: str) -> bytes:
    """The bytes of a results store's metadata document at `path` on fsspec filesystem `fs`, read
    bounded as its store reads it (FileTooLarge past MAX_METADATA_BYTES)."""
    return read_at_most(fs, path, MAX_METADATA_BYTES, "any zarr metadata")


def bounded_store(location: str, mode: str, storage_options: dict[str, Any] | None = None,
                  input_image: bool = False) -> Store:
    """The store zarr would open at `location` (an fsspec URL, or a local path) in `mode`, as a
    bounded one: what `zarr.open_group(location, mode=mode, storage_options=...)` makes. A results
    store's, or with `input_image` an input's, with the larger limit."""
    read_only = mode == "r"
    if "://" in location or "::" in location:
        remote = _InputFsspecStore if input_image else BoundedFsspecStore

        async def on_zarrs_loop() -> Store:
            # Made in zarr's event loop thread, as zarr makes its own: fsspec keeps a filesystem
            # instance, and its listing cache, per thread, and the store's writers invalidate theirs.
            return remote.from_url(location, storage_options=storage_options, read_only=read_only)

        return sync(on_zarrs_loop())
    if storage_options:
        raise TypeError("storage options are only used with a URL, not with the local path "
                        f"'{location}'")
    local = _InputLocalStore if input_image else BoundedLocalStore
    return sync(local.open(root=Path(location), mode=mode, read_only=read_only))  # type: ignore[arg-type]
