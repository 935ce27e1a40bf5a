"""docs/store.md against what a results store's tables hold: every column named, the joins it shows work."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellseg.store import ResultStore
from cellseg.store_tables import CELL_ROW_COLUMNS
from cellseg.tables import write_table

STORE_DOC = Path(__file__).resolve().parent.parent / "docs" / "store.md"
MODEL = {"version": "0123456789ab", "checkpoint": "runs/x/best.pt"}
CELLS = np.array([[1, 1, 0, 0], [0, 0, 0, 2], [0, 0, 2, 2]], dtype=np.int32)
STATS = {"cell_count": 2, "total_cell_area": 5, "mean_cell_area": 2.5, "median_cell_area": 2.5,
         "foreground_fraction": 5 / 12, "mean_intensity_inside": 10.0, "mean_intensity_outside": 1.0}
NO_CELLS = {**STATS, "cell_count": 0, "total_cell_area": 0, "mean_cell_area": None, "median_cell_area": None,
            "foreground_fraction": 0.0, "mean_intensity_inside": None}
# A plate's field read from an OME-TIFF with a pixel size: every optional column of the images table.
SOURCE = {"selection": {"format": "ome-tiff", "channel": 0, "channel_name": None, "z": 0, "t": 0},
          "pixel_size_um": 0.5, "pixel_size_yx_um": [0.5, 0.5]}


def section(title: str) -> str:
    text = STORE_DOC.read_text()
    start = text.index(f"### {title}")
    return text[start:text.index("\n#", start + 1)]


def segmented_store(tmp_path) -> ResultStore:
    """A store with a plate field of two cells and a pixel size, and an image without a cell."""
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    table = (CELL_ROW_COLUMNS[1:], np.array([[label, 2 + label] + [0.0] * 16 for label in (1, 2)]))
    store.write_result("A01_f1", CELLS > 0, STATS, "plate/A01_f1.ome.tif", MODEL, cells=CELLS, cell_table=table,
                       source=SOURCE)
    empty = (CELL_ROW_COLUMNS[1:], np.zeros((0, len(CELL_ROW_COLUMNS) - 1)))
    store.write_result("blank", np.zeros((3, 4), bool), NO_CELLS, "blank.png", MODEL,
                       cells=np.zeros((3, 4), np.int32), cell_table=empty)
    return store


def test_the_per_image_table_section_names_every_column_the_images_table_has(tmp_path):
    documented = set(re.findall(r"^\| (.+?) \|", section("The per-image table"), re.M))
    named = {name for cell in documented for name in re.findall(r"`(\w+)`", cell)}
    columns = {column for row in segmented_store(tmp_path).statistics() for column in row}
    assert columns <= named, f"undocumented columns of the images table: {sorted(columns - named)}"


def test_the_join_of_cells_and_images_the_docs_show_keeps_every_cell_and_finds_images_without_one(
        tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    store = segmented_store(tmp_path)
    (tmp_path / "runs/demo").mkdir(parents=True)
    write_table(store.cell_rows(), tmp_path / "runs/demo/cells.parquet", "parquet")
    write_table(store.statistics(), tmp_path / "runs/demo/images.parquet", "parquet")
    monkeypatch.chdir(tmp_path)
    text = " ".join(section("The per-cell table in pandas").split())
    images_read, join, without = re.search(
        r"`(images = pd\.read_parquet\(.*?\))`, `(cells\.merge\(.*?\))` gives .*?, and `(images\[.*?\])` the images",
        text).groups()
    namespace = {"pd": pd, "cells": pd.read_parquet("runs/demo/cells.parquet")}
    exec(images_read, namespace)
    joined = eval(join, namespace)
    assert joined[["image_id", "label", "area", "cell_count", "pixel_size_um"]].to_dict("records") == [
        {"image_id": "A01_f1", "label": 1, "area": 3, "cell_count": 2, "pixel_size_um": 0.5},
        {"image_id": "A01_f1", "label": 2, "area": 4, "cell_count": 2, "pixel_size_um": 0.5}]
    assert list(eval(without, namespace)["image_id"]) == ["blank"]
