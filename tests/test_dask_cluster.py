"""segment-images and tune-unet on a Dask cluster started as an operator starts one: a `dask
scheduler` and two `dask worker` processes, the flows run by the `cellseg` command against a real
`prefect server`. What ran where comes from the scheduler's task stream and the workers' logs."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from benchmarks.servers import BIN, free_port, port_open, stop_process_group, wait_until_ready
from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from tests.conftest import cellseg, linked_images

pytestmark = pytest.mark.integration

WORKERS = ("worker-a", "worker-b")


@dataclass
class DaskCluster:
    address: str
    client: Any  # distributed.Client, connected for the task stream
    logs: dict[str, Path]  # worker name -> its log file

    def worker_names(self) -> dict[str, str]:
        """Worker address -> name, as the scheduler knows them."""
        return {address: info["name"] for address, info in self.client.scheduler_info()["workers"].items()}

    def computed(self, stream: list[dict[str, Any]], function: str) -> list[tuple[str, float, float]]:
        """(worker name, start, stop) of each run of the Prefect task `function` in a task stream
        (the Dask key of a Prefect task is its function's name and a hash)."""
        names = self.worker_names()
        return [(names[entry["worker"]], period["start"], period["stop"]) for entry in stream
                if entry["key"].startswith(f"{function}-")
                for period in entry["startstops"] if period["action"] == "compute"]


def _start(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True, cwd=log.parent)


@pytest.fixture(scope="module")
def dask_cluster(prefect_server, tmp_path_factory) -> Iterator[DaskCluster]:
    """`dask scheduler` and two single-threaded `dask worker` processes on loopback, each in its
    own session, talking to the session's prefect server; stopped by their process groups."""
    from distributed import Client

    root = tmp_path_factory.mktemp("dask")
    env = {key: value for key, value in os.environ.items() if not key.startswith("CELLSEG_")}
    env |= {**prefect_server, "DO_NOT_TRACK": "1", "PREFECT_LOGGING_EXTRA_LOGGERS": "cellseg"}
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    dask = str(BIN / "dask")
    processes = [_start([dask, "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                        root / "scheduler.log", env)]
    try:
        wait_until_ready(lambda: port_open(port), processes[0], "dask scheduler", 60)
        for name in WORKERS:
            (root / name).mkdir()
            processes.append(_start([dask, "worker", address, "--name", name, "--host", "127.0.0.1", "--nworkers", "1",
                                     "--nthreads", "1", "--no-dashboard", "--local-directory", str(root / name)],
                                    root / name / "worker.log", env))
        with Client(address, timeout=30) as client:
            deadline = time.monotonic() + 120
            while len(client.scheduler_info()["workers"]) < len(WORKERS):
                exited = [process.args for process in processes if process.poll() is not None]
                assert not exited, f"exited before both workers registered: {exited}"
                assert time.monotonic() < deadline, "the dask workers did not register within 120 s"
                time.sleep(0.5)
            yield DaskCluster(address, client, {name: root / name / "worker.log" for name in WORKERS})
    finally:
        for process in reversed(processes):
            stop_process_group(process)


def test_segment_images_spreads_shards_over_both_workers_and_matches_the_thread_pool(
        dask_cluster, prefect_server, tiny_checkpoint, tmp_path):
    from distributed import get_task_stream

    from cellseg.model_source import _cached_predictor

    write_dataset(str(tmp_path / "new"), count=8, size=96, seed=5)
    common = ["flow", "segment-images", "--source", str(tmp_path / "new" / "images"), "--model", str(tiny_checkpoint),
              "--shard-size", "2"]
    threads = cellseg(*common, "--store", str(tmp_path / "threads.zarr"), env=prefect_server)
    with get_task_stream(dask_cluster.client) as stream:
        run = cellseg(*common, "--store", str(tmp_path / "dask.zarr"), "--dask-address", dask_cluster.address,
                      env=prefect_server)
    assert "segmented 8, skipped 0 already done, failed 0" in run.stdout, run.stdout + run.stderr
    version = run.stdout.split("with model ")[1].split()[0]
    assert f"with model {version} " in threads.stdout

    shards = dask_cluster.computed(stream.data, "segment_one_shard")
    assert len(shards) == 4 and {worker for worker, _, _ in shards} == set(WORKERS), shards
    for name, log in dask_cluster.logs.items():
        text = log.read_text()
        assert "segment-shard-" in text, f"{name} logged no shard:\n{text}"
        assert text.count(f"loaded model {version} (cpu, ") == 1, f"{name}:\n{text}"
    assert all(info.misses == 1 for info in dask_cluster.client.run(_cached_predictor.cache_info).values())

    on_threads = ResultStore.open(str(tmp_path / "threads.zarr"), mode="r")
    on_dask = ResultStore.open(str(tmp_path / "dask.zarr"), mode="r")
    assert on_dask.done_ids() == on_threads.done_ids() and len(on_dask.done_ids()) == 8
    for image_id in on_threads.done_ids():
        np.testing.assert_array_equal(on_dask.read_mask(image_id), on_threads.read_mask(image_id))
        assert on_dask.record(image_id)["statistics"] == on_threads.record(image_id)["statistics"]


def test_tune_trials_run_at_once_on_different_workers(dask_cluster, prefect_server, synthetic_dataset, tmp_path):
    from distributed import get_task_stream

    training = {"epochs": 1, "patch_size": 64, "patches_per_image": 1, "device": "cpu", "init_from": None}
    with get_task_stream(dask_cluster.client) as stream:
        run = cellseg("tune", "--images", str(synthetic_dataset / "images"), "--masks", str(synthetic_dataset / "masks"),
                      "--registry", str(tmp_path / "registry"), "--cache-dir", str(tmp_path / "cache"),
                      "--work-dir", str(tmp_path / "tuning"), "--trials", "2", "--parallel", "2",
                      "--depth", "3", "--base-width", "8", "--lr", "0.001", "0.003",
                      "--training-json", json.dumps(training), "--dask-address", dask_cluster.address,
                      env=prefect_server)
    rows = [line for line in run.stdout.splitlines() if line.endswith("  done")]
    assert len(rows) == 2, run.stdout
    trials = dask_cluster.computed(stream.data, "train_trial")
    assert len(trials) == 2 and {worker for worker, _, _ in trials} == set(WORKERS), trials
    assert max(start for _, start, _ in trials) < min(stop for _, _, stop in trials), f"trials did not overlap: {trials}"


def test_ctrl_c_stops_the_shards_on_the_dask_workers_too(dask_cluster, prefect_server, tmp_path):
    """Interrupted or cancelled, a run on Dask ended, but its shards on the workers segmented on to
    the end of their shards, writing into the store for a minute or more after the run was gone.
    They now read the run's stop event on the scheduler, and end within seconds of the run."""
    import signal
    import sys

    from cellseg.verify import verify_store

    images = linked_images(tmp_path, 3000)  # two shards of 1500: over a minute each on one worker thread
    store = tmp_path / "r.zarr"
    as_from_a_shell = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                       "os.execv(sys.argv[1], sys.argv[1:])")
    command = [str(BIN / "cellseg"), "flow", "segment-images", "--source", str(images), "--store", str(store),
               "--model-version", "general", "--shard-size", "1500", "--dask-address", dask_cluster.address,
               "--registry", str(tmp_path / "registry")]
    env = {key: value for key, value in os.environ.items() if not key.startswith("CELLSEG_")} | prefect_server
    run = subprocess.Popen([sys.executable, "-c", as_from_a_shell, *command], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)

    def done() -> int:
        return len(ResultStore.open(str(store), mode="r").done_ids()) if (store / "zarr.json").exists() else 0

    deadline = time.monotonic() + 240
    while run.poll() is None and done() < 4:
        assert time.monotonic() < deadline, "no image was segmented within 240 s"
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr

    time.sleep(10)  # a shard polls the event once a second, and finishes the images it has predicted
    settled = done()
    time.sleep(5)
    assert done() == settled < 1500, "the shards on the Dask workers went on after their run had ended"
    assert verify_store(str(store), read_data=True).broken == []
