"""What the commands print: progress bars, tables of images, scores and metrics, and the exit
status of a segmentation batch."""

from __future__ import annotations

import math
import sys
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cellseg.cli_parser_base import PARTLY_FAILED
from cellseg.redact import newlines_escaped, redact_text, redact_url

if TYPE_CHECKING:
    from cellseg.jobs_plan import SegmentPreview
    from cellseg.store import ResultStore

INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)


def batch_status(failed: int) -> int:
    """The exit status of a segmentation batch, said on its last line when it is not 0: 0 when
    every image is done or skipped, PARTLY_FAILED when any image failed."""
    if not failed:
        return 0
    print(f"{failed} image{'s' if failed > 1 else ''} failed (listed above); the rest are done, and the next run "
          f"tries the failed ones again (exit status {PARTLY_FAILED})")
    return PARTLY_FAILED


PREVIEW_IDS = 10  # of the images a dry run would segment, named


def print_preview(preview: SegmentPreview, source_url: str, store_url: str) -> int:
    """What a segmentation run would do, as `--dry-run` found it (`preview_segmentation`); status 0."""
    def some(ids: Sequence[str]) -> str:
        more = f" and {len(ids) - PREVIEW_IDS} more" if len(ids) > PREVIEW_IDS else ""
        return ", ".join(ids[:PREVIEW_IDS]) + more

    plural = {True: "s", False: ""}
    print("dry run: no model loaded, nothing written")
    print(f"  model: {preview.model}")
    print(f"  store: {redact_url(store_url)} " + ("(exists)" if preview.store_exists else "(new: the run creates it)"))
    count = len(preview.to_segment)
    if count:
        parts = [f"{len(preview.retried)} failed in an earlier run"] if preview.retried else []
        parts += [f"{len(preview.blockwise)} block by block"] if preview.blockwise else []
        shards = f" in {preview.shards} shard{plural[preview.shards != 1]}" if preview.shards else ""
        print(f"would segment {count} image{plural[count != 1]}{shards}" + (f" ({', '.join(parts)})" if parts else "")
              + f": {some(preview.to_segment)}")
    elif preview.found:
        many = preview.found != 1
        print(f"would segment nothing: the {preview.found} image{plural[many]} under {redact_url(source_url)} "
              f"{'are' if many else 'is'} done or rejected")
    else:
        print(f"would segment nothing: no images found under {redact_url(source_url)}")
    if preview.skipped:
        print(f"would skip {len(preview.skipped)} already done")
    for problem in preview.rejected:
        print(f"  would reject: {problem['source_url']}: {problem['error']}")
    return 0


def progress(description: str, unit: str, total: int | None = None, leave: bool = False):
    """A tqdm bar on stderr when it is a terminal; nothing at all when piped or redirected."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=None, file=sys.stderr, leave=leave)


def print_cell_scores(cells: dict, label: str = "cells") -> None:
    """The cell-level summary of `summarise_instance_scores`: scores, then why cells did not match."""
    error = cells["count_error_median"]
    print(f"{label}: F1@0.5 {cells['f1_mean']:.4f} (pooled {cells['f1_pooled']:.4f}), DSB score "
          f"{cells['dsb_score_mean']:.4f}, median count error {'n/a' if error is None else f'{error:.1%}'}")
    print(f"cell errors: of {cells['true_cells_total']} true cells {cells['merged_total']} merged with a "
          f"neighbour, {cells['split_total']} split, {cells['missed_total']} missed; "
          f"{cells['extra_total']} of {cells['predicted_cells_total']} predicted cells extra")


def print_damaged(store: ResultStore) -> None:
    """A line naming the images of `store` found damaged while reading it, and how to repair them."""
    from cellseg.store_checks import damage_summary

    if store.damaged:
        print(redact_text(damage_summary(store.url, store.damaged)))


def print_metrics(metrics: dict[str, float]) -> None:
    for key, value in metrics.items():
        print(f"  {key:18} {value:.4f}")


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    columns = ("image_id", "cell_count", "mean_cell_area", "foreground_fraction", "mean_intensity_inside",
               "mean_intensity_outside")
    if not rows:
        return
    # As wide as the longest id (DSB2018's are 64 characters), counted in terminal columns.
    ids = [newlines_escaped(str(row["image_id"])) for row in rows]  # one row per line, whatever a file was named
    width = max(len(columns[0]), *(_columns(image_id) for image_id in ids))
    print("  ".join([_padded(columns[0], width)] + [f"{c:>22}" for c in columns[1:]]))
    for image_id, row in zip(ids, rows, strict=True):
        print("  ".join([_padded(image_id, width)] + [f"{fmt(row.get(c)):>22}" for c in columns[1:]]))


def _columns(text: str) -> int:
    """How many terminal columns `text` takes: wide (CJK) characters two, combining marks none."""
    return sum(0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
               for char in text)


def _padded(text: str, width: int) -> str:
    return text + " " * (width - _columns(text))


def fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)
