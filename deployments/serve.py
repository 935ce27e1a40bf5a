"""Serve the cellseg deployments from one process, for a laptop or a single machine.

    cellseg serve --nightly-source data/incoming --nightly-store runs/nightly.zarr
    python -m cellseg.deployments.serve ...   (same thing)

The deployments are the ones `prefect.yaml` beside this file declares, with the same names,
parameters and schedules. Its `{{ prefect.variables.NAME }}` values are read from the Prefect
variables, or from --nightly-source/--nightly-store; a deployment with one still missing is
served paused.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
from pathlib import Path
from typing import Any

import yaml
from prefect import serve
from prefect.deployments.runner import RunnerDeployment
from prefect.variables import Variable

DECLARATION = Path(__file__).with_name("prefect.yaml")
_VARIABLE = re.compile(r"^\{\{\s*prefect\.variables\.(\w+)\s*\}\}$")

logger = logging.getLogger(__name__)


def declared_deployments() -> list[dict[str, Any]]:
    """The deployments of prefect.yaml as written there."""
    return yaml.safe_load(DECLARATION.read_text())["deployments"]


def _flow(entrypoint: str) -> Any:
    """The flow an entrypoint like `flows/train.py:train_unet` names, imported as cellseg.flows.train."""
    path, name = entrypoint.split(":")
    module = "cellseg." + path.removesuffix(".py").replace("/", ".")
    return getattr(importlib.import_module(module), name)


def _fill(value: Any, variables: dict[str, str | None], missing: list[str]) -> Any:
    """`value` with every `{{ prefect.variables.NAME }}` replaced; names without a value go to `missing`."""
    if isinstance(value, dict):
        return {key: _fill(item, variables, missing) for key, item in value.items()}
    match = _VARIABLE.match(value) if isinstance(value, str) else None
    if match is None:
        return value
    name = match.group(1)
    filled = variables.get(name) or Variable.get(name, default=None)
    if filled is None:
        missing.append(name)
    return filled


def build_deployments(
    nightly_source: str | None = None, nightly_store: str | None = None, cron: str | None = None
) -> list[RunnerDeployment]:
    """The deployments of prefect.yaml as RunnerDeployments; `cron` replaces a declared schedule."""
    variables = {"cellseg_nightly_source": nightly_source, "cellseg_nightly_store": nightly_store}
    deployments = []
    for declared in declared_deployments():
        missing: list[str] = []
        parameters = _fill(declared.get("parameters", {}), variables, missing)
        if missing:
            logger.warning("%s is paused: set the Prefect variables %s (or give --nightly-source and --nightly-store)",
                           declared["name"], " and ".join(missing))
        schedules = declared.get("schedules") or []
        deployments.append(_flow(declared["entrypoint"]).to_deployment(
            name=declared["name"],
            description=declared.get("description"),
            tags=declared.get("tags", []),
            parameters={} if missing else parameters,
            cron=(cron or schedules[0]["cron"]) if schedules else None,
            paused=bool(missing),
        ))
    return deployments


def serve_all(nightly_source: str | None = None, nightly_store: str | None = None, cron: str | None = None) -> None:
    """Register the deployments with the Prefect API and run their flow runs here until stopped."""
    serve(*build_deployments(nightly_source, nightly_store, cron))


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
