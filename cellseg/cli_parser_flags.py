"""The command line's flags as tables: each flag names the settings or job field it sets, so a
field has one meaning everywhere (a flag, a CELLSEG_* variable, a settings file, a flow
parameter). Flags apply only when given; the environment and the settings file fill in the rest."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import BaseModel

from cellseg.cli_parser_base import SETTING, cell_diameter, minutes, time_point, z_plane
from cellseg.config import COMPILE_MODES, AugmentationConfig
from cellseg.job_config import FROM_SETTINGS
from cellseg.paths import LOCAL_ROOT
from cellseg.settings import CellsegSettings

Flag = tuple[tuple[str, ...], str, dict[str, Any]]  # (flags, settings field, argparse keywords)

TRAINING_FLAGS: list[Flag] = [
    (("--epochs",), "training.epochs", {"type": int}),
    (("--patience",), "training.patience", {"type": int, "help": "epochs without improvement before stopping"}),
    (("--min-delta",), "training.min_delta", {"type": float, "help": "smallest gain that counts as an improvement "
                                                                        "for early stopping and the learning rate's "
                                                                        "halving (best.pt takes any gain)"}),
    (("--monitor",), "training.monitor", {"choices": ("val_dice", "val_iou", "val_loss"),
                                          "help": "what best.pt and early stopping watch (val_loss: plain BCE)"}),
    (("--val-fraction",), "training.val_fraction", {"type": float}),
    (("--seed",), "training.seed", {"type": int}),
    (("--batch-size",), "training.batch_size", {"type": int}),
    (("--lr",), "training.learning_rate", {"type": float, "help": "Adam learning rate"}),
    (("--patch-size",), "training.patch_size", {"type": int}),
    (("--patches-per-image",), "training.patches_per_image", {"type": int}),
    (("--patch-sampling",), "training.patch_sampling", {"choices": ["per_image", "by_area"]}),
    (("--balance-appearance",), "training.balance_appearance", {
        "type": float, "metavar": "SHARE", "help": "least share of crops for each kind of image (fluorescence, "
                                                   "brightfield, stained tissue), repeating the rarer kinds"}),
    (("--no-augment",), "training.augment", {"action": "store_const", "const": False, "help": "no augmentation at all"}),
    (("--strong-augmentation",), "training.augmentation", {
        "action": "store_const", "const": AugmentationConfig.strong().model_dump(),
        "help": "add affine warps, elastic deformation and intensity changes to the flips/rotations"}),
    (("--loss",), "training.loss", {"choices": ("bce", "bce_dice"), "help": "BCEWithLogits, or BCEWithLogits + soft Dice"}),
    (("--border-weight",), "training.border_weight", {
        "type": float, "help": "U-Net paper border weight w0 on background between nearby cells (paper: 10; 0 = off)"}),
    (("--border-sigma",), "training.border_sigma", {"type": float, "help": "pixels over which the border weight decays"}),
    (("--max-minutes",), "training.max_minutes", {"type": minutes, "help": "wall-clock budget; 0 for none; auto: 15 "
                                                                           "when fine-tuning, 25 from scratch"}),
    (("--device",), "training.device", {"help": "auto, cpu, cuda or cuda:N"}),
    (("--no-amp",), "training.amp", {"action": "store_const", "const": False,
                                     "help": "plain fp32, no bf16/fp16 mixed precision"}),
    (("--compile",), "training.compile", {"choices": COMPILE_MODES,
                                          "help": "torch.compile the training steps; reduce-overhead: also as CUDA "
                                                  "graphs"}),
    (("--init-from",), "training.init_from", {"help": "fine-tune from this checkpoint, shipped model, or version of "
                                                      "the registry ('current' or a version name; --registry) (its "
                                                      "model config replaces --depth etc.); 'auto': the shipped model "
                                                      "for small datasets whose cells it already finds"}),
    (("--from-scratch",), "training.init_from", {"action": "store_const", "const": None,
                                                 "help": "random initialisation, never the shipped model"}),
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
                "training and in prediction (nuclei: 19); 'none': images at their own scale; 'auto': the "
                "training images' median cell when their cell sizes differ more than 1.5x, else none"}),
    (("--distance-map",), "model.distance_map", {
        "action": "store_const", "const": True,
        "help": "also learn each cell's distance to its outline (needs instance label masks) and split touching "
                "cells at its peaks: fewer merged cells, a little less pixel Dice"}),
]

PREDICT_FLAGS: list[Flag] = [
    (("--threshold",), "predict.threshold", {"type": float, "none_means": "the model's, decided when it was trained"}),
    (("--min-cell-area",), "predict.min_cell_area", {"type": int}),
    (("--cell-diameter",), "predict.cell_diameter", {
        "type": float, "help": "median diameter (pixels) of the cells in these images, for a model trained with "
                               "--cell-diameter", "none_means": "measured on each image"}),
    (("--cell-diameter-um",), "predict.cell_diameter_um", {
        "type": float, "help": "the cells' median diameter in µm, converted with each image's pixel size (from its "
                               "metadata; an image without one fails)", "none_means": "unset: --cell-diameter applies"}),
    (("--channel",), "predict.selection.channel", {
        "help": "channel to segment in multi-channel files: index (0 = first) or name, e.g. DAPI; needed when a "
                "file has several", "none_means": "the only one"}),
    (("--z",), "predict.selection.z", {"type": z_plane, "metavar": "Z|max",
                                       "help": "z plane of z-stacks, or max: maximum projection",
                                       "none_means": "unset, which a z-stack refuses"}),
    (("--t",), "predict.selection.t", {"type": time_point, "metavar": "T|all",
                                       "help": "time point of time series, or all: each one an image (<name>_t003)",
                                       "none_means": "unset, which a time series refuses"}),
    (("--recursive",), "predict.selection.recursive", {
        "action": "store_const", "const": True,
        "help": "also segment the images in subfolders of the source folder (to 16 levels); one in a subfolder has "
                "their path in its id: 2026-12-05/A01.tif is 2026-12-05_A01"}),
    (("--no-split",), "predict.split_touching", {"action": "store_const", "const": False,
                                                 "help": "keep touching cells as one object (no watershed); "
                                                         "default: as the model decided when it was trained"}),
    (("--split",), "predict.split_touching", {"action": "store_const", "const": True,
                                              "help": "always separate touching cells"}),
    (("--split-depth",), "predict.split_depth", {
        "type": float, "help": "for a model without a distance map: how much narrower (pixels of distance) a neck must "
                               "be than both cells to split them"}),
    (("--centre-prominence",), "predict.centre_prominence", {
        "type": float, "help": "for a model trained with --distance-map: how far (0-1) a cell's centre must rise above "
                               "the saddle to its neighbour on the distance map to make a cell of its own",
        "none_means": "the model's, decided on its validation images when it was trained"}),
    (("--no-measure",), "predict.measure_cells", {"action": "store_const", "const": False,
                                                  "help": "skip the per-cell measurement table"}),
    (("--no-image",), "predict.store_image", {
        "action": "store_const", "const": False,
        "help": "do not copy the source images into the store (labels only; napari then shows no image)"}),
    (("--save-probabilities",), "predict.save_probabilities", {
        "action": "store_const", "const": True, "help": "also store the probability map (float16)"}),
    (("--tta",), "predict.tta", {"action": "store_const", "const": True,
                                 "help": "average over 8 flips/rotations (slower, smoother masks)"}),
    (("--batch-size",), "predict.batch_size", {"type": int, "help": "images per forward pass",
                                             "none_means": "1 on CPU, 8 on CUDA"}),
    (("--device",), "predict.device", {"help": "auto, cpu, cuda or cuda:N"}),
    (("--no-amp",), "predict.amp", {"action": "store_const", "const": False,
                                    "help": "plain fp32 inference, no mixed precision"}),
    (("--compile",), "predict.compile", {"action": "store_const", "const": True,
                                         "help": "torch.compile the model, once per image size (unset: eager, "
                                                 "which was faster on CPU)"}),
    (("--no-compile",), "predict.compile", {"action": "store_const", "const": False,
                                            "help": "never torch.compile the model"}),
    (("--tile-size",), "predict.tile_size", {"type": int, "help": "tile larger images"}),
    (("--tile-overlap",), "predict.tile_overlap", {"type": int, "help": "pixels shared by neighbouring tiles, at most "
                                                    "3/4 of the tile; unset: 128, or half the tile under 256"}),
    (("--max-pixels",), "predict.max_pixels", {"type": int, "help": "refuse images with more pixels (or more than "
                                                  "8 bytes of samples per pixel of it), before decoding"}),
    (("--blockwise-above",), "predict.blocks.above_pixels", {
        "type": int, "metavar": "PIXELS", "help": "segment TIFF/OME-Zarr/CZI/ND2/LIF images with more pixels block by "
                                                  "block, never whole in memory"}),
    (("--block-size",), "predict.blocks.block_size", {"type": int, "help": "side of a block's core: 128 to 1024, "
                                                                           "or a multiple of 1024 up to 16384"}),
    (("--block-overlap",), "predict.blocks.overlap", {"type": int, "help": "pixels a block reads past its core on "
                                                                           "every side: over the largest cell's "
                                                                           "diameter"}),
]

REGISTRY_FLAG: Flag = (("--registry",), "registry_url", {"help": "model registry URL"})

SEGMENT_JOB_FLAGS: list[Flag] = [
    (("--model",), "checkpoint_url", {"help": "a checkpoint URL to segment with instead of the registry"}),
    (("--model-version",), "model_version", {"help": "registered version, 'current', or a shipped model: 'bundled' "
                                                     "(the default one), 'nuclei' or 'general'"}),
    (("--shard-size",), "shard_size", {"type": int, "help": "most images per parallel task (shards are evened out)"}),
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


# The job folders whose defaults the settings' local_root moves (`job_config.with_settings`).
UNDER_LOCAL_ROOT = ("cache_dir", "work_dir")


def add_flags(parser: argparse.ArgumentParser, flags: list[Flag], prefix: str = SETTING,
              model: type[BaseModel] = CellsegSettings) -> None:
    """Add each flag for its field of `model` (settings or a job), applied only when given; its
    help shows the field's default, as the settings' value where a settings file or CELLSEG_*
    variable may give one (a flag's help is written before --config is read). Flags of one field
    (--split, --no-split) exclude each other: given both, the last one won without a word."""
    keys = [key for _, key, _ in flags]
    groups = {key: parser.add_mutually_exclusive_group() for key in dict.fromkeys(keys) if keys.count(key) > 1}
    for names, key, declared in flags:
        options = dict(declared)
        if options.get("action") != "store_const":
            if "choices" not in options:
                options.setdefault("metavar", names[0].lstrip("-").upper().replace("-", "_"))
            none_means = options.pop("none_means", "none")
            default = none_means if (value := field_default(model, key)) is None else value
            from_settings = model is CellsegSettings or key.split(".")[0] in FROM_SETTINGS
            if model is not CellsegSettings and key in UNDER_LOCAL_ROOT:
                where = (f"default: {str(default).removeprefix(LOCAL_ROOT + '/')} under the settings' local_root, "
                         f"else {default}")
            else:
                where = f"default: the settings' {key}, else {default}" if from_settings else f"default {default}"
            options["help"] = f"{options.get('help', '')} ({where})".strip()
        groups.get(key, parser).add_argument(*names, dest=f"{prefix}{key}", default=argparse.SUPPRESS, **options)


def field_default(model: type[BaseModel], key: str) -> Any:
    """The default of the dotted field `key` of `model`."""
    section, *path = key.split(".")
    value = model.model_fields[section].get_default(call_default_factory=True)
    for name in path:
        value = getattr(value, name)
    return value
