"""train-unet: ingest -> train (`cellseg.jobs.run_training`, tagged `gpu`) -> register, with
progress and metric artifacts and the training pictures embedded in artifacts."""

from __future__ import annotations

import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from prefect.settings import get_current_settings

from cellseg.flows._common import (
    STOPPED,
    ProgressArtifact,
    failing_in_one_line,
    gpu_slot,
    how_stopped,
    markdown_table,
    retry_unless_bad_input,
    stop_with_worker,
    warn_now,
    with_run_tags,
    worker_job,
)
from cellseg.flows.ingest import ingest_dataset_flow
from cellseg.ingest import Manifest
from cellseg.jobs import TrainJob, run_training
from cellseg.jobs_training import kept_line
from cellseg.pictures import picture_markdown
from cellseg.redact import redact_url
from cellseg.registry import Registry
from cellseg.runtime import resolve_device
from cellseg.scoring import HEADLINE_CELL_SCORES

METRICS = ("loss", "iou", "dice", "precision", "recall", "dice_pooled")


def new_run_dir(work_dir: str, name: str | None) -> str:
    """A folder under `work_dir` for a new run, named after the flow run; flow run names repeat, so a
    name used before gets the time appended: a flow never trains into another run's folder."""
    now = datetime.now(timezone.utc)
    folder = Path(work_dir) / (name or f"{now:%Y%m%d-%H%M%S}")
    return str(folder.with_name(f"{folder.name}-{now:%Y%m%d-%H%M%S-%f}") if folder.exists() else folder)


@task(name="train-model", tags=["gpu"])
def train_model(job: TrainJob, manifest_path: str, run_dir: str) -> dict[str, Any]:
    """Train and validate on the cached dataset (`run_training`); on a GPU it holds a slot of the
    `gpu` global concurrency limit."""
    logger = get_run_logger()
    manifest = Manifest.load(manifest_path)
    epochs = job.training.epochs
    progress = ProgressArtifact("train-unet-progress", epochs, f"training: up to {epochs} epochs")
    library_logged = "cellseg" in (get_current_settings().logging.extra_loggers or [])  # its own epoch lines

    def report(record: dict[str, float]) -> None:
        if not library_logged:
            logger.info("epoch %d: %s", record["epoch"],
                        ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "seconds")))  # lr 3e-05
        progress.update(int(record["epoch"]), f"epoch {int(record['epoch'])} of up to {epochs}: "
                                              f"val Dice {record.get('val_dice', float('nan')):.4f}")

    with gpu_slot(resolve_device(job.training.device).type == "cuda"):
        outcome = run_training(job, run_dir, pairs=manifest.pairs(), on_epoch=report)
    progress.update(epochs, f"{outcome.result.stop_reason}; {outcome.result.best_described}")
    logger.info("%s; %s", outcome.result.stop_reason, outcome.result.best_described)
    return outcome.summary()


@task(name="register-model", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_unless_bad_input)
def register_model(checkpoint_path: str, registry_url: str, promote: bool) -> dict[str, Any]:
    return Registry(registry_url).register(checkpoint_path, promote=promote).model_dump(mode="json")


@flow(name="train-unet")
def train_unet(job: TrainJob) -> dict[str, Any]:
    """Train a U-Net on the job's image/mask pairs and register the best checkpoint (current when
    `job.promote`). A fault that stops the run (storage that cannot be reached, a dataset that
    cannot be used) fails it with that one line, as its message and as the `train-unet-failure`
    artifact."""
    stop_with_worker()
    return failing_in_one_line("train-unet", "train-unet-failure", _train_unet, job)


def _train_unet(job: TrainJob) -> dict[str, Any]:
    job = worker_job(job)
    logger = get_run_logger()
    Registry(job.registry_url).check_writable()  # before the training, not after it
    with with_run_tags():
        dataset = ingest_dataset_flow(job.images_url, job.masks_url, job.cache_dir)
    run_dir = new_run_dir(job.work_dir, flow_run.get_name())
    try:
        trained = train_model(job, dataset["manifest_path"], run_dir)
    except STOPPED as stopped:
        warn_now(logger, "train-unet %s: no model registered; %s", how_stopped(stopped), kept_line(run_dir, own_folder=True))
        raise
    version = register_model(trained["best_checkpoint"], job.registry_url, job.promote)
    logger.info("registered %s in %s%s", version["version"], redact_url(job.registry_url), " as current" if job.promote else "")

    metrics = trained["metrics"]
    rows = [{"metric": name, "validation": metrics[name]} for name in METRICS if name in metrics]
    rows += [{"metric": f"cells: {name}", "validation": metrics[f"cells_{name}"]} for name in HEADLINE_CELL_SCORES
             if f"cells_{name}" in metrics]
    registry = Registry(job.registry_url)
    checkpoint_url = redact_url(registry.checkpoint_url(version["version"]))  # shown, never read
    kept = "".join(f", `{name}`" for name in version["files"])
    create_markdown_artifact(
        key="train-unet-metrics",
        markdown=(
            f"## train-unet: model {version['version']}\n\n"
            f"Dataset `{dataset['manifest_hash'][:12]}` ({dataset['pairs']} pairs); {trained['best_described']} "
            f"({trained['stop_reason']}).\n\n"
            + markdown_table(rows, ("metric", "validation"))
            + f"\n\nCheckpoint `{checkpoint_url}`; the registry keeps `model.json`{kept} beside it. "
            f"`cellseg models show {version['version']} --registry {shlex.quote(redact_url(job.registry_url))}` prints "
            "their URLs."
        ),
        description="Validation metrics of the registered checkpoint",
    )
    for picture in trained["pictures"]:  # on this worker's disk: embedded, so that the UI shows them anywhere
        name, title = Path(picture).name, f"{Path(picture).name} of model {version['version']}"
        create_markdown_artifact(
            key=Path(picture).stem.replace("_", "-"),
            markdown=(f"### {title}\n\n{picture_markdown(picture, title)}\n\n"
                      f"Kept in the registry as `{redact_url(registry.file_url(version['version'], name))}`."),
            description=title,
        )
    return {**trained, "version": version["version"], "checkpoint": checkpoint_url}
