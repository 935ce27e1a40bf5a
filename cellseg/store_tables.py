"""A store's tables: the per-image statistics, the failed and unfinished images, and every cell's
measurements as rows."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from cellseg.measure import CELL_COLUMNS, INTEGER_COLUMNS
from cellseg.plates import same_columns, source_columns
from cellseg.redact import redact_text
from cellseg.stats import STATISTIC_FIELDS
from cellseg.store_arrays import StoreArrays
from cellseg.store_checks import DONE, FAILED, DamagedImage
from cellseg.store_records import mapped_ahead

# The columns of `cell_rows` and `statistics` that every store has (pixel sizes and plates add
# more): the header of an exported table without rows.
CELL_ROW_COLUMNS = ("image_id", *CELL_COLUMNS)
IMAGE_ROW_COLUMNS = ("image_id", "source_url", "model_version", *STATISTIC_FIELDS, "status")
# Each column's type in an exported table (a table without rows keeps them: `tables.write_table`).
CELL_ROW_TYPES: dict[str, type] = {name: str if name == "image_id" else int if name in INTEGER_COLUMNS else float
                                   for name in CELL_ROW_COLUMNS}
IMAGE_ROW_TYPES: dict[str, type] = {name: int if name in ("cell_count", "total_cell_area") else float
                                    if name in STATISTIC_FIELDS else str for name in IMAGE_ROW_COLUMNS}
WELL_ROW_TYPES: dict[str, type] = {"well": str, "images": int, "fields": int}
TABLE_READERS = 4  # cell tables read at once by `cell_rows`
TABLES_AHEAD = 8  # and read ahead of the one whose rows go out: at most 8 x a 65,536-row chunk (10 MB each)


class StoreTables(StoreArrays):
    """The tables of a store's images (`cellseg.store.ResultStore`)."""

    def statistics(self, on_record: Callable[[str], None] | None = None,
                   read_cell_tables: bool = False, among: Collection[str] | None = None) -> list[dict[str, Any]]:
        """The per-image statistics table: one row per done image (of those of `among`). With
        `read_cell_tables`, an image whose cell table is damaged is left out as `cell_rows` leaves it
        out (with a warning, noted in `damaged`), so that the two tables join: its statistics would
        count cells it has no row of."""
        rows = []
        for image_id, record in self.records(on_record, among):
            if record.get("status") != DONE:
                continue
            if read_cell_tables:
                try:
                    self.checked_cell_table(image_id, record)
                except DamagedImage as error:
                    self.note_damage(image_id, error.problem)
                    continue
            rows.append(_statistics_row(image_id, record))
        return same_columns(rows)

    def failures(self) -> list[dict[str, Any]]:
        """Images whose last attempt failed, with the error."""
        return self.summary().failures

    def unfinished(self) -> list[dict[str, Any]]:
        """Images neither done nor failed, with their status ("writing", or None for a group with no
        record yet): being written by a run now, or left so by a run that stopped; the next run into
        the store segments them (a block-wise one from the blocks it finished)."""
        return self.summary().unfinished

    def summary(self, on_record: Callable[[str], None] | None = None) -> StoreSummary:
        """`statistics()`, `failures()` and `unfinished()` from one pass over the images' metadata
        (on object storage, each image's metadata is a request)."""
        rows: list[dict[str, Any]] = []
        failures: list[dict[str, Any]] = []
        unfinished: list[dict[str, Any]] = []
        for image_id, record in self.records(on_record):
            status, source_url = record.get("status"), _shown(record.get("source_url"))
            if status == DONE:
                rows.append(_statistics_row(image_id, record))
            elif status == FAILED:
                failures.append({"image_id": image_id, "source_url": source_url, "error": _shown(record.get("error"))})
            else:
                unfinished.append({"image_id": image_id, "source_url": source_url, "status": status})
        return StoreSummary(same_columns(rows), failures, unfinished)

    def cell_rows(self) -> Iterator[dict[str, Any]]:
        """Every cell of every done image that has measurements, as {"image_id", column: value} rows.
        A damaged image is left out with a warning and noted in `damaged`."""
        done = ((image_id, record) for image_id, record in self.records() if record.get("status") == DONE)
        # The next tables read on threads while this one's rows go out: one at a time, each was a
        # wait of its own (1 ms on local disk, tens on object storage, for every image of the store)
        with ThreadPoolExecutor(max_workers=TABLE_READERS) as pool:
            for image_id, table, problem in mapped_ahead(pool, self._cell_table_or_problem, done, TABLES_AHEAD):
                if problem is not None:
                    self.note_damage(image_id, problem)
                    continue
                if table is None:
                    continue
                columns, chunks = table
                integer = [name in INTEGER_COLUMNS for name in columns]
                for rows in chunks:
                    for row in rows.tolist():  # Python floats at once: 3x faster than numpy's scalars one by one
                        yield {"image_id": image_id, **{name: int(value) if whole else value
                                                        for name, whole, value in zip(columns, integer, row, strict=True)}}

    def _cell_table_or_problem(self, entry: tuple[str, dict[str, Any]]
                               ) -> tuple[str, tuple[list[str], Iterator[np.ndarray]] | None, str | None]:
        image_id, record = entry
        try:
            return image_id, self.checked_cell_table(image_id, record), None
        except DamagedImage as error:
            return image_id, None, error.problem


@dataclass(frozen=True)
class StoreSummary:
    """A store's images by status, as `ResultStore.statistics`, `failures` and `unfinished` list them."""

    statistics: list[dict[str, Any]]
    failures: list[dict[str, Any]]
    unfinished: list[dict[str, Any]]


def _shown(text: Any) -> Any:
    """A stored URL or error as shown: stores written before cellseg redacted them may hold credentials."""
    return redact_text(text) if isinstance(text, str) else text


def _statistics_row(image_id: str, record: dict[str, Any]) -> dict[str, Any]:
    """The statistics table's row of a done image, from its record."""
    model = record.get("model", {})
    return {
        "image_id": image_id,
        "source_url": _shown(record.get("source_url")),
        "model_version": model.get("version"),
        **record.get("statistics", {}),
        **source_columns(image_id, record.get("source"), record.get("statistics")),
        "status": DONE,
    }
