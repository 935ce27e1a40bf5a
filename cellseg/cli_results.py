"""The commands that read a store of results: evaluate, results, export and verify."""

from __future__ import annotations

import argparse
import logging
import posixpath
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from cellseg.cli_output import print_cell_scores, print_damaged, print_table, progress
from cellseg.cli_parser_base import PARTLY_FAILED
from cellseg.cli_settings import command_settings
from cellseg.json_values import dumps
from cellseg.redact import redact_text, redact_url


def run_evaluate(args: argparse.Namespace) -> int:
    from cellseg.evaluate import evaluate_store
    from cellseg.store import ResultStore

    command_settings(args)
    result = evaluate_store(ResultStore.open(args.pred, mode="r"), args.masks, labels_url=args.labels)
    if args.json:
        print(dumps(result, indent=1))
        return 0
    print(f"{_images(result['images'])} scored")
    print(f"{'':8}" + "".join(f"{name:>11}" for name in result["mean"]))
    for kind in ("mean", "pooled"):
        print(f"{kind:8}" + "".join(f"{value:11.4f}" for value in result[kind].values()))
    errors = result["pixel_error"]
    swept = (f"best of thresholds 0.0-1.0: {errors['isbi2012_threshold']:.1f}" if errors["isbi2012_threshold"] is not None
             else "the stored masks; predict --save-probabilities to sweep thresholds")
    print(f"pixel error: {errors['misclassified']:.4f} of pixels misclassified; "
          f"ISBI 2012 definition (1 - F-score of cell pixels) {errors['isbi2012']:.4f}, at {swept}")
    regions = result["regions"]
    labelled = result["labelled_images"]
    truth = ("the true labels" if labelled == result["images"] else "the 4-connected components of the masks"
             if not labelled else f"the true labels of {_images(labelled)} and the masks' 4-connected components "
                                  f"of {_images(result['images'] - labelled)} (label images and binary masks mixed, "
                                  "so no cell scores)")
    print(f"adapted Rand error {regions['adapted_rand_error_mean']:.4f} (precision "
          f"{regions['adapted_rand_precision_mean']:.4f}, recall {regions['adapted_rand_recall_mean']:.4f}), "
          f"mean over images, cells against {truth}")
    if "instances" in result:
        print_cell_scores(result["instances"])
    if missing := result["missing_predictions"]:
        named = _first_names(missing)
        print(f"{_images(len(missing))} with a ground-truth mask and no finished prediction, left out of the "
              f"scores: {named}")
    if unmatched := result["missing_truths"]:
        print(f"{_images(len(unmatched))} of the store with no ground-truth mask under {redact_url(args.masks)}, left "
              f"out of the scores: {_first_names(unmatched)}")
    return 0


def _first_names(names: Sequence[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"


def run_results(args: argparse.Namespace) -> int:
    from cellseg.store import ResultStore

    command_settings(args)
    store = ResultStore.open(args.store, mode="r")
    with progress("reading store", "image") as bar:
        summary = store.summary(on_record=lambda _: bar.update())
    rows, failures, unfinished = summary.statistics, summary.failures, summary.unfinished
    if args.json:
        damaged = [{"image_id": image_id, "error": problem} for image_id, problem in sorted(store.damaged.items())]
        print(dumps({"statistics": rows, "failures": failures, "unfinished": unfinished, "damaged": damaged}, indent=1))
        return 0
    shown_rows, shown_failures, shown_unfinished = rows[: args.limit], failures[: args.limit], unfinished[: args.limit]
    left_out = (len(rows) + len(failures) + len(unfinished)
                - len(shown_rows) - len(shown_failures) - len(shown_unfinished))
    in_work = (f", {len(unfinished)} in progress or left by a stopped run{_shown(shown_unfinished, unfinished)}"
               if unfinished else "")
    print(f"{redact_url(args.store)}: {len(rows)} images done{_shown(shown_rows, rows)}, {len(failures)} failed"
          f"{_shown(shown_failures, failures)}{in_work}{'; --limit 0 shows all' if left_out else ''}")
    if models := Counter(str(row.get("model_version")) for row in rows if row.get("model_version")):
        print(f"{'model' if len(models) == 1 else 'models'}: "
              + ", ".join(f"{version} ({_images(count)})" for version, count in models.most_common()))
    print_table(shown_rows)
    for failure in shown_failures:
        # An image repaired after its metadata was lost no longer knows its source: name its id.
        print(f"  failed: {failure['source_url'] or failure['image_id']}: {failure['error']}")
    for image in shown_unfinished:
        print(f"  not finished: {image['source_url'] or image['image_id']}")
    if unfinished:
        # As `predict` sees them: a run still going finishes them, a stopped one left them to be redone.
        print(f"in progress or left by a stopped run: a run still going finishes them, else rerun `cellseg predict` "
              f"into {redact_url(args.store)} to finish them")
    print_damaged(store)
    return 0


def _shown(shown: Sequence[Any], rows: Sequence[Any]) -> str:
    """' (10 shown)' when `shown` leaves some of `rows` out, else nothing."""
    return f" ({len(shown)} shown)" if len(shown) < len(rows) else ""


def run_export(args: argparse.Namespace) -> int:
    from cellseg.plates import by_well
    from cellseg.store import ResultStore
    from cellseg.store_checks import damage_summary
    from cellseg.store_tables import CELL_ROW_TYPES, IMAGE_ROW_TYPES, WELL_ROW_TYPES
    from cellseg.tables import standard_stream, write_table

    command_settings(args)
    if args.labels:
        return _export_labels(args)
    if args.format in ("tiff", "png"):
        raise ValueError(f"--format {args.format} writes label images: add --labels cells (or mask)")
    suffix = posixpath.splitext(args.out)[1].lower()
    named = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}.get(suffix)
    given = args.format
    args.format, args.table = given or named or "csv", args.table or "cells"
    if args.group_by and args.table != "images":
        raise ValueError("--group-by well groups the per-image statistics: add --table images")
    store = ResultStore.open(args.store, mode="r")
    unit = "cell" if args.table == "cells" else "well" if args.group_by else "image"

    def rows() -> Iterator[dict[str, Any]]:  # read only once write_table has accepted the target
        if named is not None and named != args.format:
            logging.getLogger("cellseg").warning("writing %s into '%s', whose name says otherwise", args.format,
                                                 redact_url(args.out))
        elif named is None and given is None and suffix:  # cells.xlsx, cells.tsv: a table a spreadsheet would misread
            logging.getLogger("cellseg").warning("writing csv into '%s': a table is written as csv (a name ending in "
                                                 ".csv) or parquet (.parquet, or --format parquet)", redact_url(args.out))
        if args.group_by:
            statistics = list(store.statistics(read_cell_tables=True))
            wells = by_well(statistics)
            if statistics and not wells:  # before anything is written
                raise ValueError(f"no image of '{redact_url(args.store)}' lies in a plate's well (a field of an HCS "
                                 "plate, or an id such as A01_f1): nothing to group by well")
            yield from wells
        else:
            # The images table leaves out the images whose cell table is damaged, as the cells table
            # does: a join of the two would otherwise count cells that have no row.
            yield from store.cell_rows() if args.table == "cells" else store.statistics(read_cell_tables=True)

    with progress("exporting", unit) as bar:
        header = CELL_ROW_TYPES if args.table == "cells" else WELL_ROW_TYPES if args.group_by else IMAGE_ROW_TYPES
        count = write_table((bar.update() or row for row in rows()), args.out, args.format, overwrite=args.overwrite,
                            empty_columns=header)
    wrote = f"wrote {count} {unit}{'s' if count != 1 else ''} to {redact_url(args.out)}"
    if standard_stream(args.out) == 1:  # the table is stdout: what is said of it goes to stderr, as the log does
        logging.getLogger("cellseg").info(wrote)
        if store.damaged:
            logging.getLogger("cellseg").warning(damage_summary(store.url, store.damaged))
    else:
        print(wrote)
        print_damaged(store)  # left out of the table, which says so here
    return PARTLY_FAILED if store.damaged else 0  # a script must not take a table without them for the whole


def _export_labels(args: argparse.Namespace) -> int:
    from cellseg.label_export import export_labels
    from cellseg.store import ResultStore

    if args.table or args.group_by:
        raise ValueError("--labels writes label images, --table a table: give one of them")
    if args.format in ("csv", "parquet"):
        raise ValueError(f"--format {args.format} writes a table: label images are written as tiff or png")
    store = ResultStore.open(args.store, mode="r")
    with progress("exporting", "image") as bar:
        exported = export_labels(store, args.out, args.labels, args.format or "tiff", overwrite=args.overwrite,
                                 on_image=lambda _: bar.update(), on_plan=bar.reset)
    suffix = ".png" if args.format == "png" else ".tif"
    written = len(exported.written)
    print(f"wrote the {'cell labels' if args.labels == 'cells' else 'masks'} of {written} "
          f"image{'s' if written != 1 else ''} to {redact_url(args.out)} as <image id>_{args.labels}{suffix}")
    if not_done := exported.not_done:
        shown_ids = ", ".join(not_done[:5]) + (", ..." if len(not_done) > 5 else "")
        counted = "1 image of the store has" if len(not_done) == 1 else f"{len(not_done)} images of the store have"
        print(f"{counted} no labels, not segmented (failed, or left unfinished by a run): {shown_ids}; "
              f"`cellseg results {redact_url(args.store)}` says why")
    print_damaged(store)
    return PARTLY_FAILED if store.damaged else 0


def run_verify(args: argparse.Namespace) -> int:
    from cellseg.verify import STORE_METADATA, verify_store

    command_settings(args)
    with progress("verifying", "image") as bar:
        report = verify_store(args.store, repair=args.repair, read_data=args.read_data, on_image=lambda _: bar.update())
    for damage in report.broken:
        where = "store metadata" if damage.image_id == STORE_METADATA else f"image '{damage.image_id}'"
        print(redact_text(f"broken: {where}: {damage.problem}"))
    if not report.images_checked:
        print(f"images not checked: the store's metadata must be repaired first "
              f"(cellseg verify {redact_url(args.store)} --repair)" if report.repairable else
              "images not checked: no image group under it is a cellseg result, so it is no results store to repair")
    print(f"{report.checked} images checked, {len(report.broken)} broken")
    images = [damage for damage in report.broken if damage.image_id != STORE_METADATA]
    if report.repaired and len(images) < len(report.broken):
        print("repaired: the store's metadata rewritten")
    for damage in report.unrepaired:
        print(redact_text(f"not repaired: image '{damage.image_id}': {damage.problem}"))
    left = {damage.image_id for damage in report.unrepaired}
    images = [damage for damage in images if damage.image_id not in left]
    if report.repaired and images:
        print(f"repaired: {len(images)} images marked not done; the next `cellseg predict` (or `cellseg flow "
              f"segment-images`) into {redact_url(args.store)} segments them again")
    elif report.broken and not report.repaired and report.repairable:
        # A repair without --read-data would not see the chunks that only decoding found damaged.
        print(f"to repair: cellseg verify {redact_url(args.store)}{' --read-data' if args.read_data else ''} --repair")
    return 1 if (report.broken and not report.repaired) or report.unrepaired else 0
