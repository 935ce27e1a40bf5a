"""Serve the cellseg deployments from one process, for a laptop or a single machine.

    cellseg serve --nightly-source data/incoming --nightly-store runs/nightly.zarr
    python -m deployments.serve ...   (same thing)

Without --nightly-source/--nightly-store the Prefect variables cellseg_nightly_source and
cellseg_nightly_store are used; without those either, the nightly deployment is served paused.
"""

from __future__ import annotations

import argparse
import logging

from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.variables import Variable

from flows.segment import segment_images_flow
from flows.train import train_unet
from flows.tune import tune_unet

logger = logging.getLogger(__name__)


def build_deployments(
    nightly_source: str | None = None, nightly_store: str | None = None, cron: str = "0 2 * * *"
) -> list[RunnerDeployment]:
    """train-unet, tune-unet, nightly-segmentation and backfill, named as in prefect.yaml."""
    source = nightly_source or Variable.get("cellseg_nightly_source", default=None)
    store = nightly_store or Variable.get("cellseg_nightly_store", default=None)
    configured = bool(source and store)
    if not configured:
        logger.warning("nightly-segmentation is paused: give --nightly-source and --nightly-store "
                       "or set the Prefect variables cellseg_nightly_source and cellseg_nightly_store")
    return [
        train_unet.to_deployment(name="train-unet", tags=["cellseg", "training"]),
        tune_unet.to_deployment(name="tune-unet", tags=["cellseg", "training", "tuning"]),
        segment_images_flow.to_deployment(
            name="nightly-segmentation",
            cron=cron,
            paused=not configured,
            parameters={"source_url": source, "store_url": store} if configured else {},
            tags=["cellseg", "nightly"],
        ),
        segment_images_flow.to_deployment(name="backfill", tags=["cellseg", "backfill"]),
    ]


def serve_all(nightly_source: str | None = None, nightly_store: str | None = None, cron: str = "0 2 * * *") -> None:
    """Register the deployments with the Prefect API and run their flow runs here until stopped."""
    serve(*build_deployments(nightly_source, nightly_store, cron))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nightly-source")
    parser.add_argument("--nightly-store")
    parser.add_argument("--cron", default="0 2 * * *")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    serve_all(args.nightly_source, args.nightly_store, args.cron)


if __name__ == "__main__":
    main()
