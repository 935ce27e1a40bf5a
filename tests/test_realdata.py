"""The CLI round trip on the real datasets in ../shared/data (skipped when absent)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_dataset
from tests.test_cli import cellseg

pytestmark = [pytest.mark.integration, pytest.mark.realdata]


def test_cli_round_trip_on_dsb2018(tmp_path):
    data = shared_dataset("dsb2018")
    model = tmp_path / "model"
    cellseg("train", "--images", str(data / "images"), "--masks", str(data / "masks"), "--out", str(model),
            "--epochs", "3", "--depth", "3", "--base-width", "8", "--patch-size", "128", "--patches-per-image", "2")
    split = json.loads((model / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 45

    store = str(tmp_path / "dsb.zarr")
    predicted = cellseg("predict", "--model", str(model / "best.pt"), "--images", str(data / "images"), "--out", store)
    assert "segmented 45, skipped 0" in predicted.stdout

    scores = json.loads(cellseg("evaluate", "--pred", store, "--masks", str(data / "masks"), "--json").stdout)
    assert scores["images"] == 45 and scores["missing_predictions"] == []
    # Three epochs of a tiny model already separate nuclei from background on most images.
    assert scores["pooled"]["dice"] > 0.6

    rows = json.loads(cellseg("results", store, "--json").stdout)["statistics"]
    shapes = {row["image_id"]: row for row in rows}
    assert len(shapes) == 45
    assert sum(row["cell_count"] > 0 for row in rows) >= 40
