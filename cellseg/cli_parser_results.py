"""The arguments of the commands on images and results stores: predict, evaluate, results, export
and verify; their functions are in `cellseg.cli_predict` and `cellseg.cli_results`."""

from __future__ import annotations

import argparse

from cellseg.cli_parser_base import DRY_RUN_HELP, EXIT_STATUS_HELP, PARTLY_FAILED, add_command, row_limit
from cellseg.cli_parser_flags import PREDICT_FLAGS, REGISTRY_FLAG, add_flags


def add_predict(commands: argparse._SubParsersAction) -> None:
    """`cellseg predict`: images segmented into a store."""
    predict = add_command(commands, "predict", "predict", help="segment images into a zarr results store",
                          epilog=EXIT_STATUS_HELP)
    chosen_model = predict.add_mutually_exclusive_group()
    chosen_model.add_argument("--model", help="checkpoint URL (e.g. runs/x/best.pt) or a shipped model's name (nuclei, "
                                              "general); default: the shipped nuclei model")
    chosen_model.add_argument("--model-version", metavar="VERSION",
                              help="a version of the registry (--registry), or 'current': the one promoted last")
    add_flags(predict, [REGISTRY_FLAG])
    predict.add_argument("--images", required=True, help="directory URL of images to segment, or one image file")
    predict.add_argument("--out", required=True, help="zarr store URL; created if missing, done images skipped")
    predict.add_argument("--dry-run", action="store_true", help=DRY_RUN_HELP)
    add_flags(predict, PREDICT_FLAGS)


def add_evaluate(commands: argparse._SubParsersAction) -> None:
    """`cellseg evaluate`: a store scored against ground truth."""
    evaluate = add_command(commands, "evaluate", "evaluate", help="score a results store against ground-truth masks")
    evaluate.add_argument("--pred", required=True, help="zarr results store URL")
    evaluate.add_argument("--masks", required=True,
                          help="directory URL of ground-truth masks: binary, or instance label images (one integer "
                               "per cell, as train reads them), which give the cell scores too")
    evaluate.add_argument("--labels", help="directory URL of ground-truth instance label images (one value per cell): "
                                           "adds F1 at IoU 0.5, the DSB2018 score and the cell count error")
    evaluate.add_argument("--json", action="store_true", help="print the full result as JSON")


def add_results(commands: argparse._SubParsersAction) -> None:
    """`cellseg results`: a store summarised."""
    results = add_command(commands, "results", "results", help="summarise a results store")
    results.add_argument("store", help="zarr results store URL")
    results.add_argument("--json", action="store_true", help="print all statistics rows as JSON")
    results.add_argument("--limit", type=row_limit, default=10, help="rows to show, 0 for all (default 10)")


def add_export(commands: argparse._SubParsersAction) -> None:
    """`cellseg export`: a store's table or label images written out."""
    export = add_command(commands, "export", "export", help="write a store's per-cell (or per-image) table as CSV or "
                                                             "Parquet, or its label images as TIFF or PNG files",
                         description="A table (--table, the default: one row per cell) into the file OUT, or with "
                                     "--labels each done image's cell labels or mask as a file <image id>_cells.tif "
                                     "(or _mask) in the folder OUT, for Fiji, CellProfiler, QuPath or any tool that "
                                     "reads label images from files.",
                         epilog=f"Exit status 0: written; {PARTLY_FAILED}: written without the store's damaged images, "
                                "named with the repair; 2: bad usage or an OUT refused.")
    export.add_argument("store", help="zarr results store URL")
    export.add_argument("--format", choices=("csv", "parquet", "tiff", "png"),
                        help="csv or parquet for a table (default: as --out is named, .csv or .parquet; else "
                             "csv); tiff (default) or png for --labels: cell labels as uint16 (a TIFF's uint32 "
                             "above 65,535 cells), masks as uint8; a large image is written as a tiled TIFF")
    export.add_argument("--table", choices=("cells", "images"),
                        help="one row per cell (default) or the per-image statistics")
    export.add_argument("--group-by", choices=("well",), dest="group_by",
                        help="with --table images: one row per well of a plate (cells and areas summed, the other "
                             "statistics averaged over its fields)")
    export.add_argument("--labels", choices=("cells", "mask"),
                        help="write label images instead of a table, one file per done image into the folder OUT: "
                             "cells (0 background, 1..N one number per cell) or mask (0 background, 255 cells)")
    export.add_argument("--out", required=True,
                        help="file to write, or folder with --labels (local path or URL); never inside a zarr store")
    export.add_argument("--overwrite", action="store_true", help="replace OUT (with --labels: its files) if it exists")


def add_verify(commands: argparse._SubParsersAction) -> None:
    """`cellseg verify`: a store checked for damage, and repaired."""
    verify = add_command(commands, "verify", "verify", help="check a results store for damage; --repair marks broken "
                                                            "images to be segmented again",
                         description="Checks the store's metadata and every image: metadata readable, and for done "
                                     "images every array present, of its shape and type, with all chunks stored. "
                                     "Exit status 0: nothing broken (or all repaired); 1: broken images found.")
    verify.add_argument("store", help="zarr results store URL")
    verify.add_argument("--repair", action="store_true",
                        help="mark each broken image not done (its failure: 'damaged: ...'), so that the next predict "
                             "or segment-images run segments it again; rewrite unreadable metadata")
    verify.add_argument("--read-data", action="store_true",
                        help="also read every chunk of every done image (reads the whole store) to find chunks that "
                             "cannot be decoded")
