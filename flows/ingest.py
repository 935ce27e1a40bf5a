"""ingest-dataset: list a source, pair, validate, cache by content, write a manifest."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task

from cellseg.config import Url
from cellseg.flows._common import configure_storage, retry_unless_bad_input
from cellseg.ingest import ingest_dataset
from cellseg.paths import DEFAULT_CACHE_DIR


@task(name="ingest-files", retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_unless_bad_input)
def ingest_files(images_url: str, masks_url: str, cache_dir: str) -> dict[str, Any]:
    result = ingest_dataset(images_url, masks_url, cache_dir)
    return {
        "manifest_path": str(result.manifest_path),
        "manifest_hash": result.manifest.hash,
        "pairs": len(result.manifest.entries),
        "copied": result.copied,
        "reused": result.reused,
    }


@flow(name="ingest-dataset")
def ingest_dataset_flow(
    images_url: Url,
    masks_url: Url,
    cache_dir: str = DEFAULT_CACHE_DIR,
) -> dict[str, Any]:
    """Ingest image/mask pairs from `images_url`/`masks_url` (s3://, file://, paths) into `cache_dir`."""
    configure_storage()
    summary = ingest_files(images_url, masks_url, cache_dir)
    get_run_logger().info(
        "dataset %s: %d pairs, %d files copied, %d unchanged; manifest %s",
        summary["manifest_hash"][:12], summary["pairs"], summary["copied"], summary["reused"], summary["manifest_path"],
    )
    return summary
