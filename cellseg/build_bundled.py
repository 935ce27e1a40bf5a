"""Rebuild the model shipped in the package (`cellseg.bundled`) from its recipe:

    make bundled-model          # = python -m cellseg.build_bundled --out runs/bundled --install
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from datetime import datetime, timezone
from pathlib import Path

from cellseg import __version__
from cellseg.bundled import BUILD_COMMAND, BUNDLED_CHECKPOINT, BUNDLED_PROVENANCE, MODELS_DIR, BundledRecipe
from cellseg.jobs import TrainJob, TrainOutcome, run_training
from cellseg.paths import LOCAL_ROOT
from cellseg.synth import write_dataset

logger = logging.getLogger(__name__)


def build(out_dir: str | Path, recipe: BundledRecipe | None = None, install: bool = False) -> TrainOutcome:
    """Generate the synthetic dataset under `out_dir/data`, train it with `run_training`, and with
    `install` copy the best checkpoint into the package with a provenance file (recipe, metrics,
    sha256, command)."""
    recipe = recipe or BundledRecipe()
    out = Path(out_dir)
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    write_dataset(str(data), count=recipe.images, size=recipe.image_size, seed=recipe.data_seed,
                  polarity=recipe.polarity, vary_size=True)
    job = TrainJob(images_url=str(data / "images"), masks_url=str(data / "labels"),
                   model=recipe.model, training=recipe.training)
    outcome = run_training(job, out / "training")
    if install:
        MODELS_DIR.mkdir(exist_ok=True)
        shutil.copyfile(outcome.best_checkpoint, BUNDLED_CHECKPOINT)
        result = outcome.result
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
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the bundled general-purpose model on synthetic images.")
    parser.add_argument("--out", default=f"{LOCAL_ROOT}/bundled", help="working directory (synthetic data, training run)")
    parser.add_argument("--install", action="store_true", help=f"copy the result to {BUNDLED_CHECKPOINT}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    build(args.out, install=args.install)


if __name__ == "__main__":
    main()
