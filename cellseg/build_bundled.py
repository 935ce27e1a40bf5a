"""Rebuild a model shipped in the package (`cellseg.bundled`) from its recipe:

    make nuclei-model           # = python -m cellseg.build_bundled nuclei --install
    make bundled-model          # = python -m cellseg.build_bundled general --install
    python -m cellseg.build_bundled nuclei --post-processing-only   # the decision again, no training

Training goes to `runs/shipped/<name>/training` and is resumable (`--resume` continues from its
last epoch after an interruption); `--install` then copies the best checkpoint into the package
with its model card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellseg import __version__
from cellseg.bundled import (
    MODELS_DIR,
    SHIPPED_MODELS,
    GeneralRecipe,
    NucleiRecipe,
    model_card,
    shipped_checkpoint,
    shipped_paths,
)
from cellseg.checkpoint import load_checkpoint, save_checkpoint
from cellseg.config import PredictConfig
from cellseg.evaluate import validation_cell_scores
from cellseg.infer import Predictor
from cellseg.io import decode_mask, read_bytes
from cellseg.jobs import TrainJob, run_training
from cellseg.jobs_checkpoint import decide_postprocessing
from cellseg.jobs_training import TrainOutcome
from cellseg.loaded_pairs import load_pairs
from cellseg.mask_pixels import instance_labels
from cellseg.pairs import ImagePair, pair_images_and_masks, split_train_val
from cellseg.paths import LOCAL_ROOT
from cellseg.runtime import resolve_device
from cellseg.scale import median_cell_diameter
from cellseg.synth import write_dataset

logger = logging.getLogger(__name__)

TEST_SETS = ("dsb2018", "isbi2012")  # the figures of the shipped models come from these: never train on them


def build_general(out_dir: str | Path, recipe: GeneralRecipe | None = None, install: bool = False,
                  resume: bool = False) -> TrainOutcome:
    """Generate the synthetic dataset under `out_dir/data` and train the `general` model on it."""
    recipe = recipe or GeneralRecipe()
    out = Path(out_dir)
    data = out / "data"
    if not resume:
        if data.exists():
            shutil.rmtree(data)
        write_dataset(str(data), count=recipe.images, size=recipe.image_size, seed=recipe.data_seed,
                      polarity=recipe.polarity, vary_size=True)
    # overwrite: a rebuild replaces the last one
    outcome = run_training(recipe_job(recipe, data), out / "training", resume=resume, overwrite=True)
    if install:
        install_model("general", outcome, recipe.model_dump(mode="json"),
                      {"name": "synthetic images (cellseg.synth)", "licence": "generated", "images": recipe.images})
    return outcome


def can_resume(out_dir: str | Path) -> bool:
    """Whether `out_dir` holds an interrupted build to continue (its training's `last.pt`)."""
    return (Path(out_dir) / "training" / "last.pt").is_file()


def build_nuclei(out_dir: str | Path, recipe: NucleiRecipe | None = None, install: bool = False,
                 resume: bool = False, on_epoch: Callable[[dict[str, float]], None] | None = None) -> TrainOutcome:
    """Train the `nuclei` model on the DSB2018 stage-1 training images and their instance labels
    (`on_epoch`: as for `cellseg.train.train`)."""
    recipe = recipe or NucleiRecipe()
    data = Path(recipe.data_dir)
    if data.resolve().name in TEST_SETS:
        raise ValueError(f"'{data}' is a test set of the shipped models; train on dsb2018-train")
    if not (data / "images").is_dir() or not (data / "labels").is_dir():
        raise FileNotFoundError(f"'{data}' has no images/ and labels/ folders (the DSB2018 stage-1 training set)")
    outcome = run_training(recipe_job(recipe, data), Path(out_dir) / "training", resume=resume, overwrite=True,
                           on_epoch=on_epoch)
    if install:
        install_model("nuclei", outcome, recipe.model_dump(mode="json"), nuclei_training_data(data, outcome))
    return outcome


def nuclei_training_data(data: Path, outcome: TrainOutcome) -> dict[str, Any]:
    """What the card says about the DSB2018 training data: source, licence, counts, cell sizes."""
    diameters, nuclei = [], 0
    for pair in pair_images_and_masks(str(data / "images"), str(data / "labels")):
        decoded = decode_mask(read_bytes(pair.mask_url), pair.mask_url)
        labels = instance_labels(decoded.pixels, pair.mask_url, decoded.colour)
        if labels is None:
            continue
        nuclei += len(np.unique(labels)) - 1
        diameter = median_cell_diameter(labels)
        if diameter is not None:
            diameters.append(diameter)
    low, median, high = np.percentile(diameters, [10, 50, 90])
    return {
        "name": "2018 Data Science Bowl stage-1 training set (BBBC038v1) with the community's annotation fixes",
        "licence": "CC0",
        "citation": "Caicedo et al., Nature Methods 16, 1247-1253 (2019)",
        "images": outcome.train_images + outcome.val_images,
        "train_images": outcome.train_images,
        "val_images": outcome.val_images,
        "nuclei": nuclei,
        "dataset_hash": outcome.dataset_hash,
        "median_nucleus_diameter_px": {"p10": round(float(low), 1), "median": round(float(median), 1),
                                       "p90": round(float(high), 1)},
    }


def device_description(device: str) -> str:
    """The device a model was trained on, in words."""
    resolved = resolve_device(device)
    if resolved.type == "cuda":
        return f"{torch.cuda.get_device_name(resolved)} (CUDA, torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def install_model(name: str, outcome: TrainOutcome, recipe: dict[str, Any], training_data: dict[str, Any]) -> Path:
    """Copy the best checkpoint into the package as `name` and write its model card beside it.
    Test figures already in the card are kept (benchmarks.quality writes them) only when the
    weights are unchanged."""
    checkpoint_path, card_path = shipped_paths(name)
    MODELS_DIR.mkdir(exist_ok=True)
    shutil.copyfile(outcome.best_checkpoint, checkpoint_path)
    digest = hashlib.sha256(checkpoint_path.read_bytes()).hexdigest()
    old = json.loads(card_path.read_text()) if card_path.is_file() else {}
    result = outcome.result
    history = result.history
    card = {
        "name": name,
        "description": SHIPPED_MODELS[name][0],
        "command": SHIPPED_MODELS[name][1],
        "training_data": training_data,
        "recipe": recipe,
        "model": load_checkpoint(str(outcome.best_checkpoint)).model_config.model_dump(mode="json"),
        "trained_on": device_description(recipe["training"]["device"]),
        "training_minutes": round(sum(record["seconds"] for record in history) / 60, 1),
        "best_epoch": result.best_epoch,
        "epochs_run": len(history),
        "stop_reason": result.stop_reason,
        "validation": {key: round(value, 4) for key, value in outcome.validation.items()}
                      | {f"cells_{key}": value for key, value in outcome.cells.items()},
        "test": old.get("test", {}) if old.get("sha256") == digest else {},
        "sha256": digest,
        "cellseg_version": __version__,
        "built": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    logger.info("installed %s with its model card %s", checkpoint_path, card_path)
    return checkpoint_path


def recipe_job(recipe: NucleiRecipe | GeneralRecipe, data: Path) -> TrainJob:
    """The training job of a shipped model's `recipe` on `data`: its images/ and their labels/."""
    return TrainJob(images_url=str(data / "images"), masks_url=str(data / "labels"),
                    model=recipe.model, training=recipe.training)


def recipe_split(recipe: NucleiRecipe, data: Path) -> tuple[list[ImagePair], list[ImagePair]]:
    """The (training, validation) pairs of `data` (images/ and labels/) as `recipe`'s training
    splits them: the split `run_training` makes with the recipe's fraction and seed."""
    pairs = pair_images_and_masks(str(data / "images"), str(data / "labels"))
    return split_train_val(pairs, recipe.training.val_fraction, recipe.training.seed)


def recipe_validation_pairs(recipe: NucleiRecipe, data: Path) -> list[ImagePair]:
    """The pairs of `data` that `recipe`'s training holds out for validation (`recipe_split`)."""
    return recipe_split(recipe, data)[1]


def decide_nuclei_postprocessing(recipe: NucleiRecipe | None = None) -> Path:
    """Decide the shipped `nuclei` model's post-processing again on its recipe's validation images,
    as the end of training does (`cellseg.jobs_checkpoint.finish_checkpoint`), without training again: for
    weights trained before a choice was added. Reinstalls the checkpoint with the decision, and
    its card with the validation cell scores and sha256 that go with it; the card's test figures
    are dropped until `python -m benchmarks.quality --dataset ../shared/data/dsb2018 --model nuclei
    --card` measures them again."""
    recipe = recipe or NucleiRecipe()
    data = Path(recipe.data_dir)
    val_pairs = recipe_validation_pairs(recipe, data)
    checkpoint_path, card_path = shipped_paths("nuclei")
    checkpoint = load_checkpoint(shipped_checkpoint("nuclei"))
    loaded = load_pairs(val_pairs, checkpoint.model_config.normalization)
    logger.info("deciding post-processing on %d validation images of %s", len(loaded), data)
    decide_postprocessing(checkpoint, PredictConfig(), loaded, recipe.training.device)
    choice = (checkpoint.split_touching, checkpoint.threshold, checkpoint.centre_prominence)
    save_checkpoint(checkpoint, str(checkpoint_path))
    cells = validation_cell_scores(Predictor(checkpoint, PredictConfig(device=recipe.training.device)), loaded)
    card = model_card("nuclei")
    card["validation"] = {key: value for key, value in card["validation"].items() if not key.startswith("cells_")} | {
        f"cells_{key}": value for key, value in cells.items()}
    card["post_processing"] = {"split_touching": choice[0], "threshold": choice[1], "centre_prominence": choice[2],
                               "decided": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    card["test"] = {}
    card["sha256"] = hashlib.sha256(checkpoint_path.read_bytes()).hexdigest()
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    logger.info("nuclei: touching cells %s, threshold %g, centre prominence %g; validation cell F1 %.4f",
                "split" if choice[0] else "kept whole", choice[1], choice[2], cells.get("f1_mean", float("nan")))
    return checkpoint_path


BUILDERS: dict[str, Callable[..., TrainOutcome]] = {"nuclei": build_nuclei, "general": build_general}


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a model shipped in the package from its recipe.")
    parser.add_argument("name", choices=sorted(BUILDERS), help="which shipped model")
    parser.add_argument("--out", help=f"working directory (default {LOCAL_ROOT}/shipped/NAME)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch")
    parser.add_argument("--install", action="store_true", help="copy the result into the package with its model card")
    parser.add_argument("--post-processing-only", action="store_true",
                        help="nuclei: decide the shipped model's post-processing again on its validation images, "
                             "without training, and reinstall it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.post_processing_only:
        if args.name != "nuclei":
            parser.error("--post-processing-only is for the nuclei model (trained on a data folder)")
        decide_nuclei_postprocessing()
        return
    out = args.out or f"{LOCAL_ROOT}/shipped/{args.name}"
    resume = args.resume and can_resume(out)
    BUILDERS[args.name](out, install=args.install, resume=resume)


if __name__ == "__main__":
    main()
