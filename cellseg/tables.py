"""Write rows (dicts with the same keys) as CSV or Parquet, to a local path or any fsspec URL."""

from __future__ import annotations

import csv
import io
import itertools
import os
import posixpath
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, BinaryIO

from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from cellseg.io import (
    StorageOptions,
    file_replaced_atomically,
    filesystem,
    is_object_store,
    os_error_reason,
    write_bytes,
)
from cellseg.plates import same_columns
from cellseg.store_checks import enclosing_zarr_store


class OutputError(ValueError):
    """An output file that must not or cannot be written; the message names it."""


SPILL_ROWS = 50_000  # rows held as dicts at once (some 75 MB of cell rows); a longer table is spilled in parts


def write_table(
    rows: Iterable[dict[str, Any]],
    url: str | os.PathLike[str],
    table_format: str = "csv",
    storage_options: StorageOptions = None,
    overwrite: bool = False,
    empty_columns: Mapping[str, type] | Sequence[str] = ("image_id",),
) -> int:
    """Write `rows` to `url` as `table_format` ('csv' or 'parquet'); returns the number of rows.

    Columns are every key any row has, in the order they first appear; a row without one (the
    cells of an image without a pixel size beside others' `area_um2`) leaves it empty. A table
    without rows has `empty_columns` (`store_tables.CELL_ROW_TYPES` for cells), so that a script
    reading it finds the columns it reads from a full one; given as a mapping, in Parquet with the
    types (str, int, float) a full one has, which a join or concatenation with it then keeps. Parquet needs pyarrow (the `tables` extra).
    The target and the format are checked before `rows` is read (`check_output_file`); a local
    file is written whole or not at all, a device or pipe (/dev/stdout) is written into. Rows past
    SPILL_ROWS go to temporary files (TMPDIR) part by part, joined into the table at the end:
    held whole, 400,000 cells took 700 MB, and a store of millions of cells more memory than it has.
    """
    url = os.fspath(url)
    check_output_file(url, overwrite, storage_options)
    encoder = _encoder(table_format)  # a missing pyarrow is said before a large store is read
    batches = _batches(rows)
    first = next(batches, [])
    second = next(batches, None)
    if second is None:
        first = same_columns(first)
        if not first and table_format == "parquet" and isinstance(empty_columns, Mapping):
            encoded = _typed_empty_parquet(empty_columns)
        else:
            encoded = encoder.encode(first, list(first[0]) if first else list(empty_columns))
        _write(url, lambda file: file.write(encoded), storage_options)
        return len(first)
    try:
        spill_folder = tempfile.TemporaryDirectory(prefix="cellseg-table-")
    except OSError as error:
        raise _spill_failure(url, error) from error
    with spill_folder as spill:
        try:
            parts = [encoder.spill(same_columns(batch), os.path.join(spill, f"part-{index}"))
                     for index, batch in enumerate(itertools.chain((first, second), batches))]
        except OSError as error:  # a full TMPDIR
            raise _spill_failure(url, error) from error
        columns = list(dict.fromkeys(name for part in parts for name in part.columns))
        if "status" in columns and any(part.columns != columns for part in parts):  # stays last, as same_columns keeps it
            columns.append(columns.pop(columns.index("status")))
        _write(url, lambda file: encoder.join(parts, columns, file), storage_options, spill)
        return sum(part.rows for part in parts)


def _spill_failure(url: str, error: OSError) -> OutputError:
    return OutputError(f"cannot write '{url}': a table of more than {SPILL_ROWS} rows goes through temporary files in "
                       f"'{tempfile.gettempdir()}' (TMPDIR), which failed: {os_error_reason(error)}")


def _batches(rows: Iterable[dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(rows)
    while batch := list(itertools.islice(iterator, SPILL_ROWS)):
        yield batch


@dataclass(frozen=True)
class _Part:
    """A part of a table spilled to a file, with the columns it has."""

    path: str
    columns: list[str]
    rows: int


@dataclass(frozen=True)
class _Encoder:
    """How a table format is written: whole (`encode`), or spilled in parts and joined (`spill`, `join`)."""

    encode: Callable[[list[dict[str, Any]], list[str]], bytes]
    write_part: Callable[[list[dict[str, Any]], list[str], str], None]
    join: Callable[[Sequence[_Part], list[str], BinaryIO], None]

    def spill(self, rows: list[dict[str, Any]], path: str) -> _Part:
        columns = list(rows[0])
        self.write_part(rows, columns, path)
        return _Part(path, columns, len(rows))


def _encoder(table_format: str) -> _Encoder:
    """The encoder of `table_format`; ValueError for an unknown format or a missing package."""
    if table_format == "csv":
        return _Encoder(_csv_bytes, _csv_part, _join_csv)
    if table_format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError as error:
            raise ValueError("Parquet export needs pyarrow: pip install 'cellseg[tables]'") from error
        return _Encoder(_parquet_bytes, _parquet_part, _join_parquet)
    raise ValueError(f"unknown table format {table_format!r}: use 'csv' or 'parquet'")


def _csv_bytes(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def _csv_part(rows: list[dict[str, Any]], columns: list[str], path: str) -> None:
    with open(path, "wb") as file:
        file.write(_csv_bytes(rows, columns))


def _join_csv(parts: Sequence[_Part], columns: list[str], file: BinaryIO) -> None:
    """One header, then each part's rows: copied as they are when the part has every column in
    order, else read and written again with the columns it lacks left empty."""
    file.write(_csv_bytes([], columns))
    for part in parts:
        with open(part.path, "rb") as spilled:
            spilled.readline()  # the part's header: column names hold no line break
            if part.columns == columns:
                shutil.copyfileobj(spilled, file)
                continue
            text = io.TextIOWrapper(spilled, encoding="utf-8", newline="")
            out = io.TextIOWrapper(file, encoding="utf-8", newline="", write_through=True)
            writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
            writer.writerows(csv.DictReader(text, fieldnames=part.columns))
            out.detach()  # leaves `file` open for the next part


def _parquet_table(rows: list[dict[str, Any]], columns: list[str]) -> Any:
    import pyarrow as pa

    return pa.table({name: [row.get(name) for row in rows] for name in columns})


def _parquet_bytes(rows: list[dict[str, Any]], columns: list[str]) -> bytes:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(_parquet_table(rows, columns), buffer)
    return buffer.getvalue()


def _typed_empty_parquet(columns: Mapping[str, type]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow_types = {str: pa.string(), int: pa.int64(), float: pa.float64()}
    buffer = io.BytesIO()
    pq.write_table(pa.table({name: pa.array([], type=arrow_types[kind]) for name, kind in columns.items()}), buffer)
    return buffer.getvalue()


def _parquet_part(rows: list[dict[str, Any]], columns: list[str], path: str) -> None:
    import pyarrow.parquet as pq

    pq.write_table(_parquet_table(rows, columns), path)


def _join_parquet(parts: Sequence[_Part], columns: list[str], file: BinaryIO) -> None:
    """The parts as row groups of one file, of the types the whole table would have had: a column
    of ints in one part and floats in another is float, one all empty in a part takes the others' type."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    unified = pa.unify_schemas([pq.read_schema(part.path) for part in parts], promote_options="permissive")
    schema = pa.schema([unified.field(name) for name in columns])
    with pq.ParquetWriter(file, schema) as writer:
        for part in parts:
            table = pq.read_table(part.path)
            for name in columns:
                if name not in part.columns:
                    table = table.append_column(name, pa.nulls(table.num_rows, schema.field(name).type))
            writer.write_table(table.select(columns).cast(schema))


# The process's own output named as a file (`--out /dev/stdout`): written through its descriptor, so
# that a shell's `> table.csv` or `>> log` does what the shell set up, never checked or replaced as
# the file behind it.
STANDARD_STREAMS = {"/dev/stdout": 1, "/dev/fd/1": 1, "/proc/self/fd/1": 1,
                    "/dev/stderr": 2, "/dev/fd/2": 2, "/proc/self/fd/2": 2}


def standard_stream(url: str) -> int | None:
    """The descriptor of the process's stdout or stderr where `url` names it, else None."""
    return STANDARD_STREAMS.get(url.removeprefix("file://"))


def check_output_file(url: str, overwrite: bool = False, storage_options: StorageOptions = None) -> None:
    """Refuse an output that is no file name, a folder (or a name ending in a separator), below a
    file, inside a zarr store, in a bucket that does not exist, or an existing file (unless
    `overwrite`); OutputError names it and what would be lost. stdout and stderr pass."""
    if standard_stream(url) is not None:
        return
    if not url.strip():
        raise OutputError("the output file name is empty: name a file to write")
    if url.endswith(("/", os.sep)):
        raise OutputError(f"'{url}' names a folder: name a file to write (a name ending in .csv or .parquet)")
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


def _write(url: str, write: Callable[[BinaryIO], object], storage_options: StorageOptions, spill: str | None = None) -> None:
    """Write to `url` what `write` writes into a file: a local file through a temporary file and a
    rename, so that a full disk never leaves a partial table that looks complete; a device or pipe
    (/dev/stdout) written into, never replaced; on object storage one upload, whole or nothing (a
    table spilled in parts joined into a file in the `spill` folder first). OutputError naming
    `url` on failure."""
    fs, path = filesystem(url, storage_options)
    try:
        if (descriptor := standard_stream(url)) is not None:
            sys.stdout.flush()
            with os.fdopen(os.dup(descriptor), "wb") as stream:
                write(stream)
        elif not isinstance(fs, LocalFileSystem):
            _upload(url, write, fs, path, storage_options, spill)
        elif os.path.exists(path) and not os.path.isfile(path):
            with open(path, "wb") as device:
                write(device)
        else:
            with file_replaced_atomically(os.path.realpath(path)) as temporary, open(temporary, "wb") as file:
                write(file)  # through a link, to the file it names
    except BrokenPipeError:  # `--out /dev/stdout | head`: the command ends quietly, as `results | head` does
        raise
    except OSError as error:
        raise write_failure(url, error) from error


def _upload(url: str, write: Callable[[BinaryIO], object], fs: AbstractFileSystem, path: str,
            storage_options: StorageOptions, spill: str | None) -> None:
    if spill is None:  # a table written whole: one PUT
        buffer = io.BytesIO()
        write(buffer)
        write_bytes(url, buffer.getvalue(), storage_options)
        return
    joined = os.path.join(spill, "joined")
    with open(joined, "wb") as file:
        write(file)
    if parent := posixpath.dirname(path):
        fs.makedirs(parent, exist_ok=True)
    fs.put_file(joined, path)  # a multipart upload on S3: the object appears whole or not at all


def write_failure(url: str, error: OSError) -> OutputError:
    """The OutputError of a file that could not be written, with the system's reason."""
    return OutputError(f"cannot write '{url}': {os_error_reason(error)}")
