"""Generated hostile inputs for `cellseg.io.decode_image`, decoded one after another in this
process under a 1 GiB address-space limit; run by `test_reader_fuzz.py`:

    python -m tests.reliability.reader_fuzz --seed 19

Each input is a small PNG, JPEG or TIFF (8/16-bit, float, colour, planar, tiled, compressed,
multi-page) mutated deterministically from the seed: truncated, bit-flipped, with extreme header
values (sizes, samples, bits, compression, strips, tiles) whose checksums are made right again so
that decoders believe them, plus decompression bombs, many pages, IFD loops and other formats
named as images. One JSON line is printed when an input starts and one when it ends: decoded
(with its shape) or refused (with ImageReadError's message), or failed, with what went wrong
(another exception, a MemoryError under the limit, a wrong result). A hang or a crash shows as
a start line without its end.
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import random
import resource
import struct
import sys
import time
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import tifffile
from PIL import Image

from cellseg.io import ImageReadError, decode_image

MEMORY_LIMIT = 2**30
MAX_PIXELS = 4096 * 4096  # what the readers may allocate for: max_pixels x 8 bytes, 128 MiB
EXTREMES = (0, 1, 3, 16, 255, 65535, 2**31 - 1, 2**32 - 1)
TIFF_TAGS = {256: "ImageWidth", 257: "ImageLength", 258: "BitsPerSample", 259: "Compression", 262: "Photometric",
             273: "StripOffsets", 277: "SamplesPerPixel", 278: "RowsPerStrip", 279: "StripByteCounts",
             284: "PlanarConfiguration", 322: "TileWidth", 323: "TileLength", 324: "TileOffsets",
             325: "TileByteCounts", 339: "SampleFormat"}
BOMB_BYTES = 1536 * 2**20  # what each decompression bomb inflates to: more than the memory limit

Case = tuple[str, bytes, str | None]  # description, input, a fragment its refusal must contain (or None)


def _png(array: np.ndarray, mode: str | None = None, **options) -> bytes:
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    (image.convert(mode) if mode else image).save(buffer, format="PNG", **options)
    return buffer.getvalue()


def _jpeg(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", **options)
    return buffer.getvalue()


def _tiff(array: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **options)
    return buffer.getvalue()


def _pages(count: int, **options) -> bytes:
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        for index in range(count):
            writer.write(np.full((2, 3), index % 256, np.uint8), metadata=None, **options)
    return buffer.getvalue()


def _bases(rng: np.random.Generator) -> dict[str, bytes]:
    """Small valid files of every kind the readers take."""
    gray = rng.integers(0, 256, (24, 32), dtype=np.uint8)
    wide = rng.integers(0, 65536, (24, 32), dtype=np.uint16)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    animated = io.BytesIO()
    Image.fromarray(gray).save(animated, format="PNG", save_all=True, append_images=[Image.fromarray(255 - gray)] * 2)
    return {
        "png gray8": _png(gray), "png gray16": _png(wide), "png rgb": _png(rgb), "png palette": _png(rgb, "P"),
        "png rgba": _png(rgb, "RGBA"), "png gray+alpha": _png(np.dstack([gray, gray]), "LA"),
        "apng 3 frames": animated.getvalue(),
        "jpeg gray": _jpeg(gray), "jpeg rgb": _jpeg(rgb), "jpeg progressive": _jpeg(rgb, progressive=True),
        "tiff u8": _tiff(gray), "tiff u16 zlib": _tiff(wide, compression="zlib"),
        "tiff f32 lzma": _tiff(gray.astype(np.float32) / 7, compression="lzma"),
        "tiff rgb": _tiff(rgb, photometric="rgb"),
        "tiff planar rgb zlib": _tiff(np.moveaxis(rgb, -1, 0).copy(), photometric="rgb", planarconfig="separate",
                                      compression="zlib"),
        "tiff tiled zlib": _tiff(rng.integers(0, 256, (40, 40), dtype=np.uint8), tile=(16, 16), compression="zlib"),
        "tiff strips predictor": _tiff(wide, rowsperstrip=5, compression="zlib", predictor=True),
        "tiff 3 pages": _pages(3), "bigtiff": _tiff(gray, bigtiff=True),
    }


def _truncations(name: str, data: bytes, rand: random.Random) -> Iterator[Case]:
    for cut in sorted({8, 33, len(data) // 2, *(rand.randrange(1, len(data)) for _ in range(2))}):
        yield f"{name}, first {cut} of {len(data)} bytes", data[:cut], None


def _bit_flips(name: str, data: bytes, rand: random.Random) -> Iterator[Case]:
    for flips in (1, 3, 12, 40):
        mutated = bytearray(data)
        for _ in range(flips):
            mutated[rand.randrange(len(mutated))] ^= 1 << rand.randrange(8)
        yield f"{name}, {flips} random bit flips", bytes(mutated), None


def _png_headers(name: str, data: bytes, rand: random.Random) -> Iterator[Case]:
    """IHDR fields set to extreme values, with the chunk's CRC made right again."""
    fields = {"width": (0, ">I"), "height": (4, ">I"), "bit depth": (8, ">B"), "colour type": (9, ">B"),
              "interlace": (12, ">B")}
    for field, (offset, fmt) in fields.items():
        for value in rand.sample([v for v in EXTREMES if v < 2 ** (8 * struct.calcsize(fmt))], 4):
            mutated = bytearray(data)
            struct.pack_into(fmt, mutated, 16 + offset, value)
            struct.pack_into(">I", mutated, 29, zlib.crc32(bytes(mutated[12:29])))
            yield f"{name}, IHDR {field} = {value}", bytes(mutated), None


def _jpeg_headers(name: str, data: bytes, rand: random.Random) -> Iterator[Case]:
    """Start-of-frame fields (precision, height, width, components) set to extreme values."""
    frame = next(index for index in range(2, len(data) - 1) if data[index] == 0xFF and data[index + 1] in (0xC0, 0xC2))
    for field, (offset, fmt) in {"precision": (4, ">B"), "height": (5, ">H"), "width": (7, ">H"),
                                 "components": (9, ">B")}.items():
        for value in rand.sample([v for v in EXTREMES if v < 2 ** (8 * struct.calcsize(fmt))], 4):
            mutated = bytearray(data)
            struct.pack_into(fmt, mutated, frame + offset, value)
            yield f"{name}, SOF {field} = {value}", bytes(mutated), None


def _tiff_tags(name: str, data: bytes, rand: random.Random) -> Iterator[Case]:
    """One tag of the first IFD (classic little-endian TIFF) set to an extreme value, as a LONG."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        entries = {tag.code: tag.offset for tag in tif.pages[0].tags.values() if tag.code in TIFF_TAGS}
    for code, entry in sorted(entries.items()):
        for value in rand.sample(EXTREMES, 4):
            mutated = bytearray(data)
            struct.pack_into("<HII", mutated, entry + 2, 4, 1, value)  # type LONG, count 1, the value inline
            yield f"{name}, {TIFF_TAGS[code]} = {value}", bytes(mutated), None


def _deflate_bomb() -> bytes:
    """A zlib stream inflating to BOMB_BYTES, built from one repeated block of 1 MiB of zeros."""
    compressor = zlib.compressobj(9)
    first = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(bytes(2**20)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return first + block * (BOMB_BYTES // 2**20 - 1) + compressor.flush()


def _lzma_bomb() -> bytes:
    """Concatenated xz streams inflating to BOMB_BYTES (lzma.decompress reads them all)."""
    stream = lzma.compress(bytes(128 * 2**20), preset=0)
    return lzma.compress(bytes(16)) + stream * (BOMB_BYTES // (128 * 2**20))


def _with_tags(data: bytes, values: dict[int, int], appended: bytes = b"") -> bytes:
    """A classic little-endian TIFF with tags of its first IFD set to `values` (as one LONG
    each, inline) and `appended` after its end."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        entries = {tag.code: tag.offset for tag in tif.pages[0].tags.values()}
    mutated = bytearray(data)
    for code, value in values.items():
        struct.pack_into("<HII", mutated, entries[code] + 2, 4, 1, value)
    return bytes(mutated) + appended


def _with_strip(data: bytes, strip: bytes, compression: int) -> bytes:
    """A one-strip classic TIFF whose strip is replaced by `strip`, appended at the end."""
    return _with_tags(data, {259: compression, 273: len(data), 279: len(strip)}, strip)


def _ifd_loop(data: bytes) -> bytes:
    """The first IFD's next-IFD offset pointing back at itself."""
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        ifd = tif.pages[0].offset
    mutated = bytearray(data)
    count = struct.unpack_from("<H", mutated, ifd)[0]
    struct.pack_into("<I", mutated, ifd + 2 + 12 * count, ifd)
    return bytes(mutated)


def _specials(bases: dict[str, bytes]) -> Iterator[Case]:
    """Inputs made by hand: bombs, page counts, loops, and other formats named as images."""
    small = np.zeros((16, 16), np.uint8)
    plain = _tiff(small)
    yield "tiff 16x16 whose zlib strip inflates to 1.5 GiB", _with_strip(plain, _deflate_bomb(), 8), "decompression bomb"
    yield "tiff 16x16 whose lzma strip inflates to 1.5 GiB", _with_strip(plain, _lzma_bomb(), 34925), "decompression bomb"
    packbits = b"\x81\x00" * (BOMB_BYTES // 128)  # 128 zeros per two bytes
    yield "tiff 16x16 whose packbits strip inflates to 1.5 GiB", _with_strip(plain, packbits, 32773), "decompression bomb"
    yield ("planar tiff 3 x 16 x 2000000 (zlib)", _tiff(np.zeros((3, 16, 2_000_000), np.uint8), photometric="rgb",
           planarconfig="separate", compression="zlib"), "pixels exceeds the limit")
    yield ("tiff of 65535 samples on a 100 x 100 plane", _with_tags(_tiff(np.zeros((100, 100), np.uint8)), {277: 65535}),
           "would take")
    yield "tiff whose one strip is 100 x 2**31 rows", _with_tags(_tiff(np.zeros((100, 100), np.uint8)), {278: 2**31}), None
    yield "tiff of 16 x 16 tiles of 2**20 x 2**20", _with_tags(bases["tiff tiled zlib"], {322: 2**20, 323: 2**20}), None
    yield "png 30000 x 30000 over one row of data", _huge_png(), "pixels exceeds the limit"
    yield "tiff of 2000 pages", _pages(2000), None
    yield "tiff whose IFD points at itself", _ifd_loop(bases["tiff u8"]), None
    yield "eps named .png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 30 30\nshowpage\n", "its content is EPS"
    yield "pdf named .png", b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "its content is PDF"
    yield "zip named .tif", b"PK\x03\x04" + bytes(100), "its content is ZIP"
    for kind in ("GIF", "BMP", "ICO", "PPM", "WEBP"):
        buffer = io.BytesIO()
        Image.fromarray(small).save(buffer, format=kind)
        yield f"{kind.lower()} named .png", buffer.getvalue(), f"its content is {kind}"
    yield "tiff magic then garbage", b"II*\x00" + bytes(random.Random(1).randbytes(200)), None
    yield "png signature then garbage", b"\x89PNG\r\n\x1a\n" + bytes(random.Random(2).randbytes(200)), None


def _huge_png() -> bytes:
    """A 30000 x 30000 grayscale PNG header (900 M pixels) over a tiny compressed row of zeros."""
    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(30001))) + chunk(b"IEND", b"")


def cases(seed: int) -> Iterator[Case]:
    """Every input, in a fixed order for `seed`."""
    rand = random.Random(seed)
    bases = _bases(np.random.default_rng(seed))
    mutations: list[tuple[str, Callable[[str, bytes, random.Random], Iterator[Case]]]] = [
        ("", _truncations), ("", _bit_flips), ("png", _png_headers), ("jpeg", _jpeg_headers), ("tiff", _tiff_tags),
    ]
    for name, data in bases.items():
        yield f"{name}, as written", data, None
    for prefix, mutate in mutations:
        for name, data in bases.items():
            if name.startswith(prefix) and not (mutate is _tiff_tags and name == "bigtiff"):
                yield from mutate(name, data, rand)
    yield from _specials(bases)


def _caused_by_memory(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, MemoryError):
            return True
        error = error.__cause__ or error.__context__
    return False


def _try(data: bytes, name: str) -> tuple[str, str]:
    """(outcome, detail) of decoding one input: decoded, refused or failed."""
    warnings: list[str] = []
    try:
        array = decode_image(data, name, MAX_PIXELS, warnings)
    except ImageReadError as error:
        if _caused_by_memory(error):
            return "failed", f"ran out of the {MEMORY_LIMIT} bytes allowed: {error}"
        return "refused", str(error)
    except Exception as error:  # noqa: BLE001 - every other outcome is what the fuzzing looks for
        return "failed", f"{type(error).__name__}: {error}"
    if array.ndim != 2 or min(array.shape) < 1 or array.dtype.kind not in "biuf":
        return "failed", f"decoded to an unusable array {array.shape} {array.dtype}"
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        return "failed", "decoded to non-finite pixels"
    return "decoded", f"{array.shape} {array.dtype} {warnings}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=19)
    args = parser.parse_args(argv)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    count = 0
    for index, (description, data, expected) in enumerate(cases(args.seed)):
        print(json.dumps({"start": index, "case": description}), flush=True)
        started = time.monotonic()
        outcome, detail = _try(data, f"case-{index}")
        print(json.dumps({"index": index, "case": description, "outcome": outcome, "detail": detail[:300],
                          "expected": expected, "seconds": round(time.monotonic() - started, 3)}), flush=True)
        count += 1
    print(json.dumps({"cases": count}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
