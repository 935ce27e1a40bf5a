"""train-unet: ingest -> train (tagged `gpu`) -> evaluate -> register, with metric artifacts."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from cellseg.checkpoint import load_checkpoint
from cellseg.config import ModelConfig, PredictConfig, TrainConfig, TrainUnetSettings
from cellseg.data import load_pairs, split_train_val
from cellseg.ingest import Manifest
from cellseg.instances import HEADLINE_CELL_SCORES
from cellseg.predict import Predictor
from cellseg.registry import Registry
from cellseg.report import training_pictures
from cellseg.scale import rescale_pairs
from cellseg.train import evaluate_model, resolve_device, train
from cellseg.validation import validation_cell_scores
from flows._common import (
    ProgressArtifact,
    configure_storage,
    gpu_slot,
    markdown_table,
    retry_unless_bad_input,
)
from flows.ingest import ingest_dataset_flow

METRICS = ("loss", "iou", "dice", "precision", "recall", "dice_pooled")


def _split(manifest_path: str, training: TrainConfig):
    return split_train_val(Manifest.load(manifest_path).pairs(), training.val_fraction, training.seed)


@task(name="train-model", tags=["gpu"])
def train_model(manifest_path: str, model: ModelConfig, training: TrainConfig, run_dir: str) -> dict[str, Any]:
    """Train on the cached dataset; on a GPU it holds a slot of the `gpu` global concurrency limit."""
    logger = get_run_logger()
    manifest = Manifest.load(manifest_path)
    train_pairs, val_pairs = _split(manifest_path, training)
    logger.info("training on %d images, validating on %d (dataset %s)", len(train_pairs), len(val_pairs), manifest.hash[:12])
    progress = ProgressArtifact("train-unet-progress", training.epochs, f"training: up to {training.epochs} epochs")

    def report(record: dict[str, float]) -> None:
        logger.info("epoch %d: %s", record["epoch"],
                    ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k not in ("epoch", "seconds")))
        progress.update(int(record["epoch"]), f"epoch {int(record['epoch'])} of up to {training.epochs}: "
                                              f"val Dice {record.get('val_dice', float('nan')):.4f}")

    loaded_train, loaded_val = load_pairs(train_pairs, model.normalization), load_pairs(val_pairs, model.normalization)
    with gpu_slot(resolve_device(training.device).type == "cuda"):
        result = train(loaded_train, loaded_val, run_dir, model, training, manifest.hash, on_epoch=report)
    progress.update(training.epochs, f"{result.stop_reason}; best epoch {result.best_epoch}")
    logger.info("%s; best epoch %d", result.stop_reason, result.best_epoch)
    return {
        "best_checkpoint": str(result.best_checkpoint),
        "history_path": str(result.history_path),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stop_reason": result.stop_reason,
    }


@task(name="evaluate-model", tags=["gpu"])
def evaluate_checkpoint(checkpoint_path: str, manifest_path: str, training: TrainConfig) -> dict[str, Any]:
    """Validation metrics of the best checkpoint on whole validation images; with instance label
    masks also the cell-level ones (`cells_` + HEADLINE_CELL_SCORES), segmenting as `cellseg
    predict` does."""
    checkpoint = load_checkpoint(checkpoint_path)
    _, val_pairs = _split(manifest_path, training)
    if not val_pairs:
        return {}
    device = resolve_device(training.device)
    loaded = load_pairs(val_pairs, checkpoint.model_config.normalization)
    with gpu_slot(device.type == "cuda"):
        predict = PredictConfig(device=training.device, amp=training.amp, threshold=training.threshold)
        predictor = Predictor(checkpoint, predict)  # one model for the pixel and the cell scores
        # Pixel scores as training measured them (at the model's cell size); cells as predict segments them.
        metrics = evaluate_model(predictor.model, rescale_pairs(loaded, checkpoint.model_config), predictor.device,
                                 training.threshold, training.amp)
        cells = validation_cell_scores(predictor, loaded)
    return metrics | {f"cells_{name}": cells[name] for name in HEADLINE_CELL_SCORES if name in cells}


@task(name="draw-training-pictures")
def draw_training_pictures(run_dir: str, history_path: str, manifest_path: str, training: TrainConfig,
                           model: ModelConfig) -> list[str]:
    """Training curves and the validation overlay gallery, written next to the checkpoint."""
    _, val_pairs = _split(manifest_path, training)
    history = json.loads(Path(history_path).read_text())
    return training_pictures(run_dir, history, load_pairs(val_pairs, model.normalization), training.device,
                             training.threshold)


@task(name="register-model", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_unless_bad_input)
def register_model(checkpoint_path: str, registry_url: str, promote: bool) -> dict[str, Any]:
    return Registry(registry_url).register(checkpoint_path, promote=promote).model_dump(mode="json")


@flow(name="train-unet")
def train_unet(
    images_url: str,
    masks_url: str,
    registry_url: str = "runs/registry",
    cache_dir: str = "runs/cache",
    work_dir: str = "runs/training",
    promote: bool = True,
    model: ModelConfig = ModelConfig(),
    training: TrainConfig = TrainConfig(),
) -> dict[str, Any]:
    """Train a U-Net on image/mask pairs and register the best checkpoint (current when `promote`)."""
    configure_storage()
    settings = TrainUnetSettings(
        images_url=images_url, masks_url=masks_url, registry_url=registry_url, cache_dir=cache_dir,
        work_dir=work_dir, promote=promote, model=model, training=training,
    )
    logger = get_run_logger()
    dataset = ingest_dataset_flow(settings.images_url, settings.masks_url, settings.cache_dir)
    run_name = flow_run.get_name() or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = str(Path(settings.work_dir) / run_name)
    trained = train_model(dataset["manifest_path"], settings.model, settings.training, run_dir)
    metrics = evaluate_checkpoint(trained["best_checkpoint"], dataset["manifest_path"], settings.training)
    pictures = draw_training_pictures(run_dir, trained["history_path"], dataset["manifest_path"], settings.training,
                                      settings.model)
    version = register_model(trained["best_checkpoint"], settings.registry_url, settings.promote)
    logger.info("registered %s in %s%s", version["version"], settings.registry_url, " as current" if settings.promote else "")

    rows = [{"metric": name, "validation": metrics[name]} for name in METRICS if name in metrics]
    rows += [{"metric": f"cells: {name}", "validation": metrics[f"cells_{name}"]} for name in HEADLINE_CELL_SCORES
             if f"cells_{name}" in metrics]
    create_markdown_artifact(
        key="train-unet-metrics",
        markdown=(
            f"## train-unet: model {version['version']}\n\n"
            f"Dataset `{dataset['manifest_hash'][:12]}` ({dataset['pairs']} pairs); best epoch "
            f"{trained['best_epoch']} of {trained['epochs_run']} ({trained['stop_reason']}).\n\n"
            + markdown_table(rows, ("metric", "validation"))
        ),
        description="Validation metrics of the registered checkpoint",
    )
    for picture in pictures:
        create_link_artifact(key=Path(picture).stem.replace("_", "-"), link=Path(picture).resolve().as_uri(),
                             link_text=f"{Path(picture).name} of {version['version']}")
    checkpoint_url = Registry(settings.registry_url).checkpoint_url(version["version"])
    create_link_artifact(
        key="train-unet-checkpoint",
        link=checkpoint_url if "://" in checkpoint_url else Path(checkpoint_url).resolve().as_uri(),
        link_text=f"checkpoint {version['version']}",
    )
    return {"version": version["version"], "checkpoint": checkpoint_url, "metrics": metrics, "pictures": pictures,
            **trained}
