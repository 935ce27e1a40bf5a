"""The command line's parser, its flags as tables: each flag names the settings or job field it sets, so a
field has one meaning everywhere (a flag, a CELLSEG_* variable, a settings file, a flow
parameter). Flags apply only when given; the environment and the settings file fill in the rest."""

from __future__ import annotations

import argparse
import difflib
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel

from cellseg import __version__
from cellseg.config import COMPILE_MODES, AugmentationConfig
from cellseg.job_config import FROM_SETTINGS, SegmentJob, TrainJob, TuneJob
from cellseg.paths import LOCAL_ROOT
from cellseg.settings import CellsegSettings

CONFIG_HELP = "TOML or YAML settings file (default: $CELLSEG_CONFIG); flags > CELLSEG_* environment > file"
QUIET_HELP = "only warnings and errors on stderr"
SETTING, JOB = "setting:", "job:"  # argparse dest prefixes of the two kinds of field
PARTLY_FAILED = 3  # the exit status of a batch in which some images failed
EXIT_STATUS_HELP = (
    "exit status: 0 done (every image done or skipped, or nothing to do); 1 verify found damaged images (not "
    "repaired); 2 bad usage, settings or input, or storage that cannot be used (no credentials, unreachable, timed "
    f"out, denied), with one line saying which; {PARTLY_FAILED} some images failed: each is listed and recorded, the "
    "rest are done, and the next run tries the failed ones again (export: damaged images were left out of the "
    "table); 130 interrupted (Ctrl-C): what was written is kept"
)


def cell_diameter(text: str) -> float | str | None:
    """--cell-diameter of training: pixels, 'auto' or 'none'."""
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    return float(text)


def z_plane(text: str) -> int | str:
    """--z: a plane index or 'max' (projection)."""
    return text if text == "max" else int(text)


def time_point(text: str) -> int | str:
    """--t: a time point index or 'all'."""
    return text if text == "all" else int(text)


def minutes(text: str) -> float | str | None:
    """--max-minutes: 0 means no limit, 'auto' the default budget."""
    return text if text == "auto" else float(text) or None


def row_limit(text: str) -> int | None:
    """--limit of `results`: how many rows to show; 0 shows every row."""
    rows = int(text)
    if rows < 0:
        raise argparse.ArgumentTypeError(f"{rows} rows: give 0 (every row) or more")
    return rows or None


def at_least(least: int, what: str) -> Any:
    """An argparse type: an integer of at least `least` (`what` names it in the error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} {what}: give {least} or more")
        return value
    return parse


Flag = tuple[tuple[str, ...], str, dict[str, Any]]  # (flags, settings field, argparse keywords)

TRAINING_FLAGS: list[Flag] = [
    (("--epochs",), "training.epochs", {"type": int}),
    (("--patience",), "training.patience", {"type": int, "help": "epochs without improvement before stopping"}),
    (("--min-delta",), "training.min_delta", {"type": float}),
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
    (("--cell-diameter-um",), "predict.cell_diameter_um", {
        "type": float, "help": "the cells' median diameter in µm, converted with each image's pixel size (from its "
                               "metadata; an image without one fails)"}),
    (("--channel",), "predict.selection.channel", {
        "help": "channel to segment in multi-channel files: index (0 = first) or name, e.g. DAPI; needed when a "
                "file has several"}),
    (("--z",), "predict.selection.z", {"type": z_plane, "metavar": "Z|max",
                                       "help": "z plane of z-stacks, or max: maximum projection"}),
    (("--t",), "predict.selection.t", {"type": time_point, "metavar": "T|all",
                                       "help": "time point of time series, or all: each one an image (<name>_t003)"}),
    (("--no-split",), "predict.split_touching", {"action": "store_const", "const": False,
                                                 "help": "keep touching cells as one object (no watershed); "
                                                         "default: as the model decided when it was trained"}),
    (("--split",), "predict.split_touching", {"action": "store_const", "const": True,
                                              "help": "always separate touching cells"}),
    (("--split-depth",), "predict.split_depth", {
        "type": float, "help": "how much narrower (pixels of distance) a neck must be than both cells to split them"}),
    (("--centre-prominence",), "predict.centre_prominence", {
        "type": float, "help": "for a model trained with --distance-map: how far (0-1) a cell's centre must rise above "
                               "the saddle to its neighbour on the distance map to make a cell of its own (default: the model's, "
                               "decided on its validation images when it was trained)"}),
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
                                                                           "or a multiple of 1024 above"}),
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
    variable may give one (a flag's help is written before --config is read)."""
    for names, key, declared in flags:
        options = dict(declared)
        if options.get("action") != "store_const":
            if "choices" not in options:
                options.setdefault("metavar", names[0].lstrip("-").upper().replace("-", "_"))
            default = "none" if (value := field_default(model, key)) is None else value
            from_settings = model is CellsegSettings or key.split(".")[0] in FROM_SETTINGS
            if model is not CellsegSettings and key in UNDER_LOCAL_ROOT:
                where = (f"default: {str(default).removeprefix(LOCAL_ROOT + '/')} under the settings' local_root, "
                         f"else {default}")
            else:
                where = f"default: the settings' {key}, else {default}" if from_settings else f"default {default}"
            options["help"] = f"{options.get('help', '')} ({where})".strip()
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



def _command(group: argparse._SubParsersAction, name: str, run: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """A (sub)command that also takes --config and -q after its name; `run` names its function in
    `cellseg.cli.COMMANDS`."""
    parser = group.add_parser(name, **kwargs)
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE", help=CONFIG_HELP)
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=QUIET_HELP)
    if run is not None:
        parser.set_defaults(run=run)
    return parser


# the parser --------------------------------------------------------------------------------------


class CommandParser(argparse.ArgumentParser):
    """A parser whose commands refuse what they do not know themselves: with the command's own
    usage line, and the option nearest a misspelt one (`--treshold`: did you mean --threshold?),
    where argparse would have the top parser name them under `cellseg`'s usage."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras and self._subparsers is None:  # a command's own parser, not one that holds commands
            self.error(f"unrecognized arguments: {' '.join(extras)}{self._nearest(extras)}")
        return namespace, extras

    def _nearest(self, extras: list[str]) -> str:
        options = [option for action in self._actions for option in action.option_strings if option.startswith("--")]
        for extra in extras:
            if extra.startswith("--") and (close := difflib.get_close_matches(extra.split("=", 1)[0], options, n=1)):
                return f" (did you mean {close[0]}?)"
        return ""


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="cellseg", description="Segment grayscale microscopy images into cells and background with a U-Net.",
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"cellseg {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    synth = _command(commands, "synth", "synth", help="write a synthetic dataset (images/, masks/, labels/)")
    synth.add_argument("--out", required=True, help="directory URL to write into")
    synth.add_argument("--count", type=at_least(1, "images"), default=24, help="number of images (default 24)")
    synth.add_argument("--size", type=at_least(16, "pixels"), default=128, help="image side in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--bit-depth", type=int, choices=(8, 16), default=8)
    synth.add_argument("--polarity", choices=("bright", "dark", "mixed"), default="bright",
                       help="bright cells on dark (fluorescence), dark on bright, or alternating")
    synth.add_argument("--vary-size", action="store_true", help="draw each side from [3/4 size, size]")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace a dataset already in OUT (its images/, masks/ and labels/; refused without it)")

    train = _command(commands, "train", "train", help="train a U-Net on image/mask pairs")
    _add_pairs(train)
    train.add_argument("--out", required=True, help="local directory for best.pt, last.pt, history.json")
    add_flags(train, TRAINING_FLAGS + MODEL_FLAGS + [REGISTRY_FLAG])
    existing_run = train.add_mutually_exclusive_group()
    existing_run.add_argument("--resume", action="store_true", help="continue the run in OUT from its last.pt")
    existing_run.add_argument("--overwrite", action="store_true",
                              help="replace the run already in OUT (refused without it, or --resume)")

    predict = _command(commands, "predict", "predict", help="segment images into a zarr results store",
                       epilog=EXIT_STATUS_HELP)
    chosen_model = predict.add_mutually_exclusive_group()
    chosen_model.add_argument("--model", help="checkpoint URL (e.g. runs/x/best.pt) or a shipped model's name (nuclei, "
                                              "general); default: the shipped nuclei model")
    chosen_model.add_argument("--model-version", metavar="VERSION",
                              help="a version of the registry (--registry), or 'current': the one promoted last")
    add_flags(predict, [REGISTRY_FLAG])
    predict.add_argument("--images", required=True, help="directory URL of images to segment, or one image file")
    predict.add_argument("--out", required=True, help="zarr store URL; created if missing, done images skipped")
    add_flags(predict, PREDICT_FLAGS)

    evaluate = _command(commands, "evaluate", "evaluate", help="score a results store against ground-truth masks")
    evaluate.add_argument("--pred", required=True, help="zarr results store URL")
    evaluate.add_argument("--masks", required=True,
                          help="directory URL of ground-truth masks: binary, or instance label images (one integer "
                               "per cell, as train reads them), which give the cell scores too")
    evaluate.add_argument("--labels", help="directory URL of ground-truth instance label images (one value per cell): "
                                           "adds F1 at IoU 0.5, the DSB2018 score and the cell count error")
    evaluate.add_argument("--json", action="store_true", help="print the full result as JSON")

    results = _command(commands, "results", "results", help="summarise a results store")
    results.add_argument("store", help="zarr results store URL")
    results.add_argument("--json", action="store_true", help="print all statistics rows as JSON")
    results.add_argument("--limit", type=row_limit, default=10, help="rows to show, 0 for all (default 10)")

    export = _command(commands, "export", "export", help="write a store's per-cell (or per-image) table as CSV or "
                                                          "Parquet, or its label images as TIFF or PNG files",
                      description="A table (--table, the default: one row per cell) into the file OUT, or with "
                                  "--labels each done image's cell labels or mask as a file <image id>_cells.tif "
                                  "(or _mask) in the folder OUT, for Fiji, CellProfiler, QuPath or any tool that "
                                  "reads label images from files.",
                      epilog=f"Exit status 0: written; {PARTLY_FAILED}: written without the store's damaged images, "
                             "named with the repair; 2: bad usage or an OUT refused.")
    export.add_argument("store", help="zarr results store URL")
    export.add_argument("--format", choices=("csv", "parquet", "tiff", "png"),
                        help="csv (default) or parquet for a table; tiff (default: uint16, or uint32 above 65,535 "
                             "cells, tiled for a large image) or png (16-bit) for --labels")
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

    verify = _command(commands, "verify", "verify", help="check a results store for damage; --repair marks broken "
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

    tune = _command(commands, "tune", "tune",
                    help="search hyper-parameters: train trials in parallel (tune-unet flow), register the best",
                    description="Runs the tune-unet Prefect flow here: trains TRIALS points of the grid the value lists "
                                "span (each with early stopping), registers the best by validation Dice and prints every trial.")
    _add_pairs(tune)
    add_flags(tune, [REGISTRY_FLAG])
    add_flags(tune, TUNE_JOB_FLAGS, JOB, TuneJob)
    tune.add_argument("--training-json", default="{}",
                      help='other TrainConfig fields for every trial as JSON, e.g. \'{"epochs": 20}\'')

    models = _command(commands, "models", help="list, show, promote, roll back and export registered model versions")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (("list", "list versions and the shipped models"),
                            ("show", "show one version (metadata and the URLs of its checkpoint, training history and "
                                     "pictures), or a shipped model's card (nuclei, general), as JSON"),
                            ("promote", "mark a version current"),
                            ("rollback", "make current again the version that was current before the last promotion"),
                            ("export", "export a version (or --checkpoint) to TorchScript or ONNX for other software")):
        action = _command(actions, name, "models", help=help_text)
        add_flags(action, [REGISTRY_FLAG])
        if name not in ("list", "rollback"):
            # export's default is set in cellseg.cli_models: a version given beside --checkpoint is refused there
            action.add_argument("version", nargs="?" if name in ("show", "export") else None,
                                default=None if name == "export" else "current")
        if name == "export":
            action.add_argument("--checkpoint", help="export this checkpoint file instead of a registered version "
                                                     "(e.g. runs/training/best.pt)")
            action.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                                help="TorchScript takes any image size; ONNX needs the onnx extra (default %(default)s)")
            action.add_argument("--out", required=True, help="file to write; its description goes to OUT.json")
            action.add_argument("--overwrite", action="store_true", help="replace OUT and OUT.json if they exist")

    flow = _command(commands, "flow", help="run a Prefect flow (train-unet, segment-images) from here")
    flows = flow.add_subparsers(dest="flow", required=True, metavar="FLOW")
    flow_train = _command(flows, "train-unet", "flow_train", help="ingest, train, evaluate and register a model")
    _add_pairs(flow_train)
    add_flags(flow_train, [REGISTRY_FLAG])
    add_flags(flow_train, TRAIN_JOB_FLAGS, JOB, TrainJob)
    add_flags(flow_train, TRAINING_FLAGS + MODEL_FLAGS)
    flow_train.add_argument("--model-json", default="{}",
                            help='ModelConfig fields as JSON, e.g. \'{"base_width": 8}\', over the settings\' model section')
    flow_train.add_argument("--training-json", default="{}",
                            help='TrainConfig fields as JSON, e.g. \'{"epochs": 5}\', over the settings\' training section')
    segment = _command(flows, "segment-images", "flow_segment", help="segment new images in parallel shards into a store",
                       epilog=EXIT_STATUS_HELP)
    segment.add_argument("--source", required=True, help="directory URL of images, or one image file")
    segment.add_argument("--store", required=True, help="zarr results store URL")
    add_flags(segment, [REGISTRY_FLAG])
    add_flags(segment, SEGMENT_JOB_FLAGS, JOB, SegmentJob)
    add_flags(segment, PREDICT_FLAGS)

    config = _command(commands, "config", help="show the effective settings (flags > CELLSEG_* environment > --config file)")
    config_actions = config.add_subparsers(dest="action", required=True, metavar="ACTION")
    show = _command(config_actions, "show", "config", help="print the settings every command starts from, secrets masked")
    show.add_argument("--json", action="store_true", help="JSON instead of YAML")

    serve = _command(commands, "serve", "serve",
                     help="serve the train-unet, tune-unet, nightly-segmentation and backfill deployments")
    serve.add_argument("--nightly-source", default=None, help="image directory URL for nightly-segmentation")
    serve.add_argument("--nightly-store", default=None, help="store URL for nightly-segmentation")
    serve.add_argument("--cron", default=None, help="nightly schedule (default: the one in deployments/prefect.yaml)")
    return parser


def _add_pairs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="directory URL of images")
    parser.add_argument("--masks", required=True,
                        help="directory URL of masks, each named as its image or with _mask, _masks, _label, "
                             "_labels or _cp_masks before the extension (may be the --images folder): binary masks, "
                             "or instance label images (one integer per cell), which teach the model to keep "
                             "touching cells apart")
