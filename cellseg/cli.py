"""The `cellseg` command: parse flags into settings and jobs, call the library's recipe, print.

synth, train, predict, evaluate, results, export, models and config run without Prefect; flow,
tune and serve run the Prefect flows and deployments (the `orchestration` extra). Object-storage
endpoints and credentials come from the settings (`storage`), the environment or fsspec's
config files, never from flags.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import logging
import math
import os
import posixpath
import select
import sys
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext, redirect_stderr
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from cellseg import __version__
from cellseg.cli_parser import JOB, PARTLY_FAILED, SETTING, build_parser, given
from cellseg.json_values import dumps
from cellseg.redact import redact_text, redact_url, shown, terminal_safe
from cellseg.settings import CellsegSettings, config_file_path, describe_invalid, load_settings

if TYPE_CHECKING:
    from cellseg.job_config import TuneJob
    from cellseg.store import ResultStore

ORCHESTRATION_EXTRA = "pip install 'cellseg[orchestration]'"
PREDICT_TABLE_ROWS = 5  # of the store's images that `predict` prints after its summary
Run = Callable[[argparse.Namespace], int]


def _settings(args: argparse.Namespace, overrides: dict[str, Any] | None = None) -> CellsegSettings:
    """The command's settings: its flags (and `overrides`) over the environment over --config;
    storage options are handed to fsspec before anything is read."""
    nested = given(args, SETTING)
    for section, values in (overrides or {}).items():
        nested[section] = {**values, **nested.get(section, {})} if isinstance(values, dict) else values
    settings = load_settings(getattr(args, "config", None), nested)
    settings.apply_storage()
    return settings


def _needs_orchestration(command: str) -> None:
    """A one-line error naming the extra to install when Prefect (or Dask's runner) is missing.
    Also keeps the Prefect server that a flow command starts for itself (no PREFECT_API_URL) from
    reporting to Prefect's telemetry, unless the environment says otherwise (on a machine without
    internet every run's output showed a Prefect ERROR line for it), and out of Ctrl-C's way
    (`flows.temporary_server`)."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    try:
        import prefect  # noqa: F401
        import prefect_dask  # noqa: F401
    except ImportError as error:
        raise ModuleNotFoundError(f"`cellseg {command}` runs Prefect flows, but {error.name} is not installed: "
                                  f"{ORCHESTRATION_EXTRA}") from error
    from cellseg.flows.temporary_server import keep_temporary_server_from_ctrl_c

    keep_temporary_server_from_ctrl_c()


def _prefect_api_error(error: BaseException) -> str | None:
    """One line for a Prefect API that a flow command cannot use: PREFECT_API_URL unreachable or
    answering with an error, or the temporary server Prefect starts without it too slow to start;
    None for other errors (and when Prefect was never imported)."""
    if "prefect" not in sys.modules:
        return None
    import httpx
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if isinstance(error, RuntimeError) and str(error).startswith("Timed out while attempting to connect to ephemeral"):
        return (f"the temporary Prefect server (PREFECT_API_URL is not set) did not start within "
                f"{PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()} s: on a busy machine raise "
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or run `prefect server start` and set PREFECT_API_URL")
    cause: BaseException | None = error
    for _ in range(16):  # causes can form loops
        if cause is None:
            break
        if isinstance(cause, httpx.TransportError | httpx.HTTPStatusError):
            api = f" at {redact_url(PREFECT_API_URL.value())}" if PREFECT_API_URL.value() else ""
            what = (f"answered {cause.response.status_code}" if isinstance(cause, httpx.HTTPStatusError)
                    else f"cannot be reached ({type(cause).__name__}: {cause})")
            return (f"the Prefect API{api} {what}: start it (`prefect server start`), fix PREFECT_API_URL, or unset "
                    "it to run on a temporary server")
        cause = cause.__cause__ or cause.__context__
    return None


# synth -------------------------------------------------------------------------------------------


def _run_synth(args: argparse.Namespace) -> int:
    from cellseg.synth import write_dataset

    _settings(args)
    ids = write_dataset(args.out, args.count, args.size, args.seed, args.bit_depth, args.polarity, args.vary_size,
                        overwrite=args.overwrite)
    print(f"wrote {len(ids)} image{'s' if len(ids) != 1 else ''} with masks and labels under {redact_url(args.out)}")
    return 0


# train -------------------------------------------------------------------------------------------


def _run_train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from cellseg.jobs import TrainJob, run_training

    settings = _settings(args)
    job = TrainJob(images_url=args.images, masks_url=args.masks, registry_url=settings.registry_url,
                   model=settings.model, training=settings.training, predict=settings.predict)
    with _progress("training", "epoch", total=job.training.epochs, leave=True) as bar, \
            logging_redirect_tqdm(loggers=[logging.getLogger()]):
        def advance(record: dict[str, float]) -> None:
            bar.update(int(record["epoch"]) - bar.n)
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("train_loss", "val_dice") if k in record})

        outcome = run_training(job, args.out, resume=args.resume, on_epoch=advance, overwrite=args.overwrite)
    result = outcome.result
    print(f"{result.stop_reason}; {result.best_described}")
    _print_metrics({k: v for k, v in result.best_metrics.items() if k.startswith("val_")} or result.best_metrics)
    if outcome.cells:
        _print_cell_scores(outcome.cells, label=f"validation cells ({outcome.cells['images']} images, as `predict` segments them)")
    print(f"checkpoint: {result.best_checkpoint}\nhistory:    {result.history_path}")
    for picture in outcome.pictures:
        print(f"picture:    {picture}")
    return 0


# predict, evaluate, results, export --------------------------------------------------------------


def _run_predict(args: argparse.Namespace) -> int:
    settings = _settings(args)  # before torch is imported: bad settings are refused at once
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
    with ExitStack() as bars:
        scan = bars.enter_context(_progress("reading store", "image"))
        segmenting: list[Any] = []

        def planned(pending: int) -> None:
            scan.close()
            segmenting.append(bars.enter_context(_progress("segmenting", "image", total=pending, leave=True)))

        block_bars: dict[tuple[str, str], Any] = {}

        def block_done(image_id: str, step: str, done: int, blocks: int) -> None:
            # An image segmented block by block takes minutes: a bar per step under the images' bar.
            bar = block_bars.get((image_id, step))
            if bar is None:
                bar = block_bars[(image_id, step)] = _progress(f"{image_id}: {step}", "block", total=blocks)
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
        print(f"  failed: {failure['source_url']}: {failure['error']}")
    for warning in report.warnings:
        print(f"  warning: {warning['source_url']}: {warning['warning']}")
    written = ResultStore.open(args.out, mode="r")
    statistics = written.statistics()
    if len(statistics) > PREDICT_TABLE_ROWS:
        print(f"the first {PREDICT_TABLE_ROWS} of the store's {len(statistics)} images "
              f"(cellseg results {redact_url(args.out)} --limit 0 shows all):")
    _print_table(statistics[:PREDICT_TABLE_ROWS])
    _print_damaged(written)
    return _batch_status(len(report.failed))


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


def _run_evaluate(args: argparse.Namespace) -> int:
    from cellseg.evaluate import evaluate_store
    from cellseg.store import ResultStore

    _settings(args)
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
        _print_cell_scores(result["instances"])
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


def _run_results(args: argparse.Namespace) -> int:
    from cellseg.store import ResultStore

    _settings(args)
    store = ResultStore.open(args.store, mode="r")
    with _progress("reading store", "image") as bar:
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
    _print_table(shown_rows)
    for failure in shown_failures:
        # An image repaired after its metadata was lost no longer knows its source: name its id.
        print(f"  failed: {failure['source_url'] or failure['image_id']}: {failure['error']}")
    for image in shown_unfinished:
        print(f"  not finished: {image['source_url'] or image['image_id']}")
    if unfinished:
        # As `predict` sees them: a run still going finishes them, a stopped one left them to be redone.
        print(f"in progress or left by a stopped run: a run still going finishes them, else rerun `cellseg predict` "
              f"into {redact_url(args.store)} to finish them")
    _print_damaged(store)
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from cellseg.plates import by_well
    from cellseg.store import ResultStore
    from cellseg.store_tables import CELL_ROW_COLUMNS, IMAGE_ROW_COLUMNS
    from cellseg.tables import write_table

    _settings(args)
    if args.labels:
        return _export_labels(args)
    if args.format in ("tiff", "png"):
        raise ValueError(f"--format {args.format} writes label images: add --labels cells (or mask)")
    args.format, args.table = args.format or "csv", args.table or "cells"
    if args.group_by and args.table != "images":
        raise ValueError("--group-by well groups the per-image statistics: add --table images")
    store = ResultStore.open(args.store, mode="r")
    unit = "cell" if args.table == "cells" else "well" if args.group_by else "image"
    suffix = posixpath.splitext(args.out)[1].lower()
    if suffix in (".csv", ".parquet", ".pq") and (suffix == ".csv") != (args.format == "csv"):
        logging.getLogger("cellseg").warning("writing %s into '%s', whose name says otherwise", args.format,
                                             redact_url(args.out))

    def rows() -> Iterator[dict[str, Any]]:  # read only once write_table has accepted the target
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

    with _progress("exporting", unit) as bar:
        header = CELL_ROW_COLUMNS if args.table == "cells" else ("well", "images", "fields") if args.group_by else IMAGE_ROW_COLUMNS
        count = write_table((bar.update() or row for row in rows()), args.out, args.format, overwrite=args.overwrite,
                            empty_columns=header)
    print(f"wrote {count} {unit}{'s' if count != 1 else ''} to {redact_url(args.out)}")
    _print_damaged(store)  # left out of the table, which says so here
    return PARTLY_FAILED if store.damaged else 0  # a script must not take a table without them for the whole


def _export_labels(args: argparse.Namespace) -> int:
    from cellseg.label_export import export_labels
    from cellseg.store import ResultStore

    if args.table or args.group_by:
        raise ValueError("--labels writes label images, --table a table: give one of them")
    if args.format in ("csv", "parquet"):
        raise ValueError(f"--format {args.format} writes a table: label images are written as tiff or png")
    store = ResultStore.open(args.store, mode="r")
    with _progress("exporting", "image") as bar:
        written = export_labels(store, args.out, args.labels, args.format or "tiff", overwrite=args.overwrite,
                                on_image=lambda _: bar.update())
    suffix = ".png" if args.format == "png" else ".tif"
    print(f"wrote the {'cell labels' if args.labels == 'cells' else 'masks'} of {len(written)} "
          f"image{'s' if len(written) != 1 else ''} to {redact_url(args.out)} as <image id>_{args.labels}{suffix}")
    _print_damaged(store)
    return PARTLY_FAILED if store.damaged else 0


def _run_verify(args: argparse.Namespace) -> int:
    from cellseg.verify import STORE_METADATA, verify_store

    _settings(args)
    with _progress("verifying", "image") as bar:
        report = verify_store(args.store, repair=args.repair, read_data=args.read_data, on_image=lambda _: bar.update())
    for damage in report.broken:
        where = "store metadata" if damage.image_id == STORE_METADATA else f"image '{damage.image_id}'"
        print(redact_text(f"broken: {where}: {damage.problem}"))
    if not report.images_checked:
        print(f"images not checked: the store's metadata must be repaired first "
              f"(cellseg verify {redact_url(args.store)} --repair)")
    print(f"{report.checked} images checked, {len(report.broken)} broken")
    images = [damage for damage in report.broken if damage.image_id != STORE_METADATA]
    if report.repaired and len(images) < len(report.broken):
        print("repaired: the store's metadata rewritten")
    if report.repaired and images:
        print(f"repaired: {len(images)} images marked not done; the next `cellseg predict` (or `cellseg flow "
              f"segment-images`) into {redact_url(args.store)} segments them again")
    elif report.broken and not report.repaired:
        # A repair without --read-data would not see the chunks that only decoding found damaged.
        print(f"to repair: cellseg verify {redact_url(args.store)}{' --read-data' if args.read_data else ''} --repair")
    return 1 if report.broken and not report.repaired else 0


# models, config ----------------------------------------------------------------------------------


def _run_models(args: argparse.Namespace) -> int:
    from cellseg.bundled import DEFAULT_SHIPPED_MODEL, SHIPPED_MODELS, model_card, shipped_name
    from cellseg.registry import Registry, RegistryError, RegistryMissing

    registry_url = _settings(args).registry_url
    registry = Registry(registry_url)
    version, checkpoint = getattr(args, "version", None), getattr(args, "checkpoint", None)
    needs_registry = args.action in ("promote", "rollback") or (
        args.action in ("show", "export") and not (checkpoint or shipped_name(version or "current")))
    if needs_registry:
        registry.check_exists()  # a misspelt --registry is refused as missing, not read as one without versions
    if args.action == "list":
        try:
            registry.check_exists()
            absent = False
        except RegistryMissing as missing:  # said, not refused: the shipped models below need no registry
            print(f"{missing}: nothing registered there")
            absent = True
        versions, unreadable = ([], {}) if absent else registry.scan()  # one damaged version never hides the others
        problems = [f"version {version}: {problem}" for version, problem in unreadable.items()]
        current = None
        try:
            current = None if absent else registry.current()
        except RegistryError as error:
            problems.append(str(error))
        if not versions and not problems and not absent:
            print(f"no models registered in {redact_url(registry_url)}")
        for meta in versions:
            marker = "*" if meta.version == current else " "
            print(f"{marker} {meta.version}  val_dice {_fmt(meta.metrics.get('val_dice'))}  epoch {meta.epoch}  "
                  f"dataset {str(meta.dataset_manifest_hash)[:12]}  registered {meta.registered[:19]}")
        for problem in problems:
            print(f"! {problem}")
        print("shipped with cellseg (cellseg models show NAME):")
        for shipped, (description, _) in SHIPPED_MODELS.items():
            print(f"  {shipped}{' (default)' if shipped == DEFAULT_SHIPPED_MODEL else ''}: {description}")
    elif args.action == "show":
        card_name = shipped_name(args.version)
        if card_name:
            print(dumps(model_card(card_name), indent=1))
        else:
            with _suggesting_a_shipped_model(args.version):
                meta = registry.get(args.version)
            # Where the checkpoint, its training history and pictures are, to copy or open.
            urls = {name: redact_url(registry.file_url(meta.version, name)) for name in ("checkpoint.pt", *meta.files)}
            print(dumps({**meta.model_dump(mode="json"), "urls": urls}, indent=1))
    elif args.action == "export":
        from cellseg.export import export_model
        from cellseg.model_source import ModelSource

        if args.checkpoint and args.version:
            raise ValueError(f"give a registered version ({args.version}) or --checkpoint, not both")
        with _suggesting_a_shipped_model(args.version):
            checkpoint, version = ModelSource(registry_url, args.version or "current", args.checkpoint).load()
        export_model(checkpoint, args.out, args.format, model_version=version, overwrite=args.overwrite)
        print(f"exported model {version} as {args.format} to {redact_url(args.out)} (input/normalisation/threshold in {redact_url(args.out)}.json)")
    elif args.action == "rollback":
        before, now = registry.rollback()
        print(f"{now} is current again in {redact_url(registry_url)} (was {before})")
    else:
        previous = registry.promote(args.version)
        promoted = registry.resolve(args.version)
        was = ("; it already was" if previous == promoted else f" (was {previous}; `cellseg models rollback` makes "
               "it current again)" if previous else "")
        print(f"{promoted} is now current in {redact_url(registry_url)}{was}")
    return 0


@contextmanager
def _suggesting_a_shipped_model(version: str | None) -> Iterator[None]:
    """A RegistryError of an unknown `version` raised again with the shipped model its name looks
    like a misspelling of (`nucleus`: did you mean the shipped model 'nuclei'?), where one is."""
    from cellseg.bundled import SHIPPED_MODELS
    from cellseg.registry import RegistryError

    try:
        yield
    except RegistryError as error:
        if version and (close := difflib.get_close_matches(version, SHIPPED_MODELS, n=1, cutoff=0.6)):
            raise RegistryError(f"{error}; did you mean the shipped model '{close[0]}'?") from error
        raise


def _run_config(args: argparse.Namespace) -> int:
    import yaml

    data = _settings(args).masked()
    if args.json:
        print(dumps(data, indent=1))
        return 0
    path = config_file_path(getattr(args, "config", None))
    print(f"# cellseg {__version__} settings: flags > CELLSEG_* environment > "
          f"{f'file {path}' if path else 'no settings file'} > defaults; secrets masked")
    print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


# flows, tune, serve (Prefect) --------------------------------------------------------------------


def _json_object(text: str, flag: str) -> dict[str, Any]:
    """The JSON object a flag such as --training-json gives; ValueError naming the flag otherwise."""
    try:
        value = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{flag} is not valid JSON ({error}): give a JSON object of fields") from error
    if not isinstance(value, dict):
        raise ValueError(f"{flag} gives {text!r}, not a JSON object of fields")
    return value


def _run_flow_train(args: argparse.Namespace) -> int:
    _needs_orchestration("flow train-unet")
    from cellseg.flows.train import train_unet
    from cellseg.jobs import TrainJob, with_settings

    settings = _settings(args, {"model": _json_object(args.model_json, "--model-json"),
                                "training": _json_object(args.training_json, "--training-json")})
    job = with_settings(TrainJob.model_validate({"images_url": args.images, "masks_url": args.masks, **given(args, JOB)}),
                        settings)
    result = train_unet(job)
    made_current = ("current" if job.promote else f"not current: `cellseg models promote {result['version']} "
                    f"--registry {redact_url(job.registry_url)}` makes it so")
    print(f"registered model {result['version']} ({result['stop_reason']}; {result['best_described']}), {made_current}")
    _print_metrics({f"val_{k}": v for k, v in result["metrics"].items() if not k.startswith("cells_")})
    if cells := {k.removeprefix("cells_"): v for k, v in result["metrics"].items() if k.startswith("cells_")}:
        _print_cell_scores(cells, label=f"validation cells ({cells['images']} images, as `predict` segments them)")
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def _run_flow_segment(args: argparse.Namespace) -> int:
    _needs_orchestration("flow segment-images")
    from cellseg.flows.segment import segment_images_flow
    from cellseg.jobs import SegmentJob, with_settings
    from cellseg.segment import cpu_line

    job = with_settings(SegmentJob.model_validate({"source_url": args.source, "store_url": args.store,
                                                   **given(args, JOB)}), _settings(args))
    _warn_when_dask_workers_cannot_report(job.dask_address)
    summary = segment_images_flow(job)
    print(f"segmented {summary['done']}, skipped {summary['skipped']} already done, failed {len(summary['failed'])} "
          f"with model {summary['model_version']} in {summary['seconds']}s -> {redact_url(args.store)}")
    if summary.get("cpu_ms_per_image"):
        print(f"  CPU per image: {cpu_line(summary['cpu_ms_per_image'])}")
    if summary.get("montage"):
        print(f"montage: {redact_url(summary['montage'])}")
    for failure in summary["failed"]:
        print(f"  failed: {failure['source_url']}: {failure['error']}")
    for warning in summary["warnings"]:
        print(f"  warning: {warning['source_url']}: {warning['warning']}")
    return _batch_status(len(summary["failed"]))


def _warn_when_dask_workers_cannot_report(dask_address: str | None) -> None:
    """Without PREFECT_API_URL a flow command runs on a temporary Prefect server of its own, which
    Dask workers do not report to: each starts one of its own, so the run finishes (results come
    back through Dask) but the tasks' states and logs never reach it."""
    from prefect.settings import PREFECT_API_URL

    if dask_address and not PREFECT_API_URL.value():
        logging.getLogger("cellseg").warning(
            "--dask-address without PREFECT_API_URL: the Dask workers cannot report to the temporary Prefect "
            "server of this command, so the tasks' progress and logs stay on the workers (the results still come "
            "back); set PREFECT_API_URL here and on the workers to a server all of them reach (infra/README.md)")


def _run_tune(args: argparse.Namespace) -> int:
    _needs_orchestration("tune")
    from cellseg.flows.temporary_server import shared_temporary_server
    from cellseg.flows.tune import tune_unet
    from cellseg.jobs import TuneJob, with_settings
    from cellseg.tune import NoTrialFinished, trial_rows

    fields = given(args, JOB)
    fields["training"] = _json_object(args.training_json, "--training-json") | fields.get("training", {})
    job = with_settings(TuneJob.model_validate({"images_url": args.images, "masks_url": args.masks, **fields}),
                        _settings(args))
    _warn_when_dask_workers_cannot_report(job.dask_address)
    before = set(os.listdir(job.work_dir)) if os.path.isdir(job.work_dir) else set()
    try:
        # The trials' processes on this machine report to it; a Dask worker elsewhere could not reach it.
        with shared_temporary_server() if job.dask_address is None else nullcontext():
            result = tune_unet(job)
    except NoTrialFinished as error:
        _print_trials(trial_rows(error.results), job)  # the table first: `main` ends with the error's line
        raise
    except KeyboardInterrupt:
        _stop_trial_processes()
        left = sorted(set(os.listdir(job.work_dir)) - before) if os.path.isdir(job.work_dir) else []
        where = (f"the trials' folders so far are left in {', '.join(os.path.join(job.work_dir, name) for name in left)}"
                 if left else "no trial had written anything")
        print(f"cellseg tune: interrupted; nothing was registered, and {where}; run the same command again to "
              f"search anew", file=sys.stderr)
        return INTERRUPTED
    _print_trials(result["trials"], job)
    best, registry = result["best"], redact_url(job.registry_url)
    params = ", ".join(f"{name} {value}" for name, value in best["params"].items())
    current = (" and made current" if job.promote
               else f"; not made current (cellseg models promote --registry {registry} {result['version']} does)")
    print(f"best: trial {best['number']} (val Dice {best['val_dice']:.4f}; {params}), registered as "
          f"{result['version']} in {registry}{current}")
    return 0


def _stop_trial_processes() -> None:
    """End the trials' processes after Ctrl-C. It ends the thread of Prefect's process pool that
    would tell them to stop, so they would wait for work and the interpreter for them at exit."""
    import multiprocessing

    children = multiprocessing.active_children()
    for child in children:
        child.terminate()
    for child in children:
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join(timeout=5)


def _print_trials(rows: Sequence[dict[str, Any]], job: TuneJob) -> None:
    """The table of a search's trials, best first, and a line saying how many ran of those asked for."""
    from cellseg.tune import TABLE_COLUMNS

    columns = [c for c in TABLE_COLUMNS if c != "status"]
    print("  ".join(f"{c:>13}" for c in columns) + "  status")
    for row in rows:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print("  ".join(f"{cell:>13}" for cell in cells) + f"  {row['status']}")
    failed = sum(row["status"] != "done" for row in rows)
    grid = job.space.size()
    asked = (f", of {job.trials} asked for: the search grid has only {grid} point{'s' if grid != 1 else ''}"
             if len(rows) < job.trials else f" of a {grid}-point search grid")
    print(f"{len(rows)} trial{'s' if len(rows) != 1 else ''} ran{asked}; {len(rows) - failed} done, {failed} failed")


def _run_serve(args: argparse.Namespace) -> int:
    _needs_orchestration("serve")
    from cellseg.deployments.serve import serve_all

    _settings(args)
    serve_all(nightly_source=args.nightly_source, nightly_store=args.nightly_store, cron=args.cron)
    return 0


# output ------------------------------------------------------------------------------------------


def _batch_status(failed: int) -> int:
    """The exit status of a segmentation batch, said on its last line when it is not 0: 0 when
    every image is done or skipped, PARTLY_FAILED when any image failed."""
    if not failed:
        return 0
    print(f"{failed} image{'s' if failed > 1 else ''} failed (listed above); the rest are done, and the next run "
          f"tries the failed ones again (exit status {PARTLY_FAILED})")
    return PARTLY_FAILED


def _progress(description: str, unit: str, total: int | None = None, leave: bool = False):
    """A tqdm bar on stderr when it is a terminal; nothing at all when piped or redirected."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=None, file=sys.stderr, leave=leave)


def _print_cell_scores(cells: dict, label: str = "cells") -> None:
    """The cell-level summary of `summarise_instance_scores`: scores, then why cells did not match."""
    error = cells["count_error_median"]
    print(f"{label}: F1@0.5 {cells['f1_mean']:.4f} (pooled {cells['f1_pooled']:.4f}), DSB score "
          f"{cells['dsb_score_mean']:.4f}, median count error {'n/a' if error is None else f'{error:.1%}'}")
    print(f"cell errors: of {cells['true_cells_total']} true cells {cells['merged_total']} merged with a "
          f"neighbour, {cells['split_total']} split, {cells['missed_total']} missed; "
          f"{cells['extra_total']} of {cells['predicted_cells_total']} predicted cells extra")


def _print_damaged(store: ResultStore) -> None:
    """A line naming the images of `store` found damaged while reading it, and how to repair them."""
    from cellseg.store_checks import damage_summary

    if store.damaged:
        print(redact_text(damage_summary(store.url, store.damaged)))


def _print_metrics(metrics: dict[str, float]) -> None:
    for key, value in metrics.items():
        print(f"  {key:18} {value:.4f}")


def _shown(shown: Sequence[Any], rows: Sequence[Any]) -> str:
    """' (10 shown)' when `shown` leaves some of `rows` out, else nothing."""
    return f" ({len(shown)} shown)" if len(shown) < len(rows) else ""


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    columns = ("image_id", "cell_count", "mean_cell_area", "foreground_fraction", "mean_intensity_inside",
               "mean_intensity_outside")
    if not rows:
        return
    # As wide as the longest id (DSB2018's are 64 characters), counted in terminal columns.
    width = max(len(columns[0]), *(_columns(str(row["image_id"])) for row in rows))
    print("  ".join([_padded(columns[0], width)] + [f"{c:>22}" for c in columns[1:]]))
    for row in rows:
        print("  ".join([_padded(str(row["image_id"]), width)] + [f"{_fmt(row.get(c)):>22}" for c in columns[1:]]))


def _columns(text: str) -> int:
    """How many terminal columns `text` takes: wide (CJK) characters two, combining marks none."""
    return sum(0 if unicodedata.combining(char) else 2 if unicodedata.east_asian_width(char) in "WF" else 1
               for char in text)


def _padded(text: str, width: int) -> str:
    return text + " " * (width - _columns(text))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (`cellseg results STORE | head -1`), as
    opposed to a broken connection elsewhere, which is an error."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll() (Windows), or stdout is no file
        return False


COMMANDS: dict[str, Run] = {
    "synth": _run_synth, "train": _run_train, "predict": _run_predict, "evaluate": _run_evaluate,
    "results": _run_results, "export": _run_export, "models": _run_models, "config": _run_config,
    "flow_train": _run_flow_train, "flow_segment": _run_flow_segment, "tune": _run_tune, "serve": _run_serve,
    "verify": _run_verify,
}


class RedactingFormatter(logging.Formatter):
    """Log lines with credentials masked (`redact_text`) and control characters escaped,
    whichever library logged them."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info and _explained(record.exc_info[1]):
            # Prefect logs a failed task's or flow's traceback; `main` says this error in one line.
            record = logging.makeLogRecord({**record.__dict__, "exc_info": None, "exc_text": None})
        return shown(super().format(record))


def _explained(error: BaseException | None) -> bool:
    """Whether `main` reports `error` in one line, which its traceback would only bury."""
    from cellseg.storage_errors import storage_error

    if isinstance(error, ValueError | FileNotFoundError | ModuleNotFoundError):
        return True
    return error is not None and storage_error(None, error) is not None


class TerminalSafeOutput:
    """stdout with control characters escaped: file names are printed, and a name holding an
    escape sequence must not drive the terminal."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._stream.write(terminal_safe(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


INTERRUPTED = 130  # the shell's status for a command ended by Ctrl-C (128 + SIGINT)
INTERRUPTED_HINTS = {
    "predict": "the images written so far are kept: run the same command again to segment the rest",
    "train": "the last finished epoch is kept in last.pt: add --resume to continue from it",
}


def main(argv: Sequence[str] | None = None) -> int:
    usage_errors = io.StringIO()
    try:
        with redirect_stderr(usage_errors):  # argparse echoes the arguments it refuses, URLs included
            args = build_parser().parse_args(argv)
    finally:
        sys.stderr.write(shown(usage_errors.getvalue()))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("cellseg").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from cellseg.storage_errors import storage_error

    stdout, sys.stdout = sys.stdout, TerminalSafeOutput(sys.stdout)
    try:
        status = COMMANDS[args.run](args)
        sys.stdout.flush()  # a reader that has gone (`| head -1`) shows up here, not at interpreter exit
        return status
    except KeyboardInterrupt:
        hint = INTERRUPTED_HINTS.get(args.command)
        print(f"cellseg {args.command}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError as error:
        if _stdout_reader_gone():
            # Python's advice: point stdout at devnull, so that the flush at exit cannot fail again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        print(f"cellseg {args.command}: error: {shown(str(error))}", file=sys.stderr)
    except ValidationError as error:
        print(f"cellseg {args.command}: invalid settings: {terminal_safe(describe_invalid(error))}", file=sys.stderr)
    # ValueError holds the library's own errors (CheckpointError, DatasetError, ImageReadError,
    # RegistryError, SettingsError, StoreError): named here, their modules would load torch for
    # commands that never touch a model.
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as error:
        print(f"cellseg {args.command}: error: {shown(str(error))}", file=sys.stderr)
    except Exception as error:
        # The Prefect API's own, then storage errors raised where no URL is named (StorageError
        # where one is: a ValueError, above); the Prefect client's errors chain connection errors too.
        if (line := _prefect_api_error(error) or storage_error(None, error)) is None:
            raise
        print(f"cellseg {args.command}: error: {shown(str(line))}", file=sys.stderr)
    finally:
        sys.stdout = stdout
    return 2


if __name__ == "__main__":
    sys.exit(main())
