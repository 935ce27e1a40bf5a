"""zstd chunks decoded only where they fit their chunk: a store's chunk of a few kilobytes can
inflate to gigabytes (1 GB of zeros compresses to 32 KB), and the codec allocates whatever its
frames ask for before zarr finds the chunk too big. `BoundedZstdCodec` reads the frames' headers
first and refuses a chunk whose frames could decode past the bytes its chunk holds; it is the
codec zarr uses for "zstd" once this module is imported (`cellseg.store_layout` does), and it
writes exactly what zarr's own does."""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

import numpy as np
import zarr
from zarr.codecs import ZstdCodec
from zarr.registry import fully_qualified_name, register_codec

if TYPE_CHECKING:
    from zarr.core.array_spec import ArraySpec
    from zarr.core.buffer import Buffer

FRAME_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC = 0x184D2A50  # the low 4 bits are free
MAX_BLOCK_BYTES = 128 * 1024  # what one block of a frame decodes to at most (the format's Block_Maximum_Size)


class InflatedChunk(RuntimeError):
    """A zstd chunk whose frames would decode past its chunk's size (a RuntimeError, as zstd's own
    decode errors are: the store reads it as a damaged chunk)."""


def zstd_content_size(frame: bytes | memoryview) -> int | None:
    """The decompressed size a zstd frame's header declares (RFC 8878, 3.1.1.1), None when it
    declares none or is not a zstd frame."""
    header = _frame_header(memoryview(frame), 0)
    return None if header is None else header[0]


def _frame_header(view: memoryview, position: int) -> tuple[int | None, int, bool] | None:
    """The zstd frame header at `position`: (the content size it declares, or None; where its
    blocks begin; whether a checksum follows them), or None where there is no whole header."""
    end = len(view)
    if position + 5 > end or int.from_bytes(view[position : position + 4], "little") != FRAME_MAGIC:
        return None
    descriptor = view[position + 4]
    size_flag, single_segment = descriptor >> 6, (descriptor >> 5) & 1
    position += 5 + (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 3]  # window, dictionary id
    size_bytes = (single_segment, 2, 4, 8)[size_flag]
    if position + size_bytes > end:
        return None
    declared = int.from_bytes(view[position : position + size_bytes], "little") + (256 if size_bytes == 2 else 0)
    return (declared if size_bytes else None), position + size_bytes, bool(descriptor & 4)


def zstd_decoded_bound(data: bytes | memoryview) -> int | None:
    """The most bytes the zstd frames in `data` decode to: each frame's declared content size (the
    size the decoder allocates), or for a frame that declares none, 128 KiB per block. None where the
    frames cannot be walked: libzstd then names the damage without inflating anything."""
    view = memoryview(data)
    end, position, total = len(view), 0, 0
    while position < end:
        if position + 8 <= end and int.from_bytes(view[position : position + 4], "little") & 0xFFFFFFF0 \
                == SKIPPABLE_MAGIC:
            position += 8 + int.from_bytes(view[position + 4 : position + 8], "little")
            continue
        header = _frame_header(view, position)
        if header is None:
            return None
        declared, position, checksum = header
        blocks, last = 0, False
        while not last:
            if position + 3 > end:
                return None
            block = int.from_bytes(view[position : position + 3], "little")
            last, kind, size = bool(block & 1), (block >> 1) & 3, block >> 3
            if kind == 3:  # reserved
                return None
            blocks += size if kind in (0, 1) else MAX_BLOCK_BYTES  # raw, RLE: their size; compressed: at most
            position += 3 + (1 if kind == 1 else size)
        position += 4 if checksum else 0
        if position > end:  # cut short
            return None
        total += blocks if declared is None else declared
    return total


def chunk_bytes(spec: ArraySpec) -> int | None:
    """The bytes one chunk of `spec` holds, None for variable-length samples."""
    native = np.dtype(spec.dtype.to_native_dtype())
    return None if native.hasobject or native.itemsize == 0 else prod(spec.shape) * native.itemsize


class BoundedZstdCodec(ZstdCodec):
    """zarr's zstd codec, refusing chunks that would decode past their size (see the module)."""

    def _decode_sync(self, chunk_bytes_: Buffer, chunk_spec: ArraySpec) -> Buffer:  # the async path calls it too
        self._check_bound(chunk_bytes_, chunk_spec)
        return super()._decode_sync(chunk_bytes_, chunk_spec)

    @staticmethod
    def _check_bound(data: Buffer, spec: ArraySpec) -> None:
        expected = chunk_bytes(spec)
        if expected is None:
            return
        bound = zstd_decoded_bound(data.as_numpy_array().data)
        if bound is not None and bound > expected:
            raise InflatedChunk(f"a zstd chunk decodes to {bound} bytes, more than the {expected} its "
                                f"{' x '.join(map(str, spec.shape))} chunk holds (a decompression bomb)")


register_codec("zstd", BoundedZstdCodec)
zarr.config.set({"codecs.zstd": fully_qualified_name(BoundedZstdCodec)})
