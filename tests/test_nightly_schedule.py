"""The nightly run as docs/operations.md sets it up, fired by the real scheduler: a `prefect server`
of its own, the work pool, `prefect deploy` of deployments/prefect.yaml untouched, the Prefect
variable set after deploying, a process worker whose settings file holds the S3 endpoint, the
credentials and predict settings, a model trained through the train-unet deployment, then the
nightly schedule (moved to every minute) picked up without `prefect deployment run`.

About 3-4 minutes: a server start, one tiny training run, and two firings a minute apart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import s3fs
import yaml

from cellseg.registry import Registry
from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from tests.conftest import REPO_ROOT, S3_TEST_CREDENTIALS, running_prefect_server, stop_process_group
from tests.test_configs_whole import PREDICT

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).parent / "prefect")
NIGHTLY = "segment-images/nightly-segmentation"


def prefect(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run([PREFECT, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                            check=False)
    assert result.returncode == 0, f"prefect {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def api(code: str, env: dict[str, str]) -> object:
    """What `code` (an async body using `client`, ending in `return ...`) returns, run against the server."""
    body = "\n".join("        " + line for line in code.strip().splitlines())
    program = (
        "import asyncio, json\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas import filters\n"
        "async def main():\n"
        "    async with get_client() as client:\n"
        f"{body}\n"
        "print(json.dumps(asyncio.run(main()), default=str))\n"
    )
    result = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def nightly_runs(env: dict[str, str]) -> list[dict[str, str]]:
    """The nightly deployment's runs, oldest first: id, state type and name, how it was started."""
    return api(f"""
deployment = await client.read_deployment_by_name({NIGHTLY!r})
runs = await client.read_flow_runs(
    deployment_filter=filters.DeploymentFilter(id=filters.DeploymentFilterId(any_=[deployment.id])))
runs.sort(key=lambda run: run.expected_start_time)
return [{{"id": str(run.id), "state": run.state.type.value, "name": run.state.name,
          "auto_scheduled": run.auto_scheduled, "message": run.state.message}} for run in runs]
""", env)


def summary_markdown(flow_run_id: str, env: dict[str, str]) -> str:
    return api(f"""
artifacts = await client.read_artifacts(
    artifact_filter=filters.ArtifactFilter(key=filters.ArtifactFilterKey(any_=["segment-images-summary"])),
    flow_run_filter=filters.FlowRunFilter(id=filters.FlowRunFilterId(any_=[{flow_run_id!r}])))
return artifacts[0].data if artifacts else ""
""", env)


def wait_for_completed_nightly_runs(count: int, env: dict[str, str], worker_log: Path, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        runs = nightly_runs(env)
        finished = [run for run in runs if run["state"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")]
        if len(finished) >= count:
            return finished
        assert time.monotonic() < deadline, f"{len(finished)} nightly runs finished: {runs}\n{worker_log.read_text()[-4000:]}"
        time.sleep(3)


@pytest.fixture(scope="module")
def object_store(seaweedfs_endpoint):
    """The S3 endpoint (SeaweedFS, a real S3-compatible server) and the credentials the worker's settings file names."""
    return seaweedfs_endpoint, {"key": S3_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
                                "secret": S3_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}


def test_the_documented_nightly_run_fires_on_its_schedule(object_store, tmp_path):
    endpoint, credentials = object_store
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, **credentials, skip_instance_cache=True)
    suffix = str(time.monotonic_ns() % 10**8)
    images, models, results = (f"lab-images-{suffix}", f"lab-models-{suffix}", f"lab-results-{suffix}")
    for bucket in (images, models, results):
        fs.mkdir(bucket)
    write_dataset(str(tmp_path / "train"), count=8, size=96, seed=5)
    write_dataset(str(tmp_path / "incoming"), count=4, size=96, seed=6)
    fs.put(str(tmp_path / "train") + "/", f"{images}/train/", recursive=True)
    fs.put(str(tmp_path / "incoming/images") + "/", f"{images}/incoming/", recursive=True)

    # The worker's own settings: where S3 is and its credentials, the predict settings, its local folders.
    settings_file = tmp_path / "worker.yaml"
    settings_file.write_text(yaml.safe_dump({
        "storage": {"s3": {"endpoint_url": endpoint, **credentials}},
        "local_root": str(tmp_path / "worker-root"),
        "predict": PREDICT,
    }))
    (tmp_path / "home").mkdir()
    with running_prefect_server(tmp_path / "home") as server_env:
        clean = {key: value for key, value in os.environ.items() if not key.startswith(("CELLSEG_", "AWS_"))}
        env = {**clean, **server_env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        prefect("work-pool", "create", "cellseg-process", "--type", "process", env=env)
        prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=env)
        nightly_job = {"source_url": f"s3://{images}/incoming", "store_url": f"s3://{results}/nightly.zarr",
                       "registry_url": f"s3://{models}/registry"}
        prefect("variable", "set", "cellseg_nightly", json.dumps(nightly_job), env=env)  # after deploying: read at run time

        worker_log = tmp_path / "worker.log"
        with open(worker_log, "wb") as log:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cellseg-process"], cwd=REPO_ROOT,
                                      env={**env, "CELLSEG_CONFIG": str(settings_file)}, stdout=log, stderr=log,
                                      start_new_session=True)
            try:
                prefect("deployment", "run", "train-unet/train-unet", "--param", "job=" + json.dumps({
                    "images_url": f"s3://{images}/train/images", "masks_url": f"s3://{images}/train/labels",
                    "registry_url": f"s3://{models}/registry", "model": {"depth": 2, "base_width": 8},
                    "training": {"epochs": 1, "patch_size": 64, "patches_per_image": 1, "device": "cpu"}}),
                    "--watch", "--watch-timeout", "400", env=env, timeout=500)
                registry = Registry(f"s3://{models}/registry", storage_options={"endpoint_url": endpoint, **credentials})
                (version,) = registry.versions()
                assert registry.current() == version.version
                root = tmp_path / "worker-root"  # the worker's local_root: its dataset cache and training runs
                assert len(list((root / "cache" / "objects").rglob("*"))) >= 16 and list(root.glob("training/*/best.pt"))

                # The schedule moved from 02:00 to every minute, as an operator tries it out; nothing else runs it.
                prefect("deployment", "schedule", "create", NIGHTLY, "--cron", "* * * * *", "--replace", "-y", env=env)
                first, second = wait_for_completed_nightly_runs(2, env, worker_log, timeout=240)[:2]
                prefect("deployment", "schedule", "clear", NIGHTLY, "-y", env=env)
            finally:
                stop_process_group(worker)

        assert first["state"] == second["state"] == "COMPLETED", (first, second, worker_log.read_text()[-4000:])
        assert first["auto_scheduled"] and second["auto_scheduled"]
        store = ResultStore.open(f"s3://{results}/nightly.zarr", mode="r",
                                 storage_options={"endpoint_url": endpoint, **credentials})
        done = sorted(store.done_ids())
        assert done == [f"synth_{i:04d}" for i in range(4)]
        for image_id in done:
            record = store.record(image_id)
            assert record["model"]["version"] == version.version
            assert record["model"]["predict"] == PREDICT  # every predict field of the worker's settings file
            assert store.has_probabilities(image_id)
        first_summary, second_summary = (summary_markdown(run["id"], env) for run in (first, second))
        assert "| done | 4 |" in first_summary
        assert "| done | 0 |" in second_summary and "| skipped | 4 |" in second_summary  # nothing left to do
        for summary in (first_summary, second_summary):
            assert credentials["secret"] not in summary and credentials["key"] not in summary
