"""Cancelling runs from Prefect (the UI's Cancel, `prefect flow-run cancel`), as an operator does:
a real `prefect server`, the deployments served by `cellseg serve`, `prefect deployment run`, then a
cancel while the run works. The run ends Cancelled, `cellseg serve` takes the next run, no process
of the run survives it, nothing is registered or half-written, and its log says what was kept."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from cellseg.checkpoint import load_checkpoint
from cellseg.jobs_tune import stop_trial_processes
from cellseg.registry import Registry
from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from tests.conftest import cellseg, running_prefect_server, stop_process_group

BIN = Path(sys.executable).parent
SPACE = {"learning_rate": [1e-3, 3e-3], "base_width": [8], "depth": [2], "dropout": [0.0], "loss": ["bce"],
         "augmentation": ["flips"], "border_weight": [0.0]}
LONG_TRAINING = {"epochs": 500, "patience": 500, "patch_size": 64, "patches_per_image": 1, "device": "cpu"}


def _sleep_for_ever() -> None:
    time.sleep(600)


def test_stop_trial_processes_ends_the_children_and_their_half_written_files(tmp_path):
    """Only the trials: a process the search found running (a label-worker pool, say) is spared."""
    context = multiprocessing.get_context("spawn")
    before = multiprocessing.active_children()
    other = context.Process(target=_sleep_for_ever, daemon=True)
    other.start()
    spared = [*before, other]
    children = [context.Process(target=_sleep_for_ever, daemon=True) for _ in range(2)]
    for child in children:
        child.start()
    (tmp_path / "trial-001").mkdir()
    (tmp_path / "trial-001" / ".tmp-abc123").write_bytes(b"half a checkpoint")
    (tmp_path / "trial-001" / "last.pt").write_bytes(b"kept")
    try:
        assert stop_trial_processes(tmp_path, grace_seconds=10, spared=spared) == 2
        assert not any(child.is_alive() for child in children) and other.is_alive()
    finally:
        other.kill()
    assert sorted(path.name for path in (tmp_path / "trial-001").iterdir()) == ["last.pt"]


def wait_for(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.5) -> object:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout:.0f}s for {what}"
        time.sleep(interval)
    return value


def api(env: dict[str, str], code: str, *args: str) -> object:
    """What `code` (an async main(client, *args) returning JSON-able data) returns, run against the server."""
    program = ("import asyncio, json, sys\nfrom prefect.client.orchestration import get_client\n" + code
               + "\nasync def run():\n    async with get_client() as client:\n"
               "        print(json.dumps(await main(client, *sys.argv[1:])))\nasyncio.run(run())\n")
    result = subprocess.run([sys.executable, "-c", program, *args], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


STATE = "async def main(client, run_id):\n    return (await client.read_flow_run(run_id)).state.type.value"
LOGS = (
    "from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId\n"
    "async def main(client, run_id):\n"
    "    logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))\n"
    "    return [(log.level, log.message) for log in logs]"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A real prefect server and `cellseg serve` on it: (the environment of its clients, serve's process)."""
    root = tmp_path_factory.mktemp("served")
    (root / "home").mkdir()
    with running_prefect_server(root / "home") as server_env:
        env = {**os.environ, **server_env, "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
        env = {key: value for key, value in env.items() if not key.startswith("CELLSEG_")}
        with open(root / "serve.log", "wb") as log:
            serve = subprocess.Popen([str(BIN / "cellseg"), "serve"], cwd=root, env=env, stdout=log, stderr=log,
                                     start_new_session=True)
            try:
                wait_for(lambda: b"being served" in (root / "serve.log").read_bytes() or serve.poll() is not None,
                         180, "cellseg serve to register its deployments", interval=1)
                assert serve.poll() is None, (root / "serve.log").read_text()
                yield env, serve
            finally:
                stop_process_group(serve)


def long_training_job(tmp_path: Path, work_dir: Path, **fields: object) -> dict:
    """A train or tune job on tmp_path/data of a small network trained for far longer than a test
    waits, registering into tmp_path/registry."""
    return {"images_url": str(tmp_path / "data/images"), "masks_url": str(tmp_path / "data/labels"),
            "registry_url": str(tmp_path / "registry"), "cache_dir": str(tmp_path / "cache"),
            "work_dir": str(work_dir), "model": {"depth": 2, "base_width": 8}, "training": LONG_TRAINING, **fields}


def start_run(env: dict[str, str], deployment: str, job: dict) -> str:
    result = subprocess.run([str(BIN / "prefect"), "deployment", "run", deployment, "--param", "job=" + json.dumps(job)],
                            env=env, capture_output=True, text=True, timeout=120, check=True)
    return result.stdout.split("UUID:")[1].split()[0]


def cancel_and_wait(env: dict[str, str], run_id: str, serve: subprocess.Popen) -> list[tuple[int, str]]:
    """Cancel the run as an operator does; once Cancelled (not Crashed, not Running), its log."""
    subprocess.run([str(BIN / "prefect"), "flow-run", "cancel", run_id], env=env, capture_output=True, timeout=120,
                   check=True)
    # Prefect's runner kills a run that has not ended 30 s after its SIGTERM: ending by itself takes seconds.
    final = wait_for(lambda: (state := api(env, STATE, run_id)) in ("CANCELLED", "CRASHED", "COMPLETED", "FAILED")
                     and state, 90, "the cancelled run to end")
    assert final == "CANCELLED"
    assert serve.poll() is None, "cellseg serve stopped with the run it cancelled"
    return [tuple(entry) for entry in api(env, LOGS, run_id)]


def run_processes(serve: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(serve.pid).children(recursive=True)


def assert_cancelled_cleanly(logs: list[tuple[int, str]], kept: str) -> None:
    warnings = [message for level, message in logs if level >= 30]
    # Every line, untruncated: this failed twice under CI's load and passed in every try here.
    assert any(kept in message for message in warnings), "\n".join(f"{level} {message}" for level, message in logs)
    assert not [message for level, message in logs if level >= 40], logs  # no "Crash detected!" for a cancel
    assert not any("Traceback" in message for _, message in logs), logs


@pytest.mark.integration
def test_a_cancelled_tune_unet_ends_its_trial_processes_and_registers_nothing(served, tmp_path):
    env, serve = served
    write_dataset(str(tmp_path / "data"), count=8, size=64, seed=3)
    registry = tmp_path / "registry"
    run_id = start_run(env, "tune-unet/tune-unet", long_training_job(
        tmp_path, tmp_path / "tuning", trials=2, max_parallel_trials=2, space=SPACE))

    def trials() -> list[psutil.Process]:
        found = [p for p in run_processes(serve) if "multiprocessing.spawn" in " ".join(p.cmdline())]
        return found if len(found) == 2 else []

    def trials_training() -> bool:  # each has written its first epoch: the trials are well under way
        return len(list((tmp_path / "tuning").glob("*/trial-*/last.pt"))) == 2

    trial_processes = wait_for(trials, 120, "the two trial processes")
    wait_for(trials_training, 120, "both trials to finish an epoch")
    logs = cancel_and_wait(env, run_id, serve)
    # Before, they trained on for ever, orphaned, after the runner killed the run's process.
    _, alive = psutil.wait_procs(trial_processes, timeout=20)
    assert not alive, [p.cmdline() for p in alive]
    assert not run_processes(serve)
    assert Registry(str(registry)).versions() == []
    assert not list(tmp_path.rglob(".tmp-*"))
    assert_cancelled_cleanly(logs, "tune-unet cancelled: no model registered; the trials' folders so far are left")


@pytest.mark.integration
def test_a_cancelled_train_unet_says_where_its_resumable_checkpoint_is(served, tmp_path):
    env, serve = served
    write_dataset(str(tmp_path / "data"), count=8, size=64, seed=4)
    registry = tmp_path / "registry"
    run_id = start_run(env, "train-unet/train-unet", long_training_job(tmp_path, tmp_path / "training"))
    last = wait_for(lambda: next(iter((tmp_path / "training").glob("*/last.pt")), None), 120, "a first epoch")
    logs = cancel_and_wait(env, run_id, serve)
    assert Registry(str(registry)).versions() == []
    assert not list(tmp_path.rglob(".tmp-*"))
    kept = load_checkpoint(str(last))
    assert_cancelled_cleanly(logs, f"train-unet cancelled: no model registered; {last} holds epoch {kept.epoch}: "
                                   f"`cellseg train --resume --out {last.parent}` goes on from it")
    # As the line says: the folder alone; the images, masks, network and settings are the run's.
    resumed = cellseg("train", "--out", str(last.parent), "--resume", "--epochs", str(kept.epoch + 1), check=False)
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout + resumed.stderr, resumed.stderr
    assert load_checkpoint(str(last)).epoch == kept.epoch + 1
    assert load_checkpoint(str(last)).train_config.patch_size == kept.train_config.patch_size == 64


@pytest.mark.integration
def test_a_cancelled_backfill_says_how_many_images_it_kept(served, tmp_path):
    env, serve = served
    write_dataset(str(tmp_path / "data"), count=60, size=128, seed=5)
    images = tmp_path / "images"
    images.mkdir()
    # 600 images (links to the 60): on an idle machine 60 were all done before `prefect flow-run
    # cancel` had started, and the cancel of a Completed run failed.
    for index in range(600):
        os.link(tmp_path / f"data/images/synth_{index % 60:04d}.png", images / f"img_{index:04d}.png")
    store = tmp_path / "backfill.zarr"
    run_id = start_run(env, "segment-images/backfill", {
        "source_url": str(images), "store_url": str(store), "model_version": "bundled", "shard_size": 4})

    def some_done() -> bool:
        try:
            return len(ResultStore.open(str(store), mode="r").done_ids()) >= 4
        except Exception:  # noqa: BLE001 - not created yet
            return False

    wait_for(some_done, 120, "a first shard")
    logs = cancel_and_wait(env, run_id, serve)
    done = len(ResultStore.open(str(store), mode="r").done_ids())
    assert 4 <= done < 600
    assert_cancelled_cleanly(logs, f"segment-images cancelled: {done} of its 600 images were segmented and are kept")
    assert cellseg("verify", str(store), "--read-data").returncode == 0
    assert not list(tmp_path.rglob(".tmp-*")) and not run_processes(serve)
