"""Write rows (dicts with the same keys) as CSV or Parquet, to a local path or any fsspec URL."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import PurePath
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from cellseg.io import StorageOptions, filesystem, is_object_store, write_bytes, write_file_atomic
from cellseg.plates import same_columns
from cellseg.store_checks import enclosing_zarr_store


class OutputError(ValueError):
    """An output file that must not or cannot be written; the message names it."""


def write_table(
    rows: Iterable[dict[str, Any]],
    url: str | os.PathLike[str],
    table_format: str = "csv",
    storage_options: StorageOptions = None,
    overwrite: bool = False,
    empty_columns: Sequence[str] = ("image_id",),
) -> int:
    """Write `rows` to `url` as `table_format` ('csv' or 'parquet'); returns the number of rows.

    Columns are every key any row has, in the order they first appear; a row without one (the
    cells of an image without a pixel size beside others' `area_um2`) leaves it empty. A table
    without rows has `empty_columns` (`store.CELL_ROW_COLUMNS` for cells), so that a script
    reading it finds the columns it reads from a full one. Parquet needs pyarrow (the `tables` extra).
    The target and the format are checked before `rows` is read (`check_output_file`); a local
    file is written whole or not at all, a device or pipe (/dev/stdout) is written into.
    """
    url = os.fspath(url)
    check_output_file(url, overwrite, storage_options)
    encode = _encoder(table_format)  # a missing pyarrow is said before a large store is read
    rows = same_columns(list(rows))
    _write(url, encode(rows, list(rows[0]) if rows else list(empty_columns)), storage_options)
    return len(rows)


def _encoder(table_format: str) -> Callable[[list[dict[str, Any]], list[str]], bytes]:
    """The function that encodes (rows, columns) as `table_format`; ValueError for an unknown
    format or a missing package."""
    if table_format == "csv":
        return _csv_bytes
    if table_format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as error:
            raise ValueError("Parquet export needs pyarrow: pip install 'cellseg[tables]'") from error
        return _parquet_bytes
    raise ValueError(f"unknown table format {table_format!r}: use 'csv' or 'parquet'")


def _csv_bytes(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def _parquet_bytes(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(pa.table({name: [row.get(name) for row in rows] for name in columns}), buffer)
    return buffer.getvalue()


def check_output_file(url: str, overwrite: bool = False, storage_options: StorageOptions = None) -> None:
    """Refuse an output that is no file name, a folder, below a file, inside a zarr store, in a
    bucket that does not exist, or an existing file (unless `overwrite`); OutputError names it and
    what would be lost."""
    if not url.strip():
        raise OutputError("the output file name is empty: name a file to write")
    fs, path = output_place(url, storage_options, "write")
    if fs.isdir(path):
        raise OutputError(f"'{url}' is a folder: name a file to write")
    if store := enclosing_zarr_store(fs, path):
        raise OutputError(f"'{url}' is inside the zarr store '{store}', which it would damage: write it elsewhere")
    if fs.isfile(path) and not overwrite:
        raise OutputError(f"'{url}' exists; pass --overwrite to replace it")


def output_place(url: str, storage_options: StorageOptions, writing: str) -> tuple[AbstractFileSystem, str]:
    """(filesystem, path) of an output `url`, a local link resolved (a link into a store leads
    inside it); OutputError when it lies in a bucket that does not exist or below a file. The
    errors say "cannot `writing` 'url'" ('write' a file, 'write into' a folder)."""
    fs, path = filesystem(url, storage_options)
    if isinstance(fs, LocalFileSystem):
        path = os.path.realpath(path)
    elif bucket := _bucket_is_missing(fs, path):
        raise OutputError(f"cannot {writing} '{url}': its bucket '{bucket}' does not exist")
    if blocking := _file_above(fs, path):
        raise OutputError(f"cannot {writing} '{url}': '{blocking}' is a file, not a folder")
    return fs, path


def _file_above(fs: AbstractFileSystem, path: str) -> str | None:
    """The nearest folder above `path` that is a file, where no folder can be made; on object
    storage, an object named as one of its prefixes, which a copy to a disk could not hold beside it."""
    if isinstance(fs, LocalFileSystem):
        return next((str(folder) for folder in PurePath(path).parents if os.path.isfile(folder)), None)
    parts = path.strip("/").split("/")
    for end in range(len(parts) - 1, 1, -1):  # the prefixes below the bucket, the nearest first
        if fs.isfile(above := "/".join(parts[:end])):
            return str(fs.unstrip_protocol(above))
    return None


def _bucket_is_missing(fs: AbstractFileSystem, path: str) -> str | None:
    """The bucket of `path` on an object store (s3://, gs://, ...) when it does not exist: writing
    would make it, and a typo in its name must not create one. None on other filesystems."""
    bucket = path.strip("/").split("/", 1)[0] if is_object_store(fs) else None
    return bucket if bucket and not fs.exists(bucket) else None


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
        raise write_failure(url, error) from error


def write_failure(url: str, error: OSError) -> OutputError:
    """The OutputError of a file that could not be written, with the system's reason."""
    reason = f"[Errno {error.errno}] {error.strerror}" if error.errno and error.strerror else str(error)
    return OutputError(f"cannot write '{url}': {reason}")
