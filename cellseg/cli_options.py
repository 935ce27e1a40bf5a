"""The command line's flags as tables: each flag names the settings or job field it sets, so a
field has one meaning everywhere (a flag, a CELLSEG_* variable, a settings file, a flow
parameter). Flags apply only when given; the environment and the settings file fill in the rest."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel

from cellseg.config import AugmentationConfig
from cellseg.settings import CellsegSettings

CONFIG_HELP = "TOML or YAML settings file (default: $CELLSEG_CONFIG); flags > CELLSEG_* environment > file"
SETTING, JOB = "setting:", "job:"  # argparse dest prefixes of the two kinds of field


def cell_diameter(text: str) -> float | str | None:
    """--cell-diameter of training: pixels, 'auto' or 'none'."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    return float(text)


def minutes(text: str) -> float | None:
    """--max-minutes: 0 means no limit."""
    return float(text) or None


Flag = tuple[tuple[str, ...], str, dict[str, Any]]  # (flags, settings field, argparse keywords)

TRAINING_FLAGS: list[Flag] = [
    (("--epochs",), "training.epochs", {"type": int}),
    (("--patience",), "training.patience", {"type": int, "help": "epochs without improvement before stopping"}),
    (("--min-delta",), "training.min_delta", {"type": float}),
    (("--monitor",), "training.monitor", {"choices": ("val_dice", "val_iou", "val_loss")}),
    (("--val-fraction",), "training.val_fraction", {"type": float}),
    (("--seed",), "training.seed", {"type": int}),
    (("--batch-size",), "training.batch_size", {"type": int}),
    (("--lr",), "training.learning_rate", {"type": float, "help": "Adam learning rate"}),
    (("--patch-size",), "training.patch_size", {"type": int}),
    (("--patches-per-image",), "training.patches_per_image", {"type": int}),
    (("--no-augment",), "training.augment", {"action": "store_const", "const": False, "help": "no augmentation at all"}),
    (("--strong-augmentation",), "training.augmentation", {
        "action": "store_const", "const": AugmentationConfig.strong().model_dump(),
        "help": "add affine warps, elastic deformation and intensity changes to the flips/rotations"}),
    (("--loss",), "training.loss", {"choices": ("bce", "bce_dice"), "help": "BCEWithLogits, or BCEWithLogits + soft Dice"}),
    (("--border-weight",), "training.border_weight", {
        "type": float, "help": "U-Net paper border weight w0 on background between nearby cells (paper: 10; 0 = off)"}),
    (("--border-sigma",), "training.border_sigma", {"type": float, "help": "pixels over which the border weight decays"}),
    (("--max-minutes",), "training.max_minutes", {"type": minutes, "help": "wall-clock budget; 0 for none"}),
    (("--device",), "training.device", {"help": "auto, cpu, cuda or cuda:N"}),
    (("--no-amp",), "training.amp", {"action": "store_const", "const": False,
                                     "help": "plain fp32, no bf16/fp16 mixed precision"}),
    (("--init-from",), "training.init_from", {"help": "fine-tune from this checkpoint (its model config replaces --depth etc.)"}),
    (("--freeze-encoder-epochs",), "training.freeze_encoder_epochs", {
        "type": int, "help": "with --init-from: keep the encoder fixed for this many epochs"}),
]

MODEL_FLAGS: list[Flag] = [
    (("--depth",), "model.depth", {"type": int}),
    (("--base-width",), "model.base_width", {"type": int}),
    (("--dropout",), "model.dropout", {"type": float}),
    (("--norm",), "model.norm", {"choices": ("group", "batch", "instance", "none")}),
    (("--cell-diameter",), "model.cell_diameter", {
        "type": cell_diameter, "metavar": "D|auto|none",
        "help": "work at one cell size: resample every image so that its median cell is D pixels across, in "
                "training and in prediction (nuclei: 18); 'none': images at their own scale; 'auto': the "
                "training images' median cell when their cell sizes differ more than 1.5x, else none"}),
    (("--distance-map",), "model.distance_map", {
        "action": "store_const", "const": True,
        "help": "also learn each cell's distance to its outline (needs instance label masks) and split touching "
                "cells at its peaks: fewer merged cells, a little less pixel Dice"}),
]

PREDICT_FLAGS: list[Flag] = [
    (("--threshold",), "predict.threshold", {"type": float}),
    (("--min-cell-area",), "predict.min_cell_area", {"type": int}),
    (("--cell-diameter",), "predict.cell_diameter", {
        "type": float, "help": "median diameter (pixels) of the cells in these images, for a model trained with "
                               "--cell-diameter; default: measured on each image"}),
    (("--no-split",), "predict.split_touching", {"action": "store_const", "const": False,
                                                 "help": "keep touching cells as one object (no watershed)"}),
    (("--split-depth",), "predict.split_depth", {
        "type": float, "help": "how much narrower (pixels of distance) a neck must be than both cells to split them"}),
    (("--centre-prominence",), "predict.centre_prominence", {
        "type": float, "help": "for a model trained with --distance-map: how far (0-1) a cell's centre must rise above "
                               "the saddle to its neighbour on the distance map to make a cell of its own"}),
    (("--no-measure",), "predict.measure_cells", {"action": "store_const", "const": False,
                                                  "help": "skip the per-cell measurement table"}),
    (("--no-image",), "predict.store_image", {
        "action": "store_const", "const": False,
        "help": "do not copy the source images into the store (labels only; napari then shows no image)"}),
    (("--save-probabilities",), "predict.save_probabilities", {
        "action": "store_const", "const": True, "help": "also store the probability map (float16)"}),
    (("--tta",), "predict.tta", {"action": "store_const", "const": True,
                                 "help": "average over 8 flips/rotations (slower, smoother masks)"}),
    (("--batch-size",), "predict.batch_size", {"type": int, "help": "images per forward pass (none: 1 on CPU, 8 on CUDA)"}),
    (("--device",), "predict.device", {"help": "auto, cpu, cuda or cuda:N"}),
    (("--no-amp",), "predict.amp", {"action": "store_const", "const": False,
                                    "help": "plain fp32 inference, no mixed precision"}),
    (("--compile",), "predict.compile", {"action": "store_const", "const": True,
                                         "help": "torch.compile the model (pays off on long runs)"}),
    (("--tile-size",), "predict.tile_size", {"type": int, "help": "tile larger images"}),
    (("--tile-overlap",), "predict.tile_overlap", {"type": int, "help": "pixels shared by neighbouring tiles"}),
    (("--max-pixels",), "predict.max_pixels", {"type": int, "help": "refuse images with more pixels, before decoding"}),
]

REGISTRY_FLAG: Flag = (("--registry",), "registry_url", {"help": "model registry URL"})

SEGMENT_JOB_FLAGS: list[Flag] = [
    (("--model-version",), "model_version", {"help": "registered version, 'current', or 'bundled' (the model shipped "
                                                     "in the package)"}),
    (("--shard-size",), "shard_size", {"type": int, "help": "images per parallel task"}),
    (("--max-parallel-shards",), "max_parallel_shards", {"type": int, "help": "shards run at once on this machine"}),
    (("--dask-address",), "dask_address", {"help": "run shards on this Dask scheduler (tcp://host:port)"}),
]

TRAIN_JOB_FLAGS: list[Flag] = [
    (("--cache-dir",), "cache_dir", {"help": "local dataset cache"}),
    (("--work-dir",), "work_dir", {"help": "local directory for the training runs"}),
    (("--no-promote",), "promote", {"action": "store_const", "const": False,
                                    "help": "register without marking the model current"}),
]

TUNE_JOB_FLAGS: list[Flag] = [
    (("--cache-dir",), "cache_dir", {"help": "local dataset cache"}),
    (("--work-dir",), "work_dir", {"help": "local directory for the trials"}),
    (("--promote",), "promote", {"action": "store_const", "const": True, "help": "make the best trial's model current"}),
    (("--trials",), "trials", {"type": int, "help": "grid points to train"}),
    (("--parallel",), "max_parallel_trials", {"type": int, "help": "trials at once, each in its own process"}),
    (("--seed",), "seed", {"type": int, "help": "which grid points are drawn"}),
    (("--dask-address",), "dask_address", {"help": "train trials on this Dask scheduler (tcp://host:port)"}),
    (("--lr",), "space.learning_rate", {"type": float, "nargs": "+", "metavar": "LR", "help": "learning rates to try"}),
    (("--base-width",), "space.base_width", {"type": int, "nargs": "+", "metavar": "W"}),
    (("--depth",), "space.depth", {"type": int, "nargs": "+", "metavar": "D"}),
    (("--dropout",), "space.dropout", {"type": float, "nargs": "+", "metavar": "P"}),
    (("--loss",), "space.loss", {"nargs": "+", "choices": ("bce", "bce_dice")}),
    (("--augmentation",), "space.augmentation", {"nargs": "+", "choices": ("flips", "strong")}),
    (("--border-weight",), "space.border_weight", {"type": float, "nargs": "+", "metavar": "W0"}),
    (("--max-minutes",), "training.max_minutes", {"type": minutes, "help": "wall-clock budget of each trial; 0 for none"}),
    (("--patience",), "training.patience", {"type": int, "help": "early stopping patience of each trial"}),
]


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag], prefix: str = SETTING,
              model: type[BaseModel] = CellsegSettings) -> None:
    """Add each flag for its field of `model` (settings or a job), applied only when given; its
    help shows the field's default."""
    for names, key, declared in flags:
        options = dict(declared)
        if options.get("action") != "store_const":
            if "choices" not in options:
                options.setdefault("metavar", names[0].lstrip("-").upper().replace("-", "_"))
            default = field_default(model, key)
            options["help"] = f"{options.get('help', '')} (default {'none' if default is None else default})".strip()
        parser.add_argument(*names, dest=f"{prefix}{key}", default=argparse.SUPPRESS, **options)


def field_default(model: type[BaseModel], key: str) -> Any:
    """The default of the dotted field `key` of `model`."""
    section, *path = key.split(".")
    value = model.model_fields[section].get_default(call_default_factory=True)
    for name in path:
        value = getattr(value, name)
    return value


def given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The fields the flags of `prefix` set, as nested dicts ({'training': {'epochs': 5}})."""
    nested: dict[str, Any] = {}
    for name, value in vars(args).items():
        if name.startswith(prefix):
            *parents, leaf = name.removeprefix(prefix).split(".")
            node = nested
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
    return nested

