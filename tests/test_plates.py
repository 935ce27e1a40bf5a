"""Plates and fields (cellseg.plates): an OME-Zarr HCS plate written by ome-zarr-py and a folder of
fields named per well come out per well and field, with flat ids, `well`/`field` columns and
`cellseg export --table images --group-by well`."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellseg.cli import main
from cellseg.config import PredictConfig, SelectionConfig
from cellseg.formats import list_sources
from cellseg.jobs import SegmentJob, run_segmentation
from cellseg.plates import by_well, image_id, well_and_field
from cellseg.store import ResultStore

pytest.importorskip("bioio_ome_zarr")
WELLS = {"A/1": 2, "B/3": 1}  # well path: fields


def _nuclei(synthetic_dataset: Path, index: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(synthetic_dataset / "images" / f"synth_{index:04d}.png"))


def write_plate(url: str, synthetic_dataset: Path) -> None:
    """An HCS plate (NGFF 0.5) by ome-zarr-py: wells A1 (two fields) and B3 (one), one channel each."""
    from ome_zarr.writer import write_image, write_plate_metadata, write_well_metadata

    root = zarr.open_group(url, mode="w")
    write_plate_metadata(root, ["A", "B"], ["1", "2", "3"], list(WELLS))
    index = 0
    for path, fields in WELLS.items():
        row, column = path.split("/")
        well = root.require_group(row).require_group(column)
        write_well_metadata(well, [str(field) for field in range(fields)])
        for field in range(fields):
            write_image(_nuclei(synthetic_dataset, index)[None], well.require_group(str(field)), axes="cyx",
                        scale_factors=None)
            index += 1


def export_wells(store: str, out: Path) -> list[dict[str, str]]:
    assert main(["export", store, "--table", "images", "--group-by", "well", "--out", str(out)]) == 0
    with out.open() as file:
        return list(csv.DictReader(file))


def test_an_hcs_plate_is_segmented_per_well_and_field(tmp_path, synthetic_dataset, tiny_checkpoint):
    (tmp_path / "src").mkdir()
    write_plate(str(tmp_path / "src" / "plate1.ome.zarr"), synthetic_dataset)
    sources = list_sources(str(tmp_path / "src"), SelectionConfig())
    assert [image_id(url) for url in sources] == ["plate1_A01_f0", "plate1_A01_f1", "plate1_B03_f0"]
    job = SegmentJob(source_url=str(tmp_path / "src"), store_url=str(tmp_path / "out.zarr"),
                     checkpoint_url=str(tiny_checkpoint), predict=PredictConfig(device="cpu"))
    report = run_segmentation(job)
    assert report.done == ["plate1_A01_f0", "plate1_A01_f1", "plate1_B03_f0"] and not report.failed
    store = ResultStore.open(job.store_url, mode="r")
    rows = store.statistics()
    assert [(row["well"], row["field"]) for row in rows] == [("A01", "0"), ("A01", "1"), ("B03", "0")]
    assert store.record("plate1_A01_f1")["source_url"] == f"{tmp_path}/src/plate1.ome.zarr/A/1/1"
    wells = export_wells(job.store_url, tmp_path / "wells.csv")
    assert [(well["well"], well["images"], well["fields"]) for well in wells] == [("A01", "2", "2"), ("B03", "1", "1")]
    assert int(wells[0]["cell_count"]) == rows[0]["cell_count"] + rows[1]["cell_count"] > 0
    assert float(wells[0]["mean_cell_area"]) == pytest.approx(
        (rows[0]["total_cell_area"] + rows[1]["total_cell_area"]) / int(wells[0]["cell_count"]))
    # The plate named as the source is the same three fields under the same ids (they got its
    # wells' folders in front: A_1_plate1_A01_f0), so a second run finds them done.
    named = job.model_copy(update={"source_url": str(tmp_path / "src" / "plate1.ome.zarr")})
    again = run_segmentation(named)
    assert again.skipped == ["plate1_A01_f0", "plate1_A01_f1", "plate1_B03_f0"] and not again.done


def test_a_folder_of_fields_named_per_well(tmp_path, synthetic_dataset, tiny_checkpoint):
    (tmp_path / "src").mkdir()
    for index, name in enumerate(["A01_f0", "A01_f1", "B02_f0", "overview"]):
        shutil.copy(synthetic_dataset / "images" / f"synth_{index:04d}.png", tmp_path / "src" / f"{name}.png")
    job = SegmentJob(source_url=str(tmp_path / "src"), store_url=str(tmp_path / "out.zarr"),
                     checkpoint_url=str(tiny_checkpoint), predict=PredictConfig(device="cpu"))
    assert run_segmentation(job).done == ["A01_f0", "A01_f1", "B02_f0", "overview"]
    rows = ResultStore.open(job.store_url, mode="r").statistics()
    assert [(row["image_id"], row["well"], row["field"]) for row in rows] == [
        ("A01_f0", "A01", "0"), ("A01_f1", "A01", "1"), ("B02_f0", "B02", "0"), ("overview", None, None)]
    assert list(rows[0])[-1] == "status" and all(row.keys() == rows[0].keys() for row in rows)
    wells = export_wells(job.store_url, tmp_path / "wells.csv")
    assert [(well["well"], int(well["cell_count"])) for well in wells] == [
        ("A01", rows[0]["cell_count"] + rows[1]["cell_count"]), ("B02", rows[2]["cell_count"])]


def test_group_by_needs_the_images_table(tmp_path, capsys):
    assert main(["export", str(tmp_path / "none.zarr"), "--group-by", "well", "--out", str(tmp_path / "w.csv")]) == 2
    assert "--group-by well groups the per-image statistics: add --table images" in capsys.readouterr().err


def test_group_by_well_refuses_a_store_without_wells_and_a_suffix_that_disagrees_is_named(tmp_path, capsys, caplog):
    """A store of plain images grouped by well wrote an empty table: 'wrote 0 wells', exit status 0."""
    store = ResultStore.open(str(tmp_path / "plain.zarr"))
    store.write_result("cells_01", np.eye(8, dtype=bool), {}, "cells_01.png", {"version": "v1"})
    out = tmp_path / "w.csv"
    assert main(["export", store.url, "--table", "images", "--group-by", "well", "--out", str(out)]) == 2
    assert "no image of" in capsys.readouterr().err and not out.exists()
    pytest.importorskip("pyarrow")
    assert main(["export", store.url, "--table", "images", "--format", "parquet", "--out", str(out)]) == 0
    assert f"writing parquet into '{out}', whose name says otherwise" in caplog.text
    assert "wrote 1 image to" in capsys.readouterr().out
    assert out.read_bytes()[:4] == b"PAR1"
    # With no --format, the name decides; a name that is neither is written as csv, and said so
    named = tmp_path / "w.parquet"
    assert main(["export", store.url, "--table", "images", "--out", str(named)]) == 0
    assert named.read_bytes()[:4] == b"PAR1"
    sheet = tmp_path / "w.xlsx"
    assert main(["export", store.url, "--table", "images", "--out", str(sheet)]) == 0
    assert f"writing csv into '{sheet}': a table is written as csv" in caplog.text
    assert sheet.read_text().startswith("image_id")


@pytest.mark.parametrize(("url", "expected", "located"), [
    ("s3://b/run/plate.ome.zarr/B/3/0", "plate_B03_f0", {"well": "B03", "field": "0"}),
    ("/d/plate.zarr/H/12/11#t=2", "plate_H12_f11_t002", {"well": "H12", "field": "11"}),
    ("/d/run7_A01_f1.ome.tif", "run7_A01_f1", {"well": "A01", "field": "1"}),
    ("/d/x.ome.tif#t=12", "x_t012", {}),
    ("/d/img.ome.zarr", "img", {}),
    ("/d/a.png", "a", {}),
    ("/d/A01.png", "A01", {}),  # a well without a field is no field of view
])
def test_image_ids_are_flat_and_name_well_and_field(url, expected, located):
    assert image_id(url) == expected and well_and_field(expected) == located


def test_by_well_sums_counts_and_leaves_out_images_without_a_well():
    rows = [{"image_id": "p_A01_f0", "cell_count": 3, "total_cell_area": 30, "mean_cell_area": 10.0,
             "median_cell_area": 9.0, "foreground_fraction": 0.1, "mean_intensity_inside": None},
            {"image_id": "p_A01_f1", "cell_count": 1, "total_cell_area": 30, "mean_cell_area": 30.0,
             "median_cell_area": 30.0, "foreground_fraction": 0.3, "mean_intensity_inside": 5.0},
            {"image_id": "p_A01_f1_t001", "cell_count": 0, "total_cell_area": 0, "mean_cell_area": None,
             "median_cell_area": None, "foreground_fraction": 0.2, "mean_intensity_inside": None},
            {"image_id": "loose", "cell_count": 7}]
    assert by_well(rows) == [{"well": "A01", "images": 3, "fields": 2, "cell_count": 4, "total_cell_area": 60,
                              "mean_cell_area": 15.0, "foreground_fraction": pytest.approx(0.2),
                              "mean_intensity_inside": 5.0}]


def test_a_plate_with_hostile_well_paths_is_skipped_and_the_rest_listed(tmp_path, synthetic_dataset, caplog):
    (tmp_path / "src").mkdir()
    shutil.copy(synthetic_dataset / "images" / "synth_0000.png", tmp_path / "src" / "loose.png")
    plate = zarr.open_group(str(tmp_path / "src" / "bad.zarr"), mode="w")
    plate.attrs["ome"] = {"version": "0.5", "plate": {"wells": [{"path": "../../etc"}], "rows": [], "columns": []}}
    assert list_sources(str(tmp_path / "src"), SelectionConfig()) == [f"{tmp_path}/src/loose.png"]
    assert "skipping the plate" in caplog.text and "well path '../../etc' is not '<row letters>/<column number>'" in caplog.text
