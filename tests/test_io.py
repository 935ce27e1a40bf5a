"""Tests for cellseg/io.py: decoding, colour conversion, malformed files, listing, S3."""

from __future__ import annotations

import io
import itertools
import logging
import struct
import time
import zlib

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg import png
from cellseg.io import (
    ImageReadError,
    binarize_mask,
    decode_image,
    image_stem,
    join_url,
    list_image_entries,
    list_images,
    lossy_binary,
    read_image,
    read_mask,
)

# ITU-R 601 luma of pure red and pure green at 8 bits, computed by hand: 0.299 * 255, 0.587 * 255.
RED_LUMA = round(0.299 * 255)  # 76
GREEN_LUMA = round(0.587 * 255)  # 150

VALUES_8 = np.array([[0, 1, 2, 3], [127, 128, 254, 255]], dtype=np.uint8)
# Values that a lossy or 8-bit round trip would change: above 255, odd, and both extremes.
VALUES_16 = np.array([[0, 1, 255, 256], [1000, 30001, 65534, 65535]], dtype=np.uint16)


def save_png(path, image: Image.Image):
    image.save(path, format="PNG")
    return path


def red_image_with_green_pixel(mode: str) -> Image.Image:
    """3x2 image, red everywhere except a green pixel at (row 1, column 2)."""
    red = {"RGB": (255, 0, 0), "RGBA": (255, 0, 0, 40)}[mode]
    green = {"RGB": (0, 255, 0), "RGBA": (0, 255, 0, 200)}[mode]
    image = Image.new(mode, (3, 2), red)
    image.putpixel((2, 1), green)
    return image


EXPECTED_RED_GREEN = np.array([[RED_LUMA] * 3, [RED_LUMA, RED_LUMA, GREEN_LUMA]], dtype=np.uint8)


# --- grayscale decoding -------------------------------------------------------------------


def test_8bit_png_round_trips_exactly(tmp_path):
    path = save_png(tmp_path / "a.png", Image.fromarray(VALUES_8))
    result = read_image(str(path))
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, VALUES_8)


def test_16bit_png_keeps_every_value(tmp_path):
    path = save_png(tmp_path / "a16.png", Image.fromarray(VALUES_16))
    result = read_image(str(path))
    assert result.dtype == np.uint16
    np.testing.assert_array_equal(result, VALUES_16)


@pytest.mark.parametrize("values", [VALUES_8, VALUES_16], ids=["8bit", "16bit"])
@pytest.mark.parametrize("compression", [None, "zlib"])
def test_grayscale_tiff_round_trips_exactly(tmp_path, values, compression):
    path = tmp_path / "a.tif"
    tifffile.imwrite(path, values, compression=compression)
    result = read_image(str(path))
    assert result.dtype == values.dtype
    np.testing.assert_array_equal(result, values)


def test_single_sample_tiff_with_leading_axis_becomes_2d(tmp_path):
    path = tmp_path / "one.tif"
    tifffile.imwrite(path, VALUES_16[None], photometric="minisblack")
    np.testing.assert_array_equal(read_image(str(path)), VALUES_16)


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def with_chunk_after_header(data: bytes, kind: bytes, payload: bytes) -> bytes:
    return data[:33] + png_chunk(kind, payload) + data[33:]  # 8 bytes of signature, 25 of IHDR


@pytest.mark.parametrize("values", [VALUES_8, VALUES_16], ids=["8bit", "16bit"])
@pytest.mark.parametrize(("kind", "payload", "plain"), [
    (None, b"", True),
    (b"sBIT", b"\x05", True),  # significant bits: a hint, the samples stay as stored
    (b"gAMA", struct.pack(">I", 100_000), True),  # Pillow applies no gamma; neither may cellseg.png
    (b"tEXt", b"Software\x00microscope", True),
    (b"tRNS", b"\x00\x05", False),
    (b"xyZw", b"an unknown chunk", False),
])
def test_plain_gray_pngs_are_decoded_to_the_values_pillow_gives(values, kind, payload, plain):
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, format="PNG")
    data = buffer.getvalue() if kind is None else with_chunk_after_header(buffer.getvalue(), kind, payload)
    layout = png.plain_gray(data)
    assert (layout is not None and (layout.height, layout.width) == values.shape) == plain
    decoded = decode_image(data, "plain.png")
    assert decoded.dtype == values.dtype
    np.testing.assert_array_equal(decoded, values)
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(data))))


def paeth(left: int, up: int, up_left: int) -> int:
    estimate = left + up - up_left
    distances = [abs(estimate - left), abs(estimate - up), abs(estimate - up_left)]
    return (left, up, up_left)[distances.index(min(distances))]


def filtered_rows(values: np.ndarray, filters: list[int]) -> bytes:
    """The PNG spec's filters applied to each row of `values` (big-endian samples), written
    plainly: the reference the compiled unfiltering is checked against."""
    samples = values.astype(values.dtype.newbyteorder(">")).view(np.uint8).reshape(values.shape[0], -1)
    step = values.dtype.itemsize
    out = bytearray()
    for y, kind in enumerate(filters):
        row, above = samples[y].astype(int), samples[y - 1].astype(int) if y else np.zeros(samples.shape[1], int)
        left = np.concatenate([np.zeros(step, int), row[:-step]])
        up_left = np.concatenate([np.zeros(step, int), above[:-step]])
        predicted = [np.zeros_like(row), left, above, (left + above) // 2,
                     np.array([paeth(*trio) for trio in zip(left, above, up_left, strict=True)])][kind]
        out += bytes([kind]) + bytes(((row - predicted) % 256).astype(np.uint8))
    return bytes(out)


def png_of_rows(shape: tuple[int, int], bit_depth: int, rows: bytes, chunks: int = 1) -> bytes:
    stream = zlib.compress(rows)
    cuts = np.linspace(0, len(stream), chunks + 1).astype(int)
    return (png.SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", shape[1], shape[0], bit_depth, 0, 0, 0, 0))
            + b"".join(png_chunk(b"IDAT", stream[start:end]) for start, end in itertools.pairwise(cuts))
            + png_chunk(b"IEND", b""))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize("chunks", [1, 3])
def test_every_png_filter_is_undone_as_pillow_undoes_it(dtype, chunks):
    rng = np.random.default_rng(7)
    values = (rng.integers(0, 40, (37, 23)) + np.arange(23) * 9).astype(dtype) * (1 if dtype == np.uint8 else 257)
    filters = [int(kind) for kind in rng.integers(0, 5, 37)]
    filters[:5] = [4, 3, 1, 2, 0]  # each filter on the first row, whose row above is zeros
    data = png_of_rows(values.shape, 8 * values.dtype.itemsize, filtered_rows(values, filters), chunks)
    assert png.plain_gray(data) is not None
    decoded = decode_image(data, "filters.png")
    assert decoded.dtype == values.dtype
    np.testing.assert_array_equal(decoded, values)
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(io.BytesIO(data))))


def test_an_unknown_row_filter_goes_to_pillow_and_names_the_file():
    values = np.arange(64, dtype=np.uint8).reshape(8, 8)
    rows = bytearray(filtered_rows(values, [0] * 8))
    rows[3 * 9] = 5  # the fourth row's filter byte: filter types end at 4
    data = png_of_rows(values.shape, 8, bytes(rows))
    layout = png.plain_gray(data)
    assert layout is not None and png.decode_plain_gray(data, layout) is None
    with pytest.raises(ImageReadError, match=r"odd_filter\.png.*not a readable image"):
        decode_image(data, "odd_filter.png")


def test_more_pixel_data_than_rows_is_not_decoded_here():
    values = np.arange(64, dtype=np.uint8).reshape(8, 8)
    data = png_of_rows((4, 8), 8, filtered_rows(values, [0] * 8))  # the header says 4 rows; 8 follow
    layout = png.plain_gray(data)
    assert layout is not None and png.decode_plain_gray(data, layout) is None


@pytest.mark.parametrize("shape", [(0, 8), (2**31 - 1, 0)])
def test_a_png_without_pixels_is_not_plain(shape):
    assert png.plain_gray(png_of_rows(shape, 8, b"")) is None


@pytest.mark.parametrize("pixel_data", ["half a stream", "half the rows"])
def test_pixel_data_broken_behind_right_checksums_is_decided_by_pillow(pixel_data):
    values = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    rows = b"".join(b"\x00" + row.tobytes() for row in values)  # filter type 0 per row
    stream = zlib.compress(rows)
    stream = stream[: len(stream) // 2] if pixel_data == "half a stream" else zlib.compress(rows[: len(rows) // 2])
    data = (png.SIGNATURE + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0))
            + png_chunk(b"IDAT", stream) + png_chunk(b"IEND", b""))
    layout = png.plain_gray(data)
    assert layout is not None and (layout.height, layout.width) == (64, 64)
    assert png.decode_plain_gray(data, layout) is None
    try:
        expected = np.asarray(Image.open(io.BytesIO(data)))
    except OSError:
        with pytest.raises(ImageReadError, match=r"broken\.png.*not a readable image"):
            decode_image(data, "broken.png")
    else:  # Pillow fills the missing rows, as it did before cellseg.png decoded any PNG
        np.testing.assert_array_equal(decode_image(data, "broken.png"), expected)


def test_a_png_with_a_damaged_chunk_goes_to_pillow_and_names_the_file(tmp_path):
    data = bytearray(png_bytes())
    data[45] ^= 0xFF  # inside the first IDAT: its checksum no longer matches
    assert png.plain_gray(bytes(data)) is None
    path = tmp_path / "flipped.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match=r"flipped\.png.*not a readable image"):
        read_image(str(path))


# --- colour to grayscale ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_colour_png_becomes_luma(tmp_path, mode):
    path = save_png(tmp_path / f"{mode}.png", red_image_with_green_pixel(mode))
    result = read_image(str(path))
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, EXPECTED_RED_GREEN)


def test_palette_png_uses_the_palette_colours(tmp_path):
    image = Image.new("P", (3, 2), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))  # index 0 red, index 1 green
    image.putpixel((2, 1), 1)
    path = save_png(tmp_path / "palette.png", image)
    np.testing.assert_array_equal(read_image(str(path)), EXPECTED_RED_GREEN)


@pytest.mark.parametrize(("mode", "opaque", "see_through"), [
    ("RGBA", (255, 0, 0, 255), (0, 255, 0, 0)),
    ("LA", (200, 255), (77, 3)),
])
def test_transparent_pixels_are_said_and_their_colour_segmented(tmp_path, mode, opaque, see_through):
    """Before, transparency was dropped without a word: an export with a transparent background
    was segmented by whatever colour its transparent pixels held."""
    image = Image.new(mode, (4, 2), opaque)
    image.putpixel((3, 1), see_through)
    path = save_png(tmp_path / "alpha.png", image)
    warnings: list[str] = []
    expected = np.asarray(image.convert("L"))
    np.testing.assert_array_equal(read_image(str(path), warnings=warnings), expected)
    assert warnings == ["12.5% of its pixels are transparent: segmented by their colour alone, the transparency ignored"]
    warnings.clear()
    read_image(str(save_png(tmp_path / "opaque.png", Image.new(mode, (4, 2), opaque))), warnings=warnings)
    assert warnings == []


def test_transparency_of_16_bit_pngs_and_rgba_tiffs_is_said_too():
    grey = np.full((2, 4), 1000, np.uint16)
    grey[1, 3] = 7
    keyed = io.BytesIO()
    Image.fromarray(grey).save(keyed, format="PNG", transparency=7)  # tRNS: grey level 7 is transparent
    rgba = np.full((2, 4, 4), 255, np.uint8)
    rgba[0, 0, 3] = 0
    tiff = io.BytesIO()
    tifffile.imwrite(tiff, rgba, photometric="rgb", extrasamples=["unassalpha"])
    for data, name in ((keyed.getvalue(), "keyed.png"), (tiff.getvalue(), "rgba.tif")):
        warnings: list[str] = []
        decode_image(data, name, warnings=warnings)
        assert warnings == ["12.5% of its pixels are transparent: segmented by their colour alone, the transparency "
                            "ignored"], name


def test_gray_alpha_png_drops_the_alpha(tmp_path):
    image = Image.new("LA", (3, 2), (77, 3))
    image.putpixel((0, 0), (200, 255))
    path = save_png(tmp_path / "la.png", image)
    np.testing.assert_array_equal(read_image(str(path)), [[200, 77, 77], [77, 77, 77]])


def test_rgb_tiff_becomes_luma(tmp_path):
    rgb = np.zeros((2, 3, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    rgb[1, 2] = (0, 255, 0)
    path = tmp_path / "rgb.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    np.testing.assert_array_equal(read_image(str(path)), EXPECTED_RED_GREEN)


def test_planar_rgb_tiff_becomes_luma(tmp_path):
    rgb = np.zeros((3, 2, 3), dtype=np.uint8)  # samples first, as planarconfig=separate stores it
    rgb[0] = 255
    rgb[:, 1, 2] = (0, 255, 0)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", planarconfig="separate")
    np.testing.assert_array_equal(read_image(str(path)), EXPECTED_RED_GREEN)


def test_16bit_rgb_tiff_luma_stays_16bit(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint16)
    rgb[..., 0] = 65535
    path = tmp_path / "rgb16.tif"
    tifffile.imwrite(path, rgb, photometric="rgb")
    result = read_image(str(path))
    assert result.dtype == np.uint16
    np.testing.assert_array_equal(result, np.full((2, 2), round(0.299 * 65535)))  # 19595


# --- unusable files -----------------------------------------------------------------------


def png_bytes(shape=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(shape[0] * shape[1]).reshape(shape) % 251).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_zero_byte_file_names_the_file(tmp_path):
    path = tmp_path / "empty_cell.png"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty_cell\.png.*empty \(0 bytes\)"):
        read_image(str(path))


@pytest.mark.parametrize("keep", [16, 60, 0.5])
def test_truncated_png_names_the_file(tmp_path, keep):
    data = png_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else keep
    path = tmp_path / "cut_short.png"
    path.write_bytes(data[:cut])
    with pytest.raises(ImageReadError, match=r"cut_short\.png.*not a readable image"):
        read_image(str(path))


def test_text_file_with_png_suffix_names_the_file(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match=r"notes\.png.*not a readable image"):
        read_image(str(path))


def test_truncated_tiff_names_the_file(tmp_path):
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((100, 100), dtype=np.uint8))
    path = tmp_path / "half.tif"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageReadError, match=r"half\.tif.*not a readable TIFF"):
        read_image(str(path))


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(ImageReadError, match=r"nowhere\.png.*not found"):
        read_image(str(tmp_path / "nowhere.png"))


def test_multichannel_image_is_refused_with_its_shape(tmp_path):
    path = tmp_path / "two_channels.tif"
    tifffile.imwrite(path, np.zeros((4, 5, 2), dtype=np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(ImageReadError, match=r"two_channels\.tif.*2-D.*\(4, 5, 2\)"):
        read_image(str(path))


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_max_pixels_guard(tmp_path, suffix):
    path = tmp_path / f"big.{suffix}"
    image = np.zeros((100, 120), dtype=np.uint8)  # 12000 pixels
    if suffix == "png":
        Image.fromarray(image).save(path)
    else:
        tifffile.imwrite(path, image)
    with pytest.raises(ImageReadError, match=rf"big\.{suffix}.*12000 pixels exceeds the limit of 11999"):
        read_image(str(path), max_pixels=11_999)
    assert read_image(str(path), max_pixels=12_000).shape == (100, 120)


def test_samples_and_planes_count_towards_the_limit_before_decoding():
    planar = io.BytesIO()  # (S, H, W) = 3 x 16 x 20000, about 1 KB of zlib: the plane is 320000 pixels
    tifffile.imwrite(planar, np.zeros((3, 16, 20000), np.uint8), photometric="rgb", planarconfig="separate",
                     compression="zlib")
    with pytest.raises(ImageReadError, match=r"'p\.tif': 320000 pixels exceeds the limit of 1000"):
        decode_image(planar.getvalue(), "p.tif", max_pixels=1000)
    samples = io.BytesIO()  # 400 pixels, but 64 samples each: 25600 bytes for 1000 x 8 allowed
    tifffile.imwrite(samples, np.zeros((64, 20, 20), np.uint8), photometric="minisblack", planarconfig="separate")
    with pytest.raises(ImageReadError, match=r"'s\.tif': the image \(64 x 20 x 20 uint8 samples\) would take 25600 bytes"):
        decode_image(samples.getvalue(), "s.tif", max_pixels=1000)


@pytest.mark.parametrize(("content", "named"), [(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9 9\n", "EPS"),
                                                (b"%PDF-1.4\n", "PDF"), (b"GIF89a" + bytes(40), "GIF")])
def test_other_formats_are_named_and_not_decoded(content, named):
    with pytest.raises(ImageReadError, match=rf"'x\.png': not a readable image: its content is {named}, not PNG, TIFF or JPEG"):
        decode_image(content, "x.png")


def test_non_finite_pixels_are_refused_with_their_count():
    values = np.ones((4, 5), np.float32)
    values[0, 0], values[1, 1], values[2, 2] = np.nan, np.inf, -np.inf
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, values)
    with pytest.raises(ImageReadError, match=r"'f\.tif': 3 of 20 pixels are NaN or infinite"):
        decode_image(buffer.getvalue(), "f.tif")


def test_a_multi_page_tiff_uses_page_0_and_says_so():
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        for value in (7, 8, 9):
            writer.write(np.full((2, 3), value, np.uint8), metadata=None)
    warnings: list[str] = []
    np.testing.assert_array_equal(decode_image(buffer.getvalue(), "p.tif", warnings=warnings), np.full((2, 3), 7))
    assert warnings == ["uses page 0 of 3: the other pages are not segmented; --z N segments page N, --z max their projection"]


def test_a_file_too_large_for_max_pixels_is_refused_without_reading_it_whole(tmp_path):
    from cellseg.io import MAX_BYTES_PER_PIXEL, MAX_EXTRA_FILE_BYTES

    path = tmp_path / "huge.tif"
    with open(path, "wb") as file:  # sparse: no disk space taken
        file.truncate(MAX_EXTRA_FILE_BYTES + 10 * MAX_BYTES_PER_PIXEL + 1)
    with pytest.raises(ImageReadError, match=rf"huge\.tif.*file is over {MAX_EXTRA_FILE_BYTES + 80} bytes.*max_pixels"):
        read_image(str(path), max_pixels=10)


def test_decode_image_uses_the_given_name():
    with pytest.raises(ImageReadError, match=r"s3://bucket/x/y\.png"):
        decode_image(b"garbage", "s3://bucket/x/y.png")


# --- masks --------------------------------------------------------------------------------


@pytest.mark.parametrize("on_value", [1, 255])
def test_binarize_mask(on_value):
    mask = np.array([[0, on_value], [on_value, 0]], dtype=np.uint8)
    result = binarize_mask(mask)
    assert result.dtype == bool
    np.testing.assert_array_equal(result, [[False, True], [True, False]])


def test_read_mask_of_0_255_png(tmp_path):
    path = save_png(tmp_path / "m.png", Image.fromarray(np.array([[0, 255, 0], [255, 255, 0]], dtype=np.uint8)))
    np.testing.assert_array_equal(read_mask(str(path)), [[False, True, False], [True, True, False]])



def _jpeg(array: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))


def test_a_binary_mask_saved_lossily_is_cut_at_half_not_above_zero():
    """JPEG strays around every cell: above zero they fattened each cell by about 2 pixels."""
    from cellseg.synth import generate_sample

    for seed in range(4):
        mask = generate_sample(np.random.default_rng(seed), (256, 256)).mask > 0
        saved = [_jpeg(mask.astype(np.uint8) * 255, quality) for quality in (30, 50, 75, 95)]
        saved.append(np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((384, 384), Image.BILINEAR)))
        for index, lossy in enumerate(saved):
            assert lossy_binary(lossy), (seed, index)
            expected = mask if lossy.shape == mask.shape else np.asarray(
                Image.fromarray(mask.astype(np.float32)).resize((384, 384), Image.BILINEAR)) > 0.5
            assert np.mean(binarize_mask(lossy) == expected) > (0.995 if lossy.shape == mask.shape else 0.99), (seed, index)
            if index == 2:
                assert np.mean((lossy > 0) != mask) > 0.03  # what above zero gave
        # Without strays, or with few values: as before, any value above zero is cell.
        for plain in (mask.astype(np.uint8), mask.astype(np.uint8) * 255, mask.astype(np.uint16) * 65535):
            assert not lossy_binary(plain)
            np.testing.assert_array_equal(binarize_mask(plain), mask)


def test_label_images_even_saved_lossily_are_not_cut_at_half():
    from cellseg.synth import generate_sample

    labels = generate_sample(np.random.default_rng(1), (256, 256)).labels
    assert labels.max() >= 10
    sparse = np.zeros((1024, 1024), dtype=np.uint8)  # few cells on much background
    sparse[:256, :256] = labels
    dominant = np.zeros((256, 256), dtype=np.uint8)  # one cell holds most labelled pixels, the others numbered low
    dominant[100:200, 100:200] = 200
    for number in range(1, 7):
        dominant[10 * number:10 * number + 5, 10:15] = number
    for image in (labels.astype(np.uint8), _jpeg(labels.astype(np.uint8), 75), sparse, _jpeg(sparse, 75),
                  (labels * 2000).astype(np.uint16), dominant):
        assert not lossy_binary(image)
        np.testing.assert_array_equal(binarize_mask(image), image > 0)


# --- listing and names --------------------------------------------------------------------


def test_list_images_keeps_image_suffixes_sorted(tmp_path):
    for name in ["c.tif", "a.png", "b.tiff", "d.jpg", "e.jpeg", "F.PNG", "notes.txt", "a.png.bak", "data.npy"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.png").mkdir()  # a directory with an image suffix is not an image
    expected = ["F.PNG", "a.png", "b.tiff", "c.tif", "d.jpg", "e.jpeg"]
    assert list_images(str(tmp_path)) == [str(tmp_path) + "/" + name for name in expected]


def test_symbolic_links_to_images_are_listed_dangling_ones_too_and_links_to_folders_not(tmp_path):
    """A link to a missing file (a share not mounted) is listed, so that reading it fails naming it;
    skipped, a nightly run over such links found nothing to do and said so with exit status 0."""
    originals, linked = tmp_path / "originals", tmp_path / "linked"
    originals.mkdir()
    linked.mkdir()
    (originals / "a.png").write_bytes(b"x" * 10)
    (originals / "folder.png").mkdir()
    (linked / "a.png").symlink_to(originals / "a.png")
    (linked / "folder.png").symlink_to(originals / "folder.png")
    (linked / "gone.png").symlink_to(originals / "gone.png")
    entries = list_image_entries(str(linked))
    assert [entry.url for entry in entries] == [str(linked / "a.png"), str(linked / "gone.png")]
    assert [entry.size for entry in entries] == [10, 0]


def test_list_images_of_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no_such_dir.*does not exist"):
        list_images(str(tmp_path / "no_such_dir"))


def test_one_image_file_lists_as_itself_and_a_file_of_another_kind_is_refused(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x" * 7)
    (tmp_path / "notes.txt").write_bytes(b"x")
    (tmp_path / "link.png").symlink_to(tmp_path / "a.png")
    entries = list_image_entries(str(tmp_path / "a.png"))
    assert [(entry.url, entry.size) for entry in entries] == [(str(tmp_path / "a.png"), 7)]
    assert entries[0].fingerprint == list_image_entries(str(tmp_path))[0].fingerprint  # as its folder lists it
    assert [entry.size for entry in list_image_entries(str(tmp_path / "link.png"))] == [7]
    with pytest.raises(FileNotFoundError, match=r"notes\.txt' is a file without an image suffix \(\.png .*\): name a "
                                                r"folder of images or one image file"):
        list_images(str(tmp_path / "notes.txt"))


def test_image_stem_and_join_url():
    assert image_stem("s3://bucket/images/cell_01.tif") == "cell_01"
    assert image_stem("/data/a.b.png") == "a.b"
    assert join_url("s3://bucket/images/", "a.png") == "s3://bucket/images/a.png"


# --- object storage -----------------------------------------------------------------------


@pytest.mark.integration
def test_list_and_read_images_on_s3(s3_bucket, caplog):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    buffer16 = io.BytesIO()
    Image.fromarray(VALUES_16).save(buffer16, format="PNG")
    buffer_tif = io.BytesIO()
    tifffile.imwrite(buffer_tif, VALUES_8)
    fs.pipe_file(f"{bucket}/images/b.png", buffer16.getvalue())
    fs.pipe_file(f"{bucket}/images/a.tif", buffer_tif.getvalue())
    fs.pipe_file(f"{bucket}/images/readme.txt", b"not an image")
    fs.pipe_file(f"{bucket}/images/nested/c.png", buffer16.getvalue())

    urls = list_images(f"{bucket}/images", options)
    assert urls == [f"{bucket}/images/a.tif", f"{bucket}/images/b.png"]
    np.testing.assert_array_equal(read_image(urls[0], options), VALUES_8)
    result = read_image(urls[1], options)
    assert result.dtype == np.uint16
    np.testing.assert_array_equal(result, VALUES_16)

    assert list_images(f"{bucket}/images/b.png", options) == [f"{bucket}/images/b.png"]  # one image file
    # An object store keeps no empty folders: a prefix whose images were all moved away (or not yet
    # written) is an empty folder, not a missing one that would fail a nightly run every night.
    with caplog.at_level(logging.WARNING, logger="cellseg"):
        assert list_images(f"{bucket}/missing", options) == []
    assert f"no objects under '{bucket}/missing': read as an empty image folder" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"its bucket 'no-such-bucket-[0-9]+' does not exist"):
        list_images(f"s3://no-such-bucket-{time.monotonic_ns()}/images", options)
    with pytest.raises(ImageReadError, match=r"images/gone\.png.*not found"):
        read_image(f"{bucket}/images/gone.png", options)


@pytest.mark.integration
def test_bad_image_files_on_s3_are_named_with_their_problem(s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.pipe_file(f"{bucket}/images/empty_cell.png", b"")  # S3 answers a ranged read of it 416
    fs.pipe_file(f"{bucket}/images/cut_short.png", png_bytes()[:60])
    fs.pipe_file(f"{bucket}/images/notes.png", b"this is not an image\n")
    with pytest.raises(ImageReadError, match=r"images/empty_cell\.png': file is empty \(0 bytes\)"):
        read_image(f"{bucket}/images/empty_cell.png", options)
    with pytest.raises(ImageReadError, match=r"images/cut_short\.png.*not a readable image"):
        read_image(f"{bucket}/images/cut_short.png", options)
    with pytest.raises(ImageReadError, match=r"images/notes\.png.*not a readable image"):
        read_image(f"{bucket}/images/notes.png", options)


@pytest.mark.integration
def test_credentials_the_endpoint_refuses_are_one_error_naming_the_url_and_the_settings(moto_iam):
    """A wrong secret or a key the server does not know (moto checking credentials as AWS does):
    one permanent StorageError naming the URL, the endpoint's error code and where credentials
    come from, never the secret (before: 'access denied (...)', naming no setting)."""
    import s3fs

    from cellseg.storage_errors import StorageError

    endpoint, admin, _ = moto_iam
    bucket = f"s3://refused-{time.monotonic_ns() % 10**8}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=admin["AWS_ACCESS_KEY_ID"],
                           secret=admin["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    fs.mkdir(bucket)
    fs.pipe_file(f"{bucket}/images/a.png", png_bytes())
    for key, code in ((admin["AWS_ACCESS_KEY_ID"], "SignatureDoesNotMatch"), ("AKIANOSUCHKEY0000000", "InvalidAccessKeyId")):
        options = {"endpoint_url": endpoint, "key": key, "secret": "wrong-secret-4711"}
        with pytest.raises(StorageError) as raised:
            list_images(f"{bucket}/images", options)
        message = str(raised.value)
        assert message.startswith(f"'{bucket}/images': the S3 endpoint refused the credentials ({code}: "), message
        assert message.endswith("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or "
                                "storage.s3.key and .secret in the settings, and that they are this endpoint's")
        assert "wrong-secret-4711" not in message and "\n" not in message
        assert not raised.value.transient and not raised.value.unreachable


def test_hidden_files_are_not_listed_and_those_with_an_image_suffix_are_named(tmp_path, caplog):
    """macOS leaves `._img.tif` (AppleDouble) beside each file it copies to a shared drive: an image
    suffix, no image. `predict` failed it, and a nightly run exited 3 every night."""
    from cellseg.io import list_images
    from cellseg.synth import encode_png

    (tmp_path / "a.png").write_bytes(encode_png(np.zeros((32, 32), dtype=np.uint8)))
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60))
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))
    (tmp_path / ".ipynb_checkpoints").mkdir()
    with caplog.at_level("INFO", logger="cellseg"):
        assert list_images(str(tmp_path)) == [str(tmp_path / "a.png")]
    assert f"skipping 1 hidden file(s) under '{tmp_path}', not images: ._a.png" in caplog.text
    assert ".DS_Store" not in caplog.text and "subfolder" not in caplog.text


def test_a_named_pipe_called_like_an_image_is_named_as_no_regular_file_not_read(tmp_path, caplog):
    """Reading a pipe waits for a writer that may never come. Named on its own, it was said not to
    exist; in a folder it was dropped without a word."""
    import os

    from cellseg.io import list_images
    from cellseg.synth import encode_png

    if not hasattr(os, "mkfifo"):
        pytest.skip("no named pipes on this system")
    (tmp_path / "a.png").write_bytes(encode_png(np.zeros((32, 32), dtype=np.uint8)))
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "link.png").symlink_to(tmp_path / "pipe.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    with caplog.at_level("INFO", logger="cellseg"):  # a dangling link is listed: reading it names the file
        assert list_images(str(tmp_path)) == [str(tmp_path / "a.png"), str(tmp_path / "dangling.png")]
    assert (f"skipping 2 entry(ies) under '{tmp_path}' named like images but not regular files (pipes, sockets, "
            "devices): link.png, pipe.png") in caplog.text
    with pytest.raises(ValueError, match=r"image file '.*pipe\.png' is not a regular file \(a pipe, socket or device\)"):
        list_images(str(tmp_path / "pipe.png"))
    with pytest.raises(FileNotFoundError, match=r"image file '.*gone\.png' does not exist"):
        list_images(str(tmp_path / "gone.png"))


def test_a_float_image_beyond_the_float32_range_is_refused_without_an_overflow_warning():
    import warnings

    from cellseg.io import ImageReadError, decode_image

    data = io.BytesIO()
    tifffile.imwrite(data, np.array([[0.0, 1e300], [2.0, 3.0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "overflow encountered in cast" came before the error
        with pytest.raises(ImageReadError, match=r"'huge.tif': pixel values reach 1e\+300, beyond the float32 range"):
            decode_image(data.getvalue(), "huge.tif", 1 << 20)
