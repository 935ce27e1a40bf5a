"""Exporting a results store's tables (`cellseg.tables`) as a scientist reads them back."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pytest

from cellseg.store import ResultStore
from cellseg.store_tables import CELL_ROW_COLUMNS, IMAGE_ROW_COLUMNS
from cellseg.tables import OutputError, write_table
from tests.conftest import cellseg

MODEL = {"version": "0123456789ab", "checkpoint": "runs/x/best.pt"}
NO_CELLS = {"cell_count": 0, "total_cell_area": 0, "mean_cell_area": None, "median_cell_area": None,
            "foreground_fraction": 0.0, "mean_intensity_inside": None, "mean_intensity_outside": 0.0}


def rows_never_read() -> Iterator[dict[str, Any]]:
    """Rows of a store that must not be read: the export is refused before it."""
    raise AssertionError("the rows were read before the export was refused")
    yield {}


def blank_store(tmp_path) -> ResultStore:
    """A store holding one image segmented without a cell, with its (empty) cell table."""
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    empty_table = (CELL_ROW_COLUMNS[1:], np.zeros((0, len(CELL_ROW_COLUMNS) - 1)))
    store.write_result("blank", np.zeros((8, 8), bool), NO_CELLS, "blank.png", MODEL,
                       cells=np.zeros((8, 8), np.int32), cell_table=empty_table)
    return store


@pytest.mark.parametrize("table_format", ["csv", "parquet"])
def test_a_cell_table_without_cells_has_the_columns_of_one_with_cells(tmp_path, table_format):
    """The per-cell snippet of docs/store.md (groupby, agg on `label` and `area`) works on it too."""
    store = blank_store(tmp_path)
    out = tmp_path / f"cells.{table_format}"
    assert write_table(store.cell_rows(), out, table_format, empty_columns=CELL_ROW_COLUMNS) == 0
    cells = pd.read_csv(out) if table_format == "csv" else pd.read_parquet(out)
    assert list(cells.columns) == list(CELL_ROW_COLUMNS)
    per_image = cells.groupby("image_id").agg(cells=("label", "count"), median_area=("area", "median"))
    assert per_image.empty


def test_the_images_table_of_an_empty_store_has_the_columns_of_one_with_images(tmp_path):
    empty = ResultStore.open(str(tmp_path / "empty.zarr"))
    write_table(empty.statistics(), tmp_path / "images.csv", empty_columns=IMAGE_ROW_COLUMNS)
    assert (tmp_path / "images.csv").read_text().splitlines() == [",".join(IMAGE_ROW_COLUMNS)]
    assert list(blank_store(tmp_path).statistics()[0]) == list(IMAGE_ROW_COLUMNS)


@pytest.mark.parametrize("table", ["cells", "images"])
def test_cellseg_export_of_a_table_without_rows_writes_its_whole_header(tmp_path, table):
    """A store whose images hold no cell (cells), or no image yet (images): a script reading the
    exported table finds the columns it reads in tables with rows."""
    store = blank_store(tmp_path) if table == "cells" else ResultStore.open(str(tmp_path / "empty.zarr"))
    out = tmp_path / f"{table}.csv"
    cellseg("export", store.url, "--table", table, "--format", "csv", "--out", str(out))
    header = CELL_ROW_COLUMNS if table == "cells" else IMAGE_ROW_COLUMNS
    assert out.read_text().splitlines() == [",".join(header)]


@pytest.mark.parametrize("table", ["cells", "images"])
def test_a_parquet_table_without_rows_has_the_column_types_of_one_with_rows(tmp_path, table):
    """Its columns were all of type null: concatenated with a full table in pandas, `area` and
    `label` became objects, and pyarrow's datasets refused to read the two together."""
    import pyarrow.parquet as pq

    full = blank_store(tmp_path)
    columns = CELL_ROW_COLUMNS[1:]
    full.write_result("three", np.ones((8, 8), bool), {**NO_CELLS, "cell_count": 3, "total_cell_area": 64,
                                                       "mean_cell_area": 21.3, "median_cell_area": 21.0,
                                                       "foreground_fraction": 1.0, "mean_intensity_inside": 9.5},
                      "three.png", MODEL, cells=np.zeros((8, 8), np.int32), cell_table=(columns, np.ones((3, len(columns)))))
    empty = blank_store(tmp_path / "blank") if table == "cells" else ResultStore.open(str(tmp_path / "empty.zarr"))
    for store, name in ((full, "full"), (empty, "empty")):
        cellseg("export", store.url, "--table", table, "--out", str(tmp_path / f"{name}.parquet"))
    with_rows, without = (pq.read_schema(tmp_path / f"{name}.parquet") for name in ("full", "empty"))
    assert pq.read_metadata(tmp_path / "empty.parquet").num_rows == 0
    assert [(field.name, str(field.type)) for field in without] == [(field.name, str(field.type)) for field in with_rows]
    both = pd.concat([pd.read_parquet(tmp_path / "full.parquet"), pd.read_parquet(tmp_path / "empty.parquet")])
    assert both.dtypes.to_dict() == pd.read_parquet(tmp_path / "full.parquet").dtypes.to_dict()


def test_an_export_below_a_file_names_the_file_before_reading_the_store(tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(b"an image")
    with pytest.raises(OutputError, match=r"cannot write '.*a\.png/cells\.csv': '.*a\.png' is a file, not a folder$"):
        write_table(rows_never_read(), image / "cells.csv")
    assert image.read_bytes() == b"an image"


def test_a_parquet_export_without_pyarrow_is_refused_before_reading_the_store(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as where the `tables` extra is not installed
    with pytest.raises(ValueError, match=r"Parquet export needs pyarrow: pip install 'cellseg\[tables\]'"):
        write_table(rows_never_read(), tmp_path / "cells.parquet", "parquet")
    assert not (tmp_path / "cells.parquet").exists()


def test_an_unknown_table_format_is_refused_before_reading_the_store(tmp_path):
    with pytest.raises(ValueError, match="unknown table format 'xlsx'"):
        write_table(rows_never_read(), tmp_path / "cells.xlsx", "xlsx")


@pytest.mark.parametrize(("out", "error"), [
    ("folder", "'{out}' is a folder: name a file to write"),
    ("new/", "'{out}' names a folder: name a file to write (a name ending in .csv or .parquet)"),  # before: a file 'new'
])
def test_a_folder_as_the_table_is_refused_before_reading_the_store(tmp_path, out, error):
    (tmp_path / "folder").mkdir()
    target = f"{tmp_path}/{out}"
    with pytest.raises(OutputError, match=f"^{re.escape(error.format(out=target))}$"):
        write_table(rows_never_read(), target)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["folder"]


@pytest.mark.parametrize("table_format", ["csv", "parquet"])
def test_an_export_to_stdout_is_the_table_alone_and_a_redirect_gets_what_the_shell_set_up(tmp_path, table_format):
    """`export --out /dev/stdout` ended the table with 'wrote N cells to /dev/stdout' (a Parquet
    file so made was unreadable), `> cells.csv` was refused as a file that exists, and with
    --overwrite `>> log` replaced the log by the table."""
    import subprocess

    from tests.reliability.runs import CELLSEG, clean_environment

    store = blank_store(tmp_path)
    columns = CELL_ROW_COLUMNS[1:]
    store.write_result("three", np.ones((8, 8), bool), {**NO_CELLS, "cell_count": 3}, "three.png", MODEL,
                       cells=np.zeros((8, 8), np.int32), cell_table=(columns, np.ones((3, len(columns)))))
    export = f"'{CELLSEG}' export '{store.url}' --format {table_format} --out /dev/stdout"
    kept = tmp_path / "kept.log"
    kept.write_bytes(b"a line of the user's\n")
    for redirect, target in ((">", tmp_path / f"cells.{table_format}"), (">>", kept)):
        run = subprocess.run(["bash", "-c", f"{export} {redirect} '{target}'"], capture_output=True, text=True,
                             env=clean_environment(), timeout=300, check=False)
        assert run.returncode == 0, run.stderr
        assert run.stderr.splitlines()[-1] == "wrote 3 cells to /dev/stdout"
    table = tmp_path / f"cells.{table_format}"
    cells = pd.read_csv(table) if table_format == "csv" else pd.read_parquet(table)
    assert list(cells["image_id"]) == ["three"] * 3
    assert kept.read_bytes() == b"a line of the user's\n" + table.read_bytes()


@pytest.mark.integration
def test_an_export_into_a_bucket_that_does_not_exist_is_refused_and_makes_no_bucket(moto_endpoint):
    import s3fs

    options = {"endpoint_url": moto_endpoint}
    with pytest.raises(OutputError, match=r"cannot write 's3://no-such-bucket/cells\.csv': its bucket "
                                          r"'no-such-bucket' does not exist"):
        write_table(rows_never_read(), "s3://no-such-bucket/cells.csv", storage_options=options)
    assert not s3fs.S3FileSystem(**options, skip_instance_cache=True).exists("no-such-bucket")


@pytest.mark.integration
def test_an_export_into_an_existing_bucket_is_written_and_kept_without_overwrite(moto_endpoint):
    import s3fs

    options = {"endpoint_url": moto_endpoint}
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir("tables-kept")
    url = "s3://tables-kept/run/cells.csv"
    assert write_table([{"image_id": "a", "label": 1}], url, storage_options=options) == 1
    with pytest.raises(OutputError, match="exists; pass --overwrite"):
        write_table([{"image_id": "b", "label": 2}], url, storage_options=options)
    assert pd.read_csv(url, storage_options=options).to_dict("records") == [{"image_id": "a", "label": 1}]


def test_both_tables_leave_out_an_image_whose_cell_table_lost_a_chunk_so_that_they_join(tmp_path):
    """The damaged image's statistics still read (they are metadata), but its cells cannot: the
    images table must not list its 13 cells beside a cells table without a row of them."""
    store = blank_store(tmp_path)
    columns = CELL_ROW_COLUMNS[1:]
    cells = np.zeros((8, 8), np.int32)
    rows = np.ones((13, len(columns)))
    for image_id in ("kept", "lost"):
        store.write_result(image_id, np.ones((8, 8), bool), {**NO_CELLS, "cell_count": 13}, f"{image_id}.png", MODEL,
                           cells=cells, cell_table=(columns, rows))
    (tmp_path / "results.zarr" / "lost" / "tables" / "cells" / "c.0.0").unlink()

    exported = {table: cellseg("export", store.url, "--format", "csv", "--table", table, "--out",
                               str(tmp_path / f"{table}.csv"), check=False) for table in ("cells", "images")}
    assert {result.returncode for result in exported.values()} == {3}
    damaged_lines = {table: [line for line in result.stdout.splitlines() if "lost" in line]
                     for table, result in exported.items()}
    assert damaged_lines["images"] == damaged_lines["cells"] != []
    images = pd.read_csv(tmp_path / "images.csv")
    assert list(images["image_id"]) == ["blank", "kept"]
    joined = pd.read_csv(tmp_path / "cells.csv").merge(images, on="image_id", suffixes=("", "_image"))
    assert (joined.groupby("image_id").size() == images.set_index("image_id")["cell_count"].drop("blank")).all()


def test_the_repair_an_export_names_for_a_chunk_it_cannot_decode_repairs_it(tmp_path):
    """Only reading the data finds a garbled chunk: the command the export named (`verify --repair`)
    found nothing, and every export failed the same way."""
    import shlex

    store = blank_store(tmp_path)
    columns = CELL_ROW_COLUMNS[1:]
    store.write_result("garbled", np.ones((8, 8), bool), {**NO_CELLS, "cell_count": 13}, "garbled.png", MODEL,
                       cells=np.zeros((8, 8), np.int32), cell_table=(columns, np.ones((13, len(columns)))))
    (tmp_path / "results.zarr" / "garbled" / "tables" / "cells" / "c.0.0").write_bytes(b"not zstd at all")
    exported = cellseg("export", store.url, "--out", str(tmp_path / "cells.csv"), check=False)
    assert exported.returncode == 3
    named = exported.stdout.split("`cellseg ")[1].split("`")[0]
    repaired = cellseg(*shlex.split(named), check=False)
    assert "1 broken" in repaired.stdout, repaired.stdout
    assert not ResultStore.open(store.url, mode="r").is_done("garbled")
    assert cellseg("export", store.url, "--out", str(tmp_path / "again.csv"), check=False).returncode == 0


def ragged_rows(count: int) -> Iterator[dict[str, Any]]:
    """Cell-like rows whose later ones gain a column (images with a pixel size after ones without)
    and a 'status' that stays last, with text that CSV must quote."""
    for index in range(count):
        row: dict[str, Any] = {"image_id": f"im,{index // 7}", "label": index % 7 + 1, "area": float(index)}
        if index >= count // 2:
            row["area_um2"] = index * 0.25
        row["status"] = "done" if index % 3 else 'said "done"\nthen'
        yield row


@pytest.mark.parametrize("table_format", ["csv", "parquet"])
def test_a_table_spilled_in_parts_is_the_table_written_whole_in_less_memory(tmp_path, monkeypatch, table_format):
    import tracemalloc

    import pyarrow.parquet as pq

    from cellseg import tables

    def written(name: str) -> tuple[bytes | Any, int]:
        tracemalloc.start()
        try:
            assert write_table(ragged_rows(20_000), tmp_path / name, table_format) == 20_000
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        path = tmp_path / name
        return (path.read_bytes() if table_format == "csv" else pq.read_table(path)), peak

    whole, whole_peak = written(f"whole.{table_format}")
    monkeypatch.setattr(tables, "SPILL_ROWS", 1_000)
    parts, parts_peak = written(f"parts.{table_format}")
    if table_format == "csv":
        assert parts == whole
    else:
        assert parts.schema.equals(whole.schema) and parts.equals(whole)
    assert parts_peak < whole_peak / 4, (parts_peak, whole_peak)
    assert not list(tmp_path.glob(".tmp-*"))  # the spilled parts live in TMPDIR, and are gone


def test_a_table_spilled_in_parts_is_uploaded_whole_to_object_storage(moto_endpoint, monkeypatch, tmp_path):
    import s3fs

    from cellseg import tables

    options = {"endpoint_url": moto_endpoint}
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    fs.mkdir("tables-spilled")
    write_table(ragged_rows(5_000), tmp_path / "whole.csv")
    monkeypatch.setattr(tables, "SPILL_ROWS", 1_000)
    assert write_table(ragged_rows(5_000), "s3://tables-spilled/run/cells.csv", storage_options=options) == 5_000
    assert fs.cat_file("tables-spilled/run/cells.csv") == (tmp_path / "whole.csv").read_bytes()
    table = pd.read_csv("s3://tables-spilled/run/cells.csv", storage_options=options)
    assert list(table.columns) == ["image_id", "label", "area", "area_um2", "status"] and len(table) == 5_000


def test_a_cell_table_of_several_chunks_is_exported_a_chunk_at_a_time_and_left_out_whole_when_one_is_damaged(
        tmp_path):
    """Block-wise images have tables of millions of rows: read a chunk at a time, and checked
    chunk by chunk before the first row is given, so that a damaged last chunk leaves none out."""
    from cellseg.store_layout import TABLE_CHUNK_ROWS

    store = blank_store(tmp_path)
    columns = CELL_ROW_COLUMNS[1:]
    rows = np.arange((2 * TABLE_CHUNK_ROWS + 5) * len(columns), dtype=np.float64).reshape(-1, len(columns))
    for image_id in ("kept", "damaged"):
        store.write_result(image_id, np.ones((8, 8), bool), {**NO_CELLS, "cell_count": len(rows)}, f"{image_id}.png",
                           MODEL, cells=np.zeros((8, 8), np.int32), cell_table=(columns, rows))
    (tmp_path / "results.zarr" / "damaged" / "tables" / "cells" / "c.2.0").write_bytes(b"not zstd")

    exported = list(ResultStore.open(store.url, mode="r").cell_rows())
    assert {row["image_id"] for row in exported} == {"kept"}
    assert [[row[name] for name in columns] for row in exported] == rows.tolist()


def test_a_temporary_folder_that_cannot_take_the_parts_is_named(tmp_path, monkeypatch):
    import tempfile

    from cellseg import tables

    monkeypatch.setattr(tables, "SPILL_ROWS", 1_000)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "not-a-folder"))
    with pytest.raises(OutputError, match=r"cells\.csv': a table of more than 1000 rows goes through temporary files "
                                          r"in '.*not-a-folder' \(TMPDIR\), which failed: \[Errno 20\]"):
        write_table(ragged_rows(5_000), tmp_path / "cells.csv")
    assert not (tmp_path / "cells.csv").exists()


@pytest.mark.parametrize("table_format", ["csv", "parquet"])
def test_an_export_into_a_pipe_whose_reader_stops_ends_quietly(tmp_path, table_format):
    """`export --out /dev/stdout | head -1` exited 2 with "cannot write '/dev/stdout': [Errno 32]
    Broken pipe", where `results | head -1` ends quietly."""
    import subprocess

    from tests.reliability.runs import CELLSEG, clean_environment

    store = blank_store(tmp_path)
    columns = CELL_ROW_COLUMNS[1:]
    rows = np.arange(20_000 * len(columns), dtype=np.float64).reshape(-1, len(columns))  # far past a pipe's buffer
    store.write_result("many", np.ones((8, 8), bool), {**NO_CELLS, "cell_count": len(rows)}, "many.png", MODEL,
                       cells=np.zeros((8, 8), np.int32), cell_table=(columns, rows))
    command = (f"'{CELLSEG}' -q export '{store.url}' --format {table_format} --out /dev/stdout | head -c 100 > /dev/null;"
               " exit ${PIPESTATUS[0]}")
    run = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=clean_environment(), timeout=300,
                         check=False)
    assert (run.returncode, run.stderr) == (0, "")


@pytest.mark.parametrize("renamed", ["image_id", "area"])
def test_a_cell_table_naming_a_column_twice_or_image_id_is_left_out_as_damaged(tmp_path, renamed):
    """Its rows are keyed by name: a column named 'image_id' overwrote the image's id in every row,
    and a name given twice dropped one of the two, with `verify` calling the store whole."""
    import json

    store = blank_store(tmp_path)
    columns = CELL_ROW_COLUMNS[1:]
    for image_id in ("kept", "edited"):
        store.write_result(image_id, np.ones((8, 8), bool), {**NO_CELLS, "cell_count": 3}, f"{image_id}.png", MODEL,
                           cells=np.zeros((8, 8), np.int32), cell_table=(columns, np.ones((3, len(columns)))))
    metadata = tmp_path / "results.zarr/edited/tables/cells/zarr.json"
    document = json.loads(metadata.read_text())
    document["attributes"]["columns"] = [renamed, *document["attributes"]["columns"][1:]]
    metadata.write_text(json.dumps(document))
    exported = cellseg("export", store.url, "--out", str(tmp_path / "cells.csv"), check=False)
    assert exported.returncode == 3 and "its cell table 'edited/tables/cells' has column names" in exported.stdout
    assert set(pd.read_csv(tmp_path / "cells.csv")["image_id"]) == {"kept"}
    assert cellseg("verify", store.url, check=False).returncode == 1
