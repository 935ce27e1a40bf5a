"""A new image's nodes put at once: the same objects zarr's own calls write, locally and on S3;
a write that fails part way leaves the image not done; stores written with another codec (zarr's
default, before cellseg chose its own) open, read and resume as before."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest
from numcodecs.zstd import Zstd
from zarr.codecs import ZstdCodec
from zarr.storage import LocalStore

from cellseg.measure import CELL_COLUMNS, cell_measurements
from cellseg.stats import image_statistics
from cellseg.store import ResultStore
from cellseg.store_layout import WRITE_CONFIG
from cellseg.synth import generate_sample
from cellseg.zarr_writes import (
    ARRAY_CODECS,
    UndecodableChunk,
    put_objects,
    read_region,
    write_region,
    zstd_content_size,
)

MODEL = {"version": "0123456789ab", "checkpoint": "runs/x/best.pt"}


def result(seed: int, side: int = 1100) -> dict:
    """write_result's arguments for one synthetic image (over 1024 a side: several chunks per array)."""
    sample = generate_sample(np.random.default_rng(seed), (side, side - 60))
    cells = sample.labels.astype(np.int32)
    return {"mask": cells > 0, "statistics": image_statistics(sample.image, cells), "cells": cells,
            "cell_table": (CELL_COLUMNS, cell_measurements(cells, sample.image)), "image": sample.image,
            "probabilities": np.linspace(0, 1, cells.size, dtype=np.float32).reshape(cells.shape)}


def write(store: ResultStore, image_id: str, arrays: dict) -> bool:
    return store.write_result(image_id, arrays["mask"], arrays["statistics"], f"/images/{image_id}.png", MODEL,
                              replace=False, cells=arrays["cells"], cell_table=arrays["cell_table"],
                              image=arrays["image"], probabilities=arrays["probabilities"])


def objects(url: str, storage_options: dict | None = None) -> dict[str, object]:
    """Every object under a store by key: zarr.json documents parsed (the write time left out), chunks as bytes."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    found = {}
    for path in fs.find(root):
        key, data = path[len(root.rstrip("/")) + 1:], fs.cat_file(path)
        if key.endswith("zarr.json"):
            document = json.loads(data)
            document.get("attributes", {}).get("cellseg", {}).pop("written", None)
            document.pop("consolidated_metadata", None)  # None either way; zarr writes it, cellseg's final write not
            found[key] = document
        else:
            found[key] = data
    return found


def assert_written_as_zarr_writes_it(url: str, storage_options: dict | None = None) -> None:
    """A new image (every node put at once) against the same result written over an empty group
    of that image, which takes zarr's own calls: array by array, each after its checks."""
    arrays = result(seed=1)
    fast = ResultStore.open(f"{url}/fast.zarr", storage_options=storage_options)
    slow = ResultStore.open(f"{url}/zarr-calls.zarr", storage_options=storage_options)
    slow.root.require_group("img")  # an existing (empty) group: write_result goes zarr's way
    assert write(fast, "img", arrays) and write(slow, "img", arrays)
    written, expected = objects(f"{url}/fast.zarr", storage_options), objects(f"{url}/zarr-calls.zarr", storage_options)
    assert sorted(written) == sorted(expected)
    assert "img/labels/cells/0/c.1.0" in written and "img/tables/cells/zarr.json" in written  # several chunks, the table
    for key in expected:
        if key != "zarr.json":  # the stores' own metadata differ in their creation time
            assert written[key] == expected[key], key
    assert written["img/labels/cells/0/zarr.json"]["codecs"][-1] == {"name": "zstd", "configuration": {
        "level": 1, "checksum": False}}
    reread = ResultStore.open(f"{url}/fast.zarr", mode="r", storage_options=storage_options)
    np.testing.assert_array_equal(reread.read_cells("img"), arrays["cells"])
    np.testing.assert_array_equal(reread.read_image("img"), arrays["image"])
    assert reread.read_cell_table("img")[1].shape == arrays["cell_table"][1].shape


def test_a_new_image_is_written_as_zarr_writes_it(tmp_path):
    assert_written_as_zarr_writes_it(str(tmp_path))


@pytest.mark.integration
def test_a_new_image_is_written_as_zarr_writes_it_on_s3(s3_bucket):
    bucket, options = s3_bucket
    assert_written_as_zarr_writes_it(bucket, options)


def test_a_write_that_fails_part_way_leaves_the_image_not_done_and_a_rerun_completes_it(tmp_path):
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    arrays = result(seed=2, side=200)
    obstacle = tmp_path / "results.zarr" / "img" / "labels" / "cells"
    obstacle.parent.mkdir(parents=True)
    obstacle.write_text("a file where the cell labels' folder goes")
    with pytest.raises(OSError):
        write(store, "img", arrays)
    assert store.done_ids() == set() and store.record("img") == {}  # its group was written first, nothing else done
    assert not list((tmp_path / "results.zarr").rglob("*.partial"))  # no temporary file left behind
    obstacle.unlink()
    assert write(store, "img", arrays)
    assert store.done_ids() == {"img"}
    np.testing.assert_array_equal(store.read_cells("img"), arrays["cells"])


def with_zarr_default_codec(store: ResultStore, image_id: str) -> None:
    """Rewrite an image's arrays as cellseg wrote them before it chose a codec and its chunk keys:
    zarr's defaults (zstd level 0, chunks in folders)."""
    for path in store.record(image_id)["arrays"]:
        old = store.root[f"{image_id}/{path}"]
        store.root.create_array(f"{image_id}/{path}", data=old[...], chunks=old.chunks, overwrite=True,
                                dimension_names=old.metadata.dimension_names, attributes=dict(old.attrs),
                                config=WRITE_CONFIG)


def codec_level(store: ResultStore, path: str) -> int:
    (codec,) = store.root[path].compressors
    assert isinstance(codec, ZstdCodec)
    return codec.level


def test_a_store_written_with_zarrs_default_codec_reads_and_resumes(tmp_path):
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    done, half = result(seed=3, side=300), result(seed=4, side=300)
    write(store, "done", done)
    write(store, "half", half)
    for image_id in ("done", "half"):
        with_zarr_default_codec(store, image_id)
    store.root["half"].attrs.put({})  # a run was killed before marking it done
    assert codec_level(store, "done/labels/cells/0") == 0 != ARRAY_CODECS[0].level
    # zarr's default chunk keys too ("c/0/0"; cellseg writes "c.0.0")
    assert (tmp_path / "results.zarr/done/labels/cells/0/c/0/0").is_file()
    assert not (tmp_path / "results.zarr/done/labels/cells/0/c.0.0").exists()

    reopened = ResultStore.open(store.url)
    assert reopened.done_ids() == {"done"}
    np.testing.assert_array_equal(reopened.read_cells("done"), done["cells"])
    np.testing.assert_array_equal(reopened.read_image("done"), done["image"])
    assert reopened.read_cell_table("done")[1].tolist() == done["cell_table"][1].tolist()
    # The rerun redoes the half-written image over its arrays in place (their codec kept) and
    # writes a new one with the codec of today.
    again = result(seed=5, side=300)
    assert write(reopened, "half", again) and write(reopened, "new", again)
    assert reopened.done_ids() == {"done", "half", "new"}
    for image_id in ("half", "new"):
        np.testing.assert_array_equal(reopened.read_cells(image_id), again["cells"])
        np.testing.assert_array_equal(reopened.read_mask(image_id), again["mask"])
    assert codec_level(reopened, "half/labels/cells/0") == 0
    assert codec_level(reopened, "new/labels/cells/0") == 1
    assert (tmp_path / "results.zarr/half/labels/cells/0/c/0/0").is_file()
    assert (tmp_path / "results.zarr/new/labels/cells/0/c.0.0").is_file()


def test_objects_put_into_a_local_folder_make_their_folders_and_replace_files_whole(tmp_path):
    store = LocalStore(tmp_path / "new" / "store")
    put_objects(store, [("a/b/c/0", b"first"), ("a/zarr.json", b"{}"), ("top", b"x")])
    assert (tmp_path / "new/store/a/b/c/0").read_bytes() == b"first"
    put_objects(store, [("a/b/c/0", b"second")])
    assert (tmp_path / "new/store/a/b/c/0").read_bytes() == b"second"
    assert sorted(p.name for p in (tmp_path / "new/store/a/b/c").iterdir()) == ["0"]
    with pytest.raises(ValueError, match="read-only"):
        put_objects(LocalStore(tmp_path / "new" / "store", read_only=True), [("a/b/c/0", b"third")])
    assert (tmp_path / "new/store/a/b/c/0").read_bytes() == b"second"


# Regions of whole chunks (the block-wise steps' reads and writes) ------------------------------------


def assert_regions_as_zarr_writes_them(url: str, storage_options: dict | None = None) -> None:
    """Regions written with `write_region` and with zarr's own indexing: the same objects, byte for
    byte, for each dtype cellseg writes; whole chunks, edge chunks and one region that is not whole
    chunks (written through zarr)."""
    rng = np.random.default_rng(7)
    ours = ResultStore.open(f"{url}/regions.zarr", storage_options=storage_options)
    zarrs = ResultStore.open(f"{url}/zarr-calls.zarr", storage_options=storage_options)
    regions = [((0, 0), (256, 512)), ((768, 1024), (232, 276)), ((256, 256), (512, 256)), ((10, 20), (30, 40))]
    for dtype in (np.uint8, np.int32, np.float16, np.int64):
        name = np.dtype(dtype).name
        fast = ours.blank_array(name, (1000, 1300), dtype, (256, 256))
        slow = zarrs.blank_array(name, (1000, 1300), dtype, (256, 256))
        for start, shape in regions:
            data = (rng.random(shape) * 1000).astype(dtype)
            write_region(fast, start, data)
            slow[start[0]: start[0] + shape[0], start[1]: start[1] + shape[1]] = data
        np.testing.assert_array_equal(fast[...], slow[...])
    written, by_zarr = (objects(f"{url}/{name}", storage_options) for name in ("regions.zarr", "zarr-calls.zarr"))
    for found in (written, by_zarr):
        del found["zarr.json"]  # the stores' own groups, each with the second it was created
    assert written == by_zarr


def test_regions_of_whole_chunks_are_written_as_zarr_writes_them(tmp_path):
    assert_regions_as_zarr_writes_them(str(tmp_path))


@pytest.mark.integration
def test_regions_of_whole_chunks_are_written_as_zarr_writes_them_on_s3(s3_bucket):
    bucket, options = s3_bucket
    assert_regions_as_zarr_writes_them(bucket, options)
    store = ResultStore.open(f"{bucket}/regions.zarr", storage_options=options, mode="r")
    array = store.root["int32"]
    np.testing.assert_array_equal(read_region(array, (100, 200), (700, 1100)), array[100:800, 200:1300])


def test_any_region_reads_as_zarr_reads_it_with_missing_chunks_as_the_fill_value(tmp_path):
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    array = store.blank_array("labels", (1000, 1300), np.int32, (256, 256), every_chunk=False)
    array[300:700, 100:900] = np.arange(400 * 800, dtype=np.int32).reshape(400, 800) + 1  # other chunks: none stored
    assert not (tmp_path / "results.zarr/labels/c.0.0").exists()
    rng = np.random.default_rng(3)
    for _ in range(100):
        top, left = int(rng.integers(0, 1000)), int(rng.integers(0, 1300))
        height, width = int(rng.integers(1, 1001 - top)), int(rng.integers(1, 1301 - left))
        np.testing.assert_array_equal(read_region(array, (top, left), (height, width)),
                                      array[top: top + height, left: left + width])
    table = store.blank_array("table", (5000,), np.int64, (1024,), dimension_names=("row",))
    table[...] = np.arange(5000)
    np.testing.assert_array_equal(read_region(table, (1000,), (3000,)), np.arange(1000, 4000))


def test_a_chunk_that_declares_another_size_is_refused_before_it_is_decoded(tmp_path):
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    array = store.blank_array("labels", (512, 512), np.int32, (256, 256))
    write_region(array, (0, 0), np.ones((512, 512), dtype=np.int32))
    chunk = tmp_path / "results.zarr/labels/c.0.1"
    huge = Zstd(level=1).encode(np.zeros(1 << 20, dtype=np.uint8))  # a frame of 1 MiB where 256 KiB belong
    assert zstd_content_size(huge) == 1 << 20
    chunk.write_bytes(huge)
    with pytest.raises(UndecodableChunk, match=r"c\.0\.1' cannot be decoded: it holds 1048576 bytes, not the 262144"):
        read_region(array, (0, 0), (512, 512))
    # A frame header declaring 2**62 bytes is refused from its header, before any allocation.
    chunk.write_bytes(b"\x28\xb5\x2f\xfd" + bytes([0xC0]) + bytes([0x50]) + (1 << 62).to_bytes(8, "little") + b"\x00" * 8)
    with pytest.raises(UndecodableChunk, match=str(1 << 62)):
        read_region(array, (0, 0), (512, 512))
    chunk.write_bytes(b"not zstd at all")
    with pytest.raises(UndecodableChunk, match=r"c\.0\.1' cannot be decoded: it is no zstd frame that declares its size"):
        read_region(array, (0, 0), (512, 512))
    frame = bytearray(Zstd(level=1).encode(np.arange(65536, dtype=np.int32)))
    frame[len(frame) // 2:] = bytes(len(frame) - len(frame) // 2)  # a frame torn after its header
    chunk.write_bytes(bytes(frame))
    with pytest.raises(UndecodableChunk, match=r"c\.0\.1' cannot be decoded: Zstd decompression error"):
        read_region(array, (0, 0), (512, 512))
    np.testing.assert_array_equal(read_region(array, (256, 0), (256, 512)), 1)  # the other chunks read as before
