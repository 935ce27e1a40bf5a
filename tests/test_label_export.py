"""`cellseg export --labels`: a store's label images as TIFF or PNG files, read back as Fiji,
CellProfiler or a script read them."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from cellseg.label_export import export_labels
from cellseg.stats import label_cells
from cellseg.store import ResultStore
from cellseg.tables import OutputError, write_table
from tests.conftest import cellseg

MODEL = {"version": "0123456789ab", "checkpoint": "runs/x/best.pt"}


def blobs(shape: tuple[int, int], seed: int) -> np.ndarray:
    """A mask of scattered square cells."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, bool)
    for top, left in zip(rng.integers(0, shape[0] - 8, 40), rng.integers(0, shape[1] - 8, 40), strict=True):
        mask[top:top + 6, left:left + 6] = True
    return mask


def store_with_images(path: Path, shapes: dict[str, tuple[int, int]], pixel_size: list[float] | None = None,
                      ) -> ResultStore:
    store = ResultStore.open(str(path))
    for seed, (image_id, shape) in enumerate(shapes.items()):
        mask = blobs(shape, seed)
        cells, areas = label_cells(mask)
        source = {"pixel_size_yx_um": pixel_size, "pixel_size_um": pixel_size[0]} if pixel_size else None
        store.write_result(image_id, mask, {"cell_count": len(areas)}, f"{image_id}.png", MODEL, cells=cells,
                           source=source)
    return store


def test_cell_labels_and_masks_come_back_from_tiff_and_png_as_the_store_holds_them(tmp_path):
    store = store_with_images(tmp_path / "r.zarr", {"a": (96, 130), "b": (64, 64)}, pixel_size=[0.5, 0.25])
    out = tmp_path / "labels"
    run = cellseg("export", str(tmp_path / "r.zarr"), "--labels", "cells", "--out", str(out))
    assert run.stdout.strip() == f"wrote the cell labels of 2 images to {out} as <image id>_cells.tif"
    assert sorted(os.listdir(out)) == ["a_cells.tif", "b_cells.tif"]
    for image_id in ("a", "b"):
        with tifffile.TiffFile(out / f"{image_id}_cells.tif") as tiff:
            labels = tiff.asarray()
            page = tiff.pages[0]
            assert labels.dtype == np.uint16 and page.compression == tifffile.COMPRESSION.ADOBE_DEFLATE
            x_per_cm, y_per_cm = (n / d for n, d in (page.tags["XResolution"].value, page.tags["YResolution"].value))
            assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
            assert (round(x_per_cm), round(y_per_cm)) == (40000, 20000)  # 0.25 µm in x, 0.5 µm in y
        np.testing.assert_array_equal(labels, store.read_cells(image_id))
        assert labels.max() == store.statistics()[["a", "b"].index(image_id)]["cell_count"] > 0

    run = cellseg("export", str(tmp_path / "r.zarr"), "--labels", "mask", "--format", "png", "--out", str(out))
    assert run.stdout.strip() == f"wrote the masks of 2 images to {out} as <image id>_mask.png"
    mask = np.asarray(Image.open(out / "a_mask.png"))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 255}
    np.testing.assert_array_equal(mask > 0, store.read_mask("a"))
    cellseg("export", str(tmp_path / "r.zarr"), "--labels", "cells", "--format", "png", "--out", str(out))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "b_cells.png")), store.read_cells("b"))


def test_files_already_in_the_folder_are_kept_unless_overwrite_is_given(tmp_path):
    store_with_images(tmp_path / "r.zarr", {"a": (32, 32), "b": (32, 32), "c": (32, 32)})
    out = tmp_path / "labels"
    out.mkdir()
    (out / "b_cells.tif").write_bytes(b"a file of the user's")
    (out / "notes.txt").write_text("kept")
    refused = cellseg("export", str(tmp_path / "r.zarr"), "--labels", "cells", "--out", str(out), check=False)
    assert refused.returncode == 2
    assert refused.stderr.strip() == (f"cellseg export: error: 1 of the 3 label files are already in '{out}' "
                                      "('b_cells.tif'): pass --overwrite to replace them")
    assert sorted(os.listdir(out)) == ["b_cells.tif", "notes.txt"]  # nothing written before the refusal
    assert (out / "b_cells.tif").read_bytes() == b"a file of the user's"
    cellseg("export", str(tmp_path / "r.zarr"), "--labels", "cells", "--out", str(out), "--overwrite")
    assert sorted(os.listdir(out)) == ["a_cells.tif", "b_cells.tif", "c_cells.tif", "notes.txt"]
    assert tifffile.imread(out / "b_cells.tif").shape == (32, 32) and (out / "notes.txt").read_text() == "kept"


@pytest.mark.parametrize(("out", "error"), [
    ("file.txt", "'{out}' is a file: name a folder to write the label images into"),
    ("file.txt/labels", "cannot write into '{out}': '{tmp}/file.txt' is a file, not a folder"),
    ("r.zarr/labels", "'{out}' is inside the zarr store '{tmp}/r.zarr', which it would damage: write it elsewhere"),
    ("r.zarr", "'{out}' is inside the zarr store '{tmp}/r.zarr', which it would damage: write it elsewhere"),
    ("cells.csv", "'{out}' is named like a .csv file, but the label images go into a folder, one file per image: name "
                  "a folder ('{tmp}/cells/'), or export a table without --labels"),  # before: a folder cells.csv/
])
def test_an_output_folder_that_cannot_hold_the_files_is_refused_in_one_line(tmp_path, out, error):
    store_with_images(tmp_path / "r.zarr", {"a": (32, 32)})
    (tmp_path / "file.txt").write_text("kept")
    target = str(tmp_path / out)
    run = cellseg("export", str(tmp_path / "r.zarr"), "--labels", "cells", "--out", target, check=False)
    assert run.returncode == 2
    assert run.stderr.strip() == "cellseg export: error: " + error.format(out=target, tmp=tmp_path)
    assert (tmp_path / "file.txt").read_text() == "kept"
    assert ResultStore.open(str(tmp_path / "r.zarr"), mode="r").done_ids() == {"a"}
    assert sorted(os.listdir(tmp_path)) == ["file.txt", "r.zarr"]


@pytest.mark.parametrize(("args", "error"), [
    (("--format", "tiff"), "--format tiff writes label images: add --labels cells (or mask)"),
    (("--labels", "cells", "--format", "csv"), "--format csv writes a table: label images are written as tiff or png"),
    (("--labels", "mask", "--table", "images"), "--labels writes label images, --table a table: give one of them"),
])
def test_table_and_label_options_that_do_not_go_together_are_refused(tmp_path, args, error):
    store_with_images(tmp_path / "r.zarr", {"a": (32, 32)})
    run = cellseg("export", str(tmp_path / "r.zarr"), *args, "--out", str(tmp_path / "out"), check=False)
    assert run.returncode == 2 and run.stderr.strip() == f"cellseg export: error: {error}"
    assert not (tmp_path / "out").exists()


def test_a_large_image_is_written_tile_by_tile_as_a_tiled_tiff_with_the_same_labels(tmp_path):
    store = store_with_images(tmp_path / "r.zarr", {"big": (1500, 1100), "small": (40, 40)})
    written = export_labels(store, str(tmp_path / "labels"), whole_image_pixels=1000 * 1000).written
    assert written == ["big_cells.tif", "small_cells.tif"]
    with tifffile.TiffFile(tmp_path / "labels/big_cells.tif") as tiff:
        assert tiff.pages[0].is_tiled and tiff.pages[0].tilelength == 1024
        np.testing.assert_array_equal(tiff.asarray(), store.read_cells("big"))
    assert not tifffile.TiffFile(tmp_path / "labels/small_cells.tif").pages[0].is_tiled
    assert [name for name in os.listdir(tmp_path / "labels") if name.startswith(".")] == []  # no temporary left

    with pytest.raises(OutputError, match=r"image 'big' is 1500x1100 pixels, more than a PNG is written from "
                                          r"\(1,000,000\): use --format tiff"):
        export_labels(store, str(tmp_path / "png"), file_format="png", whole_image_pixels=1000 * 1000)
    assert not (tmp_path / "png").exists()


def test_more_cells_than_sixteen_bits_number_make_a_uint32_tiff_and_are_refused_as_png(tmp_path):
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    cells = np.arange(1, 300 * 300 + 1, dtype=np.int32).reshape(300, 300)  # 90,000 one-pixel cells
    store.write_result("crowded", cells > 0, {"cell_count": 90000}, "crowded.png", MODEL, cells=cells)
    export_labels(store, str(tmp_path / "labels"))
    labels = tifffile.imread(tmp_path / "labels/crowded_cells.tif")
    assert labels.dtype == np.uint32 and np.array_equal(labels, cells)
    with pytest.raises(OutputError, match="image 'crowded' has 90,000 cells, more than a 16-bit PNG numbers "
                                          r"\(65,535\): use --format tiff"):
        export_labels(store, str(tmp_path / "png"), file_format="png")


def test_a_damaged_image_is_left_out_naming_it_and_the_others_are_written(tmp_path):
    store_with_images(tmp_path / "r.zarr", {"a": (32, 32), "b": (32, 32)})
    chunk = next(path for path in (tmp_path / "r.zarr/b/labels/cells/0").rglob("*") if path.is_file()
                 and path.name != "zarr.json")
    chunk.write_bytes(b"\x00 torn")
    run = cellseg("export", str(tmp_path / "r.zarr"), "--labels", "cells", "--out", str(tmp_path / "labels"),
                  check=False)
    assert run.returncode == 3, run.stderr
    assert os.listdir(tmp_path / "labels") == ["a_cells.tif"]
    assert "wrote the cell labels of 1 image to" in run.stdout and "'b'" in run.stdout + run.stderr
    assert "cellseg verify" in run.stdout + run.stderr


def test_labels_are_written_to_object_storage_and_a_missing_bucket_is_refused(tmp_path, s3_bucket):
    import s3fs

    bucket, options = s3_bucket
    store = store_with_images(tmp_path / "r.zarr", {"a": (48, 40), "big": (300, 200)})
    exported = export_labels(store, f"{bucket}/exports/labels", storage_options=options, whole_image_pixels=200 * 200)
    assert exported.written == ["a_cells.tif", "big_cells.tif"]  # one whole, one tiled
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    for image_id in ("a", "big"):
        with fs.open(f"{bucket}/exports/labels/{image_id}_cells.tif", "rb") as file:
            np.testing.assert_array_equal(tifffile.imread(file), store.read_cells(image_id))
    with pytest.raises(OutputError, match="its bucket 'no-such-bucket-for-labels' does not exist"):
        export_labels(store, "s3://no-such-bucket-for-labels/labels", storage_options=options)
    assert not fs.exists("no-such-bucket-for-labels")


def test_the_labels_of_a_predicted_store_are_the_cells_of_its_cell_table(tmp_path, tiny_checkpoint, synthetic_dataset):
    import pandas as pd

    store = str(tmp_path / "r.zarr")
    cellseg("predict", "--model", str(tiny_checkpoint), "--images", str(synthetic_dataset / "images"), "--out", store)
    cellseg("export", store, "--out", str(tmp_path / "cells.csv"))
    cellseg("export", store, "--labels", "cells", "--out", str(tmp_path / "labels"))
    table = pd.read_csv(tmp_path / "cells.csv")
    images = sorted(set(table["image_id"]))
    assert images and sorted(os.listdir(tmp_path / "labels")) == [f"{image_id}_cells.tif" for image_id in images]
    for image_id in images:
        labels = tifffile.imread(tmp_path / "labels" / f"{image_id}_cells.tif")
        cells = table[table["image_id"] == image_id]
        numbers, areas = np.unique(labels[labels > 0], return_counts=True)
        assert list(numbers) == sorted(cells["label"]) and list(areas) == list(cells.sort_values("label")["area"])


def test_an_array_whose_shape_is_not_its_record_s_is_left_out_as_damaged(tmp_path):
    """A hostile or damaged store: the record says 32x32, the labels array is far larger."""
    import zarr

    store = store_with_images(tmp_path / "r.zarr", {"a": (32, 32), "b": (32, 32)})
    zarr.create_array(str(tmp_path / "r.zarr/b/labels/cells/0"), shape=(4000, 4000), chunks=(1000, 1000),
                      dtype="int32", fill_value=0, overwrite=True, config={"write_empty_chunks": True})[:] = 0
    exported = export_labels(store, str(tmp_path / "labels"), file_format="png", whole_image_pixels=2000)
    assert exported.written == ["a_cells.png"]
    assert store.damaged == {"b": "its cell labels 'b/labels/cells/0' declares shape [4000, 4000], larger than its "
                                  "image's [32, 32]"}
    assert os.listdir(tmp_path / "labels") == ["a_cells.png"]


def test_a_tiled_tiff_gets_the_same_permissions_as_a_whole_one(tmp_path):
    """The temporary file a tiled TIFF is written into is private (0600); the file renamed into place must
    not be, or the folder's other users (Fiji on a shared drive) cannot open it."""
    store = store_with_images(tmp_path / "r.zarr", {"big": (300, 200), "small": (40, 40)})
    export_labels(store, str(tmp_path / "labels"), whole_image_pixels=200 * 200)
    umask = os.umask(0)
    os.umask(umask)
    modes = {name: (tmp_path / "labels" / name).stat().st_mode & 0o777 for name in ("big_cells.tif", "small_cells.tif")}
    assert modes == {"big_cells.tif": 0o666 & ~umask, "small_cells.tif": 0o666 & ~umask}


def test_a_damaged_chunk_is_named_alike_whether_the_image_is_read_whole_or_tile_by_tile(tmp_path):
    problems = []
    for whole_image_pixels in (10**6, 100):
        store = store_with_images(tmp_path / f"r{whole_image_pixels}.zarr", {"a": (32, 32), "b": (32, 32)})
        chunk = next(path for path in (tmp_path / f"r{whole_image_pixels}.zarr/b/labels/cells/0").rglob("*")
                     if path.is_file() and path.name != "zarr.json")
        chunk.write_bytes(b"\x00 torn")
        out = tmp_path / f"labels{whole_image_pixels}"
        assert export_labels(store, str(out), whole_image_pixels=whole_image_pixels).written == ["a_cells.tif"]
        assert os.listdir(out) == ["a_cells.tif"]  # no temporary left
        problems.append(store.damaged["b"].split(" (")[0])
    assert problems == ["its cell labels 'b/labels/cells/0' has a chunk that cannot be decoded"] * 2


def test_images_without_labels_are_named_and_the_progress_knows_its_total(tmp_path):
    store = store_with_images(tmp_path / "r.zarr", {"a": (32, 32)})
    store.record_failure("broken", "broken.png", "ImageReadError: damaged PNG data", MODEL)
    totals: list[int] = []
    exported = export_labels(store, str(tmp_path / "labels"), on_plan=totals.append)
    assert (exported.written, exported.not_done, totals) == (["a_cells.tif"], ["broken"], [1])
    run = cellseg("export", str(tmp_path / "r.zarr"), "--labels", "mask", "--out", str(tmp_path / "masks"))
    assert run.stdout.splitlines()[1] == (
        f"1 image of the store has no labels, not segmented (failed, or left unfinished by a run): broken; "
        f"`cellseg results {tmp_path / 'r.zarr'}` says why")


def test_an_interrupted_export_says_nothing_was_left_partly_written_and_how_to_redo_it(tmp_path, monkeypatch, capsys):
    import cellseg.label_export
    from cellseg.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    store_with_images(tmp_path / "r.zarr", {"a": (32, 32)})
    monkeypatch.setattr(cellseg.label_export, "export_labels", interrupted)
    assert main(["export", str(tmp_path / "r.zarr"), "--labels", "cells", "--out", str(tmp_path / "labels")]) == 130
    assert capsys.readouterr().err.splitlines()[-1] == (
        "cellseg export: interrupted; no file was left partly written (a table is written whole or not at all, "
        "label images each whole); with --labels, run it again with --overwrite to write them all")


def test_an_s3_folder_below_an_object_is_refused_as_a_local_one_below_a_file(tmp_path, s3_bucket):
    """`--out s3://b/x.tif/labels` was written, though a copy of the bucket to a disk cannot hold
    both the object x.tif and a folder x.tif."""
    import s3fs

    bucket, options = s3_bucket
    store = store_with_images(tmp_path / "r.zarr", {"a": (32, 32)})
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.pipe(f"{bucket}/exports/x.tif".removeprefix("s3://"), b"the user's")
    with pytest.raises(OutputError) as raised:
        export_labels(store, f"{bucket}/exports/x.tif/labels", storage_options=options)
    assert str(raised.value) == (f"cannot write into '{bucket}/exports/x.tif/labels': '{bucket}/exports/x.tif' is a "
                                 "file, not a folder")
    with pytest.raises(OutputError, match=f"'{bucket}/exports/x.tif' is a file, not a folder"):
        write_table([{"image_id": "a"}], f"{bucket}/exports/x.tif/deeper/cells.csv", storage_options=options)
    assert fs.ls(f"{bucket}/exports".removeprefix("s3://"), detail=False) == [
        f"{bucket}/exports/x.tif".removeprefix("s3://")]


def test_a_record_whose_source_is_no_object_still_exports_its_labels(tmp_path):
    """`"source": "x"` in a record edited by hand ended the export in an AttributeError traceback."""
    import json

    store = store_with_images(tmp_path / "r.zarr", {"a": (32, 32), "b": (32, 32)}, pixel_size=[0.5, 0.5])
    metadata = tmp_path / "r.zarr/b/zarr.json"
    document = json.loads(metadata.read_text())
    document["attributes"]["cellseg"]["source"] = "x"
    metadata.write_text(json.dumps(document))
    exported = export_labels(ResultStore.open(store.url, mode="r"), str(tmp_path / "labels"), file_format="tiff")
    assert sorted(exported.written) == ["a_cells.tif", "b_cells.tif"]
