"""Tests for cellseg/data.py: pairing, loading, normalisation, splitting, cropping, the dataset."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cellseg.config import AugmentationConfig, NormalizationConfig
from cellseg.dataset import TrainingDataset, crop_or_pad
from cellseg.dataset_errors import DatasetError
from cellseg.io import read_mask, read_mask_file
from cellseg.loaded_pairs import LoadedPair, load_pair, load_pairs, manifest_hash
from cellseg.mask_pixels import label_image
from cellseg.normalize import integer_histogram, intensity_skewness, normalize_image
from cellseg.pairs import ImagePair, pair_images_and_masks, split_train_val
from cellseg.synth import generate_sample

KEEP = NormalizationConfig(polarity="keep")


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png(array))
    return path


def make_dataset(root, ids=("a", "b", "c"), shape=(12, 10)):
    """images/ and masks/ with one 8-bit PNG pair per id; pixel values differ per id."""
    for number, image_id in enumerate(ids):
        image = ((np.arange(shape[0] * shape[1]).reshape(shape) + 17 * number) % 256).astype(np.uint8)
        write_png(root / "images" / f"{image_id}.png", image)
        write_png(root / "masks" / f"{image_id}.png", np.where(image > 100, 255, 0).astype(np.uint8))
    return root


def position_image(height: int, width: int) -> np.ndarray:
    """float32 (H, W) whose value is row * 1000 + column, so any crop reveals where it came from."""
    rows, cols = np.mgrid[0:height, 0:width]
    return (rows * 1000 + cols).astype(np.float32)


def loaded(image: np.ndarray, mask: np.ndarray, image_id: str = "x") -> LoadedPair:
    return LoadedPair(ImagePair(image_id, f"{image_id}.png", f"{image_id}_mask.png"), image, mask, "0", "0", "float32")


# --- pairing ------------------------------------------------------------------------------


def test_pairs_by_stem_across_directories_and_suffixes(tmp_path):
    write_png(tmp_path / "images" / "b.tif", np.zeros((2, 2), np.uint8))
    write_png(tmp_path / "images" / "a.png", np.zeros((2, 2), np.uint8))
    write_png(tmp_path / "masks" / "a.png", np.zeros((2, 2), np.uint8))
    write_png(tmp_path / "masks" / "b.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "masks" / "notes.txt").write_text("ignored: not an image suffix")

    pairs = pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))

    assert pairs == [
        ImagePair("a", f"{tmp_path}/images/a.png", f"{tmp_path}/masks/a.png"),
        ImagePair("b", f"{tmp_path}/images/b.tif", f"{tmp_path}/masks/b.png"),
    ]


def test_image_without_mask_and_mask_without_image_are_both_named(tmp_path):
    make_dataset(tmp_path, ids=("a", "b"))
    (tmp_path / "masks" / "a.png").unlink()
    write_png(tmp_path / "masks" / "orphan.png", np.zeros((2, 2), np.uint8))

    with pytest.raises(DatasetError) as caught:
        pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))

    message = str(caught.value)
    assert f"image '{tmp_path}/images/a.png' has no mask" in message
    assert f"mask '{tmp_path}/masks/orphan.png' has no image" in message
    assert "b.png" not in message


@pytest.mark.parametrize("role", ["images", "masks"])
def test_two_files_with_one_stem_are_ambiguous(tmp_path, role):
    make_dataset(tmp_path, ids=("a", "cell7"))
    write_png(tmp_path / role / "cell7.tif", np.zeros((2, 2), np.uint8))

    with pytest.raises(DatasetError, match=r"share a stem.*'cell7': cell7\.png, cell7\.tif"):
        pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))


def test_empty_image_directory_is_refused(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DatasetError, match=r"no images .* under '.*images'"):
        pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))



def test_masks_named_with_a_mask_suffix_pair_with_their_images(tmp_path, caplog):
    """Cellpose writes `img_masks.tif`, its GUI `img_cp_masks.png`, labs `img_mask.png`: each
    used to leave both files unpaired and refuse the dataset."""
    mask_names = {"a": "a_mask.png", "b": "b_masks.tif", "c": "c-labels.png", "d": "d_cp_masks.png", "e": "e.png"}
    for image_id, mask_name in mask_names.items():
        write_png(tmp_path / "images" / f"{image_id}.png", np.zeros((2, 2), np.uint8))
        write_png(tmp_path / "masks" / mask_name, np.zeros((2, 2), np.uint8))

    with caplog.at_level("INFO", logger="cellseg.pairs"):
        pairs = pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))

    assert pairs == [ImagePair(image_id, f"{tmp_path}/images/{image_id}.png", f"{tmp_path}/masks/{mask_name}")
                     for image_id, mask_name in mask_names.items()]
    assert "paired 5 images" in caplog.text and "(4 named with a mask suffix)" in caplog.text


def test_an_image_named_like_a_mask_keeps_its_exact_mask(tmp_path):
    for image_id in ("a", "a_mask"):
        write_png(tmp_path / "images" / f"{image_id}.png", np.zeros((2, 2), np.uint8))
        write_png(tmp_path / "masks" / f"{image_id}.png", np.zeros((2, 2), np.uint8))

    pairs = pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))

    assert [(pair.id, pair.mask_url.rsplit("/", 1)[1]) for pair in pairs] == [("a", "a.png"), ("a_mask", "a_mask.png")]


def test_a_plain_and_a_suffixed_mask_of_one_image_are_ambiguous(tmp_path):
    make_dataset(tmp_path, ids=("a", "b"))
    write_png(tmp_path / "masks" / "a_mask.png", np.zeros((12, 10), np.uint8))

    with pytest.raises(DatasetError, match=r"mask files name one image .*ambiguous: 'a': a\.png, a_mask\.png"):
        pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))


def test_one_folder_of_images_and_cellpose_masks_is_paired(tmp_path):
    """Cellpose keeps `img.tif` and `img_masks.tif` in one folder: given as both --images and
    --masks, every file used to be paired with itself and the dataset refused."""
    folder = tmp_path / "train"
    image, labels = np.zeros((12, 10), np.uint8), np.zeros((12, 10), np.uint16)
    image[2:6, 2:6], labels[2:6, 2:6] = 200, 7
    for image_id in ("img01", "img02"):
        write_png(folder / f"{image_id}.png", image)
        write_png(folder / f"{image_id}_masks.png", labels)

    pairs = pair_images_and_masks(str(folder), str(folder))

    assert pairs == [ImagePair(i, f"{folder}/{i}.png", f"{folder}/{i}_masks.png") for i in ("img01", "img02")]
    assert load_pair(pairs[0], KEEP).mask.sum() == 16


def test_hidden_files_are_skipped_with_a_warning(tmp_path, caplog):
    """macOS leaves `._img.tif` (AppleDouble) beside each file it copies to a shared drive: an image
    suffix, no image. It was listed, paired, and failed the whole training when decoded."""
    make_dataset(tmp_path, ids=("a", "b"))
    for role in ("images", "masks"):
        (tmp_path / role / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(60))
        (tmp_path / role / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(40))

    with caplog.at_level("WARNING"):
        pairs = pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))

    assert [pair.id for pair in pairs] == ["a", "b"]
    assert f"skipping 1 hidden file(s) under '{tmp_path}/images', not images: ._a.png" in caplog.text
    assert f"skipping 1 hidden file(s) under '{tmp_path}/masks', not images: ._a.png" in caplog.text
    assert len(load_pairs(pairs, KEEP)) == 2


def test_many_unpaired_files_are_counted_and_the_first_five_named(tmp_path):
    make_dataset(tmp_path, ids=[f"img{i}" for i in range(8)])
    for index in range(1, 8):
        (tmp_path / "masks" / f"img{index}.png").rename(tmp_path / "masks" / f"img{index}.seg.png")

    with pytest.raises(DatasetError) as caught:
        pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))

    message = str(caught.value)
    assert message.count("has no mask") == 5 and message.count("has no image") == 5
    assert "and 2 more of the 7 images without a mask" in message
    assert "and 2 more of the 7 masks without an image" in message
    assert message.endswith("(a mask is named '<image>.<ext>' or '<image>_mask', '_masks', '_label', '_labels', "
                            "'_cp_masks' before the extension)")


@pytest.mark.integration
def test_train_takes_a_folder_as_annotators_hand_it_over(tmp_path):
    """Masks named `<image>_mask.png` and macOS's `._` files beside both: trained on, and said so."""
    from cellseg.synth import write_dataset
    from tests.conftest import cellseg

    write_dataset(str(tmp_path / "data"), count=3, size=48, seed=0)
    for mask in (tmp_path / "data/masks").glob("*.png"):
        mask.rename(mask.with_name(f"{mask.stem}_mask.png"))
    for role in ("images", "masks"):
        (tmp_path / "data" / role / "._synth_0000.png").write_bytes(b"\x00\x05\x16\x07" + bytes(80))

    result = cellseg("train", "--images", str(tmp_path / "data/images"), "--masks", str(tmp_path / "data/masks"),
                     "--out", str(tmp_path / "run"), "--epochs", "1", "--depth", "2", "--base-width", "4",
                     "--patch-size", "48", "--patches-per-image", "1", "--from-scratch", "--max-minutes", "0")

    assert f"skipping 1 hidden file(s) under '{tmp_path}/data/images', not images: ._synth_0000.png" in result.stderr
    assert "paired 3 images" in result.stderr and "(3 named with a mask suffix)" in result.stderr
    split = json.loads((tmp_path / "run/split.json").read_text())
    assert sorted(split["train"] + split["val"]) == ["synth_0000", "synth_0001", "synth_0002"]


@pytest.mark.integration
def test_train_refuses_a_stack_in_one_line_with_exit_status_2(tmp_path):
    import tifffile

    from tests.conftest import cellseg

    make_dataset(tmp_path, ids=("a", "b"))
    (tmp_path / "images/b.png").unlink()
    tifffile.imwrite(tmp_path / "images/b.tif", np.zeros((4, 12, 10), np.uint8), photometric="minisblack")

    result = cellseg("train", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
                     "--out", str(tmp_path / "run"), "--from-scratch", check=False)

    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"cellseg train: error: image '{tmp_path}/images/b.tif' is a stack of 4 planes (z, time points or "
        "channels); training takes 2-D images and masks: save the annotated plane of each as a file of its own")
    assert not (tmp_path / "run/best.pt").exists()


def test_images_only_in_subfolders_are_refused_saying_subfolders_are_not_searched(tmp_path):
    make_dataset(tmp_path / "nested")
    shutil.move(tmp_path / "nested", tmp_path / "images")
    (tmp_path / "masks").mkdir()

    with pytest.raises(DatasetError, match=rf"^no images \(.*\) found directly under '{tmp_path}/images' "
                                           r"\(subfolders are not searched\)$"):
        pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))

@pytest.mark.integration
def test_pairing_and_loading_on_s3(s3_bucket, tmp_path):
    import s3fs

    bucket, options = s3_bucket
    local = make_dataset(tmp_path / "local", ids=("a", "b"))
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    for path in sorted(local.rglob("*.png")):
        fs.pipe_file(f"{bucket}/ds/{path.parent.name}/{path.name}", path.read_bytes())

    pairs = pair_images_and_masks(f"{bucket}/ds/images", f"{bucket}/ds/masks", options)

    assert pairs == [
        ImagePair(i, f"{bucket}/ds/images/{i}.png", f"{bucket}/ds/masks/{i}.png") for i in ("a", "b")
    ]
    remote = load_pairs(pairs, KEEP, options)
    here = load_pairs(pair_images_and_masks(str(local / "images"), str(local / "masks")), KEEP)
    assert manifest_hash(remote) == manifest_hash(here)
    np.testing.assert_array_equal(remote[1].image, here[1].image)
    np.testing.assert_array_equal(remote[1].mask, here[1].mask)


# --- loading ------------------------------------------------------------------------------


def test_load_pair_decodes_normalises_and_checksums(tmp_path):
    image = np.array([[0, 50], [100, 200]], dtype=np.uint8)
    mask = np.array([[0, 255], [0, 255]], dtype=np.uint8)
    pair = ImagePair("p", str(write_png(tmp_path / "p.png", image)), str(write_png(tmp_path / "pm.png", mask)))

    result = load_pair(pair, NormalizationConfig(low_percentile=0, high_percentile=100, polarity="keep"))

    np.testing.assert_allclose(result.image, [[0.0, 0.25], [0.5, 1.0]])
    assert result.image.dtype == np.float32
    np.testing.assert_array_equal(result.mask, [[False, True], [False, True]])
    assert result.dtype == "uint8"
    assert result.image_sha256 == hashlib.sha256((tmp_path / "p.png").read_bytes()).hexdigest()
    assert result.manifest_entry()["shape"] == [2, 2]


def sparse_labels(dtype) -> tuple[np.ndarray, np.ndarray]:
    """(a label image of three cells numbered 5, 2e9 and 3e9, the same cells numbered 1, 2, 3)."""
    small = np.zeros((40, 40), np.int32)
    small[2:10, 2:10], small[15:25, 15:25], small[30:38, 2:12] = 1, 2, 3
    numbers = np.array([0, 5, 2_000_000_000, 3_000_000_000], dtype=np.int64)
    return numbers[small].astype(dtype), small


@pytest.mark.parametrize("dtype", [np.uint32, np.int64])
def test_label_images_numbered_past_the_pixel_count_keep_every_cell(tmp_path, dtype):
    """Labels are numbers, not sizes: a cell numbered 3e9 used to wrap to a negative int32 and
    vanish, and every per-cell table was as long as the largest number."""
    import tifffile

    sparse, small = sparse_labels(dtype)
    tifffile.imwrite(tmp_path / "labels.tif", sparse)
    write_png(tmp_path / "image.png", (small * 60).astype(np.uint8))
    pair = load_pair(ImagePair("x", str(tmp_path / "image.png"), str(tmp_path / "labels.tif")), KEEP)
    np.testing.assert_array_equal(pair.instances, small)
    np.testing.assert_array_equal(pair.mask, small > 0)


def test_labels_within_the_pixel_count_are_kept_as_numbered(tmp_path):
    labels = np.zeros((8, 8), np.uint16)
    labels[0:2, 0:2], labels[5:7, 5:7] = 64, 7  # gaps and order kept: 64 is the image's pixel count
    write_png(tmp_path / "labels.png", labels)
    write_png(tmp_path / "image.png", (labels > 0).astype(np.uint8) * 200)
    pair = load_pair(ImagePair("x", str(tmp_path / "image.png"), str(tmp_path / "labels.png")), KEEP)
    np.testing.assert_array_equal(pair.instances, labels.astype(np.int32))


def test_load_pair_size_mismatch_names_both_files_and_sizes(tmp_path):
    image_path = write_png(tmp_path / "images" / "cell.png", np.zeros((30, 32), np.uint8))
    mask_path = write_png(tmp_path / "masks" / "cell.png", np.zeros((30, 40), np.uint8))

    with pytest.raises(DatasetError) as caught:
        load_pair(ImagePair("cell", str(image_path), str(mask_path)), KEEP)

    message = str(caught.value)
    assert f"mask '{mask_path}' is 40x30" in message
    assert f"image '{image_path}' is 32x30" in message



def touching_cells() -> np.ndarray:
    """uint16 labels: cells 1 and 2 side by side, touching, and cell 3 apart."""
    labels = np.zeros((16, 16), np.uint16)
    labels[2:8, 2:6], labels[2:8, 6:10], labels[11:14, 11:14] = 1, 2, 3
    return labels


def test_float_masks_of_whole_numbers_are_read_as_integer_masks(tmp_path):
    """numpy arrays and Fiji's 32-bit images save labels as float: a float label image was read as
    a binary mask, merging touching cells without a word."""
    import tifffile

    labels = touching_cells()
    image = write_png(tmp_path / "image.png", (labels > 0).astype(np.uint8) * 200)
    tifffile.imwrite(tmp_path / "labels.tif", labels.astype(np.float32))
    tifffile.imwrite(tmp_path / "binary.tif", (labels > 0).astype(np.float64))

    as_labels = load_pair(ImagePair("x", str(image), str(tmp_path / "labels.tif")), KEEP)
    as_binary = load_pair(ImagePair("x", str(image), str(tmp_path / "binary.tif")), KEEP)

    np.testing.assert_array_equal(as_labels.instances, labels)
    assert as_binary.instances is None
    np.testing.assert_array_equal(as_binary.mask, labels > 0)


@pytest.mark.parametrize("wrong", [0.25, -1.0])
def test_a_float_mask_of_fractions_or_negatives_is_refused_naming_it(tmp_path, wrong):
    """A probability map given as a mask was read as 'above 0 is cell': nearly every pixel a cell."""
    import tifffile

    image = write_png(tmp_path / "image.png", np.zeros((16, 16), np.uint8))
    mask = (touching_cells() > 0).astype(np.float32)
    mask[0, 0] = wrong
    tifffile.imwrite(tmp_path / "mask.tif", mask)

    with pytest.raises(DatasetError, match=rf"mask '{tmp_path}/mask.tif' holds float32 values that are not whole "
                                           rf"numbers from 0 \({wrong:g} among them\)"):
        load_pair(ImagePair("x", str(image), str(tmp_path / "mask.tif")), KEEP)



def test_a_mask_that_is_nearly_all_cell_is_warned_about_as_inverted(tmp_path, caplog):
    """Cells drawn black on white were read as a field of cell around black holes, without a word."""
    cells = np.pad(touching_cells() > 0, 8).astype(np.uint8) * 255  # 57 of 1024 pixels cell
    image = write_png(tmp_path / "image.png", cells)
    inverted = write_png(tmp_path / "inverted.png", 255 - cells)
    upright = write_png(tmp_path / "upright.png", cells)

    with caplog.at_level("WARNING", logger="cellseg.pairs"):
        load_pair(ImagePair("x", str(image), str(upright)), KEEP)
        assert not caplog.records
        pair = load_pair(ImagePair("x", str(image), str(inverted)), KEEP)

    assert pair.mask.sum() == 1024 - 57  # kept as given: a warning, not a refusal
    assert caplog.messages == [f"mask '{inverted}' marks 94% of its pixels as cell (any value above 0): is it "
                               "inverted, cells dark on a light background? Masks mark the background 0"]

@pytest.mark.parametrize("stacked", ["image", "mask"])
def test_a_stack_given_as_image_or_mask_is_refused_naming_it(tmp_path, stacked):
    """A z-stack or channel stack was read as its first page, silently, and paired with a mask
    drawn on another plane or a projection."""
    import tifffile

    labels = touching_cells()
    image = (labels > 0).astype(np.uint8) * 200
    files = {"image": tmp_path / "image.tif", "mask": tmp_path / "mask.tif"}
    planes = {"image": image, "mask": labels}
    for role, path in files.items():
        tifffile.imwrite(path, np.stack([planes[role]] * 5) if role == stacked else planes[role], photometric="minisblack")

    with pytest.raises(DatasetError, match=rf"^{stacked} '{files[stacked]}' is a stack of 5 planes \(z, time points "
                                           r"or channels\); training takes 2-D images and masks"):
        load_pair(ImagePair("x", str(files["image"]), str(files["mask"])), KEEP)


def test_an_animated_png_given_as_a_mask_is_refused_as_a_stack(tmp_path):
    """Its first frame was trained on, silently, as a TIFF stack's first page was."""
    labels = touching_cells()
    image = tmp_path / "image.png"
    Image.fromarray((labels > 0).astype(np.uint8) * 200).save(image)
    mask = tmp_path / "mask.png"
    frames = [Image.fromarray(labels.astype(np.uint8)), Image.fromarray((labels == 0).astype(np.uint8))]
    frames[0].save(mask, format="PNG", save_all=True, append_images=frames[1:])

    with pytest.raises(DatasetError, match=rf"^mask '{mask}' is a stack of 2 planes \(z, time points or channels\)"):
        load_pair(ImagePair("x", str(image), str(mask)), KEEP)
    frames[0].save(mask)
    assert load_pair(ImagePair("x", str(image), str(mask)), KEEP).mask.any()


def test_a_tiff_with_a_thumbnail_page_is_no_stack(tmp_path):
    import tifffile

    labels = touching_cells()
    with tifffile.TiffWriter(tmp_path / "image.tif") as tif:
        tif.write((labels > 0).astype(np.uint8) * 200)
        tif.write(np.zeros((4, 4), np.uint8), subfiletype=1)  # a reduced-resolution preview
    write_png(tmp_path / "mask.png", labels)

    pair = load_pair(ImagePair("x", str(tmp_path / "image.tif"), str(tmp_path / "mask.png")), KEEP)

    np.testing.assert_array_equal(pair.instances, labels)

def test_a_mask_with_the_pixels_of_its_image_is_refused_naming_both(tmp_path, capsys):
    """`--masks` pointed at the image folder used to train on each image as its own mask, silently."""
    import tifffile

    from cellseg.cli import main

    root = make_dataset(tmp_path)
    image_path = root / "images" / "a.png"
    with pytest.raises(DatasetError, match=f"mask '{image_path}' holds the same pixels as its image '{image_path}'"):
        load_pair(ImagePair("a", str(image_path), str(image_path)), KEEP)
    as_tiff = tmp_path / "a.tif"  # the same pixels in other bytes
    tifffile.imwrite(as_tiff, np.asarray(Image.open(image_path)))
    with pytest.raises(DatasetError, match="holds the same pixels"):
        load_pair(ImagePair("a", str(image_path), str(as_tiff)), KEEP)
    load_pair(ImagePair("a", str(image_path), str(root / "masks" / "a.png")), KEEP)  # its own mask is fine

    images = str(root / "images")
    assert main(["train", "--images", images, "--masks", images, "--out", str(tmp_path / "run"), "--from-scratch"]) == 2
    assert "are the masks the image folder?" in capsys.readouterr().err
    assert not (tmp_path / "run" / "best.pt").exists()


def test_a_microscope_image_read_as_a_label_image_is_refused_naming_it(tmp_path):
    """A 16-bit mask is read as instance labels; a 16-bit image in its place made a 'cell' of every
    grey level, and training went on."""
    from cellseg.synth import generate_sample

    sample = generate_sample(np.random.default_rng(0), (96, 96), bit_depth=16)
    image = write_png(tmp_path / "image.png", (sample.image >> 8).astype(np.uint8))
    labels = write_png(tmp_path / "labels.png", sample.labels)
    np.testing.assert_array_equal(load_pair(ImagePair("x", str(image), str(labels)), KEEP).instances, sample.labels)
    not_labels = write_png(tmp_path / "raw.png", sample.image)
    with pytest.raises(DatasetError, match=rf"'{not_labels}' is not a label image: \d+% of its labelled pixels lie in specks"):
        load_pair(ImagePair("x", str(image), str(not_labels)), KEEP)


@pytest.mark.parametrize("on", [1, 65535])
def test_a_sixteen_bit_binary_mask_is_read_as_binary_not_as_one_cell(tmp_path, on):
    """ImageJ and MATLAB save binary masks in 16 bits: read as a label image, all its cells were one
    'cell' whose size made training shrink the images (median diameter 62 px for nuclei of 16)."""
    cells = np.zeros((40, 40), np.uint16)
    cells[2:10, 2:10], cells[15:25, 15:25], cells[30:38, 2:12] = 1, 2, 3
    image = write_png(tmp_path / "image.png", (cells * 60).astype(np.uint8))
    binary = write_png(tmp_path / "binary.png", ((cells > 0) * on).astype(np.uint16))
    loaded = load_pair(ImagePair("x", str(image), str(binary)), KEEP)
    assert loaded.instances is None
    np.testing.assert_array_equal(loaded.mask, cells > 0)
    one_cell = write_png(tmp_path / "one.png", ((cells == 2) * on).astype(np.uint16))  # one region: one cell
    instances = load_pair(ImagePair("x", str(image), str(one_cell)), KEEP).instances
    assert instances is not None and len(np.unique(instances)) == 2
    np.testing.assert_array_equal(instances > 0, cells == 2)
    with pytest.raises(DatasetError, match=rf"'{binary}' is not a label image: its 3 separate regions all hold one value"):
        label_image(np.asarray(Image.open(binary)), str(binary))  # as `evaluate --labels` reads it


def test_an_eight_bit_label_image_is_read_as_labels_and_a_compressed_binary_mask_as_binary(tmp_path):
    """8-bit masks were always binary: a label image of under 256 cells saved in 8 bits lost its
    cells. Its grey levels are regions; a JPEG'd 0/255 mask's stray grey levels are specks."""
    from cellseg.synth import generate_sample

    sample = generate_sample(np.random.default_rng(4), (96, 96))
    assert 3 <= sample.labels.max() < 256
    image = write_png(tmp_path / "image.png", sample.image)
    labels = write_png(tmp_path / "labels.png", sample.labels.astype(np.uint8))
    np.testing.assert_array_equal(load_pair(ImagePair("x", str(image), str(labels)), KEEP).instances, sample.labels)
    jpeg = tmp_path / "mask.jpg"
    Image.fromarray(sample.mask.astype(np.uint8) * 255).save(jpeg, quality=75)
    compressed = load_pair(ImagePair("x", str(image), str(jpeg)), KEEP)
    assert len(np.unique(np.asarray(Image.open(jpeg)))) > 3 and compressed.instances is None
    assert np.mean(compressed.mask == sample.mask) > 0.995  # its strays cut at half (io.lossy_binary)


# --- normalisation ------------------------------------------------------------------------


def test_normalize_between_percentiles_by_hand():
    # Five values; numpy's linear percentile puts p25 at 10 and p75 at 30.
    image = np.array([[0, 10, 20, 30, 40]], dtype=np.uint8)
    config = NormalizationConfig(low_percentile=25, high_percentile=75, polarity="keep")
    result = normalize_image(image, config)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, [[0.0, 0.0, 0.5, 1.0, 1.0]])


def test_normalize_default_percentiles_by_hand():
    # Values 0..100: p1 = 1.0 and p99.8 = 99.8, so v maps to (v - 1) / 98.8, clipped.
    image = np.arange(101, dtype=np.uint8).reshape(1, 101)
    result = normalize_image(image, KEEP)
    assert result[0, 0] == 0.0 and result[0, 1] == 0.0
    assert result[0, 100] == 1.0
    np.testing.assert_allclose(result[0, [50, 75]], [49 / 98.8, 74 / 98.8], rtol=1e-6)


def test_normalize_flat_image_is_zeros():
    result = normalize_image(np.full((3, 4), 7, dtype=np.uint16))
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, np.zeros((3, 4)))


def test_normalize_16bit_values_above_255():
    # Values 0, 600, ..., 60000: p10 = 6000 and p90 = 54000.
    image = (np.arange(101, dtype=np.uint16) * 600).reshape(1, 101)
    config = NormalizationConfig(low_percentile=10, high_percentile=90, polarity="keep")
    result = normalize_image(image, config)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result[0, [0, 10, 30, 50, 70, 90, 100]], [0, 0, 0.25, 0.5, 0.75, 1, 1], atol=1e-6)


def test_8bit_images_normalise_as_their_float_copies_do():
    """The 8-bit path (OpenCV's histogram and lookup, np.bincount from 2**24 pixels on) against
    np.percentile on the same values as floats, for a strided view and a 16.8-megapixel image."""
    rng = np.random.default_rng(5)
    small = rng.integers(0, 256, (300, 301), dtype=np.uint8)
    large = rng.integers(30, 90, (4096, 4097), dtype=np.uint8)
    for image in (small, small[:, ::3], 255 - small[::2], large):
        for config in (KEEP, NormalizationConfig()):
            expected = normalize_image(image.astype(np.float32), config)
            np.testing.assert_allclose(normalize_image(image, config), expected, atol=1e-6)
        np.testing.assert_array_equal(integer_histogram(image), np.bincount(image.ravel(), minlength=256))


def bimodal(majority: int, minority: int, dtype=np.uint8) -> np.ndarray:
    """10x10 image: 90 pixels at `majority`, a 10-pixel row at `minority`."""
    image = np.full((10, 10), majority, dtype=dtype)
    image[4] = minority
    return image


def test_auto_polarity_inverts_bright_image_with_dark_minority():
    image = bimodal(majority=200, minority=20)  # brightfield-like: dark objects
    assert intensity_skewness(image) < 0
    expected = np.zeros((10, 10))
    expected[4] = 1.0  # the dark row becomes bright after inversion
    np.testing.assert_array_equal(normalize_image(image), expected)


def test_auto_polarity_keeps_dark_image_with_bright_minority():
    image = bimodal(majority=20, minority=200)  # fluorescence-like: bright objects
    assert intensity_skewness(image) > 0
    expected = np.zeros((10, 10))
    expected[4] = 1.0
    np.testing.assert_array_equal(normalize_image(image), expected)


def test_auto_polarity_on_16bit_brightfield():
    image = bimodal(majority=60000, minority=3000, dtype=np.uint16)
    expected = np.zeros((10, 10))
    expected[4] = 1.0
    np.testing.assert_array_equal(normalize_image(image), expected)


def test_keep_polarity_never_inverts():
    image = bimodal(majority=200, minority=20)
    expected = np.ones((10, 10))
    expected[4] = 0.0  # dark row stays dark
    np.testing.assert_array_equal(normalize_image(image, KEEP), expected)


def test_skewness_by_hand():
    # [0, 0, 0, 4]: mean 1, deviations -1,-1,-1,3; m2 = 12/4 = 3, m3 = 24/4 = 6; 6 / 3**1.5.
    assert intensity_skewness(np.array([[0, 0, 0, 4]])) == pytest.approx(6 / 3**1.5)


def test_skewness_of_an_image_of_many_bands_is_numpys_in_little_memory():
    """Summed band by band: numpy's whole-image float64 copies took 32 bytes a pixel."""
    import tracemalloc

    from cellseg.normalize import SKEWNESS_BAND_PIXELS

    image = np.random.default_rng(3).gamma(2.0, size=(3000, 2000)).astype(np.float32)  # 5.7 bands
    pixels = image.astype(np.float64).ravel()
    centred = pixels - pixels.mean()
    expected = np.mean(centred**3) / np.mean(centred**2) ** 1.5
    del pixels, centred
    tracemalloc.start()
    try:
        skewness = intensity_skewness(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert skewness == pytest.approx(expected, rel=1e-12) and skewness > 1
    assert type(skewness) is float  # numpy's float64 made the block-wise records unwritable (numpy bools in JSON)
    assert peak < 4 * SKEWNESS_BAND_PIXELS * 8 < image.size * 32, peak  # three bands' float64, whatever the image
    assert intensity_skewness(np.full((2, 2), 5)) == 0.0


# --- train/val split ----------------------------------------------------------------------


def pairs_of(n: int) -> list[ImagePair]:
    return [ImagePair(f"img{i:02d}", f"images/img{i:02d}.png", f"masks/img{i:02d}.png") for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete():
    pairs = pairs_of(20)
    train, val = split_train_val(pairs, 0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert not {p.id for p in train} & {p.id for p in val}
    assert sorted(train + val, key=lambda p: p.id) == pairs
    # Same seed, input in another order: the same split.
    assert split_train_val(list(reversed(pairs)), 0.2, seed=3) == (train, val)
    assert split_train_val(pairs, 0.2, seed=4)[1] != val


def test_split_keeps_at_least_one_of_each():
    assert len(split_train_val(pairs_of(5), 0.01, seed=0)[1]) == 1
    train, val = split_train_val(pairs_of(2), 0.9, seed=0)
    assert len(train) == 1 and len(val) == 1
    assert split_train_val(pairs_of(1), 0.5, seed=0) == (pairs_of(1), [])
    assert split_train_val(pairs_of(4), 0.0, seed=0) == (pairs_of(4), [])


# --- cropping and padding -----------------------------------------------------------------


def test_pad_small_image_by_mirroring():
    image = np.array([[0, 1, 2], [3, 4, 5]])
    mask = image % 2 == 0
    padded, padded_mask = crop_or_pad(image, mask, 4, np.random.default_rng(0))
    # Rows: 2 short -> one mirrored row above and below; columns: 1 short -> one on the right.
    expected = np.array([[0, 1, 2, 2], [0, 1, 2, 2], [3, 4, 5, 5], [3, 4, 5, 5]])
    np.testing.assert_array_equal(padded, expected)
    np.testing.assert_array_equal(padded_mask, expected % 2 == 0)


@pytest.mark.parametrize("seed", range(5))
def test_crop_large_image_is_an_aligned_window(seed):
    image = position_image(20, 30)
    mask = (image.astype(int) % 3) == 0
    crop, crop_mask = crop_or_pad(image, mask, 8, np.random.default_rng(seed))
    assert crop.shape == (8, 8) and crop_mask.shape == (8, 8)
    top, left = divmod(int(crop[0, 0]), 1000)
    np.testing.assert_array_equal(crop, image[top : top + 8, left : left + 8])
    np.testing.assert_array_equal(crop_mask, (crop.astype(int) % 3) == 0)


def test_crops_move_with_the_rng():
    image = position_image(40, 40)
    corners = {float(crop_or_pad(image, image, 8, np.random.default_rng(s))[0][0, 0]) for s in range(10)}
    assert len(corners) > 1


def test_pad_one_side_and_crop_the_other():
    image = position_image(4, 30)
    crop, crop_mask = crop_or_pad(image, image.copy(), 8, np.random.default_rng(1))
    assert crop.shape == (8, 8)
    rows = np.unique(crop // 1000)
    np.testing.assert_array_equal(rows, [0, 1, 2, 3])  # padded rows are mirrors of the 4 real ones
    np.testing.assert_array_equal(crop, crop_mask)


# --- TrainingDataset ---------------------------------------------------------------------------


def position_pairs():
    return [loaded(position_image(64, 64) + 100_000 * k, (position_image(64, 64).astype(int) % 2) == 0, f"id{k}") for k in range(2)]


def test_dataset_items_have_patch_shape_and_aligned_masks():
    # Exact symmetries only, so that every pixel keeps its position code (warps interpolate).
    dataset = TrainingDataset(position_pairs(), patch_size=16, patches_per_image=3, augment=True, seed=0,
                         augmentation=AugmentationConfig.flips_only())
    assert len(dataset) == 6
    for index in range(len(dataset)):
        image, mask = dataset[index]
        assert image.shape == (1, 16, 16) and mask.shape == (1, 16, 16)
        assert image.dtype == torch.float32 and mask.dtype == torch.float32
        # Item index // patches_per_image picks the pair: ids 0,1,2 from pair 0, ids 3,4,5 from pair 1.
        assert int(image.min()) // 100_000 == index // 3
        column = image.numpy().astype(int) % 1000
        np.testing.assert_array_equal(mask.numpy(), (column % 2 == 0).astype(np.float32))


def test_dataset_samples_are_a_function_of_seed_epoch_index():
    first = TrainingDataset(position_pairs(), patch_size=16, patches_per_image=2, augment=True, seed=7)
    second = TrainingDataset(position_pairs(), patch_size=16, patches_per_image=2, augment=True, seed=7)
    first.set_epoch(3)
    second.set_epoch(3)
    for index in (3, 0, 2):  # order of access must not matter
        assert torch.equal(first[index][0], second[index][0])
        assert torch.equal(first[index][1], second[index][1])
    before = first[1][0].clone()
    first.set_epoch(4)
    assert not torch.equal(first[1][0], before)
    first.set_epoch(3)
    assert torch.equal(first[1][0], before)


def test_validation_dataset_returns_whole_images():
    pairs = position_pairs()
    dataset = TrainingDataset(pairs, patch_size=None, patches_per_image=5)
    assert len(dataset) == 2
    image, mask = dataset[1]
    np.testing.assert_array_equal(image[0].numpy(), pairs[1].image)
    np.testing.assert_array_equal(mask[0].numpy(), pairs[1].mask.astype(np.float32))


def test_empty_dataset_is_refused():
    with pytest.raises(DatasetError, match="empty"):
        TrainingDataset([])


# --- manifest hash ------------------------------------------------------------------------


def load_dir(root):
    return load_pairs(pair_images_and_masks(str(root / "images"), str(root / "masks")), KEEP)


def test_manifest_hash_depends_on_content_not_location(tmp_path):
    original = make_dataset(tmp_path / "one")
    shutil.copytree(original, tmp_path / "elsewhere" / "two")
    reference = manifest_hash(load_dir(original))

    assert manifest_hash(load_dir(original)) == reference
    assert manifest_hash(load_dir(tmp_path / "elsewhere" / "two")) == reference
    assert manifest_hash(list(reversed(load_dir(original)))) == reference

    changed = tmp_path / "changed"
    shutil.copytree(original, changed)
    image = np.asarray(Image.open(changed / "images" / "b.png")).copy()
    image[0, 0] ^= 1  # one pixel, one bit
    write_png(changed / "images" / "b.png", image)
    assert manifest_hash(load_dir(changed)) != reference

    renamed = tmp_path / "renamed"
    shutil.copytree(original, renamed)
    for folder in ("images", "masks"):
        (renamed / folder / "c.png").rename(renamed / folder / "d.png")
    assert manifest_hash(load_dir(renamed)) != reference


def test_a_binary_image_that_is_its_own_mask_is_accepted(tmp_path):
    """Only an image of grey levels is refused as its own mask: a blank field with an empty mask,
    or a binary image with the same binary mask, is consistent."""
    blank = write_png(tmp_path / "blank.png", np.zeros((16, 16), np.uint8))
    assert not load_pair(ImagePair("b", str(blank), str(blank)), KEEP).mask.any()
    cells = np.zeros((16, 16), np.uint8)
    cells[4:9, 4:9] = 255
    binary = write_png(tmp_path / "binary.png", cells)
    np.testing.assert_array_equal(load_pair(ImagePair("c", str(binary), str(binary)), KEEP).mask, cells > 0)


def _cells_grid(count: int, side: int = 9, gap: int = 1) -> np.ndarray:
    """int32 labels 1..count: square cells of `side` pixels on a grid, `gap` pixels apart
    (no gap: each touches its neighbours)."""
    per_row = int(np.ceil(np.sqrt(count)))
    labels = np.zeros((per_row * (side + gap) + gap,) * 2, dtype=np.int32)
    for index in range(count):
        top, left = gap + (index // per_row) * (side + gap), gap + (index % per_row) * (side + gap)
        labels[top:top + side, left:left + side] = index + 1
    return labels


def _same_cells(found: np.ndarray, labels: np.ndarray) -> bool:
    """Whether two label images hold the same cells, whatever their numbers."""
    pairs = np.unique(np.stack([found.ravel(), labels.ravel()]), axis=1)
    return len(pairs[0]) == len(np.unique(found)) == len(np.unique(labels))


def test_colour_label_images_keep_each_colour_a_cell(tmp_path):
    """Annotation tools save instance labels as one colour per cell (RGB or palette PNGs). Read as
    luma, colours of equal brightness were one cell, and over 255 cells could not all be told apart."""
    labels = _cells_grid(300, gap=0)  # touching cells: only their colours part them
    rng = np.random.default_rng(3)
    colours = rng.permutation(np.arange(1, 1 << 24))[:300]
    colours[1] = 0x00FF00 if colours[0] != 0x00FF00 else 0x0000FF
    colours[0], colours[2] = 0x967D2C, 0x7D8C2F  # equal luma, 125, in Rec. 601
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[labels > 0] = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=-1)[labels[labels > 0] - 1]
    image = (labels * 37 % 200 + 20).astype(np.uint8)
    write_png(tmp_path / "a.png", image)
    Image.fromarray(rgb).save(tmp_path / "a_rgb.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "a_rgba.png")
    loaded = load_pair(ImagePair("a", str(tmp_path / "a.png"), str(tmp_path / "a_rgb.png")), NormalizationConfig())
    assert loaded.instances is not None and loaded.instances.max() == 300 and _same_cells(loaded.instances, labels)
    np.testing.assert_array_equal(loaded.mask, labels > 0)
    rgba = load_pair(ImagePair("a", str(tmp_path / "a.png"), str(tmp_path / "a_rgba.png")), NormalizationConfig())
    np.testing.assert_array_equal(rgba.instances, loaded.instances)

    # On a white background, without a black pixel: the colour of over half the image is background.
    sparse = _cells_grid(30, gap=12)
    white = np.full((*sparse.shape, 3), 255, dtype=np.uint8)
    white[sparse > 0] = np.stack([(colours >> 16) & 255, (colours >> 8) & 255, colours & 255], axis=-1)[sparse[sparse > 0] - 1]
    Image.fromarray(white).save(tmp_path / "c_white.png")
    write_png(tmp_path / "c.png", (sparse * 5 % 200 + 20).astype(np.uint8))
    on_white = load_pair(ImagePair("c", str(tmp_path / "c.png"), str(tmp_path / "c_white.png")), NormalizationConfig())
    assert on_white.instances is not None and _same_cells(on_white.instances, sparse)
    np.testing.assert_array_equal(on_white.mask, sparse > 0)

    # A palette image: its colours, whatever the order of its palette entries.
    few = _cells_grid(40, gap=0)
    palette = Image.fromarray(((few * 7) % 256).astype(np.uint8), mode="P")
    palette.putpalette([channel for index in range(256) for channel in
                        ((0, 0, 0) if index == 0 else ((index * 53) % 256, (index * 101) % 256, 255 - index))])
    palette.save(tmp_path / "b_palette.png")
    write_png(tmp_path / "b.png", (few * 5 % 200 + 20).astype(np.uint8))
    indexed = load_pair(ImagePair("b", str(tmp_path / "b.png"), str(tmp_path / "b_palette.png")), NormalizationConfig())
    assert indexed.instances is not None and _same_cells(indexed.instances, few)

    # 16-bit RGB TIFF labels, as some tools export them.
    import tifffile
    deep = np.zeros((*labels.shape, 3), dtype=np.uint16)
    deep[..., 0], deep[..., 2] = labels * 211, labels % 7
    tifffile.imwrite(tmp_path / "a_deep.tif", deep, photometric="rgb")
    from_tiff = load_pair(ImagePair("a", str(tmp_path / "a.png"), str(tmp_path / "a_deep.tif")), NormalizationConfig())
    assert from_tiff.instances is not None and _same_cells(from_tiff.instances, labels)


def test_an_image_given_as_a_mask_is_refused_and_real_masks_are_not(tmp_path):
    """A microscopy image in the mask folder trained on as a mask of nearly all cell, without a word."""
    sample = generate_sample(np.random.default_rng(5), (96, 96))
    write_png(tmp_path / "a.png", sample.image)
    write_png(tmp_path / "masks/a.png", (sample.image // 2 + 40).astype(np.uint8))  # another image, not the same pixels
    with pytest.raises(DatasetError, match=r"mask '.*masks/a\.png' holds \d+ levels .*it looks like an image, not a mask"):
        load_pair(ImagePair("a", str(tmp_path / "a.png"), str(tmp_path / "masks/a.png")), KEEP)
    for name, mask in (("binary", sample.mask * np.uint8(255)), ("labels", sample.labels.astype(np.uint16)),
                       ("ones", sample.mask.astype(np.uint8))):
        write_png(tmp_path / f"{name}.png", mask)
        loaded = load_pair(ImagePair("a", str(tmp_path / "a.png"), str(tmp_path / f"{name}.png")), KEEP)
        np.testing.assert_array_equal(loaded.mask, sample.mask)


def test_colour_masks_that_are_not_labels_stay_binary_masks(tmp_path):
    labels = _cells_grid(60)
    image = (labels * 37 % 200 + 20).astype(np.uint8)
    write_png(tmp_path / "a.png", image)
    masks = {
        "white": np.repeat(((labels > 0) * 255).astype(np.uint8)[..., None], 3, axis=-1),  # grey: the 8-bit rules
        "red": np.stack([(labels > 0) * 255, np.zeros_like(labels), np.zeros_like(labels)], axis=-1).astype(np.uint8),
    }
    for name, rgb in masks.items():
        Image.fromarray(rgb).save(tmp_path / f"{name}.png")
        loaded = load_pair(ImagePair("a", str(tmp_path / "a.png"), str(tmp_path / f"{name}.png")), NormalizationConfig())
        assert loaded.instances is None, name
        np.testing.assert_array_equal(loaded.mask, labels > 0)
        np.testing.assert_array_equal(read_mask(str(tmp_path / f"{name}.png")), labels > 0)
    # A colour label image saved as JPEG: its colours lie in specks, so it is read as a binary mask.
    rng = np.random.default_rng(0)
    colours = rng.integers(40, 256, (61, 3)).astype(np.uint8)
    colours[0] = 0
    Image.fromarray(colours[labels]).save(tmp_path / "jpeg.jpg", quality=75)
    jpeg = load_pair(ImagePair("a", str(tmp_path / "a.png"), str(tmp_path / "jpeg.jpg")), NormalizationConfig())
    assert jpeg.instances is None
    assert jpeg.mask[labels > 0].mean() > 0.99  # every cell (with the compression's noise around them, as before)
    # A colour image given as its own mask is refused, as a grayscale one is.
    photo = np.stack([image, image // 2, 255 - image], axis=-1)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    with pytest.raises(DatasetError, match="holds the same pixels as its image"):
        load_pair(ImagePair("p", str(tmp_path / "photo.png"), str(tmp_path / "photo.png")), NormalizationConfig())


# --- 8-bit label images of more than 255 cells ---------------------------------------------


def grid_of_cells(count: int, side: int = 6, gap: int = 3, columns: int = 20) -> np.ndarray:
    """uint32 labels 1..count of `side`-pixel squares on a grid, `gap` pixels apart."""
    rows = -(-count // columns)
    labels = np.zeros((rows * (side + gap) + gap, columns * (side + gap) + gap), np.uint32)
    for index in range(count):
        top, left = gap + (index // columns) * (side + gap), gap + (index % columns) * (side + gap)
        labels[top:top + side, left:left + side] = index + 1
    return labels


def test_an_8_bit_label_image_of_more_than_255_cells_is_named_as_wrapped_in_training_and_as_truth(tmp_path, caplog):
    """300 cells saved in 8 bits: cells 257..300 share labels 1..44 with cells far away, and were
    trained and scored on as one cell each, without a word."""
    wrapped = (grid_of_cells(300) % 256).astype(np.uint8)
    mask = write_png(tmp_path / "masks" / "a.png", wrapped)
    image = write_png(tmp_path / "images" / "a.png", (wrapped > 0).astype(np.uint8) * 200)

    load_pair(ImagePair("a", str(image), str(mask)), KEEP)
    label_image(read_mask_file(str(mask)).pixels, str(mask))  # as `evaluate` reads truth labels

    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert warnings == [f"label image '{mask}' looks wrapped: it is 8-bit, uses nearly all 255 cell values, and 44 "
                        "of them each label separate cells far apart, as when more than 255 cells are saved in 8 bits "
                        "(cells then share labels, and every 256th is background); save labels as 16-bit PNG or "
                        "TIFF"] * 2


def test_ordinary_label_images_and_masks_are_not_named_as_wrapped(tmp_path, caplog, synthetic_dataset):
    full = grid_of_cells(255).astype(np.uint8)  # every value, each one cell
    split = full.copy()
    split[3:9, 5] = 0  # cells cut in two: one value in two pieces side by side
    split[:, 7] = 0
    few = grid_of_cells(120).astype(np.uint8)
    masks = [write_png(tmp_path / f"{name}.png", array) for name, array in (("full", full), ("split", split),
                                                                           ("few", few))]
    binary = write_png(tmp_path / "binary.png", np.where(grid_of_cells(300) > 0, 255, 0).astype(np.uint8))

    for mask in (*masks, binary, *sorted((synthetic_dataset / "labels").iterdir())[:3]):
        pixels = read_mask_file(str(mask)).pixels
        if mask != binary:
            label_image(pixels, str(mask))
        image = write_png(tmp_path / "images" / f"{mask.stem}.png", (pixels > 0).astype(np.uint8) * 200)
        assert load_pair(ImagePair(mask.stem, str(image), str(mask)), KEEP).mask.any()

    assert "wrapped" not in caplog.text


# --- names that differ only in case ---------------------------------------------------------


def test_an_image_and_a_mask_whose_names_differ_only_in_case_are_paired_and_it_is_said(tmp_path, caplog):
    """`IMG01.tif` and `img01.png` stayed unpaired: an error naming both."""
    caplog.set_level("INFO", logger="cellseg.pairs")
    write_png(tmp_path / "images" / "IMG01.tif", np.full((4, 4), 7, np.uint8))
    write_png(tmp_path / "images" / "b.png", np.full((4, 4), 7, np.uint8))
    write_png(tmp_path / "masks" / "img01.png", np.eye(4, dtype=np.uint8) * 255)
    write_png(tmp_path / "masks" / "B_Masks.png", np.eye(4, dtype=np.uint8) * 255)

    pairs = pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))

    assert pairs == [ImagePair("IMG01", str(tmp_path / "images/IMG01.tif"), str(tmp_path / "masks/img01.png")),
                     ImagePair("b", str(tmp_path / "images/b.png"), str(tmp_path / "masks/B_Masks.png"))]
    said = [record.getMessage() for record in caplog.records if "differ only in case" in record.getMessage()]
    assert said == ["paired 2 mask files with images whose names differ only in case (e.g. 'img01.png' with image "
                    "'IMG01')"]


@pytest.mark.parametrize(("images", "masks"), [(["IMG01.tif", "img01.tif"], ["Img01.png"]),
                                               (["IMG01.tif"], ["img01.png", "Img01_mask.png"])],
                         ids=["two-images", "two-masks"])
def test_names_that_match_only_ignoring_case_stay_unpaired_where_that_is_ambiguous(tmp_path, images, masks):
    for name in images:
        write_png(tmp_path / "images" / name, np.full((4, 4), 7, np.uint8))
    for name in masks:
        write_png(tmp_path / "masks" / name, np.eye(4, dtype=np.uint8) * 255)

    with pytest.raises(DatasetError) as refused:
        pair_images_and_masks(str(tmp_path / "images"), str(tmp_path / "masks"))

    for name in images:
        assert f"image '{tmp_path}/images/{name}' has no mask" in str(refused.value)
    for name in masks:
        assert f"mask '{tmp_path}/masks/{name}' has no image" in str(refused.value)
