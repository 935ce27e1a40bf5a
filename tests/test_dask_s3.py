"""segment-images as an imaging core runs it at night: images and results in object storage (a moto
S3 server), shards on `dask worker` processes, the run and the workers reporting to a real `prefect
server`, the S3 endpoint and credentials given to each machine in its environment."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from benchmarks.servers import BIN, free_port, port_open, stop_process_group, wait_until_ready
from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from tests.conftest import cellseg

pytestmark = pytest.mark.integration


@contextmanager
def dask_cluster(env: dict[str, str], root: Path) -> Iterator[str]:
    """A `dask scheduler` and one single-threaded `dask worker` with environment `env`, on
    loopback, each in its own session; yields the scheduler's address."""
    from distributed import Client

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    processes: list[subprocess.Popen] = []

    def start(command: list[str], log: str) -> subprocess.Popen:
        with open(root / log, "wb") as out:
            processes.append(subprocess.Popen(command, env=env, stdout=out, stderr=out, start_new_session=True, cwd=root))
        return processes[-1]

    try:
        scheduler = start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                          "scheduler.log")
        wait_until_ready(lambda: port_open(port), scheduler, "dask scheduler", 60)
        worker = start([str(BIN / "dask"), "worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads",
                        "1", "--no-dashboard", "--local-directory", str(root)], "worker.log")
        with Client(address, timeout=30) as client:
            deadline = time.monotonic() + 120
            while not client.scheduler_info()["workers"]:
                assert worker.poll() is None, (root / "worker.log").read_text()
                assert time.monotonic() < deadline, "the dask worker did not register within 120 s"
                time.sleep(0.3)
        yield address
    finally:
        for process in reversed(processes):
            stop_process_group(process)


@pytest.fixture(scope="module")
def images(moto_endpoint, tmp_path_factory) -> str:
    """Three tiny images under s3://incoming-<n>/night-1/."""
    import s3fs

    local = tmp_path_factory.mktemp("images")
    write_dataset(str(local), count=3, size=64, seed=2)
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True)
    bucket = f"incoming-{time.monotonic_ns() % 10**6}"
    fs.mkdir(bucket)
    fs.put(str(local / "images") + "/", f"{bucket}/night-1/", recursive=True)
    return f"s3://{bucket}/night-1"


def _environment(prefect_server: dict[str, str], endpoint: str) -> dict[str, str]:
    """What the operator gives the run's machine and each worker: the Prefect API, the S3 endpoint
    (the credentials, AWS_*, are in this process's environment already)."""
    return {**prefect_server, "CELLSEG_STORAGE__S3__ENDPOINT_URL": endpoint, "PREFECT_LOGGING_EXTRA_LOGGERS": "cellseg"}


def _worker_environment(run: dict[str, str]) -> dict[str, str]:
    return {**{key: value for key, value in os.environ.items() if not key.startswith("CELLSEG_")}, **run}


def _segment(images: str, store: str, address: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return cellseg("flow", "segment-images", "--source", images, "--store", store, "--model-version", "bundled",
                   "--shard-size", "2", "--dask-address", address, env=env, check=False)


def test_s3_images_into_an_s3_store_on_dask_workers_and_a_rerun_skips_them(
        moto_endpoint, prefect_server, images, s3_test_credentials, tmp_path):
    import s3fs

    env = _environment(prefect_server, moto_endpoint)
    store = f"s3://{images.split('/')[2]}/results.zarr"
    with dask_cluster(_worker_environment(env), tmp_path) as address:
        first = _segment(images, store, address, env)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "segmented 3, skipped 0 already done, failed 0" in first.stdout, first.stdout
        again = _segment(images, store, address, env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "segmented 0, skipped 3 already done, failed 0" in again.stdout, again.stdout
    worker_log = (tmp_path / "worker.log").read_text()
    assert "segment-shard-" in worker_log and "loaded model " in worker_log, worker_log

    done = ResultStore.open(store, mode="r", storage_options={"endpoint_url": moto_endpoint}).done_ids()
    assert sorted(done) == ["synth_0000", "synth_0001", "synth_0002"]
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True)
    secret = s3_test_credentials["AWS_SECRET_ACCESS_KEY"].encode()
    written = {path: fs.cat(path) for path in fs.find(store)}
    assert not [path for path, data in written.items() if secret in data]
    assert secret.decode() not in first.stdout + first.stderr + again.stdout + again.stderr + worker_log


def test_credentials_missing_on_the_workers_only_are_named_before_any_shard(
        moto_endpoint, prefect_server, images, tmp_path):
    """The run's machine has the credentials, the Dask worker not: the run named the store and
    AWS_ACCESS_KEY_ID, which the operator had set, and never said that the workers lack them."""
    env = _environment(prefect_server, moto_endpoint)
    worker_env = {key: value for key, value in _worker_environment(env).items() if not key.startswith("AWS_")}
    worker_env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none"),
                   "AWS_EC2_METADATA_DISABLED": "true"}
    store = f"s3://{images.split('/')[2]}/no-credentials.zarr"
    with dask_cluster(worker_env, tmp_path) as address:
        refused = _segment(images, store, address, env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith(f"cellseg flow segment-images: error: Dask workers at {address} cannot run this run's tasks: "
                           f"reaching source_url '{images}': no credentials"), refused.stderr
    assert "AWS_ACCESS_KEY_ID" in line and "CELLSEG_CONFIG" in line, line
    assert "segment-shard-" not in (tmp_path / "worker.log").read_text()
