"""Serve the cellseg deployments from one process, for a laptop or a single machine.

    cellseg serve --nightly-source data/incoming --nightly-store runs/nightly.zarr
    python -m cellseg.deployments.serve ...   (same thing)

The deployments are the ones `prefect.yaml` beside this file declares, with the same names,
parameters, schedules and concurrency limits. nightly-segmentation reads its job from the Prefect variable
`cellseg_nightly` when each run starts, or, given --nightly-source and --nightly-store, is served
with that job as its parameter.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.schedules import Cron

DECLARATION = Path(__file__).with_name("prefect.yaml")


def declared_deployments() -> list[dict[str, Any]]:
    """The deployments of prefect.yaml as written there."""
    return yaml.safe_load(DECLARATION.read_text())["deployments"]


def _flow(entrypoint: str) -> Any:
    """The flow an entrypoint like `flows/train.py:train_unet` names, imported as cellseg.flows.train."""
    path, name = entrypoint.split(":")
    module = "cellseg." + path.removesuffix(".py").replace("/", ".")
    return getattr(importlib.import_module(module), name)


def build_deployments(
    nightly_source: str | None = None, nightly_store: str | None = None, cron: str | None = None
) -> list[RunnerDeployment]:
    """The deployments of prefect.yaml as RunnerDeployments, with their schedules (timezone included)
    and concurrency limits; `cron` replaces a declared schedule, and a nightly source and store
    replace the nightly job's variable with that job."""
    if (nightly_source is None) != (nightly_store is None):
        raise ValueError("give both --nightly-source and --nightly-store, or neither (the nightly run then reads "
                         "the Prefect variable cellseg_nightly)")
    deployments = []
    for declared in declared_deployments():
        parameters = declared.get("parameters", {})
        if "job_variable" in parameters and nightly_source is not None:
            parameters = {"job": {"source_url": nightly_source, "store_url": nightly_store}}
        schedules = declared.get("schedules") or []
        deployments.append(_flow(declared["entrypoint"]).to_deployment(
            name=declared["name"],
            description=declared.get("description"),
            tags=declared.get("tags", []),
            parameters=parameters,
            schedule=Cron(cron or schedules[0]["cron"], timezone=schedules[0].get("timezone")) if schedules else None,
            concurrency_limit=declared.get("concurrency_limit"),
        ))
    return deployments


def serve_all(nightly_source: str | None = None, nightly_store: str | None = None, cron: str | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs here until stopped."""
    # The heartbeat deployment runs send (prefect.yaml's work pool): the zombie-run automation
    # (deployments/automations.yaml) expects one every 30 s from runs tagged cellseg.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    deployments = build_deployments(nightly_source, nightly_store, cron)
    refuse_deployments_of_a_work_pool(deployments)
    serve(*deployments)


def refuse_deployments_of_a_work_pool(deployments: list[RunnerDeployment]) -> None:
    """Refuse to serve over deployments that `prefect deploy` made for a work pool: re-registered by
    serve they keep their work pool and lose their working directory, so every run would crash
    unable to find its flow file."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    taken = []
    with get_client(sync_client=True) as client:
        for deployment in deployments:
            try:
                existing = client.read_deployment_by_name(deployment.full_name)
            except ObjectNotFound:
                continue
            if existing.work_pool_name:
                taken.append(f"'{deployment.full_name}' (work pool {existing.work_pool_name})")
    if taken:
        raise ValueError(f"the Prefect server already has {', '.join(taken)} from `prefect deploy`: run a worker for "
                         "them, or delete them (prefect deployment delete NAME) before serving from this machine")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nightly-source")
    parser.add_argument("--nightly-store")
    parser.add_argument("--cron", help="nightly schedule (default: the one in prefect.yaml)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    serve_all(args.nightly_source, args.nightly_store, args.cron)


if __name__ == "__main__":
    main()
