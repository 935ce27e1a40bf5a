"""The `cellseg` command: synth, train, predict, evaluate, results and models run without Prefect;
`flow` and `serve` run the Prefect flows and deployments.

Object-storage endpoints and credentials come from the environment (AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, FSSPEC_S3_ENDPOINT_URL, ...) or fsspec's config files, never from flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cellseg import __version__

CONFIG_HELP = "TOML or YAML settings file (default: $CELLSEG_CONFIG); flags > CELLSEG_* environment > file"


def _command(group: argparse._SubParsersAction, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A (sub)command that also takes --config after its name."""
    parser = group.add_parser(name, **kwargs)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help=CONFIG_HELP)
    return parser


def _setting(parser: argparse.ArgumentParser, *flags: str, key: str, **kwargs: Any) -> None:
    """A flag for the settings field `key` (e.g. "training.epochs"), applied only when given, so
    that CELLSEG_* environment variables and the settings file fill in the rest."""
    if kwargs.get("action") != "store_const":
        if "choices" not in kwargs:
            kwargs.setdefault("metavar", flags[0].lstrip("-").upper().replace("-", "_"))
        default = _setting_default(key)
        kwargs["help"] = f"{kwargs.get('help', '')} (default {'none' if default is None else default})".strip()
    parser.add_argument(*flags, dest=f"setting:{key}", default=argparse.SUPPRESS, **kwargs)


def _setting_default(key: str) -> Any:
    from cellseg.settings import CellsegSettings

    section, *path = key.split(".")
    value = CellsegSettings.model_fields[section].get_default(call_default_factory=True)
    for name in path:
        value = getattr(value, name)
    return value


def _settings(args: argparse.Namespace, overrides: dict[str, Any] | None = None):
    """The command's settings: its flags (and `overrides`) over the environment over --config;
    storage options are handed to fsspec before anything is read."""
    from cellseg.settings import load_settings

    nested: dict[str, Any] = {}
    for name, value in vars(args).items():
        if name.startswith("setting:"):
            *parents, leaf = name.removeprefix("setting:").split(".")
            node = nested
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    for section, values in (overrides or {}).items():
        nested[section] = {**nested.get(section, {}), **values} if isinstance(values, dict) else values
    settings = load_settings(getattr(args, "config", None), nested)
    settings.apply_storage()
    return settings


def _cell_diameter(text: str) -> float | str | None:
    """--cell-diameter: pixels, 'auto' or 'none'."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    return float(text)


def _minutes(text: str) -> float | None:
    """--max-minutes: 0 means no limit."""
    return float(text) or None


def _add_synth(commands: argparse._SubParsersAction) -> None:
    parser = _command(commands, "synth", help="write a synthetic dataset (images/, masks/, labels/)")
    parser.add_argument("--out", required=True, help="directory URL to write into")
    parser.add_argument("--count", type=int, default=24, help="number of images (default 24)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    parser.add_argument("--polarity", choices=("bright", "dark", "mixed"), default="bright",
                        help="bright cells on dark (fluorescence), dark on bright, or alternating")
    parser.add_argument("--vary-size", action="store_true", help="draw each side from [3/4 size, size]")
    parser.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> int:
    from cellseg.synth import write_dataset

    _settings(args)
    ids = write_dataset(args.out, args.count, args.size, args.seed, args.bit_depth, args.polarity, args.vary_size)
    print(f"wrote {len(ids)} images with masks and labels under {args.out}")
    return 0


def _add_train(commands: argparse._SubParsersAction) -> None:
    from cellseg.config import AugmentationConfig

    parser = _command(commands, "train", help="train a U-Net on image/mask pairs")
    parser.add_argument("--images", required=True, help="directory URL of images")
    parser.add_argument("--masks", required=True,
                        help="directory URL of masks (same file stems): binary masks, or 16-bit instance label "
                             "images, which teach the model to keep touching cells apart")
    parser.add_argument("--out", required=True, help="local directory for best.pt, last.pt, history.json")
    _setting(parser, "--epochs", key="training.epochs", type=int)
    _setting(parser, "--patience", key="training.patience", type=int, help="epochs without improvement before stopping")
    _setting(parser, "--min-delta", key="training.min_delta", type=float)
    _setting(parser, "--monitor", key="training.monitor", choices=("val_dice", "val_iou", "val_loss"))
    _setting(parser, "--val-fraction", key="training.val_fraction", type=float)
    _setting(parser, "--seed", key="training.seed", type=int)
    _setting(parser, "--batch-size", key="training.batch_size", type=int)
    _setting(parser, "--lr", key="training.learning_rate", type=float, help="Adam learning rate")
    _setting(parser, "--patch-size", key="training.patch_size", type=int)
    _setting(parser, "--patches-per-image", key="training.patches_per_image", type=int)
    _setting(parser, "--no-augment", key="training.augment", action="store_const", const=False,
             help="no augmentation at all")
    _setting(parser, "--strong-augmentation", key="training.augmentation", action="store_const",
             const=AugmentationConfig.strong().model_dump(),
             help="add affine warps, elastic deformation and intensity changes to the flips/rotations")
    _setting(parser, "--loss", key="training.loss", choices=("bce", "bce_dice"), help="BCEWithLogits, or BCEWithLogits + soft Dice")
    _setting(parser, "--border-weight", key="training.border_weight", type=float,
             help="U-Net paper border weight w0 on background between nearby cells (paper: 10; 0 = off)")
    _setting(parser, "--border-sigma", key="training.border_sigma", type=float,
             help="pixels over which the border weight decays")
    _setting(parser, "--max-minutes", key="training.max_minutes", type=_minutes, help="wall-clock budget; 0 for none")
    _setting(parser, "--device", key="training.device", help="auto, cpu, cuda or cuda:N")
    _setting(parser, "--no-amp", key="training.amp", action="store_const", const=False,
             help="plain fp32, no bf16/fp16 mixed precision")
    _setting(parser, "--depth", key="model.depth", type=int)
    _setting(parser, "--base-width", key="model.base_width", type=int)
    _setting(parser, "--dropout", key="model.dropout", type=float)
    _setting(parser, "--norm", key="model.norm", choices=("group", "batch", "instance", "none"))
    _setting(parser, "--cell-diameter", key="model.cell_diameter", type=_cell_diameter, metavar="D|auto|none",
             help="work at one cell size: resample every image so that its median cell is D pixels across, in "
                  "training and in prediction (nuclei: 18); 'none': images at their own scale; 'auto': the "
                  "training images' median cell when their cell sizes differ more than 1.5x, else none")
    _setting(parser, "--distance-map", key="model.distance_map", action="store_const", const=True,
             help="also learn each cell's distance to its outline (needs instance label masks) and split touching "
                  "cells at its peaks: fewer merged cells, a little less pixel Dice")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    _setting(parser, "--init-from", key="training.init_from",
             help="fine-tune from this checkpoint (its model config replaces --depth etc.)")
    _setting(parser, "--freeze-encoder-epochs", key="training.freeze_encoder_epochs", type=int,
             help="with --init-from: keep the encoder fixed for this many epochs")
    parser.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    from cellseg.data import (
        load_pairs,
        manifest_hash,
        pair_images_and_masks,
        split_train_val,
    )

    settings = _settings(args)
    model_config, config = settings.model, settings.training
    if config.init_from:
        from cellseg.checkpoint import load_checkpoint

        model_config = load_checkpoint(config.init_from).model_config
    pairs = pair_images_and_masks(args.images, args.masks)
    train_pairs, val_pairs = split_train_val(pairs, config.val_fraction, config.seed)
    logging.getLogger("cellseg").info("loading %d image/mask pairs", len(pairs))
    loaded_train = load_pairs(train_pairs, model_config.normalization)
    loaded_val = load_pairs(val_pairs, model_config.normalization)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = [pair.manifest_entry() for pair in loaded_train + loaded_val]
    dataset_hash = manifest_hash(loaded_train + loaded_val)
    (out / "manifest.json").write_text(json.dumps({"hash": dataset_hash, "entries": manifest}, indent=1))
    (out / "split.json").write_text(json.dumps({"train": [p.id for p in train_pairs], "val": [p.id for p in val_pairs]}, indent=1))
    result = _train_with_progress_bar(loaded_train, loaded_val, out, model_config, config, dataset_hash, args.resume)
    print(f"{result.stop_reason}; best epoch {result.best_epoch} of {len(result.history)}")
    _print_metrics({k: v for k, v in result.best_metrics.items() if k.startswith("val_")} or result.best_metrics)
    if any(pair.instances is not None for pair in loaded_val):
        from cellseg.checkpoint import load_checkpoint
        from cellseg.predict import Predictor
        from cellseg.validation import validation_cell_scores

        cells = validation_cell_scores(Predictor(load_checkpoint(str(result.best_checkpoint)), settings.predict), loaded_val)
        _print_cell_scores(cells, label=f"validation cells ({cells['images']} images, as `predict` segments them)")
    print(f"checkpoint: {result.best_checkpoint}\nhistory:    {result.history_path}")
    from cellseg.report import training_pictures

    for picture in training_pictures(out, result.history, loaded_val, config.device, config.threshold):
        print(f"picture:    {picture}")
    return 0


def _print_cell_scores(cells: dict, label: str = "cells") -> None:
    """The cell-level summary of `summarise_instance_scores`: scores, then why cells did not match."""
    error = cells["count_error_median"]
    print(f"{label}: F1@0.5 {cells['f1_mean']:.4f} (pooled {cells['f1_pooled']:.4f}), DSB score "
          f"{cells['dsb_score_mean']:.4f}, median count error {'n/a' if error is None else f'{error:.1%}'}")
    print(f"cell errors: of {cells['true_cells_total']} true cells {cells['merged_total']} merged with a "
          f"neighbour, {cells['split_total']} split, {cells['missed_total']} missed; "
          f"{cells['extra_total']} of {cells['predicted_cells_total']} predicted cells extra")


def _train_with_progress_bar(train_pairs, val_pairs, out, model_config, config, dataset_hash, resume):
    """`train` with an epoch progress bar on a terminal (none when stderr is not a terminal);
    the per-epoch log lines print above the bar."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from cellseg.train import train

    with _progress("training", "epoch", total=config.epochs, leave=True) as bar, \
            logging_redirect_tqdm(loggers=[logging.getLogger()]):
        def advance(record: dict[str, float]) -> None:
            bar.update(int(record["epoch"]) - bar.n)
            bar.set_postfix({k: f"{record[k]:.4f}" for k in ("train_loss", "val_dice") if k in record})

        return train(train_pairs, val_pairs, out, model_config, config, dataset_hash, resume=resume, on_epoch=advance)


def _add_predict_settings(parser: argparse.ArgumentParser) -> None:
    """The PredictConfig flags shared by `predict` and `flow segment-images`."""
    _setting(parser, "--threshold", key="predict.threshold", type=float)
    _setting(parser, "--min-cell-area", key="predict.min_cell_area", type=int)
    _setting(parser, "--cell-diameter", key="predict.cell_diameter", type=float,
             help="median diameter (pixels) of the cells in these images, for a model trained with --cell-diameter; "
                  "default: measured on each image")
    _setting(parser, "--no-split", key="predict.split_touching", action="store_const", const=False,
             help="keep touching cells as one object (no watershed)")
    _setting(parser, "--centre-prominence", key="predict.centre_prominence", type=float,
             help="for a model trained with --distance-map: how far (0-1) a cell's centre must rise above the "
                  "saddle to its neighbour on the distance map to make a cell of its own (default 0.1)")
    _setting(parser, "--no-measure", key="predict.measure_cells", action="store_const", const=False,
             help="skip the per-cell measurement table")
    _setting(parser, "--no-image", key="predict.store_image", action="store_const", const=False,
             help="do not copy the source images into the store (labels only; napari then shows no image)")
    _setting(parser, "--tta", key="predict.tta", action="store_const", const=True,
             help="average over 8 flips/rotations (slower, smoother masks)")
    _setting(parser, "--batch-size", key="predict.batch_size", type=int, help="images per forward pass (none: 1 on CPU, 8 on CUDA)")
    _setting(parser, "--device", key="predict.device", help="auto, cpu, cuda or cuda:N")
    _setting(parser, "--no-amp", key="predict.amp", action="store_const", const=False,
             help="plain fp32 inference, no mixed precision")
    _setting(parser, "--compile", key="predict.compile", action="store_const", const=True,
             help="torch.compile the model (pays off on long runs)")
    _setting(parser, "--tile-size", key="predict.tile_size", type=int, help="tile larger images")
    _setting(parser, "--max-pixels", key="predict.max_pixels", type=int,
             help="refuse images with more pixels, before decoding")


def _add_predict(commands: argparse._SubParsersAction) -> None:
    parser = _command(commands, "predict", help="segment images into a zarr results store")
    parser.add_argument("--model", help="checkpoint URL (e.g. runs/x/best.pt); default: the bundled general-purpose "
                                        "model, trained on synthetic images (train on your own data for best results)")
    parser.add_argument("--images", required=True, help="directory URL of images to segment")
    parser.add_argument("--out", required=True, help="zarr store URL; created if missing, done images skipped")
    _add_predict_settings(parser)
    _setting(parser, "--save-probabilities", key="predict.save_probabilities", action="store_const", const=True,
             help="also store the probability map (float16)")
    parser.set_defaults(run=_run_predict)


def _run_predict(args: argparse.Namespace) -> int:
    from cellseg.io import list_images
    from cellseg.predict import Predictor
    from cellseg.segment import model_record, pending_images, segment_images
    from cellseg.store import ResultStore

    config = _settings(args).predict
    bundled = args.model is None
    if bundled:
        from cellseg.bundled import BUNDLED_VERSION, bundled_checkpoint

        args.model = bundled_checkpoint()
        logging.getLogger("cellseg").info(
            "no --model given: using the bundled general-purpose model (synthetic training data); "
            "train on your own images for best results"
        )
    predictor = Predictor.from_checkpoint(args.model, config)
    if bundled:
        predictor.model_version = f"{BUNDLED_VERSION}-{predictor.model_version}"  # as the flows record it
    store = ResultStore.open(args.out)
    rejected: list[dict[str, str]] = []
    images = list_images(args.images)
    with _progress("reading store", "image") as bar:
        todo, skipped = pending_images(images, store, rejected, on_record=lambda _: bar.update())
    if not todo and not skipped and not rejected:
        print(f"no images found under {args.images}; nothing to do")
        return 0
    with _progress("segmenting", "image", total=len(todo), leave=True) as bar:
        report = segment_images(todo, store, predictor, model_record(predictor, args.model), on_image=lambda _: bar.update())
    report.skipped = skipped
    report.failed[:0] = rejected
    summary = report.summary()
    print(f"segmented {summary['done']}, skipped {summary['skipped']} already done, failed {summary['failed']} "
          f"in {summary['seconds']}s -> {args.out}")
    for failure in report.failed:
        print(f"  failed: {failure['source_url']}: {failure['error']}")
    _print_table(store.statistics()[:5])
    return 1 if report.failed and not report.done else 0


def _add_evaluate(commands: argparse._SubParsersAction) -> None:
    parser = _command(commands, "evaluate", help="score a results store against ground-truth masks")
    parser.add_argument("--pred", required=True, help="zarr results store URL")
    parser.add_argument("--masks", required=True, help="directory URL of ground-truth masks")
    parser.add_argument("--labels", help="directory URL of ground-truth instance label images (one value per cell): "
                                         "adds F1 at IoU 0.5, the DSB2018 score and the cell count error")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    parser.set_defaults(run=_run_evaluate)


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


def _add_results(commands: argparse._SubParsersAction) -> None:
    parser = _command(commands, "results", help="summarise a results store")
    parser.add_argument("store", help="zarr results store URL")
    parser.add_argument("--json", action="store_true", help="print all statistics rows as JSON")
    parser.add_argument("--limit", type=int, default=10, help="rows to show (default 10)")
    parser.set_defaults(run=_run_results)


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


def _add_flow(commands: argparse._SubParsersAction) -> None:
    from cellseg.config import SegmentSettings

    parser = _command(commands, "flow", help="run a Prefect flow (train-unet, segment-images) from here")
    flows = parser.add_subparsers(dest="flow", required=True, metavar="FLOW")

    train = _command(flows, "train-unet", help="ingest, train, evaluate and register a model")
    train.add_argument("--images", required=True, help="directory URL of images")
    train.add_argument("--masks", required=True, help="directory URL of masks")
    _setting(train, "--registry", key="registry_url", help="model registry URL")
    train.add_argument("--cache-dir", default="runs/cache", help="local dataset cache (default runs/cache)")
    train.add_argument("--work-dir", default="runs/training", help="local training directory (default runs/training)")
    train.add_argument("--no-promote", action="store_true", help="register without marking the model current")
    train.add_argument("--model-json", default="{}",
                       help='ModelConfig fields as JSON, e.g. \'{"base_width": 8}\', over the settings\' model section')
    train.add_argument("--training-json", default="{}",
                       help='TrainConfig fields as JSON, e.g. \'{"epochs": 5}\', over the settings\' training section')
    train.set_defaults(run=_run_flow_train)

    defaults = SegmentSettings(source_url="x", store_url="x")
    segment = _command(flows, "segment-images", help="segment new images in parallel shards into a store")
    segment.add_argument("--source", required=True, help="directory URL of images")
    segment.add_argument("--store", required=True, help="zarr results store URL")
    _setting(segment, "--registry", key="registry_url", help="model registry URL")
    segment.add_argument("--model-version", default=defaults.model_version, help="registered version, 'current', or 'bundled' (the model shipped in the package)")
    segment.add_argument("--shard-size", type=int, default=defaults.shard_size)
    segment.add_argument("--max-parallel-shards", type=int, default=defaults.max_parallel_shards)
    segment.add_argument("--dask-address", default=None, help="run shards on this Dask scheduler (tcp://host:port)")
    _add_predict_settings(segment)
    segment.set_defaults(run=_run_flow_segment)


def _run_flow_train(args: argparse.Namespace) -> int:
    from cellseg.config import TrainUnetSettings
    from flows.train import train_unet

    overrides = {"model": json.loads(args.model_json), "training": json.loads(args.training_json)}
    cellseg_settings = _settings(args, overrides)
    settings = TrainUnetSettings(
        images_url=args.images, masks_url=args.masks, registry_url=cellseg_settings.registry_url,
        cache_dir=args.cache_dir, work_dir=args.work_dir, promote=not args.no_promote,
        model=cellseg_settings.model, training=cellseg_settings.training,
    )
    result = train_unet(**{key: getattr(settings, key) for key in TrainUnetSettings.model_fields})
    print(f"registered model {result['version']} ({result['stop_reason']}; best epoch {result['best_epoch']})")
    _print_metrics({f"val_{k}": v for k, v in result["metrics"].items()})
    print(f"checkpoint: {result['checkpoint']}")
    return 0


def _run_flow_segment(args: argparse.Namespace) -> int:
    import inspect

    from cellseg.config import PredictConfig
    from flows.segment import segment_images_flow

    settings = _settings(args)
    # Every PredictConfig field the flow takes as a parameter, read off its signature.
    predict = {name: getattr(settings.predict, name) for name in inspect.signature(segment_images_flow.fn).parameters
               if name in PredictConfig.model_fields}
    summary = segment_images_flow(
        source_url=args.source, store_url=args.store, registry_url=settings.registry_url, model_version=args.model_version,
        shard_size=args.shard_size, max_parallel_shards=args.max_parallel_shards, dask_address=args.dask_address,
        **predict,
    )
    print(f"segmented {summary['done']}, skipped {summary['skipped']} already done, failed {len(summary['failed'])} "
          f"with model {summary['model_version']} in {summary['seconds']}s -> {args.store}")
    if summary.get("montage"):
        print(f"montage: {summary['montage']}")
    for failure in summary["failed"]:
        print(f"  failed: {failure['source_url']}: {failure['error']}")
    return 0


def _add_export(commands: argparse._SubParsersAction) -> None:
    parser = _command(commands, "export", help="write a store's per-cell (or per-image) table as CSV or Parquet")
    parser.add_argument("store", help="zarr results store URL")
    parser.add_argument("--format", choices=("csv", "parquet"), default="csv", help="default %(default)s")
    parser.add_argument("--table", choices=("cells", "images"), default="cells",
                        help="one row per cell (default) or the per-image statistics")
    parser.add_argument("--out", required=True, help="file to write (local path or URL)")
    parser.set_defaults(run=_run_export)


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


def _add_tune(commands: argparse._SubParsersAction) -> None:
    from cellseg.config import SearchSpace, TuneUnetSettings

    space, settings = SearchSpace(), TuneUnetSettings(images_url="x", masks_url="x")
    parser = _command(commands, 
        "tune", help="search hyper-parameters: train trials in parallel (tune-unet flow), register the best",
        description="Runs the tune-unet Prefect flow here: trains TRIALS points of the grid the value lists span "
                    "(each with early stopping), registers the best by validation Dice and prints every trial.",
    )
    parser.add_argument("--images", required=True, help="directory URL of images")
    parser.add_argument("--masks", required=True, help="directory URL of masks or 16-bit instance label images")
    _setting(parser, "--registry", key="registry_url", help="model registry URL")
    parser.add_argument("--cache-dir", default=settings.cache_dir, help="local dataset cache (default %(default)s)")
    parser.add_argument("--work-dir", default=settings.work_dir, help="local directory for the trials (default %(default)s)")
    parser.add_argument("--promote", action="store_true", help="make the best trial's model current")
    parser.add_argument("--trials", type=int, default=settings.trials, help="grid points to train (default %(default)s)")
    parser.add_argument("--parallel", type=int, default=settings.max_parallel_trials,
                        help="trials at once, each in its own process (default %(default)s)")
    parser.add_argument("--seed", type=int, default=settings.seed, help="which grid points are drawn")
    parser.add_argument("--dask-address", default=None, help="train trials on this Dask scheduler (tcp://host:port)")
    parser.add_argument("--lr", type=float, nargs="+", default=space.learning_rate, metavar="LR",
                        help="learning rates to try (default %(default)s)")
    parser.add_argument("--base-width", type=int, nargs="+", default=space.base_width, metavar="W")
    parser.add_argument("--depth", type=int, nargs="+", default=space.depth, metavar="D")
    parser.add_argument("--dropout", type=float, nargs="+", default=space.dropout, metavar="P")
    parser.add_argument("--loss", nargs="+", choices=("bce", "bce_dice"), default=space.loss)
    parser.add_argument("--augmentation", nargs="+", choices=("flips", "strong"), default=space.augmentation)
    parser.add_argument("--border-weight", type=float, nargs="+", default=space.border_weight, metavar="W0")
    parser.add_argument("--max-minutes", type=float, default=settings.training.max_minutes,
                        help="wall-clock budget of each trial (default %(default)s)")
    parser.add_argument("--patience", type=int, default=settings.training.patience,
                        help="early stopping patience of each trial (default %(default)s)")
    parser.add_argument("--training-json", default="{}",
                        help='other TrainConfig fields for every trial as JSON, e.g. \'{"epochs": 20}\'')
    parser.set_defaults(run=_run_tune)


def _run_tune(args: argparse.Namespace) -> int:
    from cellseg.config import SearchSpace, TrainConfig, TuneUnetSettings
    from cellseg.tune import TABLE_COLUMNS
    from flows.tune import tune_unet

    training = TrainConfig.model_validate(
        {"max_minutes": args.max_minutes or None, "patience": args.patience, **json.loads(args.training_json)}
    )
    settings = TuneUnetSettings(
        images_url=args.images, masks_url=args.masks, registry_url=_settings(args).registry_url, cache_dir=args.cache_dir,
        work_dir=args.work_dir, promote=args.promote, trials=args.trials, max_parallel_trials=args.parallel,
        seed=args.seed, dask_address=args.dask_address, training=training,
        space=SearchSpace(learning_rate=args.lr, base_width=args.base_width, depth=args.depth, dropout=args.dropout,
                          loss=args.loss, augmentation=args.augmentation, border_weight=args.border_weight),
    )
    result = tune_unet(**{key: getattr(settings, key) for key in TuneUnetSettings.model_fields})
    columns = [c for c in TABLE_COLUMNS if c != "status"]
    print("  ".join(f"{c:>13}" for c in columns) + "  status")
    for row in result["trials"]:
        cells = [f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print("  ".join(f"{cell:>13}" for cell in cells) + f"  {row['status']}")
    best = result["best"]
    print(f"best: trial {best['number']} (val Dice {best['val_dice']:.4f}), registered as {result['version']}"
          f"{' and made current' if settings.promote else ''} in {settings.registry_url}")
    return 0


def _add_models(commands: argparse._SubParsersAction) -> None:
    parser = _command(commands, "models", help="list, show, promote and export registered model versions")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (("list", "list versions"), ("show", "show one version as JSON"), ("promote", "mark a version current"),
                            ("export", "export a version (or --checkpoint) to TorchScript or ONNX for other software")):
        action = _command(actions, name, help=help_text)
        _setting(action, "--registry", key="registry_url", help="model registry URL")
        if name != "list":
            action.add_argument("version", nargs="?" if name in ("show", "export") else None, default="current")
        action.set_defaults(run=_run_models)
        if name == "export":
            action.add_argument("--checkpoint", help="export this checkpoint file instead of a registered version "
                                                     "(e.g. cellseg/models/general.pt)")
            action.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                                help="TorchScript takes any image size; ONNX needs the onnx extra (default %(default)s)")
            action.add_argument("--out", required=True, help="file to write; its description goes to OUT.json")


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
            dice = meta.metrics.get("val_dice")
            print(f"{marker} {meta.version}  val_dice {_fmt(dice)}  epoch {meta.epoch}  "
                  f"dataset {str(meta.dataset_manifest_hash)[:12]}  registered {meta.registered[:19]}")
    elif args.action == "show":
        print(registry.get(args.version).model_dump_json(indent=1))
    elif args.action == "export":
        from cellseg.checkpoint import load_checkpoint
        from cellseg.export import export_model
        from cellseg.predict import checkpoint_digest

        if args.checkpoint:
            checkpoint, version = load_checkpoint(args.checkpoint), checkpoint_digest(args.checkpoint)[:12]
        else:
            checkpoint, meta = registry.load(args.version)
            version = meta.version
        export_model(checkpoint, args.out, args.format, model_version=version)
        print(f"exported model {version} as {args.format} to {args.out} (input/normalisation/threshold in {args.out}.json)")
    else:
        registry.promote(args.version)
        print(f"{registry.resolve(args.version)} is now current in {registry_url}")
    return 0


def _add_serve(commands: argparse._SubParsersAction) -> None:
    parser = _command(commands, "serve", help="serve the train-unet, tune-unet, nightly-segmentation and backfill deployments")
    parser.add_argument("--nightly-source", default=None, help="image directory URL for nightly-segmentation")
    parser.add_argument("--nightly-store", default=None, help="store URL for nightly-segmentation")
    parser.add_argument("--cron", default="0 2 * * *", help="nightly schedule (default 02:00 every day)")
    parser.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    from deployments.serve import serve_all

    serve_all(nightly_source=args.nightly_source, nightly_store=args.nightly_store, cron=args.cron)
    return 0


def _add_config(commands: argparse._SubParsersAction) -> None:
    parser = _command(commands, "config", help="show the effective settings (flags > CELLSEG_* environment > --config file)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = _command(actions, "show", help="print the settings every command starts from, secrets masked")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")
    show.set_defaults(run=_run_config)


def _run_config(args: argparse.Namespace) -> int:
    import yaml

    from cellseg.settings import config_file_path

    settings = _settings(args)
    data = settings.masked()
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    path = config_file_path(getattr(args, "config", None))
    print(f"# cellseg {__version__} settings: flags > CELLSEG_* environment > "
          f"{f'file {path}' if path else 'no settings file'} > defaults; secrets masked")
    print(yaml.safe_dump(data, sort_keys=False), end="")
    return 0


def _progress(description: str, unit: str, total: int | None = None, leave: bool = False):
    """A tqdm bar on stderr when it is a terminal; nothing at all when piped or redirected."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=None, file=sys.stderr, leave=leave)


def _print_metrics(metrics: dict[str, float]) -> None:
    for key, value in metrics.items():
        print(f"  {key:18} {value:.4f}")


def _print_table(rows: Sequence[dict[str, Any]]) -> None:
    columns = ("image_id", "cell_count", "mean_cell_area", "foreground_fraction", "mean_intensity_inside", "mean_intensity_outside")
    if not rows:
        return
    print("  ".join(f"{c:>22}" if i else f"{c:<24}" for i, c in enumerate(columns)))
    for row in rows:
        cells = [f"{row['image_id']:<24}"] + [f"{_fmt(row.get(c)):>22}" for c in columns[1:]]
        print("  ".join(cells))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cellseg", description="Segment grayscale microscopy images into cells and background with a U-Net."
    )
    parser.add_argument("--version", action="version", version=f"cellseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_synth, _add_train, _add_predict, _add_evaluate, _add_results, _add_export, _add_tune, _add_models, _add_flow, _add_config, _add_serve):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("cellseg").setLevel(logging.WARNING if args.quiet else logging.INFO)
    from cellseg.checkpoint import CheckpointError
    from cellseg.data import DatasetError
    from cellseg.io import ImageReadError
    from cellseg.registry import RegistryError
    from cellseg.settings import SettingsError
    from cellseg.store import StoreError

    try:
        return args.run(args)
    except ValidationError as error:
        print(f"cellseg {args.command}: invalid settings:\n{error}", file=sys.stderr)
    except (DatasetError, ImageReadError, CheckpointError, StoreError, RegistryError, SettingsError, FileNotFoundError, ValueError) as error:
        print(f"cellseg {args.command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
