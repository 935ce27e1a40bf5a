"""segment-images: list new images, split them into shards, segment the shards in parallel into
one zarr store, and report a summary. Used by the nightly-segmentation and backfill deployments."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from cellseg.bundled import BUNDLED_VERSION, bundled_checkpoint
from cellseg.config import PredictConfig, SegmentSettings
from cellseg.io import list_images
from cellseg.predict import shared_predictor
from cellseg.registry import Registry
from cellseg.report import montage_url, store_montage
from cellseg.segment import model_record, pending_images, segment_images
from cellseg.store import ResultStore
from cellseg.train import resolve_device
from flows._common import (
    ProgressArtifact,
    configure_storage,
    gpu_slot,
    markdown_table,
    retry_unless_bad_input,
    task_runner,
)

Shard = list[tuple[str, str]]


@task(name="resolve-model", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_unless_bad_input)
def resolve_model(registry_url: str, model_version: str) -> str:
    """The concrete version all shards use, fixed at the start so a promotion mid-run changes nothing.
    'bundled' names the model shipped in the package and needs no registry."""
    if model_version == BUNDLED_VERSION:
        bundled_checkpoint()  # a clear error now if this installation lacks it
        return BUNDLED_VERSION
    return Registry(registry_url).resolve(model_version)


def _checkpoint_url(registry_url: str, model_version: str) -> str:
    return bundled_checkpoint() if model_version == BUNDLED_VERSION else Registry(registry_url).checkpoint_url(model_version)


@task(name="plan-shards", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_unless_bad_input)
def plan_shards(source_url: str, store_url: str, shard_size: int) -> dict[str, Any]:
    """Images not yet done in the store, in shards of `shard_size` (id, url) pairs."""
    store = ResultStore.open(store_url)
    rejected: list[dict[str, str]] = []
    todo, skipped = pending_images(list_images(source_url), store, rejected)
    shards = [todo[start : start + shard_size] for start in range(0, len(todo), shard_size)]
    return {"shards": shards, "skipped": len(skipped), "pending": len(todo), "rejected": rejected}


@task(name="segment-shard", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_unless_bad_input)
def segment_shard(
    shard: Shard, store_url: str, registry_url: str, model_version: str, predict: PredictConfig
) -> dict[str, Any]:
    """Segment one shard; the model is loaded once per worker process and reused across shards.

    Images already done (say, by an earlier attempt of this task) are skipped; bad images are
    recorded in the store and in the result, and the shard carries on.
    """
    configure_storage()
    predictor = shared_predictor(registry_url, model_version, predict)
    store = ResultStore.open(store_url)
    remaining = [(image_id, url) for image_id, url in shard if not store.is_done(image_id)]
    with gpu_slot(predictor.device.type == "cuda"):
        report = segment_images(
            remaining, store, predictor, model_record(predictor, _checkpoint_url(registry_url, model_version))
        )
    # Skipped: finished by an earlier attempt of this task, or by another run on the same store.
    skipped = len(shard) - len(remaining) + len(report.skipped)
    return {"done": len(report.done), "skipped": skipped, "failed": report.failed, "seconds": report.seconds,
            "pixels": report.pixels}


@task(name="draw-montage")
def draw_montage(store_url: str, images: Shard, run_name: str) -> str | None:
    """A few of this run's segmented images with their cell outlines, saved beside the store."""
    return store_montage(ResultStore.open(store_url, mode="r"), images, montage_url(store_url, run_name))


@flow(name="segment-shards")
def segment_shards(
    shards: list[Shard], store_url: str, registry_url: str, model_version: str, predict: PredictConfig,
    gpu: bool = False,
) -> list[dict[str, Any]]:
    """Run one segment-shard task per shard on this flow's task runner (threads, or Dask).

    On a GPU each shard holds a slot of the `gpu` global concurrency limit when one exists (and
    the tasks carry the `gpu` tag, for tag-based task concurrency limits).
    """
    shard_task = segment_shard.with_options(tags=["gpu"]) if gpu else segment_shard
    futures = shard_task.map(
        shards, unmapped(store_url), unmapped(registry_url), unmapped(model_version), unmapped(predict)
    )
    images = sum(len(shard) for shard in shards)
    progress = ProgressArtifact("segment-images-progress", images, f"segmenting {images} images in {len(shards)} shards")
    shard_sizes = {future.task_run_id: len(shard) for future, shard in zip(futures, shards)}
    finished = 0
    for shard_done, future in enumerate(as_completed(futures), start=1):
        finished += shard_sizes[future.task_run_id]
        progress.update(finished, f"{shard_done} of {len(shards)} shards finished ({finished} of {images} images)")
    return [future.result() for future in futures]


@flow(name="segment-images")
def segment_images_flow(
    source_url: str,
    store_url: str,
    registry_url: str = "runs/registry",
    model_version: str = "current",
    shard_size: int = 32,
    threshold: float = 0.5,
    min_cell_area: int = 10,
    split_touching: bool = True,
    centre_prominence: float = PredictConfig().centre_prominence,
    cell_diameter: float | None = None,
    measure_cells: bool = True,
    store_image: bool = True,
    tta: bool = False,
    batch_size: int | None = None,
    device: str = "auto",
    amp: bool = True,
    compile: bool = False,
    tile_size: int = PredictConfig().tile_size,
    max_pixels: int = PredictConfig().max_pixels,
    max_parallel_shards: int = 2,
    dask_address: str | None = None,
) -> dict[str, Any]:
    """Segment the images under `source_url` that `store_url` does not hold yet.

    Shards run in parallel on a thread pool (`max_parallel_shards`, the CPU cores split between
    them), or on the Dask cluster at `dask_address`. `amp` (bf16 where the hardware has it) and
    `compile` (torch.compile) trade exactness against the fp32 path for speed; see the README.
    Storage credentials come from the environment and fsspec config.
    """
    configure_storage()
    settings = SegmentSettings(
        source_url=source_url, store_url=store_url, registry_url=registry_url, model_version=model_version,
        shard_size=shard_size, max_parallel_shards=max_parallel_shards, dask_address=dask_address,
        predict=PredictConfig(
            threshold=threshold, min_cell_area=min_cell_area, split_touching=split_touching,
            centre_prominence=centre_prominence, cell_diameter=cell_diameter,
            measure_cells=measure_cells, store_image=store_image, tta=tta,
            batch_size=batch_size,
            device=device, amp=amp,
            compile=compile, tile_size=tile_size, max_pixels=max_pixels,
            threads=None if dask_address else _threads_per_shard(max_parallel_shards),
        ),
    )
    logger = get_run_logger()
    started = time.monotonic()
    version = resolve_model(settings.registry_url, settings.model_version)
    plan = plan_shards(settings.source_url, settings.store_url, settings.shard_size)
    logger.info(
        "%d images to segment in %d shards with model %s; %d already done",
        plan["pending"], len(plan["shards"]), version, plan["skipped"],
    )
    for rejected in plan["rejected"]:
        logger.warning("cannot segment '%s': %s", rejected["source_url"], rejected["error"])
    results: list[dict[str, Any]] = []
    if plan["shards"]:
        results = segment_shards.with_options(
            task_runner=task_runner(settings.dask_address, ThreadPoolTaskRunner(max_workers=settings.max_parallel_shards))
        )(
            plan["shards"], settings.store_url, settings.registry_url, version, settings.predict,
            gpu=resolve_device(settings.predict.device).type == "cuda",
        )
    else:
        logger.info("nothing to do: no new images under %s", settings.source_url)

    summary = _summarise(results, plan, time.monotonic() - started, version)
    if summary["done"]:
        run_name = flow_run.get_name() or time.strftime("%Y%m%d-%H%M%S")
        summary["montage"] = draw_montage(settings.store_url, [pair for shard in plan["shards"] for pair in shard], run_name)
    _publish_summary(summary, settings)
    return summary


def _threads_per_shard(parallel_shards: int) -> int:
    """Torch threads per shard when shards share this machine: the cores split between them, so
    parallel shards never oversubscribe the CPU (Dask workers keep their own setting)."""
    return max(1, (os.cpu_count() or 1) // parallel_shards)


def _summarise(results: list[dict[str, Any]], plan: dict[str, Any], seconds: float, version: str) -> dict[str, Any]:
    done = sum(result["done"] for result in results)
    pixels = sum(result["pixels"] for result in results)
    return {
        "model_version": version,
        "done": done,
        "skipped": plan["skipped"] + sum(result["skipped"] for result in results),
        "failed": plan["rejected"] + [failure for result in results for failure in result["failed"]],
        "shards": len(plan["shards"]),
        "seconds": round(seconds, 2),
        "images_per_second": round(done / seconds, 3) if seconds else None,
        "megapixels_per_second": round(pixels / 1e6 / seconds, 3) if seconds else None,
    }


def _publish_summary(summary: dict[str, Any], settings: SegmentSettings) -> None:
    counts = [{"images": key, "count": summary[key] if key != "failed" else len(summary["failed"])}
              for key in ("done", "skipped", "failed")]
    markdown = (
        f"## segment-images into `{settings.store_url}`\n\n"
        f"Model `{summary['model_version']}`, {summary['shards']} shards, {summary['seconds']} s, "
        f"{summary['images_per_second']} images/s, {summary['megapixels_per_second']} megapixels/s.\n\n"
        + markdown_table(counts, ("images", "count"))
    )
    if summary["failed"]:
        markdown += "\n\n### Failed images\n\n" + markdown_table(summary["failed"], ("source_url", "error"))
    create_markdown_artifact(key="segment-images-summary", markdown=markdown, description="segment-images run summary")
    if summary.get("montage"):
        montage = summary["montage"]
        create_link_artifact(key="segment-images-montage", link=montage if "://" in montage else Path(montage).resolve().as_uri(),
                             link_text=f"montage of segmented images in {settings.store_url}")
    get_run_logger().info(
        "segmented %d, skipped %d, failed %d in %.1fs",
        summary["done"], summary["skipped"], len(summary["failed"]), summary["seconds"],
    )
