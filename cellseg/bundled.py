"""The small general-purpose model shipped in the package, which `cellseg predict` uses when no
`--model` is given, so that a new user gets masks before training anything.

It is trained on synthetic images only (`cellseg.synth`: bright-on-dark and dark-on-bright
cells, touching cells kept apart by their instance labels), never on `../shared/data`, by

    make bundled-model          # = python -m cellseg.build_bundled --out runs/bundled --install

which rewrites `cellseg/models/general.pt` and its provenance file `general.json`. Training is
seeded; on a different CPU or torch build the weights may differ in the last bits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from cellseg.checkpoint import CheckpointError
from cellseg.config import AugmentationConfig, ModelConfig, TrainConfig

MODELS_DIR = Path(__file__).resolve().parent / "models"
BUNDLED_CHECKPOINT = MODELS_DIR / "general.pt"
BUNDLED_PROVENANCE = MODELS_DIR / "general.json"
BUILD_COMMAND = "make bundled-model"
BUNDLED_VERSION = "bundled"  # the model version name flows accept for it


class BundledRecipe(BaseModel):
    """Everything that decides the bundled model: the synthetic data and the training settings."""

    images: int = 160
    image_size: int = 256
    data_seed: int = 2026
    polarity: Literal["bright", "dark", "mixed"] = "mixed"
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
