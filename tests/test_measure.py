"""Per-cell measurements: values checked by hand, stored beside the labels, exported as CSV/Parquet."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellseg.measure import (
    CELL_COLUMNS,
    REGIONPROPS_COLUMNS,
    REGIONPROPS_PROPERTIES,
    cell_measurements,
)
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError


def two_cells() -> tuple[np.ndarray, np.ndarray]:
    """A 4x6 rectangle (label 1, intensity 10) and a 3x3 square (label 2, intensities 1..9)."""
    cells = np.zeros((12, 12), dtype=np.int32)
    image = np.zeros((12, 12), dtype=np.uint16)
    cells[1:5, 2:8] = 1
    image[1:5, 2:8] = 10
    cells[8:11, 8:11] = 2
    image[8:11, 8:11] = np.arange(1, 10).reshape(3, 3)
    return cells, image


def test_measurements_of_hand_made_cells():
    cells, image = two_cells()
    table = dict(zip(CELL_COLUMNS, cell_measurements(cells, image).T, strict=True))
    np.testing.assert_array_equal(table["label"], [1, 2])
    np.testing.assert_array_equal(table["area"], [24, 9])
    np.testing.assert_allclose(table["centroid_y"], [2.5, 9.0])
    np.testing.assert_allclose(table["centroid_x"], [4.5, 9.0])
    np.testing.assert_array_equal([table[k][0] for k in ("bbox_min_y", "bbox_min_x", "bbox_max_y", "bbox_max_x")],
                                  [1, 2, 5, 8])
    np.testing.assert_allclose(table["solidity"], [1.0, 1.0])
    assert table["major_axis_length"][0] > table["minor_axis_length"][0] > 0  # a rectangle is elongated
    assert table["eccentricity"][1] == pytest.approx(0.0, abs=1e-9)  # a square is not
    np.testing.assert_allclose(table["equivalent_diameter"], np.sqrt(4 * np.array([24, 9]) / np.pi))
    np.testing.assert_allclose(table["intensity_mean"], [10, 5])
    np.testing.assert_allclose(table["intensity_min"], [10, 1])
    np.testing.assert_allclose(table["intensity_max"], [10, 9])
    np.testing.assert_allclose(table["intensity_integrated"], [240, 45])
    assert table["perimeter"][0] > table["perimeter"][1] > 0


def _regionprops_reference(cells: np.ndarray, image: np.ndarray) -> np.ndarray:
    """The same table straight from skimage.measure.regionprops_table."""
    from skimage.measure import regionprops_table

    measured = regionprops_table(cells, intensity_image=image.astype(np.float64), properties=REGIONPROPS_PROPERTIES)
    columns = {REGIONPROPS_COLUMNS[key]: np.asarray(value, dtype=np.float64) for key, value in measured.items()}
    columns["intensity_integrated"] = columns["intensity_mean"] * columns["area"]
    return np.stack([columns[name] for name in CELL_COLUMNS], axis=1)


def _awkward_cells() -> tuple[np.ndarray, np.ndarray]:
    """Labels with gaps, single pixels, one-pixel lines, diagonal chains, cells on every image edge,
    touching cells and a cell with a hole; a float image with negative values."""
    rng = np.random.default_rng(1)
    cells = np.zeros((40, 50), dtype=np.int32)
    cells[0:6, 0:9] = 3            # top-left corner
    cells[5, 20] = 4               # a single pixel
    cells[10, 5:30] = 7            # a horizontal line
    cells[12:30, 40] = 8           # a vertical line on ...
    cells[34:40, 44:50] = 9        # ... and a bottom-right corner cell
    for i in range(8):
        cells[15 + i, 10 + i] = 11  # a diagonal chain (8-connected)
    cells[20:32, 20:32] = 12
    cells[24:28, 24:28] = 0        # a hole
    cells[20:32, 32:36] = 13       # touching 12
    cells[30:40, 0:3] = 20         # left edge
    image = rng.normal(size=cells.shape) * 100
    return cells, image


def _ragged_cells() -> tuple[np.ndarray, np.ndarray]:
    """Concave, ragged, holed and thin cells (thresholded smooth noise; 8-connected pieces), whose
    convex hulls have edges through pixel centres at many slopes; a uint8 image."""
    from scipy import ndimage

    rng = np.random.default_rng(6)
    noise = ndimage.gaussian_filter(rng.standard_normal((160, 190)), 2.5)
    cells = ndimage.label(noise > 0.05, structure=np.ones((3, 3), bool))[0].astype(np.int32)
    return cells, rng.integers(0, 256, cells.shape, dtype=np.uint8)


def test_every_column_equals_regionprops(tmp_path):
    from cellseg.synth import generate_sample

    sample = generate_sample(np.random.default_rng(3), (256, 200), bit_depth=16)
    cases = [_awkward_cells(), (sample.labels.astype(np.int32), sample.image), _ragged_cells()]
    for case, (cells, image) in enumerate(cases):
        reference = _regionprops_reference(cells, image)
        ours = cell_measurements(cells, image)
        assert ours.shape == reference.shape and len(ours) == len(np.unique(cells)) - 1
        for column, name in enumerate(CELL_COLUMNS):
            np.testing.assert_allclose(ours[:, column], reference[:, column], rtol=1e-9, atol=1e-9,
                                       err_msg=f"{name}, case {case}")


def test_convex_hulls_equal_skimages_on_random_shapes():
    from skimage.measure import regionprops_table

    rng = np.random.default_rng(11)
    for case in range(200):
        shape = tuple(int(side) for side in rng.integers(1, 30, 2))
        cells = (rng.random(shape) < rng.uniform(0.2, 0.9)).astype(np.int32) * rng.integers(1, 4, shape).astype(np.int32)
        present = np.unique(cells[cells > 0])
        if not len(present):
            continue
        theirs = regionprops_table(cells, properties=("label", "area_convex"))
        ours = cell_measurements(cells, np.zeros(shape))
        np.testing.assert_array_equal(ours[:, CELL_COLUMNS.index("label")], theirs["label"])
        np.testing.assert_allclose(ours[:, CELL_COLUMNS.index("area")] / ours[:, CELL_COLUMNS.index("solidity")],
                                   theirs["area_convex"], rtol=1e-12, err_msg=f"case {case}")


@pytest.mark.realdata
def test_every_column_equals_regionprops_on_real_nuclei():
    from cellseg.io import list_images, read_image
    from tests.conftest import shared_dataset

    dataset = shared_dataset("dsb2018")
    for url in list_images(str(dataset / "images"))[::5]:
        cells = read_image(str(dataset / "labels" / url.rsplit("/", 1)[-1])).astype(np.int32)
        image = read_image(url)
        np.testing.assert_allclose(cell_measurements(cells, image), _regionprops_reference(cells, image),
                                   rtol=1e-9, atol=1e-9, err_msg=url)


def test_no_cells_no_rows_and_shapes_must_match():
    assert cell_measurements(np.zeros((5, 5), dtype=np.int32), np.ones((5, 5))).shape == (0, len(CELL_COLUMNS))
    with pytest.raises(ValueError, match=r"shape|image"):
        cell_measurements(np.zeros((5, 5), dtype=np.int32), np.ones((5, 6)))
    with pytest.raises(ValueError, match="labels must lie"):
        cell_measurements(np.full((5, 5), -1, dtype=np.int32), np.ones((5, 5)))


def test_the_table_is_stored_beside_the_labels_and_read_back(tmp_path):
    cells, image = two_cells()
    store = ResultStore.open(str(tmp_path / "s.zarr"))
    table = cell_measurements(cells, image)
    store.write_result("a", cells > 0, {"cell_count": 2}, "a.png", {"version": "v"}, cells=cells,
                       cell_table=(CELL_COLUMNS, table))
    store.write_result("empty", np.zeros((4, 4), bool), {"cell_count": 0}, "e.png", {"version": "v"},
                       cell_table=(CELL_COLUMNS, cell_measurements(np.zeros((4, 4), np.int32), np.zeros((4, 4)))))
    store.write_result("old", cells > 0, {"cell_count": 2}, "o.png", {"version": "v"})  # written without a table
    columns, rows = store.read_cell_table("a")
    assert columns == list(CELL_COLUMNS)
    np.testing.assert_array_equal(rows, table)
    assert store.read_cell_table("empty")[1].shape == (0, len(CELL_COLUMNS))
    with pytest.raises(StoreError, match="without per-cell measurements"):
        store.read_cell_table("old")
    rows = list(store.cell_rows())
    assert [(row["image_id"], row["label"]) for row in rows] == [("a", 1), ("a", 2)]
    assert rows[1]["intensity_integrated"] == 45.0 and isinstance(rows[1]["area"], int)


@pytest.mark.integration
def test_predict_then_export_cells_as_csv_and_parquet(tiny_checkpoint, tmp_path):
    from cellseg.synth import write_dataset

    write_dataset(str(tmp_path / "data"), count=3, size=96, seed=2)
    cli = str(Path(sys.executable).parent / "cellseg")

    def run(*args: str) -> str:
        result = subprocess.run([cli, *args], capture_output=True, text=True, timeout=300, check=False)
        assert result.returncode == 0, result.stderr
        return result.stdout

    store_url = str(tmp_path / "out.zarr")
    run("predict", "--model", str(tiny_checkpoint), "--images", str(tmp_path / "data/images"), "--out", store_url)
    store = ResultStore.open(store_url, mode="r")
    total = sum(row["cell_count"] for row in store.statistics())
    assert total > 0

    assert f"wrote {total} cells" in run("export", store_url, "--format", "csv", "--out", str(tmp_path / "cells.csv"))
    with open(tmp_path / "cells.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == total and list(rows[0]) == ["image_id", *CELL_COLUMNS]
    for image_id in store.done_ids():  # every stored cell is a row, and its area is the label's pixel count
        cells = store.read_cells(image_id)
        areas = {int(r["label"]): int(r["area"]) for r in rows if r["image_id"] == image_id}
        assert areas == {label: int((cells == label).sum()) for label in range(1, int(cells.max()) + 1)}

    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    run("export", store_url, "--format", "parquet", "--out", str(tmp_path / "cells.parquet"))
    parquet = pyarrow_parquet.read_table(tmp_path / "cells.parquet")
    assert parquet.num_rows == total and parquet.column_names == ["image_id", *CELL_COLUMNS]
    run("export", store_url, "--table", "images", "--out", str(tmp_path / "images.csv"))
    with open(tmp_path / "images.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 3
