"""tune-unet: ingest -> train trials in parallel (each in its own process, or on Dask) -> register
the best by validation Dice, with a table artifact of every trial."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ProcessPoolTaskRunner

from cellseg.config import ModelConfig, SearchSpace, TrainConfig, TuneUnetSettings
from cellseg.data import load_pairs, split_train_val
from cellseg.ingest import Manifest
from cellseg.train import resolve_device
from cellseg.tune import (
    TABLE_COLUMNS,
    Trial,
    TrialResult,
    best_trial,
    plan_trials,
    run_trial,
    trial_rows,
)
from flows._common import (
    ProgressArtifact,
    configure_storage,
    gpu_slot,
    markdown_table,
    task_runner,
)
from flows.ingest import ingest_dataset_flow
from flows.train import register_model


@task(name="train-trial", tags=["gpu"])
def train_trial(trial: Trial, manifest_path: str, run_dir: str, threads: int | None) -> dict[str, Any]:
    """Train one trial on the cached dataset; a failing trial is reported, not raised."""
    manifest = Manifest.load(manifest_path)
    train_pairs, val_pairs = split_train_val(manifest.pairs(), trial.training.val_fraction, trial.training.seed)
    normalization = trial.model.normalization
    get_run_logger().info("trial %d: %s", trial.number, trial.params)
    loaded_train, loaded_val = load_pairs(train_pairs, normalization), load_pairs(val_pairs, normalization)
    with gpu_slot(resolve_device(trial.training.device).type == "cuda"):
        result = run_trial(trial, loaded_train, loaded_val, Path(run_dir) / f"trial-{trial.number:03d}", manifest.hash, threads)
    get_run_logger().info("trial %d: %s, val Dice %s", trial.number, result.status, result.val_dice)
    return result.model_dump(mode="json")


@flow(name="train-trials")
def train_trials(trials: list[Trial], manifest_path: str, run_dir: str, threads: int | None) -> list[dict[str, Any]]:
    """One train-trial task per trial on this flow's task runner (processes, or Dask)."""
    futures = train_trial.map(trials, unmapped(manifest_path), unmapped(run_dir), unmapped(threads))
    progress = ProgressArtifact("tune-unet-progress", len(trials), f"{len(trials)} trials")
    for finished, _ in enumerate(as_completed(futures), start=1):
        progress.update(finished, f"{finished} of {len(trials)} trials finished")
    return [future.result() for future in futures]


@flow(name="tune-unet")
def tune_unet(
    images_url: str,
    masks_url: str,
    registry_url: str = "runs/registry",
    cache_dir: str = "runs/cache",
    work_dir: str = "runs/tuning",
    promote: bool = False,
    trials: int = 8,
    max_parallel_trials: int = 2,
    seed: int = 0,
    dask_address: str | None = None,
    space: SearchSpace = SearchSpace(),
    model: ModelConfig = ModelConfig(),
    training: TrainConfig = TuneUnetSettings.model_fields["training"].default,
) -> dict[str, Any]:
    """Train `trials` points of the search `space` in parallel, register the best by validation
    Dice (current when `promote`) and publish a table of all trials.

    Trials run in local processes, or on the Dask cluster at `dask_address`; there, every worker
    reads the dataset cache and writes its trial under `work_dir`, so both must be on a
    filesystem the workers share."""
    configure_storage()
    settings = TuneUnetSettings(
        images_url=images_url, masks_url=masks_url, registry_url=registry_url, cache_dir=cache_dir,
        work_dir=work_dir, promote=promote, trials=trials, max_parallel_trials=max_parallel_trials, seed=seed,
        dask_address=dask_address, space=space, model=model, training=training,
    )
    logger = get_run_logger()
    planned = plan_trials(settings.space, settings.trials, settings.seed, settings.model, settings.training)
    logger.info("%d trials of a %d-point search space, %d at a time", len(planned), settings.space.size(),
                settings.max_parallel_trials)
    dataset = ingest_dataset_flow(settings.images_url, settings.masks_url, settings.cache_dir)
    run_name = flow_run.get_name() or datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = str(Path(settings.work_dir) / run_name)
    threads = None if settings.dask_address else max(1, (os.cpu_count() or 1) // settings.max_parallel_trials)
    results = [
        TrialResult.model_validate(result)
        # Processes, not threads: torch's random state and thread count are per process, so each
        # trial is reproducible on its own and the cores are shared out between trials.
        for result in train_trials.with_options(
            task_runner=task_runner(settings.dask_address, ProcessPoolTaskRunner(max_workers=settings.max_parallel_trials))
        )(
            planned, dataset["manifest_path"], run_dir, threads
        )
    ]
    rows = trial_rows(results)
    create_table_artifact(key="tune-unet-trials", table=rows, description="tune-unet: every trial, best first")
    best = best_trial(results)
    version = register_model(best.checkpoint, settings.registry_url, settings.promote)
    logger.info("best: trial %d (val Dice %.4f) registered as %s%s", best.number, best.val_dice, version["version"],
                " and made current" if settings.promote else "")
    create_markdown_artifact(
        key="tune-unet-summary",
        markdown=(
            f"## tune-unet: best trial {best.number}, model {version['version']}\n\n"
            f"Dataset `{dataset['manifest_hash'][:12]}` ({dataset['pairs']} pairs); {len(results)} trials of "
            f"{settings.space.size()} grid points; validation Dice {best.val_dice:.4f}.\n\n"
            + markdown_table(rows, TABLE_COLUMNS)
        ),
        description="tune-unet: the registered trial and all trials",
    )
    return {"version": version["version"], "best": best.model_dump(mode="json"), "trials": rows}
