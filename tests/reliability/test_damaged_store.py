"""A damaged results store (issue 19, class 7; class 4's deleted mask chunks): a store written by
`cellseg predict` is damaged in each way a disk, a sync tool or a careless hand damages one. Every
command names the damaged image, reads the others as before, and never gives a score that reads
missing chunks as background; `cellseg verify` names each damage, `--repair` marks the broken
images not done, and a rerun of `predict` redoes exactly those, ending with the undisturbed store."""

from __future__ import annotations

import csv
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellseg.store import ResultStore
from cellseg.verify import verify_store
from tests.conftest import cellseg

pytestmark = pytest.mark.integration

IMAGES = ("synth_0000", "synth_0001", "synth_0002", "synth_0003")
UNREADABLE, CHUNK_LOST, LABELS_LOST = "synth_0000", "synth_0001", "synth_0002"


@pytest.fixture(scope="module")
def inputs(synthetic_dataset, tiny_checkpoint, tmp_path_factory) -> dict[str, str]:
    """Four images, their masks, and an undisturbed store of them written by `cellseg predict`."""
    root = tmp_path_factory.mktemp("damaged")
    for kind in ("images", "masks"):
        (root / kind).mkdir()
        for image_id in IMAGES:
            shutil.copy(synthetic_dataset / kind / f"{image_id}.png", root / kind)
    paths = {"root": str(root), "images": str(root / "images"), "masks": str(root / "masks"),
             "model": str(tiny_checkpoint), "reference": str(root / "reference.zarr")}
    cellseg("predict", "--model", paths["model"], "--images", paths["images"], "--out", paths["reference"],
            "--device", "cpu")
    return paths


def _copy(inputs: dict[str, str], name: str) -> Path:
    store = Path(inputs["root"]) / name
    shutil.copytree(inputs["reference"], store)
    return store


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _files(store: Path) -> dict[str, str]:
    return {str(path.relative_to(store)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(store.rglob("*")) if path.is_file()}


def _clean(result, status: int) -> str:
    """stdout + stderr of a CLI run that exited `status` without a traceback."""
    assert result.returncode == status, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    return result.stdout + result.stderr


def _assert_equal_stores(url: str, reference_url: str) -> None:
    """Every image done with the reference's mask, labels, cell table and statistics."""
    store, reference = ResultStore.open(url, mode="r"), ResultStore.open(reference_url, mode="r")
    assert store.done_ids() == reference.done_ids() == set(IMAGES)
    for image_id in IMAGES:
        np.testing.assert_array_equal(store.read_mask(image_id), reference.read_mask(image_id))
        np.testing.assert_array_equal(store.read_cells(image_id), reference.read_cells(image_id))
        np.testing.assert_array_equal(store.read_cell_table(image_id)[1], reference.read_cell_table(image_id)[1])
        assert store.record(image_id)["statistics"] == reference.record(image_id)["statistics"]


def test_damaged_images_are_named_left_out_of_tables_refused_in_scores_and_repaired(inputs):
    store = _copy(inputs, "images.zarr")
    _truncate(store / UNREADABLE / "zarr.json")
    (store / CHUNK_LOST / "labels/mask/0/c.0.0").unlink()  # zarr would read the lost chunk as background
    shutil.rmtree(store / LABELS_LOST / "labels")
    damaged = _files(store)

    results = _clean(cellseg("results", str(store), check=False), 0)
    assert f"{UNREADABLE}/zarr.json" in results and "cellseg verify" in results and "--repair" in results
    assert "3 images done" in results  # the others read as before

    table = Path(inputs["root"]) / "cells.csv"
    exported = _clean(cellseg("export", str(store), "--out", str(table), check=False), 3)
    assert f"'{UNREADABLE}'" in exported and "cellseg verify" in exported
    with table.open() as rows:
        assert {row["image_id"] for row in csv.DictReader(rows)} == set(IMAGES) - {UNREADABLE}

    scored = _clean(cellseg("evaluate", "--pred", str(store), "--masks", inputs["masks"], check=False), 2)
    error = scored.strip().splitlines()[-1]
    assert error.startswith("cellseg evaluate: error: no score: 3 images") and "--repair" in error
    assert f"'{CHUNK_LOST}': its mask '{CHUNK_LOST}/labels/mask/0' is missing 1 of 1 chunks" in error
    assert f"'{LABELS_LOST}': its mask '{LABELS_LOST}/labels/mask/0' is missing" in error
    assert f"{UNREADABLE}/zarr.json" in error

    checked = _clean(cellseg("verify", str(store), check=False), 1)
    broken = [line for line in checked.splitlines() if line.startswith("broken:")]
    assert [line.split("'")[1] for line in broken] == [UNREADABLE, CHUNK_LOST, LABELS_LOST]
    assert "4 images checked, 3 broken" in checked
    assert _files(store) == damaged  # reading and checking change nothing

    predict = ["predict", "--model", inputs["model"], "--images", inputs["images"], "--out", str(store), "--device", "cpu"]
    # Unreadable metadata is not done: a rerun segments that image again, over it. Lost chunks
    # leave an image that still looks done, until `verify --repair` withdraws it.
    rerun = _clean(cellseg(*predict, check=False), 0)
    assert "segmented 1, skipped 3 already done, failed 0" in rerun and f"{UNREADABLE}/zarr.json" in rerun
    repaired = _clean(cellseg("verify", str(store), "--repair", check=False), 0)
    assert "4 images checked, 2 broken" in repaired and "2 images marked not done" in repaired
    assert "segmented 2, skipped 2 already done, failed 0" in _clean(cellseg(*predict, check=False), 0)
    assert verify_store(str(store)).broken == []
    _assert_equal_stores(str(store), inputs["reference"])


def test_a_store_whose_own_metadata_is_truncated_is_named_and_rewritten(inputs):
    store = _copy(inputs, "root.zarr")
    _truncate(store / "zarr.json")
    damaged = _files(store)

    error = _clean(cellseg("results", str(store), check=False), 2).strip()
    assert "root.zarr/zarr.json' cannot be read" in error and "--repair" in error and "\n" not in error
    checked = _clean(cellseg("verify", str(store), check=False), 1)
    assert "broken: store metadata" in checked and "images not checked" in checked
    assert _files(store) == damaged

    repaired = _clean(cellseg("verify", str(store), "--repair", check=False), 0)
    assert "4 images checked, 1 broken" in repaired and "store's metadata rewritten" in repaired
    assert {name for name, digest in _files(store).items() if damaged.get(name) != digest} == {"zarr.json"}
    _assert_equal_stores(str(store), inputs["reference"])
