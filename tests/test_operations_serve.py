"""docs/operations.md as an operator follows it: `cellseg serve` on a server where `prefect deploy`
already registered the deployments for a work pool."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, running_prefect_server

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).parent / "prefect")


def test_serve_refuses_the_deployments_of_a_work_pool_in_one_line(tmp_path):
    (tmp_path / "home").mkdir()
    with running_prefect_server(tmp_path / "home") as server_env:
        env = {**os.environ, **server_env}
        for args in (
            ["work-pool", "create", "cellseg-process", "--type", "process"],
            ["--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
        ):
            subprocess.run([PREFECT, *args], cwd=REPO_ROOT, env=env, capture_output=True, timeout=300, check=True)
        try:  # served over them, it would run until stopped
            served = subprocess.run(
                [
                    str(Path(sys.executable).parent / "cellseg"),
                    "serve",
                    "--nightly-source",
                    str(tmp_path / "in"),
                    "--nightly-store",
                    str(tmp_path / "out.zarr"),
                ],
                cwd=REPO_ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail("cellseg serve served over the deployments of the work pool instead of refusing them")
    assert served.returncode != 0 and "Traceback" not in served.stderr, served.stderr
    error = served.stderr.strip().splitlines()[-1]
    assert "'segment-images/nightly-segmentation' (work pool cellseg-process)" in error, served.stderr
    assert "prefect deployment delete" in error
