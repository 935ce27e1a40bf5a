"""Tests for cellseg/ingest.py: pairing, validation, the content-addressed cache and manifests."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cellseg.config import NormalizationConfig
from cellseg.dataset_errors import DatasetError
from cellseg.ingest import Manifest, ingest_dataset
from cellseg.io import ImageReadError
from cellseg.loaded_pairs import load_pairs, manifest_hash
from cellseg.pairs import ImagePair

# Three pairs of different sizes and dtypes, so shape and dtype in the manifest are checkable by hand.
IMAGES = {
    "a": np.arange(24, dtype=np.uint8).reshape(4, 6),
    "b": (np.arange(15, dtype=np.uint16).reshape(5, 3) * 1000),
    "c": np.full((2, 7), 9, dtype=np.uint8),
}
EXPECTED_SHAPE = {"a": (4, 6), "b": (5, 3), "c": (2, 7)}
EXPECTED_DTYPE = {"a": "uint8", "b": "uint16", "c": "uint8"}


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def mask_for(array: np.ndarray) -> np.ndarray:
    """A 0/255 uint8 mask of the image's size: its left half is cell."""
    mask = np.zeros(array.shape, dtype=np.uint8)
    mask[:, : array.shape[1] // 2] = 255
    return mask


def dataset_files(images: dict[str, np.ndarray] = IMAGES) -> dict[str, bytes]:
    """Relative path -> PNG bytes for images/<id>.png and masks/<id>.png."""
    files = {}
    for image_id, array in images.items():
        files[f"images/{image_id}.png"] = png_bytes(array)
        files[f"masks/{image_id}.png"] = png_bytes(mask_for(array))
    return files


def write_local(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def object_files(cache: Path) -> list[Path]:
    return sorted(path for path in (cache / "objects").rglob("*") if path.is_file())


def ingest_local(root: Path, cache: Path):
    return ingest_dataset(str(root / "images"), str(root / "masks"), cache)


def check_manifest(result, source: dict[str, bytes], cache: Path, images_url: str, masks_url: str) -> None:
    """Entries, checksums, cached copies and the manifest file all match the source bytes."""
    manifest = result.manifest
    assert [entry.id for entry in manifest.entries] == sorted(IMAGES)
    assert (manifest.images_url, manifest.masks_url) == (images_url, masks_url)
    for entry in manifest.entries:
        for role, cached in (("images", entry.image), ("masks", entry.mask)):
            data = source[f"{role}/{entry.id}.png"]
            assert cached.source_url == f"{images_url if role == 'images' else masks_url}/{entry.id}.png"
            assert cached.sha256 == hashlib.sha256(data).hexdigest()
            assert cached.bytes == len(data)
            assert cached.shape == EXPECTED_SHAPE[entry.id]
            path = Path(cached.cache_path)
            assert path.resolve().is_relative_to(cache.resolve())
            assert path.read_bytes() == data
        assert entry.image.dtype == EXPECTED_DTYPE[entry.id]
        assert entry.mask.dtype == "uint8"

    assert result.manifest_path == cache / "manifests" / f"{manifest.hash}.json"
    assert Manifest.load(result.manifest_path) == manifest
    assert manifest.hash == manifest_hash(load_pairs(manifest.pairs(), NormalizationConfig()))


# --- local sources ------------------------------------------------------------------------


def test_local_ingest_writes_manifest_of_cached_copies(tmp_path):
    files = dataset_files()
    root = write_local(tmp_path / "src", files)
    cache = tmp_path / "cache"

    result = ingest_local(root, cache)

    check_manifest(result, files, cache, str(root / "images"), str(root / "masks"))
    assert (result.copied, result.reused) == (6, 0)
    assert len(object_files(cache)) == 6


def test_pairs_point_at_cache_paths(tmp_path):
    root = write_local(tmp_path / "src", dataset_files())
    cache = tmp_path / "cache"

    manifest = ingest_local(root, cache).manifest

    for pair, entry in zip(manifest.pairs(), manifest.entries, strict=True):
        assert pair.id == entry.id
        assert pair.image_url == str(cache / "objects" / entry.image.sha256[:2] / entry.image.sha256)
        assert pair.mask_url == str(cache / "objects" / entry.mask.sha256[:2] / entry.mask.sha256)


def test_second_ingest_of_unchanged_source_copies_nothing(tmp_path):
    root = write_local(tmp_path / "src", dataset_files())
    cache = tmp_path / "cache"
    first = ingest_local(root, cache)
    mtimes = {path: path.stat().st_mtime_ns for path in object_files(cache)}

    second = ingest_local(root, cache)

    assert (second.copied, second.reused) == (0, 6)
    assert second.manifest == first.manifest
    assert {path: path.stat().st_mtime_ns for path in object_files(cache)} == mtimes


def test_unchanged_fingerprint_is_trusted_without_reading_the_file(tmp_path):
    # Proof that the second ingest does not read the source: garbage of the same size with the
    # original modification time would fail to decode if it were read.
    root = write_local(tmp_path / "src", dataset_files())
    cache = tmp_path / "cache"
    first = ingest_local(root, cache)
    target = root / "images" / "a.png"
    stat = target.stat()
    target.write_bytes(b"\0" * stat.st_size)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    second = ingest_local(root, cache)

    assert second.copied == 0
    assert second.manifest.hash == first.manifest.hash


def test_changed_image_is_copied_again_and_changes_the_hash(tmp_path):
    files = dataset_files()
    root = write_local(tmp_path / "src", files)
    cache = tmp_path / "cache"
    first = ingest_local(root, cache)

    changed = {**IMAGES, "b": IMAGES["b"] + 1}
    new_files = dataset_files(changed)
    (root / "images" / "b.png").write_bytes(new_files["images/b.png"])
    second = ingest_local(root, cache)

    assert (second.copied, second.reused) == (1, 5)
    assert second.manifest.hash != first.manifest.hash
    entry_b = {entry.id: entry for entry in second.manifest.entries}["b"]
    assert entry_b.image.sha256 == hashlib.sha256(new_files["images/b.png"]).hexdigest()
    assert Path(entry_b.image.cache_path).read_bytes() == new_files["images/b.png"]
    assert len(object_files(cache)) == 7  # the old copy of b stays: earlier manifests still name it
    assert first.manifest_path.exists() and second.manifest_path.exists()


def test_same_content_under_two_urls_is_stored_once(tmp_path):
    files = dataset_files()
    one = write_local(tmp_path / "one", files)
    two = write_local(tmp_path / "two", files)
    cache = tmp_path / "cache"
    first = ingest_local(one, cache)
    objects = object_files(cache)

    second = ingest_local(two, cache)

    assert second.copied == 6  # new URLs are read once to learn their checksums
    assert object_files(cache) == objects
    assert second.manifest.hash == first.manifest.hash
    assert [e.image.cache_path for e in second.manifest.entries] == [e.image.cache_path for e in first.manifest.entries]
    assert [e.image.source_url for e in second.manifest.entries] == [
        str(two / "images" / f"{i}.png") for i in sorted(IMAGES)
    ]


def test_identical_files_within_one_dataset_share_an_object(tmp_path):
    same = {"a": IMAGES["a"], "b": IMAGES["a"].copy()}
    root = write_local(tmp_path / "src", dataset_files(same))
    cache = tmp_path / "cache"

    manifest = ingest_local(root, cache).manifest

    a, b = manifest.entries
    assert a.image.cache_path == b.image.cache_path
    assert len(object_files(cache)) == 2  # one image object, one mask object


# --- invalid datasets ---------------------------------------------------------------------


def assert_no_manifest(cache: Path) -> None:
    manifests = cache / "manifests"
    assert not manifests.exists() or not any(manifests.iterdir())


def test_missing_mask_is_refused_naming_the_image(tmp_path):
    root = write_local(tmp_path / "src", dataset_files())
    (root / "masks" / "b.png").unlink()
    cache = tmp_path / "cache"

    with pytest.raises(DatasetError, match=r"image '.*images/b\.png' has no mask"):
        ingest_local(root, cache)
    assert_no_manifest(cache)


def test_size_mismatch_is_refused_naming_both_files(tmp_path):
    root = write_local(tmp_path / "src", dataset_files())
    (root / "masks" / "c.png").write_bytes(png_bytes(np.zeros((3, 7), dtype=np.uint8)))
    cache = tmp_path / "cache"

    with pytest.raises(DatasetError, match=r"mask '.*masks/c\.png' is 7x3 \(WxH\), image '.*images/c\.png' is 7x2"):
        ingest_local(root, cache)
    assert_no_manifest(cache)


def test_zero_byte_image_is_refused_naming_the_file(tmp_path):
    root = write_local(tmp_path / "src", dataset_files())
    (root / "images" / "a.png").write_bytes(b"")
    cache = tmp_path / "cache"

    with pytest.raises(ImageReadError, match=r"'.*images/a\.png': file is empty \(0 bytes\)"):
        ingest_local(root, cache)
    assert_no_manifest(cache)


def test_an_image_file_too_large_for_any_image_is_refused_from_its_listed_size_unread(tmp_path):
    """Training files were read whole, however large, before the decoder's pixel limit was checked."""
    from cellseg.io import image_byte_limit

    root = write_local(tmp_path / "src", dataset_files())
    with open(root / "images" / "a.png", "r+b") as image:  # a PNG's header, then a hole past any image's bytes
        image.truncate(image_byte_limit() + 1)
    cache = tmp_path / "cache"

    with pytest.raises(ImageReadError, match=rf"'.*images/a\.png': file is {image_byte_limit() + 1} bytes, over the "
                                             rf"{image_byte_limit()} an image within max_pixels can take"):
        ingest_local(root, cache)
    assert_no_manifest(cache)
    with pytest.raises(ImageReadError, match=r"'.*images/a\.png': file is over \d+ bytes, more than an image within "
                                             r"max_pixels can take"):  # `cellseg train` reads no more than that
        load_pairs([ImagePair("a", str(root / "images" / "a.png"), str(root / "masks" / "a.png"))], NormalizationConfig())


def test_zero_byte_image_is_refused_even_after_a_good_ingest(tmp_path):
    root = write_local(tmp_path / "src", dataset_files())
    cache = tmp_path / "cache"
    good = ingest_local(root, cache)
    (root / "images" / "a.png").write_bytes(b"")

    with pytest.raises(ImageReadError, match=r"images/a\.png"):
        ingest_local(root, cache)
    assert [path.name for path in (cache / "manifests").iterdir()] == [good.manifest_path.name]



def test_masks_with_a_mask_suffix_and_hidden_files_are_ingested_as_pairs(tmp_path, caplog):
    """`a_mask.png` beside macOS's `._a.png` in both folders: paired by name, the dot files skipped."""
    files = dataset_files()
    for image_id in IMAGES:
        files[f"masks/{image_id}_mask.png"] = files.pop(f"masks/{image_id}.png")
    for role in ("images", "masks"):
        files[f"{role}/._a.png"] = b"\x00\x05\x16\x07" + bytes(80)
    root = write_local(tmp_path / "src", files)

    with caplog.at_level("WARNING"):
        result = ingest_local(root, tmp_path / "cache")

    entries = result.manifest.entries
    assert [entry.id for entry in entries] == ["a", "b", "c"]
    assert [entry.mask.source_url for entry in entries] == [f"{root}/masks/{i}_mask.png" for i in ("a", "b", "c")]
    assert f"skipping 1 hidden file(s) under '{root}/masks', not images: ._a.png" in caplog.text
    assert result.copied == 6


def test_a_stack_is_refused_naming_it_before_a_manifest_is_written(tmp_path):
    import tifffile

    root = write_local(tmp_path / "src", dataset_files())
    (root / "masks" / "a.png").unlink()
    tifffile.imwrite(root / "masks" / "a.tif", np.stack([mask_for(IMAGES["a"])] * 3), photometric="minisblack")
    cache = tmp_path / "cache"

    with pytest.raises(DatasetError, match=r"^mask '.*masks/a\.tif' is a stack of 3 planes"):
        ingest_local(root, cache)
    assert_no_manifest(cache)

# --- object storage -----------------------------------------------------------------------


@pytest.mark.integration
def test_s3_ingest_caches_locally_and_reuses_unchanged_objects(s3_bucket, tmp_path):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    files = dataset_files()
    for name, data in files.items():
        fs.pipe_file(f"{bucket}/ds/{name}", data)
    images_url, masks_url = f"{bucket}/ds/images", f"{bucket}/ds/masks"
    cache = tmp_path / "cache"

    first = ingest_dataset(images_url, masks_url, cache, options)

    check_manifest(first, files, cache, images_url, masks_url)
    assert (first.copied, first.reused) == (6, 0)
    local = write_local(tmp_path / "local", files)
    assert first.manifest.hash == ingest_local(local, tmp_path / "local-cache").manifest.hash

    second = ingest_dataset(images_url, masks_url, cache, options)
    assert (second.copied, second.reused) == (0, 6)
    assert second.manifest == first.manifest

    new_image = png_bytes(IMAGES["c"] + 1)
    fs.pipe_file(f"{bucket}/ds/images/c.png", new_image)
    third = ingest_dataset(images_url, masks_url, cache, options)
    assert (third.copied, third.reused) == (1, 5)
    assert third.manifest.hash != first.manifest.hash
    entry_c = {entry.id: entry for entry in third.manifest.entries}["c"]
    assert entry_c.image.sha256 == hashlib.sha256(new_image).hexdigest()
    assert json.loads(third.manifest_path.read_text())["hash"] == third.manifest.hash


def test_keys_with_dot_dot_never_leave_the_cache(s3_bucket, tmp_path):
    """Object keys may contain '..' (S3 does not normalise them); the cache is content-addressed,
    so whatever a listing returns, every file written lands under cache/objects/."""
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    image, mask = png_bytes(IMAGES["a"]), png_bytes(mask_for(IMAGES["a"]))
    for name in ("..png", "a..b..png", "x..png"):
        fs.pipe_file(f"{bucket}/ds/images/{name}", image)
        fs.pipe_file(f"{bucket}/ds/masks/{name}", mask)
    cache = tmp_path / "sandbox" / "cache"
    result = ingest_dataset(f"{bucket}/ds/images", f"{bucket}/ds/masks", cache, options)
    assert [entry.id for entry in result.manifest.entries] == ["a..b.", "x."]  # '..png' is a hidden file, skipped
    written = [path for path in (tmp_path / "sandbox").rglob("*") if path.is_file()]
    assert written and all(path.resolve().is_relative_to(cache.resolve()) for path in written)
    assert {path.name for path in object_files(cache)} == {hashlib.sha256(image).hexdigest(),
                                                           hashlib.sha256(mask).hexdigest()}
