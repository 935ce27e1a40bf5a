"""Images in subfolders of a segmentation source (`--recursive`, `predict.selection.recursive`):
listed on local folders and S3, their ids made of their folders' path and stem, bounded in depth,
safe from symbolic link loops, and not a result setting."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest

from cellseg.config import PredictConfig, SelectionConfig
from cellseg.formats import list_sources
from cellseg.io import MAX_LISTING_DEPTH
from cellseg.jobs import SegmentJob, run_segmentation
from cellseg.store import ResultStore
from tests.conftest import cellseg

RECURSIVE = SelectionConfig(recursive=True)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    """Four small synthetic images to copy into source trees."""
    from cellseg.synth import write_dataset

    root = tmp_path_factory.mktemp("pictures")
    write_dataset(str(root), count=4, size=96, seed=5)
    return sorted((root / "images").glob("*.png"))


def _tree(root: Path, pictures: list[Path], names: list[str]) -> Path:
    """`root` holding a copy of a picture at each relative path of `names`."""
    for index, name in enumerate(names):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(pictures[index % len(pictures)], root / name)
    return root


def _job(source: Path | str, store: Path, checkpoint: Path, **predict) -> SegmentJob:
    return SegmentJob(source_url=str(source), store_url=str(store), checkpoint_url=str(checkpoint),
                      max_parallel_shards=1, predict=PredictConfig(**predict))


NESTED = ["top.png", "2026-12-05/plate1/A01.png", "2026-12-05/Image_001.png", "2026-12-06/Image_001.png"]
NESTED_IDS = ["2026-12-05_Image_001", "2026-12-05_plate1_A01", "2026-12-06_Image_001", "top"]


def test_recursive_predict_segments_nested_images_under_their_paths_and_a_rerun_skips_them(
        tmp_path, pictures, tiny_checkpoint):
    """Image_001.png in two date folders are two images, each recorded with its own file."""
    source = _tree(tmp_path / "incoming", pictures, NESTED)
    store = tmp_path / "out.zarr"
    command = ["predict", "--model", str(tiny_checkpoint), "--images", str(source), "--out", str(store), "--recursive"]

    first = cellseg(*command)

    assert "segmented 4, skipped 0 already done, failed 0" in first.stdout
    written = ResultStore.open(str(store), mode="r")
    assert sorted(written.done_ids()) == NESTED_IDS
    assert written.record("2026-12-06_Image_001")["source_url"] == str(source / "2026-12-06/Image_001.png")
    assert written.record("2026-12-05_Image_001")["source_url"] == str(source / "2026-12-05/Image_001.png")
    rerun = cellseg(*command)
    assert "segmented 0, skipped 4 already done, failed 0" in rerun.stdout


def test_without_recursive_only_the_top_level_is_read_and_the_warning_names_the_flag(tmp_path, pictures):
    source = _tree(tmp_path / "incoming", pictures, NESTED[1:])  # nothing at the top

    preview = cellseg("predict", "--model-version", "general", "--images", str(source), "--out",
                      str(tmp_path / "out.zarr"), "--dry-run")

    assert (f"not searching the 2 subfolder(s) of '{source}' (2026-12-05, 2026-12-06): name the folder that holds "
            "the images, or list them all with --recursive (in a job: predict.selection.recursive)") in preview.stderr
    assert list_sources(str(source), SelectionConfig()) == []
    recursive = cellseg("predict", "--model-version", "general", "--images", str(source), "--out",
                        str(tmp_path / "out.zarr"), "--dry-run", "--recursive")
    assert ("would segment 3 images in 2 shards: 2026-12-05_Image_001, 2026-12-05_plate1_A01, 2026-12-06_Image_001"
            in recursive.stdout)
    assert "not searching" not in recursive.stderr


def test_files_whose_paths_make_one_id_are_rejected_naming_their_paths_and_the_others_are_done(
        tmp_path, pictures, tiny_checkpoint):
    source = _tree(tmp_path / "incoming", pictures, ["a_b/c.png", "a/b_c.png", "2026-12-05_img1.png",
                                                     "2026-12-05/img1.png", "2026-12-05/img2.png", "fine.png"])
    store = tmp_path / "out.zarr"

    report = run_segmentation(_job(source, store, tiny_checkpoint, selection=RECURSIVE))

    assert sorted(report.done) == ["2026-12-05_img2", "fine"]
    errors = {failure["source_url"]: failure["error"] for failure in report.failed}
    assert errors == {
        str(source / "a/b_c.png"): "files a/b_c.png, a_b/c.png share the image id 'a_b_c'; rename all but one",
        str(source / "a_b/c.png"): "files a/b_c.png, a_b/c.png share the image id 'a_b_c'; rename all but one",
        str(source / "2026-12-05/img1.png"): ("files 2026-12-05/img1.png, 2026-12-05_img1.png share the image id "
                                              "'2026-12-05_img1'; rename all but one"),
        str(source / "2026-12-05_img1.png"): ("files 2026-12-05/img1.png, 2026-12-05_img1.png share the image id "
                                              "'2026-12-05_img1'; rename all but one"),
    }
    assert ResultStore.open(str(store), mode="r").record("a_b_c")["status"] == "failed"


def test_hidden_folders_zarr_stores_and_results_stores_in_the_source_tree_are_not_read_as_images(
        tmp_path, pictures, caplog):
    source = _tree(tmp_path / "incoming", pictures, ["day1/a.png", ".snapshot/day1/a.png", "day1/.cache/b.png"])
    ResultStore.open(str(source / "day1/results.zarr"))  # a store written inside the tree, named as one
    ResultStore.open(str(source / "results"))  # and one that is not
    (source / "other").mkdir()
    (source / "other/zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    _tree(source, pictures, ["other/c/0.png", "results/x.png"])

    with caplog.at_level(logging.WARNING, logger="cellseg"):
        listed = list_sources(str(source), RECURSIVE)

    assert listed == [str(source / "day1/a.png")]
    assert f"skipping '{source / 'day1/results.zarr'}' in the source folder: it is a cellseg results store" in caplog.text
    assert f"skipping '{source / 'results'}' in the source folder: it is a cellseg results store" in caplog.text
    assert f"not searching 1 zarr store(s) under '{source}' whose names do not end in .zarr: other" in caplog.text


def test_folders_deeper_than_the_bound_are_named_and_not_listed(tmp_path, pictures, caplog):
    deepest = "/".join(["d"] * MAX_LISTING_DEPTH)
    source = _tree(tmp_path / "incoming", pictures, [f"{deepest}/in.png", f"{deepest}/d/out.png", "top.png"])

    with caplog.at_level(logging.WARNING, logger="cellseg"):
        listed = list_sources(str(source), RECURSIVE)

    assert listed == [str(source / deepest / "in.png"), str(source / "top.png")]
    assert (f"not searching 1 folder(s) more than {MAX_LISTING_DEPTH} levels below '{source}': {deepest}/d"
            in caplog.text)


def test_a_symbolic_link_loop_is_listed_once_and_named(tmp_path, pictures, caplog):
    source = _tree(tmp_path / "incoming", pictures, ["a/one.png", "b/two.png"])
    os.symlink("..", source / "a/up")  # back to the source folder: a loop
    os.symlink(source / "b", source / "a/to_b")  # to a folder of the tree listed under its own name
    os.symlink("self", source / "a/self")  # a link to itself, which no stat resolves

    with caplog.at_level(logging.WARNING, logger="cellseg"):
        listed = list_sources(str(source), RECURSIVE)

    assert listed == [str(source / "a/one.png"), str(source / "b/two.png")]
    assert (f"not searching 2 folder(s) under '{source}' again, reached through a symbolic link: a/to_b, a/up"
            in caplog.text)


def test_a_path_making_an_overlong_id_is_a_rejected_file_not_a_crash(tmp_path, pictures, tiny_checkpoint):
    long = "/".join(["x" * 60] * 5)  # 5 folders of 60 bytes: an id of over 300 bytes
    source = _tree(tmp_path / "incoming", pictures, [f"{long}/img.png", "fine.png"])

    report = run_segmentation(_job(source, tmp_path / "out.zarr", tiny_checkpoint, selection=RECURSIVE))

    assert report.done == ["fine"]
    [failure] = report.failed
    assert failure["source_url"] == str(source / long / "img.png")
    assert "bytes, over the 255 a store entry may take: rename the file or its folders" in failure["error"]


def test_recursion_from_a_job_is_no_result_setting_so_a_rerun_skips_the_done_images_without_a_warning(
        tmp_path, pictures, tiny_checkpoint, caplog):
    source = _tree(tmp_path / "incoming", pictures, NESTED)
    store = tmp_path / "out.zarr"
    flat = run_segmentation(_job(source, store, tiny_checkpoint))
    assert flat.done == ["top"]
    job = SegmentJob.model_validate_json(_job(source, store, tiny_checkpoint).model_dump_json().replace(
        '"recursive":false', '"recursive":true'))
    assert job.predict.selection.recursive

    with caplog.at_level(logging.WARNING, logger="cellseg"):
        recursive = run_segmentation(job)

    assert recursive.skipped == ["top"]
    assert sorted(recursive.done) == NESTED_IDS[:3]
    assert "other settings" not in caplog.text and "segmented with" not in caplog.text


def test_recursive_listing_and_segmentation_on_s3(tmp_path, pictures, tiny_checkpoint, moto_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True)
    bucket = f"recursive-{os.getpid()}-{id(tmp_path) % 10**6}"
    fs.mkdir(bucket)
    local = _tree(tmp_path / "incoming", pictures, [*NESTED, ".hidden/x.png"])
    fs.put(str(local) + "/", f"{bucket}/incoming/", recursive=True)
    source = f"s3://{bucket}/incoming"
    options = {"endpoint_url": moto_endpoint}

    listed = list_sources(source, RECURSIVE, options)
    assert listed == [f"{source}/2026-12-05/Image_001.png", f"{source}/2026-12-05/plate1/A01.png",
                      f"{source}/2026-12-06/Image_001.png", f"{source}/top.png"]
    assert list_sources(source, SelectionConfig(), options) == [f"{source}/top.png"]
    store = tmp_path / "out.zarr"
    command = ["predict", "--model", str(tiny_checkpoint), "--images", source, "--out", str(store), "--recursive"]
    first = cellseg(*command, env={"CELLSEG_STORAGE__S3__ENDPOINT_URL": moto_endpoint})
    assert "segmented 4, skipped 0 already done, failed 0" in first.stdout
    assert sorted(ResultStore.open(str(store), mode="r").done_ids()) == NESTED_IDS


def test_flow_segment_images_takes_recursive(tmp_path, pictures, tiny_checkpoint):
    source = _tree(tmp_path / "incoming", pictures, NESTED)
    store = tmp_path / "out.zarr"

    run = cellseg("flow", "segment-images", "--source", str(source), "--store", str(store), "--model",
                  str(tiny_checkpoint), "--recursive", "--registry", str(tmp_path / "registry"),
                  env={"PREFECT_API_URL": "", "PREFECT_HOME": str(tmp_path / "prefect")})

    assert "segmented 4, skipped 0 already done, failed 0" in run.stdout
    written = ResultStore.open(str(store), mode="r")
    assert sorted(written.done_ids()) == NESTED_IDS
    assert written.record("2026-12-05_plate1_A01")["model"]["predict"]["selection"]["recursive"] is True
