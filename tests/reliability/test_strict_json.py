"""NaN never reaches JSON (issue 19): Python's json writes `NaN`, which strict parsers refuse.
Store metadata and every `--json` output hold null instead, also for stores whose metadata an
older cellseg wrote with NaN in it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cellseg.json_values import dumps, finite_json
from cellseg.store import ResultStore
from tests.conftest import cellseg

pytestmark = pytest.mark.integration


def _strict(text: str):
    """Parse `text` as strict JSON: NaN, Infinity and -Infinity are refused."""
    def refuse(constant: str):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_finite_json_turns_every_non_finite_number_into_null():
    value = {"a": math.nan, "b": [1.0, math.inf, {"c": -math.inf}], "d": np.float32("nan"), "e": np.int64(3), "f": "NaN"}
    assert finite_json(value) == {"a": None, "b": [1.0, None, {"c": None}], "d": None, "e": 3, "f": "NaN"}
    assert _strict(dumps(value)) == {"a": None, "b": [1.0, None, {"c": None}], "d": None, "e": 3, "f": "NaN"}


def test_store_metadata_and_results_json_are_strict_json(tmp_path):
    url = str(tmp_path / "store")
    store = ResultStore.open(url)
    mask = np.zeros((8, 8), bool)
    mask[2:5, 2:5] = True
    statistics = {"cell_count": 1, "mean_cell_area": 9.0, "mean_intensity_inside": math.nan}
    store.write_result("new", mask, statistics, "images/new.png", {"version": "t"},
                       scale={"cell_diameter": 18.0, "measured_diameter": math.nan})
    store.write_result("old", mask, {"cell_count": 1, "mean_cell_area": 9.0}, "images/old.png", {"version": "t"})
    older = ResultStore.open(url).root["old"]  # as an older cellseg left it: NaN in its metadata
    older.attrs["cellseg"] = {**older.attrs["cellseg"], "statistics": {"cell_count": 1, "mean_cell_area": math.nan}}

    for document in Path(url).rglob("zarr.json"):
        if document.parent.name != "old":
            _strict(document.read_text())
    listed = cellseg("results", url, "--json")

    rows = {row["image_id"]: row for row in _strict(listed.stdout)["statistics"]}
    assert rows["new"]["mean_intensity_inside"] is None
    assert rows["old"]["mean_cell_area"] is None
    assert rows["new"]["mean_cell_area"] == 9.0


def test_a_block_wise_scratchs_records_take_numpys_scalars_as_json_does(tmp_path):
    """zarr's attrs refuse numpy's bools, ints and float32s ("Object of type bool is not JSON
    serializable"): one in a scratch's record, a skewness compared as numpy's, failed every image
    read block by block. The scratch's records go through finite_json, as the results' do."""
    from cellseg.blocks_scratch import Scratch

    store = ResultStore.open(str(tmp_path / "r.zarr"))
    store.root.require_group("big/blocks").attrs.put({"plan": {"shape": [8, 8]}})
    scratch = Scratch.open(store, "big")
    scratch.update(resumed=np.int64(2), stitch={"inverted": np.bool_(True), "fraction": np.float32(0.5)})
    written = json.loads((tmp_path / "r.zarr" / "big" / "blocks" / "zarr.json").read_text())["attributes"]
    assert written["resumed"] == 2 and written["stitch"] == {"inverted": True, "fraction": 0.5}
