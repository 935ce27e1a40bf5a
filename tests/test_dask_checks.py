"""What segment-images and tune-unet check of a Dask cluster before they send it work, on a real
`distributed` cluster whose worker is a process of its own; and a tune trial that Dask runs again
after losing its worker."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.servers import free_port
from cellseg.config import ModelConfig, SearchSpace, TrainConfig
from cellseg.jobs import SegmentJob, TuneJob
from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from cellseg.tune import plan_trials

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dask_address() -> Iterator[str]:
    """A scheduler and one single-threaded worker process, on loopback."""
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def _segment_job(source: str, store: str, address: str) -> SegmentJob:
    return SegmentJob(source_url=source, store_url=store, model_version="bundled", dask_address=address)


def test_a_dask_address_nothing_listens_on_fails_quickly_naming_it(prefect_harness, tmp_path, monkeypatch):
    from cellseg.flows import dask_checks
    from cellseg.flows.segment import segment_images_flow

    # Dask tries a refused address again until its connect timeout is out: with the check's 10 s the
    # run took 12 s of the 25 allowed on an idle machine, too little room for a loaded one. With 2 s
    # it takes 4 s, and Dask's own 30 s (no timeout passed) would still fail the limit.
    monkeypatch.setattr(dask_checks, "DASK_CONNECT_SECONDS", 2)
    write_dataset(str(tmp_path / "new"), count=2, size=64, seed=1)
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(ValueError, match=rf"no Dask scheduler answers at {address} \(dask_address"):
        segment_images_flow(_segment_job(str(tmp_path / "new" / "images"), str(tmp_path / "out.zarr"), address))
    assert time.monotonic() - started < 25


def test_a_path_the_workers_cannot_see_is_refused_before_any_image_is_recorded_failed(
        prefect_harness, dask_address, tmp_path, monkeypatch):
    from cellseg.flows.segment import segment_images_flow

    write_dataset(str(tmp_path / "new"), count=2, size=64, seed=1)
    monkeypatch.chdir(tmp_path)  # the worker process stays in the folder it started in
    with pytest.raises(ValueError, match=r"cannot see source_url 'new/images', a relative path") as raised:
        segment_images_flow(_segment_job("new/images", str(tmp_path / "out.zarr"), dask_address))
    assert "\n" not in str(raised.value)
    store = tmp_path / "out.zarr"
    assert not store.exists() or ResultStore.open(str(store), mode="r").failures() == []


def test_a_worker_running_another_cellseg_version_is_named(dask_address, tmp_path, monkeypatch):
    from cellseg.flows import dask_checks

    monkeypatch.setattr(dask_checks, "__version__", "9.9.9")  # this machine upgraded, the worker not yet
    with pytest.raises(ValueError, match=r"runs cellseg \S+, this machine 9\.9\.9 \(tcp://127\.0\.0\.1:\d+\)"):
        dask_checks.check_dask_workers(dask_address, {"source_url": str(tmp_path)})


def test_a_scheduler_without_workers_is_refused_instead_of_waited_on(tmp_path):
    from distributed import LocalCluster

    from cellseg.flows.dask_checks import check_dask_workers

    with (LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address=None) as cluster,
          pytest.raises(ValueError, match="has no workers")):
        check_dask_workers(cluster.scheduler_address, {"source_url": str(tmp_path)})


def test_a_worker_that_does_not_answer_fails_the_check_in_its_time_instead_of_never(tmp_path, monkeypatch):
    """A stopped worker stays on the scheduler's list until its heartbeats are missed for minutes;
    Dask's `run` waited on it for ever."""
    import os
    import signal

    from distributed import Client, LocalCluster

    from cellseg.flows import dask_checks

    monkeypatch.setattr(dask_checks, "DASK_CHECK_SECONDS", 2)
    with (LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                       dashboard_address=None) as cluster,
          Client(cluster.scheduler_address, set_as_default=False) as client):
        [pid] = client.run(os.getpid).values()
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(ValueError, match=rf"a Dask worker at {cluster.scheduler_address} did not answer "
                                                 r"cellseg's check within 2 s"):
                dask_checks.check_dask_workers(cluster.scheduler_address, {"source_url": str(tmp_path)})
            assert time.monotonic() - started < 20
        finally:
            os.kill(pid, signal.SIGCONT)


def test_a_trial_run_again_after_its_worker_was_lost_trains_from_the_start(prefect_harness, synthetic_dataset, tmp_path):
    from prefect import flow

    from cellseg.flows.ingest import ingest_dataset_flow
    from cellseg.flows.tune import train_trial

    space = SearchSpace(learning_rate=[1e-3], base_width=[8], depth=[2], dropout=[0.0], loss=["bce"],
                        augmentation=["flips"], border_weight=[0.0])
    training = TrainConfig(epochs=1, patch_size=64, patches_per_image=1, device="cpu", max_minutes=None, init_from=None)
    job = TuneJob(images_url=str(synthetic_dataset / "images"), masks_url=str(synthetic_dataset / "masks"))
    trial = plan_trials(space, 1, model=ModelConfig(depth=2, base_width=8), training=training)[0]
    manifest = ingest_dataset_flow(job.images_url, job.masks_url, str(tmp_path / "cache"))["manifest_path"]

    @flow
    def twice() -> list[dict]:
        # Dask runs a task again when the worker running it dies: the first attempt's files are there
        return [train_trial(job, trial, manifest, str(tmp_path / "run"), 1) for _ in range(2)]

    first, again = twice()
    assert first["status"] == "done" and again["status"] == "done", again.get("error")
    assert Path(again["checkpoint"]).is_file()


def test_the_command_line_warns_that_workers_cannot_report_to_its_temporary_prefect_server(tmp_path):
    """Without PREFECT_API_URL each Dask worker started a temporary server of its own, silently."""
    import os
    import subprocess
    import sys

    write_dataset(str(tmp_path / "new"), count=1, size=64, seed=1)
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_API_URL", "CELLSEG_"))}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    address = f"tcp://127.0.0.1:{free_port()}"
    command = [str(Path(sys.executable).parent / "cellseg"), "flow", "segment-images", "--source",
               str(tmp_path / "new" / "images"), "--store", str(tmp_path / "out.zarr"), "--model-version", "bundled",
               "--dask-address", address]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "--dask-address without PREFECT_API_URL: the Dask workers cannot report" in refused.stderr
