"""Write rows (dicts with the same keys) as CSV or Parquet, to a local path or any fsspec URL."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from typing import Any

from cellseg.io import StorageOptions, write_bytes


def write_table(rows: Iterable[dict[str, Any]], url: str, table_format: str = "csv",
                storage_options: StorageOptions = None) -> int:
    """Write `rows` to `url` as `table_format` ('csv' or 'parquet'); returns the number of rows.

    Columns are the keys of the first row, in order. Parquet needs pyarrow (the `tables` extra).
    """
    rows = list(rows)
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
    write_bytes(url, data, storage_options)
    return len(rows)
