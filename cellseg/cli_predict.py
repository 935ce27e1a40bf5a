"""`cellseg predict`: segment a source's images into a store with a shipped, registered or given
model, with progress bars, and print what was done."""

from __future__ import annotations

import argparse
import logging
from contextlib import ExitStack
from typing import Any

from cellseg.cli_output import batch_status, print_damaged, print_preview, print_table, progress
from cellseg.cli_settings import command_settings
from cellseg.redact import newlines_escaped, redact_url
from cellseg.settings import CellsegSettings

PREDICT_TABLE_ROWS = 5  # of the store's images that `predict` prints after its summary


def run_predict(args: argparse.Namespace) -> int:
    settings = command_settings(args)  # before torch is imported: bad settings are refused at once
    from cellseg.bundled import BUNDLED_VERSION, DEFAULT_SHIPPED_MODEL, SHIPPED_MODELS, shipped_name
    from cellseg.jobs import SegmentJob, run_segmentation
    from cellseg.segment import cpu_line
    from cellseg.store import ResultStore

    if args.model is None and args.model_version is None:
        logging.getLogger("cellseg").info(
            "no --model given: using the shipped '%s' model (%s); fine-tune it on your own images for best results",
            DEFAULT_SHIPPED_MODEL, SHIPPED_MODELS[DEFAULT_SHIPPED_MODEL][0],
        )
    if args.model_version is not None:
        job = SegmentJob(source_url=args.images, store_url=args.out, registry_url=settings.registry_url,
                         model_version=args.model_version, predict=settings.predict)
    else:
        shipped = shipped_name(args.model or BUNDLED_VERSION)
        if not shipped:
            _check_not_a_version(args.model, settings)
        job = SegmentJob(source_url=args.images, store_url=args.out, registry_url=settings.registry_url,
                         model_version=shipped or "current", checkpoint_url=None if shipped else args.model,
                         predict=settings.predict)
    if args.dry_run:
        from cellseg.jobs_plan import preview_segmentation

        return print_preview(preview_segmentation(job), args.images, args.out)
    with ExitStack() as bars:
        scan = bars.enter_context(progress("reading store", "image"))
        segmenting: list[Any] = []

        def planned(pending: int) -> None:
            scan.close()
            segmenting.append(bars.enter_context(progress("segmenting", "image", total=pending, leave=True)))

        block_bars: dict[tuple[str, str], Any] = {}

        def block_done(image_id: str, step: str, done: int, blocks: int) -> None:
            # An image segmented block by block takes minutes: a bar per step under the images' bar.
            bar = block_bars.get((image_id, step))
            if bar is None:
                bar = block_bars[(image_id, step)] = progress(f"{image_id}: {step}", "block", total=blocks)
            bar.update(done - bar.n)
            if done == blocks:
                bar.close()

        report = run_segmentation(job, on_record=lambda _: scan.update(), on_plan=planned,
                                  on_image=lambda _: segmenting[0].update(), on_block=block_done)
        for bar in block_bars.values():  # a step that failed part way
            bar.close()
    if not (report.done or report.skipped or report.failed):
        print(f"no images found under {redact_url(args.images)}; nothing to do")
        return 0
    summary = report.summary()
    warned = f", {summary['warnings']} warnings" if summary["warnings"] else ""
    print(f"segmented {summary['done']}, skipped {summary['skipped']} already done, failed {summary['failed']}{warned} "
          f"in {summary['seconds']}s -> {redact_url(args.out)}")
    if summary["cpu_ms_per_image"]:
        print(f"  CPU per image: {cpu_line(summary['cpu_ms_per_image'])}")
    for failure in report.failed:
        print(newlines_escaped(f"  failed: {failure['source_url']}: {failure['error']}"))
    for warning in report.warnings:
        print(newlines_escaped(f"  warning: {warning['source_url']}: {warning['warning']}"))
    written = ResultStore.open(args.out, mode="r")
    statistics = written.statistics(among=report.done + report.skipped)  # not every image a large store holds
    if len(statistics) > PREDICT_TABLE_ROWS:
        print(f"the first {PREDICT_TABLE_ROWS} of these {len(statistics)} images "
              f"(cellseg results {redact_url(args.out)} --limit 0 shows all the store holds):")
    print_table(statistics[:PREDICT_TABLE_ROWS])
    print_damaged(written)
    return batch_status(len(report.failed))


def _check_not_a_version(model: str, settings: CellsegSettings) -> None:
    """Refuse `--model NAME` where NAME is no file but a version of the registry (or 'current'),
    saying that --model-version takes it."""
    from cellseg.io import filesystem
    from cellseg.registry import CURRENT, VERSION_NAME, Registry

    if not (model == CURRENT or VERSION_NAME.fullmatch(model)):
        return
    fs, path = filesystem(model)
    if fs.exists(path):
        return
    if model != CURRENT:
        try:
            Registry(settings.registry_url).resolve(model)
        except ValueError:  # no such version either (or no registry to ask): the missing file is the error
            return
    raise ValueError(f"--model takes a checkpoint file or a shipped model's name, and there is no file '{model}': "
                     f"for the {'current version' if model == CURRENT else 'version'} of registry "
                     f"'{redact_url(settings.registry_url)}' give --model-version {model}")
