"""The deployment path end to end: a real `prefect server`, `prefect deploy` from prefect.yaml,
a real process worker, and `prefect deployment run` for train-unet, tune-unet and backfill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cellseg.registry import Registry
from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from tests.conftest import REPO_ROOT, running_prefect_server, stop_process_group

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).parent / "prefect")


def prefect(*args: str, env: dict[str, str], timeout: float = 300, input_text: str | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([PREFECT, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                            input=input_text, check=False)
    if result.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def flow_run_state(name_fragment: str, env: dict[str, str]) -> str:
    """State of the most recent flow run of a deployment, read back through the API."""
    code = (
        "import asyncio, json\n"
        "from prefect.client.orchestration import get_client\n"
        "async def main():\n"
        "    async with get_client() as client:\n"
        f"        deployment = await client.read_deployment_by_name({name_fragment!r})\n"
        "        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId\n"
        "        runs = await client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment.id])))\n"
        "        print(json.dumps([r.state.type.value for r in runs]))\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory):
    """Work pool, deployments from prefect.yaml and a running worker."""
    root = tmp_path_factory.mktemp("deployed")
    env = {**os.environ, **prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
    prefect("work-pool", "create", "cellseg-process", "--type", "process", env=env)
    prefect("--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml", env=env)
    log = open(root / "worker.log", "wb")  # noqa: SIM115 - the worker writes to it until the fixture's teardown, after the yield
    worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cellseg-process"], cwd=REPO_ROOT, env=env,
                              stdout=log, stderr=log, start_new_session=True)
    try:
        yield root, env
    finally:
        stop_process_group(worker)
        log.close()


def test_prefect_yaml_declares_the_deployments(deployed):
    _, env = deployed
    for name in ("train-unet/train-unet", "tune-unet/tune-unet", "segment-images/nightly-segmentation",
                 "segment-images/backfill"):
        assert "'work_pool_name': 'cellseg-process'" in prefect("deployment", "inspect", name, env=env).stdout
    nightly = prefect("deployment", "inspect", "segment-images/nightly-segmentation", env=env).stdout
    assert "0 2 * * *" in nightly
    assert "'job_variable': 'cellseg_nightly'" in nightly  # read when each run starts (tests/test_nightly_schedule.py)


def test_the_gpu_limit_of_the_how_to_can_be_created(deployed):
    _, env = deployed
    prefect("gcl", "create", "gpu", "--limit", "1", env=env)
    try:
        limit = json.loads(prefect("gcl", "inspect", "gpu", "--output", "json", env=env).stdout)
        assert limit["name"] == "gpu" and limit["limit"] == 1 and limit["active"]
    finally:
        prefect("gcl", "delete", "gpu", env=env, input_text="y\n")


def test_train_unet_then_backfill_through_the_worker(deployed):
    root, env = deployed
    write_dataset(str(root / "train"), count=12, size=80, seed=0)
    write_dataset(str(root / "backfill"), count=5, size=96, seed=9)
    registry = str(root / "registry")
    prefect(
        "deployment", "run", "train-unet/train-unet",
        "--param", "job=" + json.dumps({
            "images_url": str(root / "train/images"), "masks_url": str(root / "train/masks"), "registry_url": registry,
            "cache_dir": str(root / "cache"), "work_dir": str(root / "training"), "model": {"depth": 3, "base_width": 8},
            "training": {"epochs": 2, "patch_size": 64, "patches_per_image": 1, "device": "cpu"}}),
        "--watch", "--watch-timeout", "400",
        env=env, timeout=500,
    )
    assert flow_run_state("train-unet/train-unet", env) == ["COMPLETED"]
    versions = Registry(registry).versions()
    assert len(versions) == 1 and Registry(registry).current() == versions[0].version
    assert versions[0].train_config["epochs"] == 2

    prefect(
        "deployment", "run", "segment-images/backfill",
        "--param", "job=" + json.dumps({"source_url": str(root / "backfill/images"),
                                         "store_url": str(root / "backfill.zarr"), "registry_url": registry,
                                         "shard_size": 2}),
        "--watch", "--watch-timeout", "300",
        env=env, timeout=400,
    )
    assert flow_run_state("segment-images/backfill", env) == ["COMPLETED"]
    store = ResultStore.open(str(root / "backfill.zarr"), mode="r")
    assert sorted(store.done_ids()) == [f"synth_{i:04d}" for i in range(5)]
    assert {row["model_version"] for row in store.statistics()} == {versions[0].version}


def flow_run_logs(run_id: str, env: dict[str, str]) -> list[tuple[int, str]]:
    """(level, message) of every log line a flow run sent to the server, oldest first."""
    code = (
        "import asyncio, json, sys\n"
        "from prefect.client.orchestration import get_client\n"
        "from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId\n"
        "async def main():\n"
        "    async with get_client() as client:\n"
        "        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[sys.argv[1]])))\n"
        "        print(json.dumps([(log.level, log.message) for log in logs]))\n"
        "asyncio.run(main())\n"
    )
    result = subprocess.run([sys.executable, "-c", code, run_id], env=env, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    return [tuple(entry) for entry in json.loads(result.stdout)]


def test_a_refused_nightly_job_fails_in_one_line_without_a_traceback(deployed):
    _, env = deployed
    prefect("variable", "set", "cellseg_nightly", '{"source_url": "in", "store_url": "out.zarr", "shard_sise": 4}',
            "--overwrite", env=env)
    try:
        run = subprocess.run([PREFECT, "deployment", "run", "segment-images/nightly-segmentation", "--watch",
                              "--watch-timeout", "120"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=200, check=False)
    finally:
        prefect("variable", "unset", "cellseg_nightly", env=env, input_text="y\n")
    assert "Failed" in run.stdout, run.stdout + run.stderr
    run_id = run.stdout.split("UUID:")[1].split()[0]
    logs = flow_run_logs(run_id, env)
    errors = [message for level, message in logs if level >= 40]
    assert errors and all("shard_sise" in message and "\n" not in message for message in errors), errors
    assert not any("Traceback" in message for _, message in logs)


def test_a_misspelt_job_field_is_named_when_the_run_is_asked_for(deployed):
    """Before: "{...} is not valid under any of the given schemas" (the parameter was SegmentJob or null)."""
    root, env = deployed
    job = {"source_url": str(root / "in"), "stor_url": str(root / "out.zarr")}
    run = subprocess.run([PREFECT, "deployment", "run", "segment-images/backfill", "--param", "job=" + json.dumps(job)],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode != 0
    assert "'stor_url' was unexpected" in run.stdout + run.stderr, run.stdout + run.stderr


def test_tune_unet_through_the_worker(deployed):
    root, env = deployed
    write_dataset(str(root / "tune"), count=10, size=80, seed=1)
    registry = str(root / "tune-registry")
    space = {"learning_rate": [1e-3, 3e-3], "base_width": [8], "depth": [2], "dropout": [0.0], "loss": ["bce"],
             "augmentation": ["flips"], "border_weight": [0.0]}
    prefect(
        "deployment", "run", "tune-unet/tune-unet",
        "--param", "job=" + json.dumps({
            "images_url": str(root / "tune/images"), "masks_url": str(root / "tune/labels"), "registry_url": registry,
            "cache_dir": str(root / "cache"), "work_dir": str(root / "tuning"), "trials": 2, "space": space,
            "model": {"depth": 2, "base_width": 8},
            "training": {"epochs": 1, "patch_size": 64, "patches_per_image": 1, "device": "cpu"}}),
        "--watch", "--watch-timeout", "400",
        env=env, timeout=500,
    )
    assert flow_run_state("tune-unet/tune-unet", env) == ["COMPLETED"]
    versions = Registry(registry).versions()
    assert len(versions) == 1 and Registry(registry).current() is None
    assert versions[0].train_config["learning_rate"] in (1e-3, 3e-3)
    assert len(list((root / "tuning").glob("*/trial-*/best.pt"))) == 2


def test_serve_runs_a_backfill_on_this_machine(tiny_checkpoint, tmp_path):
    # A server of its own: serving re-registers the deployments that prefect.yaml created above.
    (tmp_path / "home").mkdir()
    with running_prefect_server(tmp_path / "home") as server_env:
        serve_and_run_a_backfill({**os.environ, **server_env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"},
                                 tiny_checkpoint, tmp_path)


def serve_and_run_a_backfill(env: dict[str, str], tiny_checkpoint: Path, tmp_path: Path) -> None:
    registry = str(tmp_path / "registry")
    Registry(registry).register(str(tiny_checkpoint), promote=True)
    write_dataset(str(tmp_path / "new"), count=3, size=96, seed=2)
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            [str(Path(sys.executable).parent / "cellseg"), "serve", "--nightly-source", str(tmp_path / "new/images"),
             "--nightly-store", str(tmp_path / "nightly.zarr")],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=log, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 180
            while b"being served" not in (tmp_path / "serve.log").read_bytes():
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "serve did not register its deployments"
                time.sleep(2)
            prefect(
                "deployment", "run", "segment-images/backfill",
                "--param", "job=" + json.dumps({"source_url": str(tmp_path / "new/images"),
                                                 "store_url": str(tmp_path / "served.zarr"), "registry_url": registry}),
                "--watch", "--watch-timeout", "300",
                env=env, timeout=400,
            )
        finally:
            stop_process_group(server)
    store = ResultStore.open(str(tmp_path / "served.zarr"), mode="r")
    assert sorted(store.done_ids()) == ["synth_0000", "synth_0001", "synth_0002"]


def test_serve_builds_the_deployments_prefect_yaml_declares(prefect_harness):
    import yaml

    from cellseg.deployments.serve import DECLARATION, build_deployments

    declared = {d["name"]: d for d in yaml.safe_load(DECLARATION.read_text())["deployments"]}
    served = {d.name: d for d in build_deployments(nightly_source="in/images", nightly_store="out.zarr")}
    assert set(served) == set(declared)
    for name, deployment in served.items():
        assert deployment.tags == declared[name]["tags"] and deployment.description == declared[name]["description"]
        assert deployment.entrypoint.endswith(declared[name]["entrypoint"].split(":")[1])
    nightly = served["nightly-segmentation"]
    assert nightly.parameters == {"job": {"source_url": "in/images", "store_url": "out.zarr"}}
    assert [schedule.schedule.cron for schedule in nightly.schedules] == ["0 2 * * *"] and not nightly.paused
    # As declared: a late nightly and the next night's never overlap, and 02:00 is UTC's.
    assert nightly.concurrency_limit == declared["nightly-segmentation"]["concurrency_limit"] == 1
    assert [schedule.schedule.timezone for schedule in nightly.schedules] == ["UTC"]
    from_variable = {d.name: d for d in build_deployments()}["nightly-segmentation"]
    assert not from_variable.paused and from_variable.parameters == {"job_variable": "cellseg_nightly"}
    assert [s.schedule.cron for s in {d.name: d for d in build_deployments(cron="30 1 * * *")}
            ["nightly-segmentation"].schedules] == ["30 1 * * *"]
    # A served nightly could not use the shipped model until one was trained into the registry.
    shipped = {d.name: d for d in build_deployments("in/images", "out.zarr", nightly_model_version="bundled")}
    assert shipped["nightly-segmentation"].parameters == {
        "job": {"source_url": "in/images", "store_url": "out.zarr", "model_version": "bundled"}}
    with pytest.raises(ValueError, match="--nightly-model-version goes with --nightly-source and --nightly-store"):
        build_deployments(nightly_model_version="bundled")


def test_serve_says_at_once_what_the_nightly_run_will_lack(tmp_path, monkeypatch):
    """A missing source folder, or a registry without a current model, failed the first scheduled
    run hours later, with nothing said when serve started."""
    from cellseg.deployments.serve import warn_of_what_the_nightly_run_lacks
    from cellseg.job_config import SegmentJob

    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    assert warn_of_what_the_nightly_run_lacks(SegmentJob(source_url="images", store_url="n.zarr",
                                                         model_version="bundled")) == []
    said = warn_of_what_the_nightly_run_lacks(SegmentJob(source_url="gone", store_url="n.zarr",
                                                         registry_url=str(tmp_path / "registry")))
    assert [line.split(" (")[0] for line in said] == [
        "the nightly run's source cannot be read or found now", "the nightly run's model cannot be read or found now"]
    assert "image folder 'gone' does not exist" in said[0] and f"registry '{tmp_path / 'registry'}' does not exist" in said[1]
