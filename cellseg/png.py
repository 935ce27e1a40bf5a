"""Plain grayscale PNGs, the usual microscopy export, decoded here: 8- or 16-bit gray, not
interlaced, one image, nothing in the file that changes its pixels. The pixel data is inflated by
libdeflate (through imagecodecs) and its rows unfiltered by a compiled loop, straight into the
array and without the GIL, in about 0.56 of the time libpng (OpenCV) takes (docs/performance.md).

Every other PNG goes to Pillow, as before, and so does one whose pixel data does not inflate to
exactly its rows, so that errors are worded as for any other image. The chunks are walked and
their checksums compared first: a truncated or damaged file never reaches the decoder.
"""

from __future__ import annotations

import struct
import sys
import zlib
from typing import NamedTuple

import imagecodecs
import numpy as np
from numba import njit

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY = 0  # IHDR colour type
# Chunks that leave a gray image's samples as they are stored: text, timestamps, resolution and
# colour-space hints. Anything else (transparency, palettes, animation, unknown chunks) goes to Pillow.
_PLAIN_CHUNKS = frozenset({b"IDAT", b"tEXt", b"zTXt", b"iTXt", b"tIME", b"pHYs", b"gAMA", b"cHRM", b"sRGB",
                           b"iCCP", b"sBIT"})


class PlainGray(NamedTuple):
    """Where a plain grayscale PNG's pixels are: its size, bit depth and pixel data chunks."""

    height: int
    width: int
    bit_depth: int
    pixel_data: tuple[slice, ...]  # the IDAT chunks' payloads, in order


def plain_gray(data: bytes) -> PlainGray | None:
    """The layout of a PNG that `decode_plain_gray` may decode: 8- or 16-bit gray, only plain
    chunks, every checksum right, ending in IEND; None for anything else."""
    if not data.startswith(SIGNATURE) or len(data) < 8 + 25:
        return None
    view = memoryview(data)
    length, kind = struct.unpack_from(">I4s", view, 8)
    if kind != b"IHDR" or length != 13:
        return None
    width, height, bit_depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", view, 16)
    if colour != _GRAY or bit_depth not in (8, 16) or compression or filtering or interlace or not width or not height:
        return None
    pixel_data: list[slice] = []
    offset = 8
    while offset + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", view, offset)
        end = offset + 12 + length
        if end > len(data):
            return None
        if zlib.crc32(view[offset + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return None
        if kind == b"IEND":
            return PlainGray(height, width, bit_depth, tuple(pixel_data))
        if offset > 8 and kind not in _PLAIN_CHUNKS:
            return None
        if kind == b"IDAT":
            pixel_data.append(slice(offset + 8, end - 4))
        offset = end
    return None


def decode_plain_gray(data: bytes, layout: PlainGray) -> np.ndarray | None:
    """The image of a PNG that `plain_gray` laid out (uint8 or uint16, (height, width)), or None
    where its pixel data is not exactly its rows, each with a known filter. The caller bounds
    height x width first: the rows are allocated at that size."""
    sample_bytes = layout.bit_depth // 8
    row_bytes = layout.width * sample_bytes
    view = memoryview(data)
    stream = b"".join(view[span] for span in layout.pixel_data)  # one copy of the pixel data, not two
    try:
        filtered = imagecodecs.deflate_decode(stream, out=layout.height * (row_bytes + 1))
    except imagecodecs.DeflateError:
        return None
    if len(filtered) != layout.height * (row_bytes + 1):
        return None
    rows = np.empty((layout.height, row_bytes), dtype=np.uint8)
    if not _unfilter(np.frombuffer(filtered, dtype=np.uint8), sample_bytes, rows):
        return None
    if sample_bytes == 1:
        return rows
    samples = rows.view(np.uint16)  # PNG stores 16-bit samples big-endian: turned in place, no copy
    if sys.byteorder == "little":
        samples.byteswap(inplace=True)
    return samples


@njit(cache=True, nogil=True, inline="always")
def _paeth(left, up, up_left):  # pragma: no cover - compiled; tested through decode_plain_gray
    """The PNG Paeth predictor: whichever neighbour is nearest left + up - up_left."""
    to_left, to_up, to_up_left = abs(up - up_left), abs(left - up_left), abs(left + up - up_left - up_left)
    if to_left <= to_up and to_left <= to_up_left:
        return left
    return up if to_up <= to_up_left else up_left


@njit(cache=True, nogil=True)
def _unfilter(filtered, sample_bytes, rows):  # pragma: no cover - compiled; tested through decode_plain_gray
    """Undo each row's PNG filter (PNG spec, section 9) into `rows`; False on an unknown filter.
    The left neighbour is carried in a register, one byte lane at a time: reloading it from the
    row just written would make every byte wait on a store."""
    height, row_bytes = rows.shape
    above = np.zeros(row_bytes, dtype=np.uint8)
    for y in range(height):
        start = y * (row_bytes + 1) + 1
        kind = filtered[start - 1]
        row = rows[y]
        if y > 0:
            above = rows[y - 1]
        if kind == 0:
            row[:] = filtered[start : start + row_bytes]
        elif kind == 2:
            for x in range(row_bytes):
                row[x] = filtered[start + x] + above[x]
        elif kind == 1:
            for lane in range(sample_bytes):
                left = np.uint8(0)
                for x in range(lane, row_bytes, sample_bytes):
                    left = np.uint8(filtered[start + x] + left)
                    row[x] = left
        elif kind == 3:
            for lane in range(sample_bytes):
                value = np.int32(0)
                for x in range(lane, row_bytes, sample_bytes):
                    value = (np.int32(filtered[start + x]) + ((value + np.int32(above[x])) >> 1)) & 255
                    row[x] = value
        elif kind == 4:
            for lane in range(sample_bytes):
                value, up_left = np.int32(0), np.int32(0)
                for x in range(lane, row_bytes, sample_bytes):
                    up = np.int32(above[x])
                    value = (np.int32(filtered[start + x]) + _paeth(value, up, up_left)) & 255
                    row[x] = value
                    up_left = up
        else:
            return False
    return True
