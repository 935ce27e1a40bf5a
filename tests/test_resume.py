"""A segment-images run killed part-way (SIGKILL) and run again: every image done exactly once,
no partial mask ever marked done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cellseg.config import PredictConfig
from cellseg.io import list_images
from cellseg.model_source import ModelSource, load_predictor
from cellseg.registry import Registry
from cellseg.segment import model_record, pending_images, segment_images
from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

IMAGES = 40


def segment_command(source, store, registry) -> list[str]:
    return [str(Path(sys.executable).parent / "cellseg"), "flow", "segment-images", "--source", str(source),
            "--store", str(store), "--registry", str(registry), "--shard-size", "1", "--max-parallel-shards", "1"]


def count_done(store_path: Path) -> int:
    if not (store_path / "zarr.json").exists():
        return 0
    try:
        return len(ResultStore.open(str(store_path), mode="r").done_ids())
    except Exception:  # noqa: BLE001 - the running process is writing the store; any error reading it half-written means look again
        return 0


def test_killed_run_is_completed_by_a_rerun(prefect_server, tiny_checkpoint, tmp_path):
    env = {**os.environ, **prefect_server}
    write_dataset(str(tmp_path / "data"), count=IMAGES, size=160, seed=4)
    registry = tmp_path / "registry"
    Registry(str(registry)).register(str(tiny_checkpoint), promote=True)
    store_path = tmp_path / "store.zarr"
    command = segment_command(tmp_path / "data/images", store_path, registry)

    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while count_done(store_path) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    store = ResultStore.open(str(store_path), mode="r")
    done_before = {image_id: store.record(image_id)["written"] for image_id in store.done_ids()}
    assert 0 < len(done_before) < IMAGES, f"kill landed outside the run ({len(done_before)} done)"

    reference = ResultStore.open(str(tmp_path / "reference.zarr"))
    predictor = load_predictor(ModelSource(str(registry), "current"), PredictConfig())
    todo, _ = pending_images(list_images(str(tmp_path / "data/images")), reference)
    segment_images(todo, reference, predictor, model_record(predictor, str(registry)))
    for image_id in done_before:
        np.testing.assert_array_equal(store.read_mask(image_id), reference.read_mask(image_id))

    rerun = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert f"skipped {len(done_before)} already done" in rerun.stdout

    store = ResultStore.open(str(store_path), mode="r")
    assert store.done_ids() == reference.done_ids() and len(store.done_ids()) == IMAGES
    assert store.failures() == []
    for image_id in store.done_ids():
        np.testing.assert_array_equal(store.read_mask(image_id), reference.read_mask(image_id))
        assert store.record(image_id)["statistics"] == reference.record(image_id)["statistics"]
    assert {image_id: store.record(image_id)["written"] for image_id in done_before} == done_before
