"""The arguments of the commands that make data and models: synth, train, and models (list, show,
promote, rollback, export); their functions are in `cellseg.cli_models`."""

from __future__ import annotations

import argparse

from cellseg.cli_parser_base import add_command, add_pairs, at_least
from cellseg.cli_parser_flags import MODEL_FLAGS, REGISTRY_FLAG, TRAINING_FLAGS, add_flags


def add_synth(commands: argparse._SubParsersAction) -> None:
    """`cellseg synth`: a synthetic dataset."""
    synth = add_command(commands, "synth", "synth", help="write a synthetic dataset (images/, masks/, labels/)")
    synth.add_argument("--out", required=True, help="directory URL to write into")
    synth.add_argument("--count", type=at_least(1, "images"), default=24, help="number of images (default 24)")
    synth.add_argument("--size", type=at_least(16, "pixels"), default=128, help="image side in pixels (default 128)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--bit-depth", type=int, choices=(8, 16), default=8,
                       help="bits per pixel of the images written (default: 8)")
    synth.add_argument("--polarity", choices=("bright", "dark", "mixed"), default="bright",
                       help="bright cells on dark (fluorescence), dark on bright, or alternating")
    synth.add_argument("--vary-size", action="store_true", help="draw each side from [3/4 size, size]")
    synth.add_argument("--overwrite", action="store_true",
                       help="replace a dataset already in OUT (its images/, masks/ and labels/; refused without it)")


def add_train(commands: argparse._SubParsersAction) -> None:
    """`cellseg train`: a U-Net trained here, into a local folder."""
    train = add_command(commands, "train", "train", help="train a U-Net on image/mask pairs")
    add_pairs(train, resumable=True)
    train.add_argument("--out", required=True, help="local directory for best.pt, last.pt, history.json")
    add_flags(train, TRAINING_FLAGS + MODEL_FLAGS + [REGISTRY_FLAG])
    existing_run = train.add_mutually_exclusive_group()
    existing_run.add_argument("--resume", action="store_true", help="continue the run in OUT from its last.pt, on its images and masks with its "
                                                               "settings; flags given change them (--epochs N)")
    existing_run.add_argument("--overwrite", action="store_true",
                              help="replace the run already in OUT (refused without it, or --resume)")


def add_models(commands: argparse._SubParsersAction) -> None:
    """`cellseg models` and its actions on the registry's versions."""
    models = add_command(commands, "models", help="list, show, promote, roll back and export registered model versions")
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")
    for name, help_text in (("list", "list versions and the shipped models"),
                            ("show", "show one version (metadata and the URLs of its checkpoint, training history and "
                                     "pictures), or a shipped model's card (nuclei, general), as JSON"),
                            ("promote", "mark a version current"),
                            ("rollback", "make current again the version that was current before the last promotion"),
                            ("export", "export a version (or --checkpoint) to TorchScript or ONNX for other software")):
        action = add_command(actions, name, "models", help=help_text)
        add_flags(action, [REGISTRY_FLAG])
        if name not in ("list", "rollback"):
            # export's default is set in cellseg.cli_models: a version given beside --checkpoint is refused there
            action.add_argument("version", nargs="?" if name in ("show", "export") else None,
                                default=None if name == "export" else "current")
        if name == "export":
            action.add_argument("--checkpoint", help="export this checkpoint file instead of a registered version "
                                                     "(e.g. runs/training/best.pt)")
            action.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                                help="TorchScript takes any image size; ONNX needs the export extra, pip install 'cellseg[export]' (default %(default)s)")
            action.add_argument("--out", required=True, help="file to write; its description goes to OUT.json")
            action.add_argument("--overwrite", action="store_true", help="replace OUT and OUT.json if they exist")
