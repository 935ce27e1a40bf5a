"""Outputs that would lose data through an easy mistake: `predict --out` and `export --out` refuse
targets where results would be lost or would overwrite other data, in one line, exit status 2,
leaving every file as it was; an empty folder, an existing store and --overwrite still work."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from tests.reliability.runs import assert_one_line_error, file_contents, together

pytestmark = pytest.mark.integration

MODEL = {"version": "0123456789ab", "checkpoint": "x.pt"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("targets")
    write_dataset(str(root), count=2, size=64, seed=3)
    return root / "images"


def _store_with_one_image(url: str) -> None:
    ResultStore.open(url).write_result("kept", np.eye(8, dtype=bool), {"cell_count": 8}, "kept.png", MODEL)


def test_predict_refuses_store_targets_that_keep_nothing_or_hold_other_data(quick_checkpoint, images, tmp_path):
    zarr.open_group(str(tmp_path / "v2.zarr"), mode="w", zarr_format=2).attrs["owner"] = "another tool"
    zarr.open_group(str(tmp_path / "v3.zarr"), mode="w").attrs["owner"] = "another tool"
    (tmp_path / "results.txt").write_text("not a store\n")
    _store_with_one_image(str(tmp_path / "existing.zarr"))
    existing = file_contents(tmp_path / "existing.zarr")
    here = tmp_path / "working directory"  # what an empty --out would name
    here.mkdir()
    targets = {  # --out -> what the message must say
        "": "store_url",
        "memory://results.zarr": "memory:// keeps nothing after the run",
        str(images): "is not empty and is not a cellseg results store",  # the images folder itself
        str(tmp_path / "v2.zarr"): "is a zarr v2 store, not a cellseg results store",
        str(tmp_path / "v3.zarr"): "is a zarr group but not a cellseg results store",
        str(tmp_path / "results.txt"): "is a file, not a results store",
        # a new store inside a store used to be written there, and showed as one of its images
        str(tmp_path / "existing.zarr" / "mask"): f"lies inside the zarr store '{tmp_path / 'existing.zarr'}'",
        str(tmp_path / "existing.zarr" / "kept" / "new.zarr"): f"lies inside the zarr store '{tmp_path / 'existing.zarr'}'",
    }
    before = {target: file_contents(Path(target)) for target in targets if target.startswith("/")}
    runs = together(*[("-q", "predict", "--model", str(quick_checkpoint), "--images", str(images), "--out", target)
                      for target in targets], cwd=here)
    for (target, message), result in zip(targets.items(), runs, strict=True):
        assert_one_line_error(result, message, *([f"'{target}'"] if target else ["must not be empty"]))
        assert result.stdout == ""
    for target, files in before.items():
        assert file_contents(Path(target)) == files, f"{target} was changed"
    assert list(here.iterdir()) == []
    assert file_contents(tmp_path / "existing.zarr") == existing


def test_predict_still_opens_an_empty_folder_and_an_existing_store(quick_checkpoint, images, tmp_path):
    (tmp_path / "empty").mkdir()
    _store_with_one_image(str(tmp_path / "existing.zarr"))
    kept = file_contents(tmp_path / "existing.zarr" / "kept")
    runs = together(*[("-q", "predict", "--model", str(quick_checkpoint), "--images", str(images), "--out",
                       str(tmp_path / name)) for name in ("empty", "existing.zarr", "new.zarr")])
    for name, result in zip(("empty", "existing.zarr", "new.zarr"), runs, strict=True):
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert ResultStore.open(str(tmp_path / name), mode="r").done_ids() >= {"synth_0000", "synth_0001"}
    assert ResultStore.open(str(tmp_path / "existing.zarr"), mode="r").done_ids() == {"kept", "synth_0000", "synth_0001"}
    assert file_contents(tmp_path / "existing.zarr" / "kept") == kept


def test_export_never_replaces_a_file_or_writes_into_a_store_unless_told(tmp_path):
    store = tmp_path / "results.zarr"
    _store_with_one_image(str(store))
    (tmp_path / "cells.csv").write_text("my earlier table\n")
    (tmp_path / "images.csv").write_text("my earlier table\n")
    (tmp_path / "folder").mkdir()
    store_files = file_contents(store)
    refused = {  # export arguments -> what the message must name
        ("--out", str(tmp_path / "cells.csv")): (f"'{tmp_path / 'cells.csv'}' exists; pass --overwrite to replace it",),
        ("--out", str(store / "zarr.json"), "--overwrite"): ("inside the zarr store", f"'{store}'"),
        ("--out", str(store / "kept" / "cells.csv")): ("inside the zarr store", f"'{store}'"),
        ("--out", str(tmp_path / "folder")): (f"'{tmp_path / 'folder'}' is a folder",),
        ("--out", ""): ("the output file name is empty",),
    }
    allowed = ("--out", str(tmp_path / "images.csv"), "--overwrite", "--table", "images")
    runs = together(*[("-q", "export", str(store), *arguments) for arguments in [*refused, allowed]])
    for (arguments, named), result in zip(refused.items(), runs[:-1], strict=True):
        assert_one_line_error(result, *named)
        assert result.stdout == "", arguments
    assert (tmp_path / "cells.csv").read_text() == "my earlier table\n"
    assert file_contents(store) == store_files
    assert sorted(path.name for path in (tmp_path / "folder").iterdir()) == []
    assert runs[-1].returncode == 0, runs[-1].stderr
    with open(tmp_path / "images.csv", newline="") as table:
        assert [row["image_id"] for row in csv.DictReader(table)] == ["kept"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cells.csv", "folder", "images.csv", "results.zarr"]
