"""Plain grayscale PNGs, the usual microscopy export, decoded by OpenCV: 8- or 16-bit gray, not
interlaced, one image, nothing in the file that changes its pixels. libpng decodes them straight into the array
in about 0.92 of the time Pillow takes and copies (docs/performance.md), and without the GIL.

Every other PNG goes to Pillow, as before, and so does one OpenCV cannot decode, so that errors
are worded as for any other image. The chunks are walked and their checksums compared first:
a truncated or damaged file never reaches OpenCV, which would print warnings of its own. Only
pixel data broken with every checksum right (a file made so) still reaches it: libpng then
prints a line to stderr ("Not enough image data"), and Pillow decides as before.
"""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GRAY = 0  # IHDR colour type
# Chunks that leave a gray image's samples as they are stored: text, timestamps, resolution and
# colour-space hints. Anything else (transparency, palettes, animation, unknown chunks) goes to Pillow.
_PLAIN_CHUNKS = frozenset({b"IDAT", b"tEXt", b"zTXt", b"iTXt", b"tIME", b"pHYs", b"gAMA", b"cHRM", b"sRGB",
                           b"iCCP", b"sBIT"})


def plain_gray_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of a PNG that `decode_plain_gray` may decode: 8- or 16-bit gray, only
    plain chunks, every checksum right, ending in IEND; None for anything else."""
    if not data.startswith(SIGNATURE) or len(data) < 8 + 25:
        return None
    view = memoryview(data)
    length, kind = struct.unpack_from(">I4s", view, 8)
    if kind != b"IHDR" or length != 13:
        return None
    width, height, bit_depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", view, 16)
    if colour != _GRAY or bit_depth not in (8, 16) or compression or filtering or interlace:
        return None
    offset = 8
    while offset + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", view, offset)
        end = offset + 12 + length
        if end > len(data):
            return None
        if zlib.crc32(view[offset + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            return None
        if kind == b"IEND":
            return height, width
        if offset > 8 and kind not in _PLAIN_CHUNKS:
            return None
        offset = end
    return None


def decode_plain_gray(data: bytes, size: tuple[int, int]) -> np.ndarray | None:
    """The image of a PNG that `plain_gray_size` sized (uint8 or uint16, (height, width)), or None
    where OpenCV gives anything else."""
    try:
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error:  # beyond OpenCV's own pixel limit (CV_IO_MAX_IMAGE_PIXELS), for one
        return None
    if image is None or image.shape != size or image.dtype not in (np.uint8, np.uint16):
        return None
    return image
