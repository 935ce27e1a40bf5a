"""Write rows (dicts with the same keys) as CSV or Parquet, to a local path or any fsspec URL."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from cellseg.io import StorageOptions, filesystem, write_bytes, write_file_atomic
from cellseg.plates import same_columns
from cellseg.store_checks import enclosing_zarr_store


class OutputError(ValueError):
    """An output file that must not or cannot be written; the message names it."""


def write_table(rows: Iterable[dict[str, Any]], url: str | os.PathLike[str], table_format: str = "csv",
                storage_options: StorageOptions = None, overwrite: bool = False) -> int:
    """Write `rows` to `url` as `table_format` ('csv' or 'parquet'); returns the number of rows.

    Columns are every key any row has, in the order they first appear; a row without one (the
    cells of an image without a pixel size beside others' `area_um2`) leaves it empty. Parquet
    needs pyarrow (the `tables` extra).
    The target is checked before `rows` is read (`check_output_file`); a local file is written
    whole or not at all, a device or pipe (/dev/stdout) is written into.
    """
    url = os.fspath(url)
    check_output_file(url, overwrite, storage_options)
    rows = same_columns(list(rows))
    columns = list(rows[0]) if rows else ["image_id"]
    if table_format == "csv":
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        data = text.getvalue().encode()
    elif table_format == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ValueError("Parquet export needs pyarrow: pip install 'cellseg[tables]'") from error
        buffer = io.BytesIO()
        pq.write_table(pa.table({name: [row.get(name) for row in rows] for name in columns}), buffer)
        data = buffer.getvalue()
    else:
        raise ValueError(f"unknown table format {table_format!r}: use 'csv' or 'parquet'")
    _write(url, data, storage_options)
    return len(rows)


def check_output_file(url: str, overwrite: bool = False, storage_options: StorageOptions = None) -> None:
    """Refuse an output that is no file name, a folder, inside a zarr store, or an existing file
    (unless `overwrite`); OutputError names it and what would be lost."""
    if not url.strip():
        raise OutputError("the output file name is empty: name a file to write")
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        path = os.path.realpath(path)  # a link into a store leads inside it
    if fs.isdir(path):
        raise OutputError(f"'{url}' is a folder: name a file to write")
    if store := enclosing_zarr_store(fs, path):
        raise OutputError(f"'{url}' is inside the zarr store '{store}', which it would damage: write it elsewhere")
    if fs.isfile(path) and not overwrite:
        raise OutputError(f"'{url}' exists; pass --overwrite to replace it")


def _write(url: str, data: bytes, storage_options: StorageOptions) -> None:
    """Write `data` to `url`: a local file through a temporary file and a rename, so that a full
    disk never leaves a partial table that looks complete; OutputError naming `url` on failure."""
    fs, path = filesystem(url, storage_options)
    try:
        if not isinstance(fs, LocalFileSystem):
            write_bytes(url, data, storage_options)  # one PUT on object storage: whole or nothing
        elif os.path.exists(path) and not os.path.isfile(path):
            with open(path, "wb") as device:  # /dev/stdout, a pipe: written into, never replaced
                device.write(data)
        else:
            write_file_atomic(os.path.realpath(path), data)  # through a link, to the file it names
    except OSError as error:
        reason = f"[Errno {error.errno}] {error.strerror}" if error.errno and error.strerror else str(error)
        raise OutputError(f"cannot write '{url}': {reason}") from error
