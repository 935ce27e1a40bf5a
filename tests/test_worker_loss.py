"""A killed worker loses no work: a real `prefect server`, the backfill deployment of
deployments/prefect.yaml, the automation of deployments/automations.yaml, and process workers
killed with SIGKILL mid-run, alone (`kill -9` of the worker) and together with their run (a
machine that dies). A rerun then completes the store, every image written exactly once."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cellseg.flows._common import stop_with_worker
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError
from cellseg.synth import write_dataset
from tests.conftest import REPO_ROOT, running_prefect_server, stop_process_group

pytestmark = pytest.mark.integration

PREFECT = str(Path(sys.executable).parent / "prefect")
IMAGES = [f"synth_{i:04d}" for i in range(12)]


def prefect(*args: str, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run([PREFECT, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                            check=False)
    if result.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result.stdout


def wait_for(what: str, check: Callable[[], Any], timeout: float, log: Path) -> Any:
    """`check()` once it is truthy; fails naming `what`, with the worker's log, after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s\n--- {log.name} ---\n"
                                 + log.read_text(errors="replace")[-6000:])
        time.sleep(0.5)
    return value


def children(pid: int) -> list[int]:
    """Live processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, parent = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(parent) == pid and state not in "ZX":
            found.append(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


class Site:
    """One Prefect server with the backfill deployed and the zombie automation created."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.workers = 0

    def start_worker(self) -> tuple[subprocess.Popen, Path]:
        self.workers += 1
        log = self.root / f"worker-{self.workers}.log"
        with open(log, "wb") as out:
            worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "cellseg-process"], cwd=REPO_ROOT,
                                      env=self.env, stdout=out, stderr=out, start_new_session=True)
        return worker, log

    def run_backfill(self, job: dict[str, Any], *watch: str) -> str:
        out = prefect("deployment", "run", "segment-images/backfill", "--param", "job=" + json.dumps(job), *watch,
                      env=self.env, timeout=400)
        return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)  # type: ignore[union-attr]

    def stuck_runs(self) -> list[dict[str, Any]]:
        """The runs Running or Cancelling, as the docs' command lists them."""
        return json.loads(prefect("flow-run", "ls", "--state-type", "RUNNING", "--state-type", "CANCELLING",
                                  "--output", "json", env=self.env))

    def state(self, run_id: str) -> tuple[str, str]:
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.env["PREFECT_API_URL"]}), get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
        return (state.type.value, state.message or "") if state else ("", "")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Iterator[Site]:
    """A server of its own: the automation acts on every cellseg run of the server it is created on."""
    root = tmp_path_factory.mktemp("worker-loss")
    (root / "home").mkdir()
    with running_prefect_server(root / "home") as server_env:
        env = {**os.environ, **server_env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
        prefect("work-pool", "create", "cellseg-process", "--type", "process", env=env)
        prefect("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name", "backfill", env=env)
        prefect("automation", "create", "--from-file", "deployments/automations.yaml", env=env)
        yield Site(root, env)


def flow_run_process(worker: subprocess.Popen, log: Path) -> int:
    """The process the worker started for its one run."""
    return wait_for("the worker starts a flow-run process", lambda: children(worker.pid), 120, log)[0]


def written(store_url: str) -> dict[str, str]:
    """When each done image was written: its record's timestamp (none before the store exists)."""
    try:
        store = ResultStore.open(store_url, mode="r")
    except StoreError:
        return {}
    return {image_id: store.record(image_id)["written"] for image_id in store.done_ids()}


def test_a_killed_worker_loses_no_work(site, tiny_checkpoint):
    write_dataset(str(site.root / "data"), count=len(IMAGES), size=768, seed=3)
    store = str(site.root / "backfill.zarr")
    # One image per shard, one shard at a time, each image about a second of work even on an idle
    # machine (768² with 8-fold test-time augmentation on one thread): images are done one by one,
    # and a run is still going when the test kills it.
    job = {"source_url": str(site.root / "data/images"), "store_url": store, "checkpoint_url": str(tiny_checkpoint),
           "shard_size": 1, "max_parallel_shards": 1, "predict": {"tta": True, "threads": 1}}

    # kill -9 of the worker alone: its run's process (a session of its own) ends too, reported Crashed.
    worker, log = site.start_worker()
    try:
        first = site.run_backfill(job)
        orphan = flow_run_process(worker, log)
        wait_for("an image is done", lambda: written(store), 180, log)
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        wait_for(f"the run's process {orphan} ends with its worker", lambda: not alive(orphan), 30, log)
        wait_for("the run is Crashed", lambda: site.state(first)[0] == "CRASHED", 30, log)
    finally:
        stop_process_group(worker)
    after_kill = written(store)
    assert len(after_kill) < len(IMAGES), "the run's process went on segmenting after its worker died"

    # The machine dies: worker and run killed at once, nothing left to report. The automation marks
    # the run Crashed when its heartbeats stop.
    worker, log = site.start_worker()
    try:
        second = site.run_backfill(job)
        process = flow_run_process(worker, log)
        wait_for("another image is done", lambda: len(written(store)) > len(after_kill), 180, log)
        os.kill(worker.pid, signal.SIGKILL)
        os.kill(process, signal.SIGKILL)
        worker.wait()
    finally:
        stop_process_group(worker)
    after_machine_loss = written(store)
    assert len(after_machine_loss) < len(IMAGES), "the run finished before its machine died"
    assert second in [run["id"] for run in site.stuck_runs()], "the dead run is listed as Running"
    wait_for("the automation marks the dead run Crashed", lambda: site.state(second)[0] == "CRASHED", 180, log)
    assert "No heartbeat" in site.state(second)[1]
    # Its shards are tasks of the run itself (no inner flow run), so nothing else is left Running.
    wait_for("no run is left Running", lambda: site.stuck_runs() == [], 120, log)

    # A new worker and a rerun complete exactly the missing images; those done before stay as written.
    worker, log = site.start_worker()
    try:
        third = site.run_backfill(job, "--watch", "--watch-timeout", "300")
    finally:
        stop_process_group(worker)
    assert site.state(third)[0] == "COMPLETED"
    final = written(store)
    assert sorted(final) == IMAGES
    assert {image: final[image] for image in after_machine_loss} == after_machine_loss
    assert {image: after_machine_loss[image] for image in after_kill} == after_kill


def test_a_flow_run_in_this_process_is_not_watched(prefect_harness):
    from prefect import flow

    @flow
    def probe() -> bool:
        stop_with_worker()
        return any(thread.name == "cellseg-worker-watch" for thread in threading.enumerate())

    assert probe() is False
