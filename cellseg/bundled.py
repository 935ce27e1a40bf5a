"""The small general-purpose model shipped in the package, which `cellseg predict` uses when no
`--model` is given, so that a new user gets masks before training anything.

It is trained on synthetic images only (`cellseg.synth`: bright-on-dark and dark-on-bright
cells, touching cells kept apart by their instance labels), never on `../shared/data`, by

    make bundled-model          # = python -m cellseg.bundled --out runs/bundled --install

which rewrites `cellseg/models/general.pt` and its provenance file `general.json`. Training is
seeded; on a different CPU or torch build the weights may differ in the last bits.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from cellseg import __version__
from cellseg.checkpoint import CheckpointError
from cellseg.config import AugmentationConfig, ModelConfig, TrainConfig
from cellseg.data import (
    load_pairs,
    manifest_hash,
    pair_images_and_masks,
    split_train_val,
)
from cellseg.synth import write_dataset
from cellseg.train import TrainResult, train

MODELS_DIR = Path(__file__).resolve().parent / "models"
BUNDLED_CHECKPOINT = MODELS_DIR / "general.pt"
BUNDLED_PROVENANCE = MODELS_DIR / "general.json"
BUILD_COMMAND = "make bundled-model"
BUNDLED_VERSION = "bundled"  # the model version name flows accept for it

logger = logging.getLogger(__name__)


class BundledRecipe(BaseModel):
    """Everything that decides the bundled model: the synthetic data and the training settings."""

    images: int = 160
    image_size: int = 256
    data_seed: int = 2026
    polarity: str = "mixed"
    model: ModelConfig = ModelConfig(base_width=8)
    # Synthetic validation Dice saturates within a few epochs, so the loss (calibration) decides;
    # strong augmentation prepares the model for images unlike the synthetic ones. No border
    # weights: they shrank the cells (validation recall 0.93 at w0 = 5).
    training: TrainConfig = TrainConfig(
        max_minutes=12.0, patience=8, monitor="val_loss", min_delta=1e-4, patches_per_image=2, seed=0,
        augmentation=AugmentationConfig.strong(),
    )


def bundled_checkpoint() -> str:
    """Path of the shipped checkpoint; a clear error when an installation lacks it."""
    if not BUNDLED_CHECKPOINT.is_file():
        raise CheckpointError(
            f"no --model given and the bundled model '{BUNDLED_CHECKPOINT}' is missing from this installation; "
            f"pass --model CHECKPOINT or rebuild it with `{BUILD_COMMAND}`"
        )
    return str(BUNDLED_CHECKPOINT)


def build(out_dir: str | Path, recipe: BundledRecipe = BundledRecipe(), install: bool = False) -> TrainResult:
    """Generate the synthetic dataset under `out_dir/data`, train, and with `install` copy the best
    checkpoint into the package with a provenance file (recipe, metrics, sha256, command)."""
    out = Path(out_dir)
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    write_dataset(str(data), count=recipe.images, size=recipe.image_size, seed=recipe.data_seed,
                  polarity=recipe.polarity, vary_size=True)
    pairs = pair_images_and_masks(str(data / "images"), str(data / "labels"))
    train_pairs, val_pairs = split_train_val(pairs, recipe.training.val_fraction, recipe.training.seed)
    normalization = recipe.model.normalization
    loaded_train, loaded_val = load_pairs(train_pairs, normalization), load_pairs(val_pairs, normalization)
    result = train(loaded_train, loaded_val, out / "training", recipe.model, recipe.training,
                   manifest_hash(loaded_train + loaded_val))
    if install:
        MODELS_DIR.mkdir(exist_ok=True)
        shutil.copyfile(result.best_checkpoint, BUNDLED_CHECKPOINT)
        provenance = {
            "description": "general-purpose nuclei/cell model trained on synthetic images only",
            "command": BUILD_COMMAND,
            "recipe": recipe.model_dump(mode="json"),
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stop_reason": result.stop_reason,
            "validation_on_synthetic": {k: round(v, 4) for k, v in result.best_metrics.items() if k.startswith("val_")},
            "sha256": hashlib.sha256(BUNDLED_CHECKPOINT.read_bytes()).hexdigest(),
            "cellseg_version": __version__,
            "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        BUNDLED_PROVENANCE.write_text(json.dumps(provenance, indent=1) + "\n")
        logger.info("installed %s (val Dice %.4f on synthetic)", BUNDLED_CHECKPOINT, result.best_metrics.get("val_dice", 0))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the bundled general-purpose model on synthetic images.")
    parser.add_argument("--out", default="runs/bundled", help="working directory (synthetic data, training run)")
    parser.add_argument("--install", action="store_true", help=f"copy the result to {BUNDLED_CHECKPOINT}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.out, install=args.install)


if __name__ == "__main__":
    main()
