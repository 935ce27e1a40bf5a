"""Serve the cellseg deployments from one process, for a laptop or a single machine.

    cellseg serve --nightly-source data/incoming --nightly-store runs/nightly.zarr [--nightly-model-version bundled]

(`cellseg serve --help` says more; `python -m cellseg.deployments.serve` takes the same flags, without
the command's settings and one-line errors.)

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

from cellseg.job_config import SegmentJob, with_settings

DECLARATION = Path(__file__).with_name("prefect.yaml")
logger = logging.getLogger("cellseg.deployments")


def declared_deployments() -> list[dict[str, Any]]:
    """The deployments of prefect.yaml as written there."""
    return yaml.safe_load(DECLARATION.read_text())["deployments"]


def _flow(entrypoint: str) -> Any:
    """The flow an entrypoint like `flows/train.py:train_unet` names, imported as cellseg.flows.train."""
    path, name = entrypoint.split(":")
    module = "cellseg." + path.removesuffix(".py").replace("/", ".")
    return getattr(importlib.import_module(module), name)


def build_deployments(
    nightly_source: str | None = None, nightly_store: str | None = None, cron: str | None = None,
    nightly_model_version: str | None = None,
) -> list[RunnerDeployment]:
    """The deployments of prefect.yaml as RunnerDeployments, with their schedules (timezone included)
    and concurrency limits; `cron` replaces a declared schedule, and a nightly source and store
    (and model version) replace the nightly job's variable with that job (`nightly_job`)."""
    nightly = nightly_job(nightly_source, nightly_store, nightly_model_version)
    deployments = []
    for declared in declared_deployments():
        parameters = declared.get("parameters", {})
        if "job_variable" in parameters and nightly is not None:
            parameters = {"job": nightly.model_dump(mode="json", exclude_unset=True)}
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


def nightly_job(source: str | None, store: str | None, model_version: str | None) -> SegmentJob | None:
    """The nightly job the serve flags give, None without them (the nightly run then reads the
    Prefect variable cellseg_nightly); flags that do not go together are refused."""
    if (source is None) != (store is None):
        raise ValueError("give both --nightly-source and --nightly-store, or neither (the nightly run then reads "
                         "the Prefect variable cellseg_nightly)")
    if source is None:
        if model_version is not None:
            raise ValueError("--nightly-model-version goes with --nightly-source and --nightly-store; without them "
                             "the nightly job is the Prefect variable cellseg_nightly's: set its model_version there")
        return None
    given = {"source_url": source, "store_url": store}
    return SegmentJob.model_validate(given if model_version is None else {**given, "model_version": model_version})


def serve_all(nightly_source: str | None = None, nightly_store: str | None = None, cron: str | None = None,
              nightly_model_version: str | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs here until stopped."""
    # The heartbeat deployment runs send (prefect.yaml's work pool): the zombie-run automation
    # (deployments/automations.yaml) expects one every 30 s from runs tagged cellseg.
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "30")
    deployments = build_deployments(nightly_source, nightly_store, cron, nightly_model_version)
    if (nightly := nightly_job(nightly_source, nightly_store, nightly_model_version)) is not None:
        warn_of_what_the_nightly_run_lacks(nightly)
    refuse_deployments_of_a_work_pool(deployments)
    serve(*deployments)


def warn_of_what_the_nightly_run_lacks(job: SegmentJob) -> list[str]:
    """Say now, not at the first scheduled run, that its source cannot be listed or its model
    found (a registry without a current model yet, say); the warnings said."""
    from cellseg.flows._common import configure_storage
    from cellseg.formats import list_sources
    from cellseg.jobs_plan import model_source

    job = with_settings(job, configure_storage())
    said = []
    for what, check in (("source", lambda: list_sources(job.source_url, job.predict.selection)),
                        ("model", lambda: model_source(job).pinned())):
        try:
            check()
        except Exception as error:  # noqa: BLE001 - serving goes on: the source or model may be there by tonight
            said.append(f"the nightly run's {what} cannot be read or found now ({error}): each scheduled run fails "
                        "until it can")
            logger.warning("%s", said[-1])
    return said


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
    parser.add_argument("--nightly-model-version")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    serve_all(args.nightly_source, args.nightly_store, args.cron, args.nightly_model_version)


if __name__ == "__main__":
    main()
