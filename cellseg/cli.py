"""The `cellseg` command: parse flags into settings and jobs, call the library's recipe, print.

synth, train, predict, evaluate, results, export, models and config run without Prefect; flow,
tune and serve run the Prefect flows and deployments (the `orchestration` extra). Object-storage
endpoints and credentials come from the settings (`storage`), the environment or fsspec's
config files, never from flags.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

from pydantic import ValidationError

from cellseg import __version__
from cellseg.cli_options import (
    CONFIG_HELP,
    JOB,
    MODEL_FLAGS,
    PREDICT_FLAGS,
    REGISTRY_FLAG,
    SEGMENT_JOB_FLAGS,
    SETTING,
    TRAIN_JOB_FLAGS,
    TRAINING_FLAGS,
    TUNE_JOB_FLAGS,
    add_flags,
    given,
)
from cellseg.settings import CellsegSettings, config_file_path, load_settings

ORCHESTRATION_EXTRA = "pip install 'cellseg[orchestration]'"
Run = Callable[[argparse.Namespace], int]


def _command(group: argparse._SubParsersAction, name: str, run: Run | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """A (sub)command that also takes --config after its name."""
    parser = group.add_parser(name, **kwargs)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help=CONFIG_HELP)
    if run is not None:
        parser.set_defaults(run=run)
    return parser


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
    if importlib.util.find_spec("prefect") is None:
        raise ModuleNotFoundError(f"`cellseg {command}` runs Prefect flows, which are not installed: {ORCHESTRATION_EXTRA}")


# synth -------------------------------------------------------------------------------------------


def _run_synth(args: argparse.Namespace) -> int:
    from cellseg.synth import write_dataset

    _settings(args)
    ids = write_dataset(args.out, args.count, args.size, args.seed, args.bit_depth, args.polarity, args.vary_size)
    print(f"wrote {len(ids)} images with masks and labels under {args.out}")
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

        outcome = run_training(job, args.out, resume=args.resume, on_epoch=advance)
    result = outcome.result
    print(f"{result.stop_reason}; best epoch {result.best_epoch} of {len(result.history)}")
    _print_metrics({k: v for k, v in result.best_metrics.items() if k.startswith("val_")} or result.best_metrics)
    if outcome.cells:
        _print_cell_scores(outcome.cells, label=f"validation cells ({outcome.cells['images']} images, as `predict` segments them)")
    print(f"checkpoint: {result.best_checkpoint}\nhistory:    {result.history_path}")
    for picture in outcome.pictures:
        print(f"picture:    {picture}")
    return 0


# predict, evaluate, results, export --------------------------------------------------------------


def _run_predict(args: argparse.Namespace) -> int:
    from cellseg.jobs import SegmentJob, run_segmentation
    from cellseg.store import ResultStore

    settings = _settings(args)
    if args.model is None:
        logging.getLogger("cellseg").info(
            "no --model given: using the bundled general-purpose model (synthetic training data); "
            "train on your own images for best results"
        )
    job = SegmentJob(source_url=args.images, store_url=args.out, registry_url=settings.registry_url,
                     model_version="current" if args.model else "bundled", checkpoint_url=args.model,
                     predict=settings.predict)
    with ExitStack() as bars:
        scan = bars.enter_context(_progress("reading store", "image"))
        segmenting: list[Any] = []

        def planned(pending: int) -> None:
            scan.close()
            segmenting.append(bars.enter_context(_progress("segmenting", "image", total=pending, leave=True)))

        report = run_segmentation(job, on_record=lambda _: scan.update(), on_plan=planned,
                                  on_image=lambda _: segmenting[0].update())
    if not (report.done or report.skipped or report.failed):
        print(f"no images found under {args.images}; nothing to do")
        return 0
    summary = report.summary()
    print(f"segmented {summary['done']}, skipped {summary['skipped']} already done, failed {summary['failed']} "
          f"in {summary['seconds']}s -> {args.out}")
    for failure in report.failed:
        print(f"  failed: {failure['source_url']}: {failure['error']}")
    _print_table(ResultStore.open(args.out, mode="r").statistics()[:5])
    return 1 if report.failed and not report.done else 0


def _run_evaluate(args: argparse.Namespace) -> int:
    from cellseg.evaluate import evaluate_store
    from cellseg.store import ResultStore

    _settings(args)
    result = evaluate_store(ResultStore.open(args.pred, mode="r"), args.masks, labels_url=args.labels)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"{result['images']} images scored")
    print(f"{'':8}" + "".join(f"{name:>11}" for name in result["mean"]))
    for kind in ("mean", "pooled"):
        print(f"{kind:8}" + "".join(f"{value:11.4f}" for value in result[kind].values()))
    errors = result["pixel_error"]
    swept = (f"best of thresholds 0.0-1.0: {errors['isbi2012_threshold']:.1f}" if errors["isbi2012_threshold"] is not None
             else "the stored masks; predict --save-probabilities to sweep thresholds")
    print(f"pixel error: {errors['misclassified']:.4f} of pixels misclassified; "
          f"ISBI 2012 definition (1 - F-score of cell pixels) {errors['isbi2012']:.4f}, at {swept}")
    if "instances" in result:
        _print_cell_scores(result["instances"])
    if result["missing_predictions"]:
        print(f"{len(result['missing_predictions'])} ground-truth masks have no finished prediction")
    return 0


def _run_results(args: argparse.Namespace) -> int:
    from cellseg.store import ResultStore

    _settings(args)
    store = ResultStore.open(args.store, mode="r")
    with _progress("reading store", "image") as bar:
        rows = store.statistics(on_record=lambda _: bar.update())
    failures = store.failures()
    if args.json:
        print(json.dumps({"statistics": rows, "failures": failures}, indent=1))
        return 0
    print(f"{args.store}: {len(rows)} images done, {len(failures)} failed")
    _print_table(rows[: args.limit])
    for failure in failures[: args.limit]:
        print(f"  failed: {failure['source_url']}: {failure['error']}")
    return 0


def _run_export(args: argparse.Namespace) -> int:
    from cellseg.store import ResultStore
    from cellseg.tables import write_table

    _settings(args)
    store = ResultStore.open(args.store, mode="r")
    unit = "cell" if args.table == "cells" else "image"
    with _progress("exporting", unit) as bar:
        rows = store.cell_rows() if args.table == "cells" else iter(store.statistics())
        count = write_table((bar.update() or row for row in rows), args.out, args.format)
    print(f"wrote {count} {'cells' if args.table == 'cells' else 'images'} to {args.out}")
    return 0


# models, config ----------------------------------------------------------------------------------


def _run_models(args: argparse.Namespace) -> int:
    from cellseg.registry import Registry

    registry_url = _settings(args).registry_url
    registry = Registry(registry_url)
    if args.action == "list":
        current = registry.current()
        versions = registry.versions()
        if not versions:
            print(f"no models registered in {registry_url}")
        for meta in versions:
            marker = "*" if meta.version == current else " "
            print(f"{marker} {meta.version}  val_dice {_fmt(meta.metrics.get('val_dice'))}  epoch {meta.epoch}  "
                  f"dataset {str(meta.dataset_manifest_hash)[:12]}  registered {meta.registered[:19]}")
    elif args.action == "show":
        print(registry.get(args.version).model_dump_json(indent=1))
    elif args.action == "export":
        from cellseg.export import export_model
        from cellseg.model_source import ModelSource

        checkpoint, version = ModelSource(registry_url, args.version, args.checkpoint).load()
        export_model(checkpoint, args.out, args.format, model_version=version)
        print(f"exported model {version} as {args.format} to {args.out} (input/normalisation/threshold in {args.out}.json)")
    else:
        registry.promote(args.version)
        print(f"{registry.resolve(args.version)} is now current in {registry_url}")
    return 0


def _run_config(args: argparse.Namespace) -> int:
    import yaml

    data = _settings(args).masked()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    path = config_file_path(getattr(args, "config", None))
    print(f"# cellseg {__version__} settings: flags > CELLSEG_* environment > "
          f"{f'file {path}' if path else 'no settings file'} > defaults; secrets masked")
    print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


# flows, tune, serve (Prefect) --------------------------------------------------------------------


def _run_flow_train(args: argparse.Namespace) -> int:
    _needs_orchestration("flow train-unet")
    from cellseg.flows.train import train_unet
    from cellseg.jobs import TrainJob

    settings = _settings(args, {"model": json.loads(args.model_json), "training": json.loads(args.training_json)})
    job = TrainJob.model_validate({"images_url": args.images, "masks_url": args.masks, "registry_url": settings.registry_url,
                                   "model": settings.model, "training": settings.training, "predict": settings.predict,
                                   **given(args, JOB)})
    result = train_unet(job)
    print(f"registered model {result['version']} ({result['stop_reason']}; best epoch {result['best_epoch']})")
    _print_metrics({f"val_{k}": v for k, v in result["metrics"].items() if not k.startswith("cells_")})
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def _run_flow_segment(args: argparse.Namespace) -> int:
    _needs_orchestration("flow segment-images")
    from cellseg.flows.segment import segment_images_flow
    from cellseg.jobs import SegmentJob

    settings = _settings(args)
    job = SegmentJob.model_validate({"source_url": args.source, "store_url": args.store,
                                     "registry_url": settings.registry_url, "predict": settings.predict,
                                     **given(args, JOB)})
    summary = segment_images_flow(job)
    print(f"segmented {summary['done']}, skipped {summary['skipped']} already done, failed {len(summary['failed'])} "
          f"with model {summary['model_version']} in {summary['seconds']}s -> {args.store}")
    if summary.get("montage"):
        print(f"montage: {summary['montage']}")
    for failure in summary["failed"]:
        print(f"  failed: {failure['source_url']}: {failure['error']}")
    return 0


def _run_tune(args: argparse.Namespace) -> int:
    _needs_orchestration("tune")
    from cellseg.flows.tune import tune_unet
    from cellseg.jobs import TuneJob
    from cellseg.tune import TABLE_COLUMNS

    fields = given(args, JOB)
    default_training = TuneJob.model_fields["training"].get_default().model_dump()
    fields["training"] = default_training | json.loads(args.training_json) | fields.get("training", {})
    job = TuneJob.model_validate({"images_url": args.images, "masks_url": args.masks,
                                  "registry_url": _settings(args).registry_url, **fields})
    result = tune_unet(job)
    columns = [c for c in TABLE_COLUMNS if c != "status"]
    print("  ".join(f"{c:>13}" for c in columns) + "  status")
    for row in result["trials"]:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print("  ".join(f"{cell:>13}" for cell in cells) + f"  {row['status']}")
    best = result["best"]
    print(f"best: trial {best['number']} (val Dice {best['val_dice']:.4f}), registered as {result['version']}"
          f"{' and made current' if job.promote else ''} in {job.registry_url}")
    return 0


def _run_serve(args: argparse.Namespace) -> int:
    _needs_orchestration("serve")
    from cellseg.deployments.serve import serve_all

    _settings(args)
    serve_all(nightly_source=args.nightly_source, nightly_store=args.nightly_store, cron=args.cron)
    return 0


# output ------------------------------------------------------------------------------------------


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


def _print_metrics(metrics: dict[str, float]) -> None:
    for key, value in metrics.items():
        print(f"  {key:18} {value:.4f}")


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    columns = ("image_id", "cell_count", "mean_cell_area", "foreground_fraction", "mean_intensity_inside",
               "mean_intensity_outside")
    if not rows:
        return
    print("  ".join(f"{c:>22}" if i else f"{c:<24}" for i, c in enumerate(columns)))
    for row in rows:
        print("  ".join([f"{row['image_id']:<24}"] + [f"{_fmt(row.get(c)):>22}" for c in columns[1:]]))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# the parser --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from cellseg.jobs import SegmentJob, TrainJob, TuneJob

    parser = argparse.ArgumentParser(
        prog="cellseg", description="Segment grayscale microscopy images into cells and background with a U-Net."
    )
    parser.add_argument("--version", action="version", version=f"cellseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = _command(commands, "synth", _run_synth, help="write a synthetic dataset (images/, masks/, labels/)")
    synth.add_argument("--out", required=True, help="directory URL to write into")
    synth.add_argument("--count", type=int, default=24, help="number of images (default 24)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    synth.add_argument("--polarity", choices=("bright", "dark", "mixed"), default="bright",
                       help="bright cells on dark (fluorescence), dark on bright, or alternating")
    synth.add_argument("--vary-size", action="store_true", help="draw each side from [3/4 size, size]")

    train = _command(commands, "train", _run_train, help="train a U-Net on image/mask pairs")
    _add_pairs(train)
    train.add_argument("--out", required=True, help="local directory for best.pt, last.pt, history.json")
    add_flags(train, TRAINING_FLAGS + MODEL_FLAGS)
    train.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")

    predict = _command(commands, "predict", _run_predict, help="segment images into a zarr results store")
    predict.add_argument("--model", help="checkpoint URL (e.g. runs/x/best.pt); default: the bundled general-purpose "
                                         "model, trained on synthetic images (train on your own data for best results)")
    predict.add_argument("--images", required=True, help="directory URL of images to segment")
    predict.add_argument("--out", required=True, help="zarr store URL; created if missing, done images skipped")
    add_flags(predict, PREDICT_FLAGS)

    evaluate = _command(commands, "evaluate", _run_evaluate, help="score a results store against ground-truth masks")
    evaluate.add_argument("--pred", required=True, help="zarr results store URL")
    evaluate.add_argument("--masks", required=True, help="directory URL of ground-truth masks")
    evaluate.add_argument("--labels", help="directory URL of ground-truth instance label images (one value per cell): "
                                           "adds F1 at IoU 0.5, the DSB2018 score and the cell count error")
    evaluate.add_argument("--json", action="store_true", help="print the full result as JSON")

    results = _command(commands, "results", _run_results, help="summarise a results store")
    results.add_argument("store", help="zarr results store URL")
    results.add_argument("--json", action="store_true", help="print all statistics rows as JSON")
    results.add_argument("--limit", type=int, default=10, help="rows to show (default 10)")

    export = _command(commands, "export", _run_export, help="write a store's per-cell (or per-image) table as CSV or Parquet")
    export.add_argument("store", help="zarr results store URL")
    export.add_argument("--format", choices=("csv", "parquet"), default="csv", help="default %(default)s")
    export.add_argument("--table", choices=("cells", "images"), default="cells",
                        help="one row per cell (default) or the per-image statistics")
    export.add_argument("--out", required=True, help="file to write (local path or URL)")

    tune = _command(commands, "tune", _run_tune,
                    help="search hyper-parameters: train trials in parallel (tune-unet flow), register the best",
                    description="Runs the tune-unet Prefect flow here: trains TRIALS points of the grid the value lists "
                                "span (each with early stopping), registers the best by validation Dice and prints every trial.")
    _add_pairs(tune)
    add_flags(tune, [REGISTRY_FLAG])
    add_flags(tune, TUNE_JOB_FLAGS, JOB, TuneJob)
    tune.add_argument("--training-json", default="{}",
                      help='other TrainConfig fields for every trial as JSON, e.g. \'{"epochs": 20}\'')

    models = _command(commands, "models", help="list, show, promote and export registered model versions")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (("list", "list versions"), ("show", "show one version as JSON"), ("promote", "mark a version current"),
                            ("export", "export a version (or --checkpoint) to TorchScript or ONNX for other software")):
        action = _command(actions, name, _run_models, help=help_text)
        add_flags(action, [REGISTRY_FLAG])
        if name != "list":
            action.add_argument("version", nargs="?" if name in ("show", "export") else None, default="current")
        if name == "export":
            action.add_argument("--checkpoint", help="export this checkpoint file instead of a registered version "
                                                     "(e.g. cellseg/models/general.pt)")
            action.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                                help="TorchScript takes any image size; ONNX needs the onnx extra (default %(default)s)")
            action.add_argument("--out", required=True, help="file to write; its description goes to OUT.json")

    flow = _command(commands, "flow", help="run a Prefect flow (train-unet, segment-images) from here")
    flows = flow.add_subparsers(dest="flow", required=True, metavar="FLOW")
    flow_train = _command(flows, "train-unet", _run_flow_train, help="ingest, train, evaluate and register a model")
    _add_pairs(flow_train)
    add_flags(flow_train, [REGISTRY_FLAG])
    add_flags(flow_train, TRAIN_JOB_FLAGS, JOB, TrainJob)
    add_flags(flow_train, TRAINING_FLAGS + MODEL_FLAGS)
    flow_train.add_argument("--model-json", default="{}",
                            help='ModelConfig fields as JSON, e.g. \'{"base_width": 8}\', over the settings\' model section')
    flow_train.add_argument("--training-json", default="{}",
                            help='TrainConfig fields as JSON, e.g. \'{"epochs": 5}\', over the settings\' training section')
    segment = _command(flows, "segment-images", _run_flow_segment, help="segment new images in parallel shards into a store")
    segment.add_argument("--source", required=True, help="directory URL of images")
    segment.add_argument("--store", required=True, help="zarr results store URL")
    add_flags(segment, [REGISTRY_FLAG])
    add_flags(segment, SEGMENT_JOB_FLAGS, JOB, SegmentJob)
    add_flags(segment, PREDICT_FLAGS)

    config = _command(commands, "config", help="show the effective settings (flags > CELLSEG_* environment > --config file)")
    config_actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = _command(config_actions, "show", _run_config, help="print the settings every command starts from, secrets masked")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")

    serve = _command(commands, "serve", _run_serve,
                     help="serve the train-unet, tune-unet, nightly-segmentation and backfill deployments")
    serve.add_argument("--nightly-source", default=None, help="image directory URL for nightly-segmentation")
    serve.add_argument("--nightly-store", default=None, help="store URL for nightly-segmentation")
    serve.add_argument("--cron", default=None, help="nightly schedule (default: the one in deployments/prefect.yaml)")
    return parser


def _add_pairs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="directory URL of images")
    parser.add_argument("--masks", required=True,
                        help="directory URL of masks (same file stems): binary masks, or 16-bit instance label "
                             "images, which teach the model to keep touching cells apart")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("cellseg").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from cellseg.checkpoint import CheckpointError
    from cellseg.io import ImageReadError
    from cellseg.pairs import DatasetError
    from cellseg.registry import RegistryError
    from cellseg.settings import SettingsError
    from cellseg.store import StoreError

    try:
        return args.run(args)
    except ValidationError as error:
        print(f"cellseg {args.command}: invalid settings:\n{error}", file=sys.stderr)
    except (DatasetError, ImageReadError, CheckpointError, StoreError, RegistryError, SettingsError,
            FileNotFoundError, ValueError, ModuleNotFoundError) as error:
        print(f"cellseg {args.command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
