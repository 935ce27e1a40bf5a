"""A full disk (a file-size limit, or /dev/full) and a reader that stops reading: one line, exit
status 2 where something could not be written, nothing partial left behind, and a rerun that
completes the store exactly as an undisturbed run would have written it."""

from __future__ import annotations

import subprocess
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from cellseg.store import ResultStore
from cellseg.synth import encode_png, write_dataset
from tests.reliability.runs import (
    CELLSEG,
    assert_one_line_error,
    at_once,
    cellseg_run,
    clean_environment,
    file_contents,
    together,
)

pytestmark = pytest.mark.integration

MODEL = {"version": "0123456789ab", "checkpoint": "x.pt"}
LIMIT = 32 * 1024  # bytes per file: above every file of a 64x64 image, below the copy of a 256x256 noise image


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """a0, a1, c0: small images; b_big: one whose stored copy is larger than LIMIT (ids in run order)."""
    root = tmp_path_factory.mktemp("full-disk")
    write_dataset(str(root), count=3, size=64, seed=5)
    folder = root / "images"
    for name, new in zip(("synth_0000", "synth_0001", "synth_0002"), ("a0", "a1", "c0"), strict=True):
        (folder / f"{name}.png").rename(folder / f"{new}.png")
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    (folder / "b_big.png").write_bytes(encode_png(noise))
    return folder


def test_a_full_disk_stops_predict_in_one_line_and_a_rerun_completes_the_store(quick_checkpoint, images, tmp_path):
    predict = ("-q", "predict", "--model", str(quick_checkpoint), "--images", str(images), "--out")
    out, new, reference = tmp_path / "out.zarr", tmp_path / "new.zarr", tmp_path / "reference.zarr"
    stopped, not_created = at_once(partial(cellseg_run, *predict, str(out), max_file_bytes=LIMIT),
                                   partial(cellseg_run, *predict, str(new), max_file_bytes=64))  # not even zarr.json
    assert_one_line_error(stopped, f"cannot write to results store '{out}'", "File too large",
                          "2 of 4 images written", "rerun to complete it")
    assert_one_line_error(not_created, f"cannot write to results store '{new}'", "File too large")
    assert stopped.stdout == not_created.stdout == ""
    written = ResultStore.open(str(out), mode="r")
    assert written.done_ids() == {"a0", "a1"}
    assert written.failures() == []  # the image that met the full disk is not done, not failed: the rerun does it
    assert not (new / "zarr.json").exists()
    done_before = {image_id: file_contents(out / image_id) for image_id in ("a0", "a1")}

    reruns = together(*[(*predict, str(url)) for url in (out, new, reference)])
    assert [run.returncode for run in reruns] == [0, 0, 0], [run.stderr for run in reruns]
    assert "segmented 2, skipped 2 already done" in reruns[0].stdout
    assert {image_id: file_contents(out / image_id) for image_id in ("a0", "a1")} == done_before  # kept, not redone
    expected = ResultStore.open(str(reference), mode="r")
    for url in (out, new):
        store = ResultStore.open(str(url), mode="r")
        assert store.done_ids() == expected.done_ids() == {"a0", "a1", "b_big", "c0"}
        for image_id in sorted(expected.done_ids()):
            np.testing.assert_array_equal(store.read_cells(image_id), expected.read_cells(image_id))
            np.testing.assert_array_equal(store.read_image(image_id), expected.read_image(image_id))
            assert store.record(image_id)["statistics"] == expected.record(image_id)["statistics"]
            columns, rows = store.read_cell_table(image_id)
            assert columns == expected.read_cell_table(image_id)[0]
            np.testing.assert_array_equal(rows, expected.read_cell_table(image_id)[1])


@pytest.fixture(scope="module")
def big_store(tmp_path_factory) -> Path:
    """A store with 3000 cells in its table and 400 failures with long messages (over 64 KiB of output)."""
    url = tmp_path_factory.mktemp("big-store") / "results.zarr"
    store = ResultStore.open(str(url))
    rows = np.column_stack([np.arange(1, 3001), np.full(3000, 12.5)])
    store.write_result("cells", np.eye(8, dtype=bool), {"cell_count": 3000}, "cells.png", MODEL,
                       cell_table=(("label", "area"), rows))
    for index in range(400):
        store.record_failure(f"broken_{index:03d}", f"broken_{index:03d}.png", "ImageReadError: " + "x" * 300, MODEL)
    return url


def test_export_to_a_full_disk_is_one_line_and_leaves_no_partial_table(big_store, tmp_path):
    earlier = tmp_path / "cells.csv"
    earlier.write_text("my earlier table\n")
    full_device, too_large = at_once(
        partial(cellseg_run, "-q", "export", str(big_store), "--out", "/dev/full"),
        partial(cellseg_run, "-q", "export", str(big_store), "--out", str(earlier), "--overwrite", max_file_bytes=4096),
    )
    assert_one_line_error(full_device, "cannot write '/dev/full'", "No space left on device")
    assert_one_line_error(too_large, f"cannot write '{earlier}'", "File too large")
    assert earlier.read_text() == "my earlier table\n"  # the old table whole, no partial new one
    assert [path.name for path in tmp_path.iterdir()] == ["cells.csv"]  # no temporary file left


def test_a_reader_that_stops_reading_ends_the_output_quietly(big_store):
    shell = [f"'{CELLSEG}' -q results '{big_store}' {options} | head -1; exit ${{PIPESTATUS[0]}}"
             for options in ("--json", "--limit 1000")]
    runs = at_once(*(partial(subprocess.run, ["bash", "-c", command], capture_output=True, text=True,
                             env=clean_environment(), timeout=600, check=False) for command in shell))
    for run, first in zip(runs, ("{", f"{big_store}: 1 images done, 400 failed"), strict=True):
        assert run.returncode == 0, run.stderr
        assert run.stderr == ""  # neither a traceback nor Python's "Exception ignored ... BrokenPipeError"
        assert run.stdout == first + "\n"


def test_a_full_disk_stops_the_segment_images_flow_in_one_line_counting_the_run(quick_checkpoint, images, prefect_server,
                                                                                  tmp_path, monkeypatch):
    """Each shard is a task of its own: the shard that meets the full disk fails, the others go on,
    and the flow's one line counts the images of the whole run, not of that shard."""
    for name, value in prefect_server.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "flow.zarr"
    stopped = cellseg_run("flow", "segment-images", "--source", str(images), "--store", str(out), "--model",
                          str(quick_checkpoint), "--shard-size", "1", "--max-parallel-shards", "2", max_file_bytes=LIMIT)
    assert stopped.returncode == 2, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]  # after the flow's own log lines
    assert last.startswith(f"cellseg flow segment-images: error: cannot write to results store '{out}'"), stopped.stderr
    assert "File too large" in last and "3 of 4 images written" in last and "rerun to complete it" in last, last
    assert ResultStore.open(str(out), mode="r").done_ids() == {"a0", "a1", "c0"}
    rerun = cellseg_run("-q", "flow", "segment-images", "--source", str(images), "--store", str(out), "--model",
                        str(quick_checkpoint), "--shard-size", "1")
    assert rerun.returncode == 0, rerun.stderr
    assert ResultStore.open(str(out), mode="r").done_ids() == {"a0", "a1", "b_big", "c0"}
