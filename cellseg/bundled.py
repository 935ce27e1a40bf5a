"""The models shipped in the package, chosen by name, so that a new user gets masks before
training anything:

- `nuclei` (the default, what 'bundled' means): nuclei of fluorescence, brightfield and stained
  tissue images, trained on the 664 annotated images of the DSB2018 stage-1 training set (CC0);
- `general`: trained on synthetic images only (`cellseg.synth`).

Each is rebuilt by one command from its recipe below (`cellseg.build_bundled`):

    make nuclei-model           # = python -m cellseg.build_bundled nuclei --install
    make bundled-model          # = python -m cellseg.build_bundled general --install

which writes `cellseg/models/<name>.pt` and its model card `<name>.json` (training data, recipe,
cell-size range, device, test figures, sha256; the checksum is verified on every load).
Training is seeded; on another CPU or torch build the weights may differ in the last bits.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from cellseg.checkpoint import CheckpointError
from cellseg.config import AugmentationConfig, ModelConfig, TrainConfig

MODELS_DIR = Path(__file__).resolve().parent / "models"
BUNDLED_VERSION = "bundled"  # the model version name that means the default shipped model


class GeneralRecipe(BaseModel):
    """Everything that decides the `general` model: the synthetic data and the training settings."""

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


class NucleiRecipe(BaseModel):
    """Everything that decides the `nuclei` model: the DSB2018 stage-1 training images with their
    instance labels, and the training settings (docs/quality.md has the measurements behind them)."""

    data_dir: str = "../shared/data/dsb2018-train"
    # Every image is resampled so that its median nucleus is the collection's median (about 20 px);
    # the distance map separates touching nuclei (it beat border weights, and both together, on the
    # validation images: docs/quality.md "Instance representations"). Width 48, 2.25x the compute of
    # 32: validation cell F1 0.890 against the width-32 weights' 0.878 (docs/quality.md).
    model: ModelConfig = ModelConfig(base_width=48, depth=4, distance_map=True, cell_diameter="auto")
    # Scale augmentation (log-uniform over 1/1.4-1.4) around the model's cell size covers the
    # spread of sizes within an image and an imperfect size estimate at prediction; crops are
    # drawn by area so neither the 1388x1040 images nor the 256x256 ones dominate, and every kind
    # of image (fluorescence, brightfield, stained tissue) gets at least 15% of them. Validation
    # Dice (threshold 0.5) plateaus at about 0.90 from the first epoch while the loss still falls,
    # so the loss decides the best epoch and the learning-rate steps. Eight crops per step keep a
    # GPU busy; the shipped weights are 45 epochs on an H200 (a 5.4-minute budget, reached while
    # the validation loss still fell: benchmarks/nuclei_candidates.py).
    training: TrainConfig = TrainConfig(
        epochs=45, batch_size=8, patch_size=192, patches_per_image=2, patch_sampling="by_area", val_fraction=0.1,
        balance_appearance=0.15,
        patience=12, lr_patience=4, monitor="val_loss", min_delta=1e-4, max_minutes=None, seed=0,
        augmentation=AugmentationConfig(affine_probability=0.5, rotation_degrees=180.0, max_scale=1.4,
                                        intensity_probability=0.5),
    )


SHIPPED_MODELS: dict[str, tuple[str, str]] = {  # name: (description, the command that rebuilds it)
    "nuclei": ("nuclei of fluorescence, brightfield and stained-tissue images (DSB2018 stage-1 training set)",
               "make nuclei-model"),
    "general": ("general-purpose cell model trained on synthetic images only", "make bundled-model"),
}
DEFAULT_SHIPPED_MODEL = "nuclei"


def shipped_name(version: str) -> str | None:
    """The shipped model a model version names ('bundled' is the default one), else None."""
    if version == BUNDLED_VERSION:
        return DEFAULT_SHIPPED_MODEL
    return version if version in SHIPPED_MODELS else None


def shipped_paths(name: str) -> tuple[Path, Path]:
    """(checkpoint, model card) of the shipped model `name`."""
    if name not in SHIPPED_MODELS:
        raise CheckpointError(f"no shipped model named '{name}'; the package has {', '.join(SHIPPED_MODELS)}")
    return MODELS_DIR / f"{name}.pt", MODELS_DIR / f"{name}.json"


def model_card(name: str) -> dict[str, Any]:
    """The model card of the shipped model `name` (recipe, data, figures, sha256)."""
    _, card = shipped_paths(name)
    if not card.is_file():
        raise CheckpointError(f"the shipped model '{name}' has no model card '{card}'; rebuild it with "
                              f"`{SHIPPED_MODELS[name][1]}`")
    return dict(json.loads(card.read_text()))


def shipped_file(name: str) -> Path:
    """Path of a shipped checkpoint, unverified; a clear error when an installation lacks it."""
    checkpoint, _ = shipped_paths(name)
    if not checkpoint.is_file():
        raise CheckpointError(
            f"the shipped model '{name}' ({checkpoint}) is missing from this installation; "
            f"pass --model CHECKPOINT or rebuild it with `{SHIPPED_MODELS[name][1]}`"
        )
    return checkpoint


def check_shipped_digest(name: str, digest: str) -> None:
    """Refuse a shipped checkpoint whose SHA-256 `digest` is not the one its model card records."""
    expected = model_card(name).get("sha256")
    if digest != expected:
        raise CheckpointError(f"the shipped model '{shipped_paths(name)[0]}' does not match the sha256 of its model "
                              f"card ({digest[:12]} vs {str(expected)[:12]}); reinstall cellseg or rebuild it with "
                              f"`{SHIPPED_MODELS[name][1]}`")


def shipped_checkpoint(name: str = DEFAULT_SHIPPED_MODEL) -> str:
    """Path of a shipped checkpoint whose bytes match the sha256 of its model card; a clear
    error when an installation lacks it or it was altered."""
    checkpoint = shipped_file(name)
    check_shipped_digest(name, hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    return str(checkpoint)
