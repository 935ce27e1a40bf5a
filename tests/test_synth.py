"""Tests for cellseg/synth.py: reproducibility, mask/label consistency, touching cells, options, S3."""

from __future__ import annotations

import numpy as np
import pytest

from cellseg.io import list_images, read_image
from cellseg.synth import encode_png, generate_sample, write_dataset
from tests.conftest import cellseg

FOLDERS = ("images", "masks", "labels")


def files_of(root) -> dict[str, bytes]:
    """Relative path -> bytes for every file under `root`."""
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def touching_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    """Pairs of different non-zero labels that are 4-adjacent somewhere."""
    found = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        touching = (a > 0) & (b > 0) & (a != b)
        found |= {tuple(sorted(pair)) for pair in zip(a[touching].tolist(), b[touching].tolist(), strict=True)}
    return found


# --- generate_sample ----------------------------------------------------------------------


def test_generate_sample_is_a_function_of_the_seed():
    first = generate_sample(np.random.default_rng(11), (64, 80))
    again = generate_sample(np.random.default_rng(11), (64, 80))
    other = generate_sample(np.random.default_rng(12), (64, 80))
    for name in ("image", "mask", "labels"):
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
    assert not np.array_equal(first.labels, other.labels)
    assert not np.array_equal(first.image, other.image)


@pytest.mark.parametrize("seed", range(4))
def test_sample_mask_labels_and_dtypes_agree(seed):
    sample = generate_sample(np.random.default_rng(seed), (64, 80))
    assert sample.image.shape == sample.mask.shape == sample.labels.shape == (64, 80)
    assert sample.image.dtype == np.uint8
    assert sample.mask.dtype == bool
    assert sample.labels.dtype == np.uint16
    np.testing.assert_array_equal(sample.mask, sample.labels > 0)
    n = int(sample.labels.max())
    assert n >= 1
    np.testing.assert_array_equal(np.unique(sample.labels), np.arange(n + 1))  # 0 and 1..N, no gaps


@pytest.mark.parametrize("seed", range(8))
def test_tiny_image_covered_by_cells_keeps_every_cell(seed):
    # At 8x8 the cells usually cover every pixel; relabelling must not turn cell 1 into background.
    sample = generate_sample(np.random.default_rng(seed), (8, 8))
    cells = np.unique(sample.labels[sample.labels > 0])
    assert len(cells) >= 1
    np.testing.assert_array_equal(cells, np.arange(1, len(cells) + 1))
    np.testing.assert_array_equal(sample.mask, sample.labels > 0)


def test_16bit_sample_uses_the_16bit_range():
    sample = generate_sample(np.random.default_rng(0), (64, 64), bit_depth=16)
    assert sample.image.dtype == np.uint16
    assert sample.image.max() > 255  # not 8-bit values stored in a wider type


@pytest.mark.parametrize("seed", range(4))
def test_polarity_sets_which_side_is_brighter(seed):
    bright = generate_sample(np.random.default_rng(seed), (96, 96), polarity="bright")
    dark = generate_sample(np.random.default_rng(seed), (96, 96), polarity="dark")
    np.testing.assert_array_equal(bright.labels, dark.labels)  # polarity changes only the image
    assert bright.image[bright.mask].mean() > bright.image[~bright.mask].mean()
    assert dark.image[dark.mask].mean() < dark.image[~dark.mask].mean()


# --- write_dataset ------------------------------------------------------------------------


def test_write_dataset_is_byte_identical_for_a_seed(tmp_path):
    ids = write_dataset(str(tmp_path / "one"), count=3, size=48, seed=5)
    write_dataset(str(tmp_path / "two"), count=3, size=48, seed=5)
    write_dataset(str(tmp_path / "other"), count=3, size=48, seed=6)

    assert ids == ["synth_0000", "synth_0001", "synth_0002"]
    one, two, other = files_of(tmp_path / "one"), files_of(tmp_path / "two"), files_of(tmp_path / "other")
    assert sorted(one) == sorted(f"{folder}/{i}.png" for folder in FOLDERS for i in ids)
    assert one == two
    assert sorted(other) == sorted(one)
    for name in one:
        assert other[name] != one[name], name


def test_synth_refuses_a_results_store_which_its_folders_would_damage(tmp_path):
    """A dataset written into a store showed as three broken images there ('images/zarr.json' is
    missing), and `verify --repair` listed them as failed images."""
    from cellseg.store import ResultStore
    from cellseg.verify import verify_store

    store = ResultStore.open(str(tmp_path / "r.zarr"))
    for out, where in ((tmp_path / "r.zarr", "is"), (tmp_path / "r.zarr" / "data", "is inside")):
        refused = cellseg("synth", "--out", str(out), "--count", "2", "--size", "32", check=False)
        assert refused.returncode == 2
        assert f"'{out}' {where} the zarr store '{tmp_path / 'r.zarr'}', which a dataset" in refused.stderr
    assert sorted(path.name for path in (tmp_path / "r.zarr").iterdir()) == ["zarr.json"]
    assert verify_store(store.url).broken == []


def test_synth_refuses_a_folder_holding_a_dataset_unless_told_to_replace_it(tmp_path, tmp_path_factory):
    """A second `synth` into the same folder used to leave the first dataset's extra images beside
    the new ones (and 8-bit beside 16-bit), without a word."""
    cellseg("synth", "--out", str(tmp_path), "--count", "3", "--size", "48", "--seed", "1")
    before = files_of(tmp_path)
    refused = cellseg("synth", "--out", str(tmp_path), "--count", "2", "--size", "32", check=False)
    assert refused.returncode == 2
    assert "already holds a dataset (files in images/, masks/, labels/)" in refused.stderr and "--overwrite" in refused.stderr
    assert files_of(tmp_path) == before

    (tmp_path / "notes.txt").write_text("mine")
    replaced = cellseg("synth", "--out", str(tmp_path), "--count", "2", "--size", "32", "--seed", "3", "--overwrite")
    assert "wrote 2 images" in replaced.stdout
    fresh = tmp_path_factory.mktemp("fresh")
    write_dataset(str(fresh), count=2, size=32, seed=3)
    assert {name: data for name, data in files_of(tmp_path).items() if "/" in name} == files_of(fresh)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # only the dataset's folders are replaced

    for flags, message in ((["--count", "0"], "0 images: give 1 or more"), (["--size", "8"], "8 pixels: give 16 or more")):
        result = cellseg("synth", "--out", str(tmp_path / "bad"), *flags, check=False)
        assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "bad").exists()


def test_written_masks_match_written_labels(synthetic_dataset):
    root = synthetic_dataset
    image_urls = list_images(str(root / "images"))
    assert len(image_urls) == 24
    for url in image_urls[:8]:
        name = url.rsplit("/", 1)[1]
        image = read_image(url)
        mask = read_image(str(root / "masks" / name))
        labels = read_image(str(root / "labels" / name))
        assert image.dtype == np.uint8 and image.shape == (96, 96)
        assert labels.dtype == np.uint16
        assert set(np.unique(mask).tolist()) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, labels > 0)
        np.testing.assert_array_equal(np.unique(labels), np.arange(int(labels.max()) + 1))


def test_some_cells_touch(synthetic_dataset):
    labels = [read_image(str(synthetic_dataset / "labels" / f"synth_{i:04d}.png")) for i in range(4)]
    touching = [touching_pairs(image) for image in labels]
    assert any(touching), "no two different cells are 4-adjacent in the first four images"


def test_touching_pairs_helper_by_hand():
    labels = np.array([[1, 1, 0, 3], [0, 2, 0, 3], [0, 0, 0, 0]])
    assert touching_pairs(labels) == {(1, 2)}


def test_16bit_dataset_reads_back_as_16bit(tmp_path):
    write_dataset(str(tmp_path), count=2, size=48, seed=0, bit_depth=16)
    for index in range(2):
        image = read_image(str(tmp_path / "images" / f"synth_{index:04d}.png"))
        assert image.dtype == np.uint16
        assert image.max() > 255


def test_mixed_polarity_alternates_bright_and_dark(tmp_path):
    write_dataset(str(tmp_path), count=4, size=96, seed=1, polarity="mixed")
    for index in range(4):
        name = f"synth_{index:04d}.png"
        image = read_image(str(tmp_path / "images" / name)).astype(float)
        cells = read_image(str(tmp_path / "masks" / name)) > 0
        cells_brighter = image[cells].mean() > image[~cells].mean()
        assert cells_brighter == (index % 2 == 0), name


def test_vary_size_gives_different_shapes_within_range(tmp_path):
    write_dataset(str(tmp_path), count=6, size=64, seed=2, vary_size=True)
    shapes = set()
    for index in range(6):
        name = f"synth_{index:04d}.png"
        shape = read_image(str(tmp_path / "images" / name)).shape
        assert read_image(str(tmp_path / "masks" / name)).shape == shape
        assert read_image(str(tmp_path / "labels" / name)).shape == shape
        assert all(48 <= side <= 64 for side in shape), shape
        shapes.add(shape)
    assert len(shapes) > 1


def test_fixed_size_gives_one_shape(tmp_path):
    write_dataset(str(tmp_path), count=3, size=40, seed=2)
    assert {read_image(str(tmp_path / "images" / f"synth_{i:04d}.png")).shape for i in range(3)} == {(40, 40)}


def test_encode_png_round_trips(tmp_path):
    labels = np.array([[0, 1], [300, 65535]], dtype=np.uint16)
    mask = np.array([[True, False], [False, True]])
    (tmp_path / "l.png").write_bytes(encode_png(labels))
    (tmp_path / "m.png").write_bytes(encode_png(mask))
    np.testing.assert_array_equal(read_image(str(tmp_path / "l.png")), labels)
    np.testing.assert_array_equal(read_image(str(tmp_path / "m.png")), [[255, 0], [0, 255]])


@pytest.mark.integration
def test_write_dataset_to_s3(s3_bucket, tmp_path):
    import s3fs

    bucket, options = s3_bucket
    ids = write_dataset(f"{bucket}/synth", count=2, size=48, seed=4, storage_options=options)
    write_dataset(str(tmp_path), count=2, size=48, seed=4)

    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    for folder in FOLDERS:
        urls = list_images(f"{bucket}/synth/{folder}", options)
        assert urls == [f"{bucket}/synth/{folder}/{i}.png" for i in ids]
        for url, image_id in zip(urls, ids, strict=True):
            assert fs.cat_file(url) == (tmp_path / folder / f"{image_id}.png").read_bytes()


def test_a_side_whose_cells_16_bit_labels_cannot_number_is_refused_before_anything_is_written(tmp_path):
    """9000 pixels a side drew up to 79,000 cells: `cellseg synth` crashed with an OverflowError
    in the uint16 labels after making the folders."""
    with pytest.raises(ValueError, match=r"of 16 to 8192 pixels a side \(asked: 1 of 9000\)"):
        write_dataset(str(tmp_path / "big"), count=1, size=9000)
    assert not (tmp_path / "big").exists()
