"""Damaged results stores: reads that name the damaged image and never take down the others,
`verify_store` finding each kind of damage, at every pyramid level of a block-wise image too, and
its repair leading to a clean rewrite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from cellseg.cli import main
from cellseg.config import BlockConfig, PredictConfig
from cellseg.job_config import SegmentJob
from cellseg.jobs import run_segmentation
from cellseg.large_image import LargeImage
from cellseg.store import ResultStore
from cellseg.store_checks import DamagedImage, DamagedStore, NoStore, StoreError
from cellseg.store_layout import CELL_TABLE
from cellseg.synth import encode_png, generate_sample
from cellseg.verify import STORE_METADATA, verify_store

MODEL = {"version": "0123456789ab"}
COLUMNS = ("label", "area")
SHAPE = (30, 1100)  # two mask chunks across (chunks of 1024)


def _write(store: ResultStore, image_id: str, empty: bool = False, replace: bool = True, **extra) -> bool:
    cells = np.zeros(SHAPE, np.int32)
    if not empty:
        cells[2:6, 3:9], cells[10:20, 1050:1060] = 1, 2
    count = int(cells.max())
    table = np.array([[label, (cells == label).sum()] for label in range(1, count + 1)], np.float64).reshape(-1, 2)
    return store.write_result(image_id, cells > 0, {"cell_count": count, "mean_cell_area": None}, f"/in/{image_id}.png",
                              MODEL, cells=cells, cell_table=(COLUMNS, table), image=np.full(SHAPE, 7, np.uint8),
                              replace=replace, **extra)


@pytest.fixture()
def store(tmp_path) -> ResultStore:
    store = ResultStore.open(str(tmp_path / "s.zarr"))
    for image_id in ("a", "b", "c"):
        _write(store, image_id)
    _write(store, "empty", empty=True)
    return store


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _problems(report) -> dict[str, str]:
    return {damage.image_id: damage.problem for damage in report.broken}


def test_every_chunk_is_stored_even_where_an_image_has_no_cells(store):
    root = Path(store.url)
    assert sorted(p.name for p in (root / "empty/labels/mask/0").glob("c.*")) == ["c.0.0", "c.0.1"]
    assert store.record("empty")["arrays"] == ["0", "labels/mask/0", "labels/cells/0", CELL_TABLE]
    report = verify_store(store.url)
    assert (report.checked, report.broken) == (4, [])


def test_an_unreadable_image_is_left_out_with_a_warning_and_is_not_done(store, caplog):
    _truncate(Path(store.url) / "b/zarr.json")
    reader = ResultStore.open(store.url, mode="r")
    assert reader.done_ids() == {"a", "c", "empty"}
    assert [row["image_id"] for row in reader.statistics()] == ["a", "c", "empty"]
    assert {row["image_id"] for row in reader.cell_rows()} == {"a", "c"}
    assert "b/zarr.json" in reader.damaged["b"] and "JSONDecodeError" in reader.damaged["b"]
    assert "image 'b'" in caplog.text and "b/zarr.json" in caplog.text
    assert not reader.is_done("b")
    with pytest.raises(DamagedImage, match=r"image 'b' .*b/zarr\.json.*cellseg verify .* --repair"):
        reader.read_mask("b")
    # A rerun writes over it: the unreadable metadata is replaced.
    assert _write(ResultStore.open(store.url), "b", replace=False)
    assert ResultStore.open(store.url, mode="r").done_ids() == {"a", "b", "c", "empty"}


@pytest.mark.parametrize("garbage", [b"", b"{}", b"null", b'{"zarr_format": 3, "node_type": "group", "attributes": 5}',
                                     b'{"zarr_format": 3, "node_type": "group", "attributes": {"cellseg": "x"}}'])
def test_any_garbage_image_metadata_is_damage_of_that_image_only(store, garbage):
    (Path(store.url) / "a/zarr.json").write_bytes(garbage)
    reader = ResultStore.open(store.url, mode="r")
    assert reader.done_ids() == {"b", "c", "empty"} and set(reader.damaged) == {"a"}
    assert set(_problems(verify_store(store.url))) == {"a"}


def test_a_missing_chunk_is_damage_not_background(store):
    (Path(store.url) / "a/labels/mask/0/c.0.1").unlink()
    with pytest.raises(DamagedImage, match=r"image 'a'.*mask 'a/labels/mask/0' is missing 1 of 2 chunks"):
        store.read_mask("a")
    np.testing.assert_array_equal(store.read_mask("c")[10:20, 1050:1060], True)  # the others read as before
    assert _problems(verify_store(store.url)) == {"a": "its mask 'a/labels/mask/0' is missing 1 of 2 chunks"}


def test_verify_names_each_kind_of_damage(store):
    root = Path(store.url)
    (root / "a/labels/cells/0/c.0.0").unlink()
    _truncate(root / "b/labels/zarr.json")
    _truncate(root / "c/tables/cells/zarr.json")
    meta = json.loads((root / "empty/zarr.json").read_text())
    meta["attributes"]["cellseg"]["statistics"]["mean_cell_area"] = float("nan")
    meta["attributes"]["cellseg"]["statistics"]["cell_count"] = 3  # the table has no rows
    (root / "empty/zarr.json").write_text(json.dumps(meta))
    (root / "lost/labels/mask/0").mkdir(parents=True)
    (root / "lost/labels/mask/0/zarr.json").write_text("{}")
    problems = _problems(verify_store(store.url))
    assert set(problems) == {"a", "b", "c", "empty", "lost"}
    assert "cell labels 'a/labels/cells/0' is missing 1 of 2 chunks" in problems["a"]
    assert "'b/labels/zarr.json' cannot be read" in problems["b"]
    assert "cell table, 'c/tables/cells/zarr.json', cannot be read" in problems["c"]
    assert "'mean_cell_area' is nan" in problems["empty"] and "has shape (0, 2), expected (3, 2)" in problems["empty"]
    assert problems["lost"] == "'lost/zarr.json' is missing"


def test_undecodable_chunks_are_found_only_when_reading_the_data(store):
    chunk = Path(store.url) / "a/labels/mask/0/c.0.0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    assert verify_store(store.url).broken == []
    assert "cannot be decoded" in _problems(verify_store(store.url, read_data=True))["a"]
    with pytest.raises(DamagedImage, match=r"'a'.*cannot be decoded.*--read-data --repair"):
        store.read_mask("a")


def test_repair_marks_only_the_broken_images_not_done_and_a_rerun_completes_them(store):
    root = Path(store.url)
    _truncate(root / "a/zarr.json")
    (root / "b/labels/mask/0/c.0.0").unlink()
    before = (root / "c/labels/mask/0/c.0.0").read_bytes(), (root / "c/zarr.json").read_bytes()
    report = verify_store(store.url, repair=True)
    assert report.repaired and set(_problems(report)) == {"a", "b"}
    repaired = ResultStore.open(store.url)
    assert repaired.done_ids() == {"c", "empty"}
    failures = {row["image_id"]: row for row in repaired.failures()}
    assert failures["b"]["error"].startswith("damaged: its mask") and failures["b"]["source_url"] == "/in/b.png"
    assert failures["a"]["source_url"] is None and "a/zarr.json" in failures["a"]["error"]
    assert ((root / "c/labels/mask/0/c.0.0").read_bytes(), (root / "c/zarr.json").read_bytes()) == before
    assert _write(repaired, "a", replace=False) and _write(repaired, "b", replace=False)
    assert verify_store(store.url).broken == [] and repaired.done_ids() == {"a", "b", "c", "empty"}
    np.testing.assert_array_equal(repaired.read_cells("b"), repaired.read_cells("c"))


@pytest.mark.parametrize("damage, problem", [
    pytest.param(lambda cellseg: cellseg.update(statistics={}), "its statistic 'cell_count' is None, not a count of cells",
                 id="statistics-removed"),
    pytest.param(lambda cellseg: cellseg["statistics"].pop("cell_count"),
                 "its statistic 'cell_count' is None, not a count of cells", id="cell-count-removed"),
    pytest.param(lambda cellseg: cellseg.update(arrays=[]), "its record's 'arrays' [] do not list its mask", id="no-arrays"),
])
def test_a_done_record_without_its_cell_count_or_its_mask_is_damage(store, damage, problem):
    # Both read as healthy before: a store written with --no-measure has no cell table to disagree with a lost
    # count, and an empty 'arrays' left nothing to check (export then wrote the image's cells as none).
    for image_id in ("a", "empty"):
        path = Path(store.url) / image_id / "zarr.json"
        meta = json.loads(path.read_text())
        meta["attributes"]["cellseg"].pop("arrays") if image_id == "empty" else None  # as a result written --no-measure
        damage(meta["attributes"]["cellseg"])
        path.write_text(json.dumps(meta))
    problems = _problems(verify_store(store.url))
    assert set(problems) == {"a", "empty"} and problem in problems["a"] and problem in problems["empty"], problems


def test_a_group_both_labels_sit_under_is_named_once(store):
    (Path(store.url) / "a/labels/zarr.json").write_text("[]")
    problem = _problems(verify_store(store.url))["a"]
    assert problem.count("the metadata 'a/labels/zarr.json' cannot be read") == 1, problem


def test_an_unreadable_store_metadata_is_rewritten_only_for_a_cellseg_store(store, tmp_path, capsys):
    _truncate(Path(store.url) / "zarr.json")
    with pytest.raises(DamagedStore, match=r"s\.zarr/zarr\.json' cannot be read.*--repair"):
        ResultStore.open(store.url, mode="r")
    report = verify_store(store.url)
    assert [damage.image_id for damage in report.broken] == [STORE_METADATA] and not report.images_checked
    assert main(["verify", store.url]) == 1
    assert f"to repair: cellseg verify {store.url} --repair" in capsys.readouterr().out
    assert verify_store(store.url, repair=True).checked == 4
    assert ResultStore.open(store.url, mode="r").done_ids() == {"a", "b", "c", "empty"}
    foreign = tmp_path / "foreign"
    (foreign / "x").mkdir(parents=True)
    (foreign / "zarr.json").write_text("{")
    (damage,) = verify_store(str(foreign)).broken  # never advising a --repair that would refuse
    assert "no image group under it is a cellseg result, so there is nothing to repair it from" in damage.problem
    assert "--repair" not in damage.problem
    capsys.readouterr()
    assert main(["verify", str(foreign)]) == 1
    printed = capsys.readouterr().out
    assert "--repair" not in printed
    assert "images not checked: no image group under it is a cellseg result, so it is no results store to repair" in printed
    with pytest.raises(StoreError, match="not a results store, left as it is"):
        verify_store(str(foreign), repair=True)
    assert (foreign / "zarr.json").read_text() == "{"


def test_folders_and_files_that_are_no_image_are_left_alone_and_not_counted(store):
    root = Path(store.url)
    (root / ".ipynb_checkpoints").mkdir()
    (root / ".ipynb_checkpoints" / "notes.txt").write_text("a notebook's own")
    (root / "qc" / "plots").mkdir(parents=True)
    (root / "qc" / "plots" / "a.png").write_bytes(b"png")
    (root / ".DS_Store").write_bytes(b"finder")
    (root / "lost" / "labels" / "cells" / "0").mkdir(parents=True)  # an image whose zarr.json was lost
    (root / "lost" / "labels" / "cells" / "0" / "zarr.json").write_text("{}")
    report = verify_store(store.url)
    assert _problems(report) == {"lost": "'lost/zarr.json' is missing"} and report.checked == 4
    verify_store(store.url, repair=True)
    assert not (root / ".ipynb_checkpoints" / "zarr.json").exists() and not (root / "qc" / "zarr.json").exists()
    reopened = ResultStore.open(store.url, mode="r")
    assert reopened.done_ids() == {"a", "b", "c", "empty"} and reopened.record("lost")["status"] != "done"


def test_repair_of_a_file_is_one_line_saying_there_is_no_store(tmp_path):
    (tmp_path / "results.zarr").write_text("not a store")
    for repair in (False, True):
        with pytest.raises(NoStore, match=r"no results store at '.*results\.zarr'"):
            verify_store(str(tmp_path / "results.zarr"), repair=repair)
    assert (tmp_path / "results.zarr").read_text() == "not a store"
    (tmp_path / "group.zarr").mkdir()
    (tmp_path / "group.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group", "attributes": {}}')
    with pytest.raises(StoreError, match="not a cellseg results store; give a store that cellseg predict wrote"):
        verify_store(str(tmp_path / "group.zarr"), repair=True)


def test_arrays_left_by_an_earlier_result_are_not_read_as_this_ones(store):
    _write(store, "p", probabilities=np.full(SHAPE, 0.9, np.float32))
    assert store.has_probabilities("p")
    _write(store, "p")  # rewritten without probabilities: the old array stays, but is not this result's
    assert not store.has_probabilities("p")
    with pytest.raises(StoreError, match="written without probabilities"):
        store.read_probabilities("p")


# Block-wise images: every level of their pyramids ------------------------------------------------

BIG = (300, 520)  # blocks of 128: levels (150, 260), (75, 130), (38, 65), their chunks 128 x 128


@pytest.fixture(scope="module")
def blockwise_job(tmp_path_factory) -> SegmentJob:
    """A job that segments 'big' (a 300x520 TIFF) block by block and 'small' (a PNG) whole, done once."""
    root = tmp_path_factory.mktemp("blockwise")
    (root / "in").mkdir()
    tifffile.imwrite(root / "in" / "big.tif", generate_sample(np.random.default_rng(0), BIG).image, tile=(128, 128))
    (root / "in" / "small.png").write_bytes(encode_png(generate_sample(np.random.default_rng(1), (96, 96)).image))
    config = PredictConfig(amp=False, threads=2, blocks=BlockConfig(block_size=128, overlap=32, above_pixels=256 * 256))
    job = SegmentJob(source_url=str(root / "in"), store_url=str(root / "r.zarr"), model_version="general", predict=config)
    assert sorted(run_segmentation(job).done) == ["big", "small"]
    return job


@pytest.fixture()
def blockwise_store(blockwise_job, tmp_path) -> tuple[SegmentJob, Path]:
    """A copy of the job's store for one test to damage, and the job writing to it."""
    shutil.copytree(blockwise_job.store_url, tmp_path / "r.zarr")
    return blockwise_job.model_copy(update={"store_url": str(tmp_path / "r.zarr")}), tmp_path / "r.zarr"


def test_a_blockwise_image_is_verified_at_every_level_of_its_pyramids(blockwise_store):
    _, root = blockwise_store
    record = ResultStore.open(str(root), mode="r").record("big")
    assert record["blocks"]["levels"] == 4 and "blocks" not in ResultStore.open(str(root), mode="r").record("small")
    assert verify_store(str(root), read_data=True).broken == []
    (root / "big/labels/mask/2/c.0.1").unlink()
    chunk = root / "big/1/c.1.2"
    chunk.write_bytes(chunk.read_bytes()[:5])
    assert _problems(verify_store(str(root))) == {"big": "its mask level 2 'big/labels/mask/2' is missing 1 of 2 chunks"}
    problems = _problems(verify_store(str(root), read_data=True))
    assert problems["big"].startswith("its copy of the source image level 1 'big/1' has a chunk (1, 2) that cannot be "
                                      "decoded (") and set(problems) == {"big"}


def _resized(root: Path, path: str, shape: tuple[int, int], dtype: str) -> None:
    """The level at `path` rewritten whole, every chunk stored, with another shape or type."""
    zarr.create_array(str(root / path), shape=shape, dtype=dtype, chunks=(128, 128), overwrite=True,
                      config={"write_empty_chunks": True})[...] = 1


def _set_levels(root: Path, levels: int) -> None:
    """The count of pyramid levels in the record of 'big' set to `levels`."""
    meta = json.loads((root / "big/zarr.json").read_text())
    meta["attributes"]["cellseg"]["blocks"]["levels"] = levels
    (root / "big/zarr.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, problem", [
    pytest.param(lambda root: (root / "big/labels/cells/3/zarr.json").write_bytes(b"{"),
                 "the metadata of its cell labels level 3, 'big/labels/cells/3/zarr.json', cannot be read "
                 "(JSONDecodeError: ", id="garbage-metadata"),
    pytest.param(lambda root: shutil.rmtree(root / "big/labels/mask/1"), "its mask level 1 'big/labels/mask/1' is missing",
                 id="missing"),
    pytest.param(lambda root: _resized(root, "big/labels/cells/2", (75, 131), "int32"),
                 "its cell labels level 2 'big/labels/cells/2' has shape (75, 131), expected (75, 130)", id="shape"),
    pytest.param(lambda root: _resized(root, "big/3", (38, 65), "float32"),
                 "its copy of the source image level 3 'big/3' is float32, expected uint8", id="dtype"),
    pytest.param(lambda root: _set_levels(root, 12), "its 'blocks' record has levels 12, not a count of 1 to 11",
                 id="level-count"),
])
def test_each_damaged_level_is_damage_of_its_image_only(blockwise_store, damage, problem):
    _, root = blockwise_store
    damage(root)
    problems = _problems(verify_store(str(root)))
    assert set(problems) == {"big"} and problems["big"].startswith(problem), problems


def test_repair_of_a_damaged_level_and_a_rerun_rewrite_the_blockwise_image(blockwise_store):
    job, root = blockwise_store
    before = ResultStore.open(str(root), mode="r").read_cells("big")
    (root / "big/labels/mask/1/zarr.json").write_bytes(b"garbage")
    (root / "big/labels/cells/2/c.0.0").unlink()
    small = (root / "small/zarr.json").read_bytes()
    report = verify_store(str(root), repair=True)
    assert report.repaired and set(_problems(report)) == {"big"}
    store = ResultStore.open(str(root), mode="r")
    assert store.done_ids() == {"small"} and (root / "small/zarr.json").read_bytes() == small
    assert store.failures()[0]["error"].startswith("damaged: the metadata of its mask level 1, 'big/labels/mask/1/zarr.json'")
    assert run_segmentation(job).done == ["big"]
    assert verify_store(str(root), read_data=True).broken == [] and store.done_ids() == {"big", "small"}
    np.testing.assert_array_equal(store.read_cells("big"), before)
    np.testing.assert_array_equal(zarr.open_array(str(root / "big/labels/cells/2"), mode="r")[...], before[::4, ::4])


def test_damage_to_the_blocks_an_unfinished_blockwise_image_left_is_found_and_repaired(blockwise_store):
    # A run stopped part-way leaves the image's blocks for the next run to take up. A chunk of them lost or
    # damaged since used to pass unseen (the image is not done) and fail that run, and every later one.
    job, root = blockwise_store
    before = ResultStore.open(str(root), mode="r").read_cells("big")
    url = str(Path(job.source_url) / "big.tif")
    again_url = str(root.parent / "again.zarr")
    rerun = job.model_copy(update={"store_url": again_url})
    large = LargeImage(rerun, "big", url)
    _, todo = large.prepare()
    for index in todo[:4]:
        large.predict(index)
    again = root.parent / "again.zarr/big/blocks"
    assert verify_store(again_url, read_data=True).broken == []
    (again / "labels/c.0.1").unlink()
    ring = again / "ring/c.2.0.0.0"
    ring.write_bytes(ring.read_bytes()[:5])
    assert _problems(verify_store(again_url)) == {
        "big": "its block-wise scratch 'big/blocks/labels' is missing 1 of the 4 chunks its blocks wrote"}
    problem = _problems(verify_store(again_url, read_data=True))["big"]
    assert "'big/blocks/ring' has a chunk (2, 0, 0, 0) that cannot be decoded" in problem
    report = verify_store(again_url, repair=True, read_data=True)
    assert report.repaired and not again.exists()
    assert ResultStore.open(again_url, mode="r").failures()[0]["error"].startswith(
        "damaged: its block-wise scratch")
    assert sorted(run_segmentation(rerun).done) == ["big", "small"]
    assert verify_store(again_url, read_data=True).broken == []
    np.testing.assert_array_equal(ResultStore.open(again_url, mode="r").read_cells("big"), before)


def test_a_scratch_state_declaring_more_blocks_than_its_plan_is_damage_read_by_no_one(blockwise_store):
    """The state of an unfinished block-wise image was read at the shape its zarr.json declares:
    2**40 rows, 32 TiB, in `verify` and in the rerun that took the image up."""
    job, root = blockwise_store
    again_url = str(root.parent / "again-state.zarr")
    rerun = job.model_copy(update={"store_url": again_url})
    large = LargeImage(rerun, "big", str(Path(job.source_url) / "big.tif"))
    _, todo = large.prepare()
    large.predict(todo[0])
    meta_path = root.parent / "again-state.zarr/big/blocks/state/zarr.json"
    meta = json.loads(meta_path.read_text())
    blocks = meta["shape"][0]
    meta["shape"] = [2**40, 4]
    meta_path.write_text(json.dumps(meta))
    assert _problems(verify_store(again_url)) == {
        "big": f"its block-wise scratch 'big/blocks' cannot be read (ValueError: its 'state' declares shape "
               f"{[2**40, 4]}, not the {[blocks, 4]} of its plan's {blocks} blocks)"}
    assert sorted(run_segmentation(rerun).done) == ["big", "small"]  # started over, with a warning
    assert verify_store(again_url, read_data=True).broken == []


def test_metadata_declaring_huge_arrays_or_nested_without_end_is_damage_not_a_crash(store):
    """A labels zarr.json declaring 2**40 x 2**40 ended `verify` in a MemoryError (zarr walked its
    chunk grid), a cell table of 2**50 rows `export` in numpy's 'Unable to allocate 144. PiB', and
    a root zarr.json of 100,000 nested brackets every command in a RecursionError traceback."""
    from tests.conftest import cellseg

    root = Path(store.url)
    for path, shape in (("a/labels/cells/0", [2**40, 2**40]), ("b/tables/cells", [2**50, 2])):
        meta = json.loads((root / path / "zarr.json").read_text())
        meta["shape"] = shape
        (root / path / "zarr.json").write_text(json.dumps(meta))
    problems = _problems(verify_store(store.url, read_data=True))
    assert set(problems) == {"a", "b"}, problems
    assert f"its cell labels 'a/labels/cells/0' declares shape {[2**40, 2**40]}, larger than its image's" in problems["a"]
    assert f"its cell table 'b/tables/cells' declares shape {[2**50, 2]}, not that of a cell table" in problems["b"]
    # A record that lies as its array does: the chunks zarr would walk are bounded all the same
    meta = json.loads((root / "c/zarr.json").read_text())
    meta["attributes"]["cellseg"]["shape"] = [2**40, 2**40]
    (root / "c/zarr.json").write_text(json.dumps(meta))
    labels = json.loads((root / "c/labels/cells/0/zarr.json").read_text())
    (root / "c/labels/cells/0/zarr.json").write_text(json.dumps({**labels, "shape": [2**40, 2**40]}))
    assert "chunks, over the 16777216 an image's array may have" in _problems(verify_store(store.url))["c"]
    # ... and its array declared as one chunk: verify --read-data and export tried to allocate 37 GiB
    # to 1.3 TiB (a traceback; under that much memory, taken)
    side = 100_000
    (root / "c/labels/cells/0/zarr.json").write_text(json.dumps({
        **labels, "shape": [side, side], "chunk_grid": {**labels["chunk_grid"], "configuration": {"chunk_shape": [side, side]}}}))
    assert (f"its cell labels 'c/labels/cells/0' declares chunks of [{side}, {side}] ({side * side * 4} bytes), over "
            "the 268435456 bytes cellseg writes at most") in _problems(verify_store(store.url, read_data=True))["c"]
    exported = cellseg("export", store.url, "--out", str(root.parent / "cells.csv"), check=False)
    assert exported.returncode == 3 and "Traceback" not in exported.stderr, exported.stderr

    (root / "zarr.json").write_text("[" * 100_000 + "]" * 100_000)
    for command in (("results", store.url), ("verify", store.url), ("export", store.url, "--out",
                                                                    str(root.parent / "again.csv"))):
        run = cellseg(*command, check=False)
        said = run.stdout + run.stderr
        assert run.returncode in (1, 2) and "Traceback" not in said, (command, said)
        assert f"'{store.url}/zarr.json' cannot be read (not valid JSON: RecursionError" in said, said


def test_an_array_where_an_image_belongs_is_left_and_named_while_the_others_are_repaired(store):
    """`verify --repair` stopped at it in a TypeError traceback (zarr's "Incompatible object already
    exists"), leaving every damaged image after it marked done; `predict` stopped there too."""
    from cellseg.segment import _record_failure
    from tests.conftest import cellseg

    root = Path(store.url)
    shutil.rmtree(root / "a")
    zarr.create_array(str(root / "a"), shape=(4, 4), dtype="uint8")[...] = 7  # someone's array, in an image's place
    (root / "c/labels/mask/0/c.0.0").unlink()
    repaired = cellseg("verify", store.url, "--repair", check=False)
    assert repaired.returncode == 1 and "Traceback" not in repaired.stderr, repaired.stderr
    assert ("not repaired: image 'a': 'a' in '" + store.url + "' is a zarr array, not an image's group: move or remove "
            "it (cellseg leaves what it did not write), then run again") in repaired.stdout
    assert "repaired: 1 images marked not done" in repaired.stdout
    again = ResultStore.open(store.url, mode="r")
    assert not again.is_done("c") and again.is_done("b")
    np.testing.assert_array_equal(zarr.open_array(str(root / "a"), mode="r")[...], 7)  # left as it was
    _record_failure(ResultStore.open(store.url), "a", "a.png", "ValueError: its write failed", {})  # said, not raised


def test_a_run_goes_on_past_an_array_where_a_block_wise_image_belongs(blockwise_job, tmp_path):
    """Recording the large image's failure met the array again and ended the whole run."""
    store_url = str(tmp_path / "r.zarr")
    ResultStore.open(store_url)
    zarr.create_array(f"{store_url}/big", shape=(4, 4), dtype="uint8")[...] = 7
    report = run_segmentation(blockwise_job.model_copy(update={"store_url": store_url}))
    assert report.done == ["small"] and [failure["image_id"] for failure in report.failed] == ["big"]
    np.testing.assert_array_equal(zarr.open_array(f"{store_url}/big", mode="r")[...], 7)
