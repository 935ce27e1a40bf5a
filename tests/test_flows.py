"""The Prefect flows under Prefect's test harness: train-unet, segment-images, failures, Dask."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from PIL import Image

from benchmarks.servers import black_hole
from cellseg.config import ModelConfig, PredictConfig, TrainConfig
from cellseg.ingest import Manifest
from cellseg.io import list_images
from cellseg.jobs import SegmentJob, TrainJob
from cellseg.model_source import ModelSource, load_predictor
from cellseg.pictures import EMBED_MAX_CHARACTERS
from cellseg.registry import Registry
from cellseg.segment import model_record, pending_images, segment_images
from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from tests.test_pictures import embedded_png

pytestmark = pytest.mark.integration

# The model works at a cell size and has a distance-map output, so the flows train, evaluate and
# segment through the resampling of cellseg.scale (the synthetic cells are about 14 px across;
# new_images vary in size) and split cells at the map's peaks.
TINY_MODEL = ModelConfig(depth=3, base_width=8, cell_diameter=20.0, distance_map=True)
TINY_TRAINING = TrainConfig(epochs=3, patch_size=64, patches_per_image=1, device="cpu", max_minutes=None)


@pytest.fixture(scope="module")
def trained_registry(prefect_harness, synthetic_dataset, tmp_path_factory):
    """train-unet run once for this module, on instance label images as masks: (flow result,
    registry URL, cache dir)."""
    from cellseg.flows.train import train_unet

    root = tmp_path_factory.mktemp("train-flow")
    result = train_unet(TrainJob(
        images_url=str(synthetic_dataset / "images"), masks_url=str(synthetic_dataset / "labels"),
        registry_url=str(root / "registry"), cache_dir=str(root / "cache"), work_dir=str(root / "training"),
        model=TINY_MODEL, training=TINY_TRAINING,
    ))
    return result, str(root / "registry"), root / "cache"


@pytest.fixture(scope="module")
def new_images(tmp_path_factory):
    """Eight images of varying size to segment."""
    root = tmp_path_factory.mktemp("new-images")
    write_dataset(str(root), count=8, size=112, seed=3, vary_size=True)
    return root


def test_train_unet_registers_a_current_checkpoint(trained_registry, synthetic_dataset):
    result, registry_url, cache = trained_registry
    registry = Registry(registry_url)
    versions = registry.versions()
    assert [meta.version for meta in versions] == [result["version"]]
    assert registry.current() == result["version"]
    meta = versions[0]
    manifest = Manifest.load(next((cache / "manifests").glob("*.json")))
    assert meta.dataset_manifest_hash == manifest.hash
    assert len(manifest.entries) == 24
    assert meta.architecture["base_width"] == 8 and meta.architecture["cell_diameter"] == 20.0
    assert meta.architecture["distance_map"] is True
    assert meta.train_config["epochs"] == 3
    assert result["metrics"]["dice"] == pytest.approx(meta.metrics["val_dice"], abs=1e-6)
    assert result["metrics"]["dice"] > 0.5


def run_artifacts(key: str) -> dict[str, Any]:
    """{key: artifact} of the flow run that published the latest `key` artifact, read through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        latest = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                       sort=ArtifactSort.CREATED_DESC, limit=1)[0]
        published = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[latest.flow_run_id])))
    return {artifact.key: artifact for artifact in published}


def task_runs_named(flow_run_id: Any, name: str = "segment-shard") -> list[Any]:
    """The task runs of a flow run whose names start with `name` (its segment-shard runs by
    default), read through the API; fails if the run started any inner flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        inner = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        assert inner == [], [run.name for run in inner]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return [run for run in runs if run.name.startswith(name)]


@contextmanager
def extra_logger(name: str) -> Iterator[None]:
    """The handlers of Prefect's `prefect.extra` logger (the run's logs on the API among them) on
    logger `name` meanwhile, as the setting PREFECT_LOGGING_EXTRA_LOGGERS adds them."""
    logger, handlers = logging.getLogger(name), logging.getLogger("prefect.extra").handlers
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            logger.removeHandler(handler)


def run_log_messages(flow_run_id: Any) -> list[str]:
    """The messages a flow run logged, read through the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [log.message for log in logs]


def assert_embeds(artifact: Any, picture: Image.Image) -> None:
    """`artifact` is markdown showing `picture` from its own data, within the size bound."""
    assert artifact.type == "markdown" and len(artifact.data) < EMBED_MAX_CHARACTERS + 1000
    _, embedded = embedded_png(artifact.data)
    assert embedded.size == picture.size
    assert "file://" not in artifact.data


def test_train_unet_publishes_metrics_and_embedded_pictures(trained_registry):
    result, registry_url, _ = trained_registry
    version = result["version"]
    artifacts = run_artifacts("train-unet-metrics")
    assert set(artifacts) == {"train-unet-metrics", "train-unet-progress", "training-curves", "validation-gallery"}
    metrics = artifacts["train-unet-metrics"].data
    assert version in metrics
    assert "| dice |" in metrics
    cells = {name: result["metrics"][f"cells_{name}"] for name in ("f1_mean", "true_cells_total", "merged_total")}
    assert 0.0 <= cells["f1_mean"] <= 1.0 and cells["true_cells_total"] > 10 and cells["merged_total"] >= 0
    assert f"| cells: f1_mean | {cells['f1_mean']:.4f} |" in metrics
    assert f"| cells: true_cells_total | {cells['true_cells_total']} |" in metrics
    assert f"Checkpoint `{registry_url}/{version}/checkpoint.pt`" in metrics  # as text: a link could not open
    assert f"`cellseg models show {version} --registry {registry_url}`" in metrics
    assert [os.path.basename(p) for p in result["pictures"]] == ["training_curves.png", "validation_gallery.png"]
    for key, path in zip(("training-curves", "validation-gallery"), result["pictures"], strict=True):
        with Image.open(path) as picture:
            assert_embeds(artifacts[key], picture)
        assert f"`{registry_url}/{version}/{os.path.basename(path)}`" in artifacts[key].data
    progress = artifacts["train-unet-progress"]
    assert progress.type == "progress" and float(progress.data) == 100.0
    assert "best epoch" in progress.description


def test_train_unet_keeps_history_and_pictures_with_the_version(trained_registry):
    result, registry_url, _ = trained_registry
    run = Path(result["best_checkpoint"]).parent
    meta = Registry(registry_url).get(result["version"])
    assert meta.files == ["history.json", "training_curves.png", "validation_gallery.png"]
    kept = Path(registry_url) / meta.version
    assert {name: (kept / name).read_bytes() for name in meta.files} == {name: (run / name).read_bytes() for name in meta.files}
    assert len(json.loads((kept / "history.json").read_text())) == result["epochs_run"]


def _reference_store(registry_url: str, images, path, config: PredictConfig = PredictConfig()) -> ResultStore:
    """What `cellseg predict` writes for the same images and the current model."""
    predictor = load_predictor(ModelSource(registry_url, "current"), config)
    store = ResultStore.open(str(path))
    todo, _ = pending_images(list_images(str(images)), store)
    segment_images(todo, store, predictor, model_record(predictor, registry_url))
    return store


def test_segment_images_writes_every_image_once_matching_predict(trained_registry, new_images, tmp_path):
    from cellseg.flows.segment import segment_images_flow

    _, registry_url, _ = trained_registry
    store_url = str(tmp_path / "flow.zarr")
    summary = segment_images_flow(SegmentJob(source_url=str(new_images / "images"), store_url=store_url,
                                  registry_url=registry_url, shard_size=3))
    assert summary["done"] == 8 and summary["shards"] == 4 and summary["failed"] == []
    # The shards' CPU per stage, added up over the run (each stage ran in some shard's threads).
    assert set(summary["cpu_ms_per_image"]) == {"read", "model", "labels", "write"}
    assert all(spent > 0 for spent in summary["cpu_ms_per_image"].values())
    from prefect.artifacts import Artifact

    progress = Artifact.get("segment-images-progress")
    assert float(progress.data) == 100.0 and "4 of 4 shards finished (8 of 8 images)" in progress.description
    assert summary["montage"].startswith(store_url + "-montages/") and os.path.getsize(summary["montage"]) > 1000
    artifacts = run_artifacts("segment-images-summary")
    assert f"CPU per image: model {summary['cpu_ms_per_image']['model']:.0f} ms" in artifacts["segment-images-summary"].data
    montage = artifacts["segment-images-montage"]
    with Image.open(summary["montage"]) as picture:
        assert_embeds(montage, picture)
    assert f"Saved as `{summary['montage']}`" in montage.data
    # The shards are tasks of this run, two at a time (no inner flow run, each of which added
    # about a second of Prefect's heartbeat shutdown to a run).
    shards = task_runs_named(montage.flow_run_id)
    assert len(shards) == 4 and all(run.state.is_completed() for run in shards)
    spans = sorted((run.start_time, run.end_time) for run in shards)
    assert spans[1][0] < spans[0][1], spans  # the second shard started before the first ended
    # The montage is drawn once the first shard is done, while the last ones still run.
    [montage_run] = task_runs_named(montage.flow_run_id, "draw-montage")
    assert min(end for _, end in spans) <= montage_run.start_time < max(end for _, end in spans), (montage_run, spans)

    store = ResultStore.open(store_url, mode="r")
    reference = _reference_store(registry_url, new_images / "images", tmp_path / "reference.zarr")
    ids = sorted(store.done_ids())
    assert ids == [f"synth_{i:04d}" for i in range(8)]
    for image_id in ids:
        np.testing.assert_array_equal(store.read_mask(image_id), reference.read_mask(image_id))
        assert store.record(image_id)["statistics"] == reference.record(image_id)["statistics"]
        assert store.record(image_id)["model"]["version"] == Registry(registry_url).current()

    written = {image_id: store.record(image_id)["written"] for image_id in ids}
    again = segment_images_flow(SegmentJob(source_url=str(new_images / "images"), store_url=store_url, registry_url=registry_url))
    assert again["done"] == 0 and again["skipped"] == 8 and again["shards"] == 0
    assert {image_id: store.record(image_id)["written"] for image_id in ids} == written


def test_segment_images_takes_a_stated_cell_size(trained_registry, new_images, tmp_path):
    from cellseg.flows.segment import segment_images_flow

    _, registry_url, _ = trained_registry
    store_url = str(tmp_path / "stated.zarr")
    summary = segment_images_flow(SegmentJob(source_url=str(new_images / "images"), store_url=store_url,
                                  registry_url=registry_url,
                                  predict=PredictConfig(cell_diameter=10.0, centre_prominence=0.2)))
    assert summary["done"] == 8
    stated = PredictConfig(cell_diameter=10.0, centre_prominence=0.2)
    reference = _reference_store(registry_url, new_images / "images", tmp_path / "reference.zarr", stated)
    measured = _reference_store(registry_url, new_images / "images", tmp_path / "measured.zarr")
    store = ResultStore.open(store_url, mode="r")
    differs = 0
    for image_id in sorted(store.done_ids()):
        np.testing.assert_array_equal(store.read_mask(image_id), reference.read_mask(image_id))
        assert store.record(image_id)["model"]["predict"]["cell_diameter"] == 10.0
        assert store.record(image_id)["model"]["predict"]["centre_prominence"] == 0.2
        differs += not np.array_equal(store.read_mask(image_id), measured.read_mask(image_id))
    assert differs  # half the size the cells have: the model sees them at another scale


def test_bad_image_is_recorded_and_the_others_finish(trained_registry, new_images, tmp_path):
    from cellseg.flows.segment import segment_images_flow

    _, registry_url, _ = trained_registry
    source = tmp_path / "images"
    shutil.copytree(new_images / "images", source)
    (source / "broken.png").write_bytes(b"not a png at all")
    (source / "empty.tif").write_bytes(b"")
    # One shard at a time, the first holding the two bad images alone; cellseg's lines go to the
    # run's logs on the API, as PREFECT_LOGGING_EXTRA_LOGGERS=cellseg makes them on a worker.
    with extra_logger("cellseg"):
        summary = segment_images_flow(SegmentJob(source_url=str(source), store_url=str(tmp_path / "s.zarr"),
                                      registry_url=registry_url, shard_size=2, max_parallel_shards=1))
    assert summary["done"] == 8
    run_id = run_artifacts("segment-images-summary")["segment-images-summary"].flow_run_id
    logged = run_log_messages(run_id)
    for name in ("broken.png", "empty.tif"):  # written by the shard's writer thread
        assert any(message.startswith("failed to segment") and name in message for message in logged), logged
    # The montage starts once that first shard is done and draws what the store holds when it runs:
    # nothing, and then it is drawn again at the end, or already the second shard's images (a fast
    # machine, CI 2026-12-04). Either way the run's montage shows cells.
    montages = task_runs_named(run_artifacts("segment-images-montage")["segment-images-montage"].flow_run_id,
                               "draw-montage")
    assert len(montages) in (1, 2) and os.path.getsize(summary["montage"]) > 1000
    failed = {failure["image_id"]: failure for failure in summary["failed"]}
    assert set(failed) == {"broken", "empty"}
    assert "broken.png" in failed["broken"]["source_url"] and "not a readable image" in failed["broken"]["error"]
    assert "0 bytes" in failed["empty"]["error"]
    store = ResultStore.open(str(tmp_path / "s.zarr"), mode="r")
    assert {row["image_id"] for row in store.failures()} == {"broken", "empty"}
    assert len(store.done_ids()) == 8


def test_invalid_parameters_are_rejected_before_any_work(trained_registry, new_images, tmp_path):
    from prefect.exceptions import ParameterTypeError
    from pydantic import ValidationError

    from cellseg.flows.segment import segment_images_flow

    _, registry_url, _ = trained_registry
    for bad, field in (({"shard_size": 0}, "shard_size"), ({"predict": {"threshold": 1.5}}, "threshold"),
                       ({"source_url": "nope://x"}, "source_url")):
        job = {"source_url": str(new_images / "images"), "store_url": str(tmp_path / "x.zarr"),
               "registry_url": registry_url, **bad}
        with pytest.raises(ValidationError, match=field):
            SegmentJob.model_validate(job)
        with pytest.raises(ParameterTypeError, match=field):  # as a deployment run passes it: JSON
            segment_images_flow(job=job)
    assert not (tmp_path / "x.zarr").exists()


@pytest.mark.parametrize("command", [("flow", "train-unet"), ("tune",)])
@pytest.mark.parametrize(("given", "said"), [("{\"epochs\": 2", "--training-json is not valid JSON (Expecting"),
                                             ("[2]", "--training-json gives '[2]', not a JSON object of fields")])
def test_a_training_json_that_is_no_object_is_one_line_naming_the_flag(command, given, said, tmp_path):
    """Not a traceback (`tune` with a JSON list), nor a JSON parser's message that names no flag."""
    from tests.conftest import cellseg

    result = cellseg(*command, "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
                     "--training-json", given, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith(f"cellseg {' '.join(command)}: error: {said}") and result.stderr.count("\n") == 1


def test_unknown_model_version_fails_fast(trained_registry, new_images, tmp_path):
    from cellseg.flows.segment import segment_images_flow
    from cellseg.registry import RegistryError

    _, registry_url, _ = trained_registry
    with pytest.raises(RegistryError, match="no version 'v-missing'"):
        segment_images_flow(SegmentJob(source_url=str(new_images / "images"), store_url=str(tmp_path / "x.zarr"),
                            registry_url=registry_url, model_version="v-missing"))


def test_empty_source_is_nothing_to_do(trained_registry, tmp_path):
    from cellseg.flows.segment import segment_images_flow

    _, registry_url, _ = trained_registry
    (tmp_path / "empty").mkdir()
    summary = segment_images_flow(SegmentJob(source_url=str(tmp_path / "empty"), store_url=str(tmp_path / "e.zarr"),
                                  registry_url=registry_url))
    assert summary["done"] == 0 and summary["shards"] == 0 and summary["failed"] == []
    assert summary["cpu_ms_per_image"] == {}
    assert not (tmp_path / "e.zarr").exists()  # a day without images makes no store


def test_segment_images_on_a_dask_cluster_matches_the_thread_pool(trained_registry, new_images, tmp_path):
    from distributed import LocalCluster

    from cellseg.flows.segment import segment_images_flow

    _, registry_url, _ = trained_registry
    common = {"source_url": str(new_images / "images"), "registry_url": registry_url, "shard_size": 2}
    segment_images_flow(SegmentJob(store_url=str(tmp_path / "threads.zarr"), **common))
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        summary = segment_images_flow(SegmentJob(store_url=str(tmp_path / "dask.zarr"), dask_address=cluster.scheduler_address,
                                      **common))
    assert summary["done"] == 8 and summary["shards"] == 4
    threads = ResultStore.open(str(tmp_path / "threads.zarr"), mode="r")
    dask = ResultStore.open(str(tmp_path / "dask.zarr"), mode="r")
    assert dask.done_ids() == threads.done_ids()
    for image_id in threads.done_ids():
        np.testing.assert_array_equal(dask.read_mask(image_id), threads.read_mask(image_id))
        assert dask.record(image_id)["statistics"] == threads.record(image_id)["statistics"]


def test_segment_images_reads_and_writes_s3(trained_registry, new_images, s3_bucket, monkeypatch, tmp_path, caplog):
    import fsspec
    import s3fs

    from cellseg.flows.segment import segment_images_flow

    _, registry_url, _ = trained_registry
    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(new_images / "images") + "/", f"{bucket[5:]}/incoming/", recursive=True)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": options["endpoint_url"]})
    caplog.set_level("DEBUG")
    summary = segment_images_flow(SegmentJob(source_url=f"{bucket}/incoming", store_url=f"{bucket}/results.zarr",
                                  registry_url=registry_url, shard_size=4))
    assert summary["done"] == 8
    from cellseg import s3_direct

    # The results went to the server through the direct writer (cellseg.s3_direct), not s3fs.
    writers = s3_direct.writers_of(f"{bucket[5:]}/results.zarr")
    assert writers and all(writer is not None and writer.proven for writer in writers), writers
    assert "written through s3fs" not in caplog.text
    from prefect.artifacts import Artifact

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    assert "segmented 8, skipped 0, failed 0" in caplog.text  # the run's logs were captured
    assert secret not in caplog.text
    assert secret not in Artifact.get("segment-images-summary").data
    assert secret not in json.dumps(summary)
    montage = run_artifacts("segment-images-summary")["segment-images-montage"]  # drawn from the bucket
    with Image.open(io.BytesIO(fs.cat_file(summary["montage"]))) as picture:
        assert_embeds(montage, picture)
    assert secret not in montage.data
    store = ResultStore.open(f"{bucket}/results.zarr", mode="r", storage_options=options)
    assert len(store.statistics()) == 8
    local = _reference_store(registry_url, new_images / "images", tmp_path / "ref.zarr")
    for image_id in local.done_ids():
        np.testing.assert_array_equal(store.read_mask(image_id), local.read_mask(image_id))
    ngff = pytest.importorskip("ome_zarr_models.v05")  # the NGFF metadata written through S3 is valid too
    ngff.Image.from_zarr(zarr.open_group(f"{bucket}/results.zarr/synth_0000", mode="r", storage_options=options))


def test_cellseg_flow_train_unet_keeps_history_and_pictures_in_an_s3_registry(synthetic_dataset, seaweedfs_endpoint,
                                                                              prefect_server, tmp_path):
    # As an operator runs it: the CLI on a real Prefect server, the registry in a bucket of a real
    # S3 server (SeaweedFS), the training run's folder on this machine's disk.
    import s3fs
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tests.conftest import cellseg

    fs = s3fs.S3FileSystem(endpoint_url=seaweedfs_endpoint, skip_instance_cache=True)
    bucket = f"train-flow-{time.monotonic_ns() % 10**6}"
    fs.mkdir(bucket)
    registry_url = f"s3://{bucket}/models"
    printed = cellseg(
        "flow", "train-unet", "--images", str(synthetic_dataset / "images"), "--masks", str(synthetic_dataset / "labels"),
        "--registry", registry_url, "--cache-dir", str(tmp_path / "cache"), "--work-dir", str(tmp_path / "training"),
        "--model-json", json.dumps({"depth": 2, "base_width": 8}),
        "--training-json", json.dumps({"epochs": 1, "patch_size": 64, "patches_per_image": 1, "device": "cpu"}),
        env={**prefect_server, "FSSPEC_S3_ENDPOINT_URL": seaweedfs_endpoint}).stdout
    assert "validation cells (" in printed and "F1@0.5" in printed  # as `cellseg train` prints them

    (meta,) = Registry(registry_url, {"endpoint_url": seaweedfs_endpoint}).versions()
    (run,) = (tmp_path / "training").iterdir()
    assert meta.files == ["history.json", "training_curves.png", "validation_gallery.png"]
    for name in meta.files:
        assert fs.cat_file(f"{registry_url}/{meta.version}/{name}") == (run / name).read_bytes()
    with temporary_settings({PREFECT_API_URL: prefect_server["PREFECT_API_URL"]}):
        artifacts = run_artifacts("train-unet-metrics")
    assert f"Checkpoint `{registry_url}/{meta.version}/checkpoint.pt`" in artifacts["train-unet-metrics"].data
    assert not [artifact for artifact in artifacts.values() if artifact.type == "link"]
    for key, name in (("training-curves", "training_curves.png"), ("validation-gallery", "validation_gallery.png")):
        with Image.open(run / name) as picture:
            assert_embeds(artifacts[key], picture)
        assert f"`{registry_url}/{meta.version}/{name}`" in artifacts[key].data


def test_segment_images_with_a_shipped_model_by_name_needs_no_registry(new_images, tmp_path, prefect_harness):
    from cellseg.flows.segment import segment_images_flow

    store_url = str(tmp_path / "shipped.zarr")
    summary = segment_images_flow(SegmentJob(source_url=str(new_images / "images"), store_url=store_url,
                                  registry_url=str(tmp_path / "no-registry"), model_version="general", shard_size=4))
    assert summary["done"] == 8 and summary["failed"] == []
    rows = ResultStore.open(store_url, mode="r").statistics()
    assert len(rows) == 8 and all(row["model_version"].startswith("general-") for row in rows)
    assert summary["model_version"] == rows[0]["model_version"]  # the version the images record, not its name
    assert summary["model_version"] in run_artifacts("segment-images-summary")["segment-images-summary"].data
    assert all(row["cell_count"] > 0 for row in rows)
    assert not (tmp_path / "no-registry").exists()


def _storage_failure(endpoint: str, **timeouts: Any) -> Any:
    """The StorageError of listing s3://bucket/images on the S3 endpoint `endpoint`."""
    import fsspec

    from cellseg.settings import CellsegSettings, StorageTimeouts
    from cellseg.storage_errors import StorageError, storage_call

    fsspec.config.conf.clear()
    CellsegSettings(storage={"s3": {"endpoint_url": endpoint}},
                    storage_timeouts=StorageTimeouts(**timeouts)).apply_storage()
    with pytest.raises(StorageError) as raised, storage_call("s3://bucket/images"):
        list_images("s3://bucket/images")
    return raised.value


@contextmanager
def _endpoint_that_takes_no_connection() -> Iterator[str]:
    """A loopback port whose listen queue is full, so that the kernel drops new connections' SYNs:
    connecting times out, as to a host that is down."""
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    waiting = []
    try:
        for _ in range(3):
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(("127.0.0.1", port))
            waiting.append(client)
        yield f"http://127.0.0.1:{port}"
    finally:
        for client in waiting:
            client.close()
        server.close()


def test_a_dead_endpoint_is_retried_once_when_it_refused_and_never_when_connecting_timed_out(
        s3_test_credentials, monkeypatch):
    """An endpoint that took no connection in all of botocore's attempts is down: a task retries
    one that refused once (a restart, a blip), one that timed out connecting not at all; a slow
    answer is retried as before. Every task retry of a dead endpoint cost its delays again."""
    import fsspec
    from prefect.client.schemas.objects import TaskRun
    from prefect.states import Failed

    from benchmarks.servers import free_port
    from cellseg.flows._common import retry_unless_bad_input

    monkeypatch.setattr(fsspec.config, "conf", {})

    def retried(error: BaseException, run_count: int) -> bool:
        run = TaskRun(flow_run_id=None, task_key="plan-shards", dynamic_key="0", run_count=run_count)
        return retry_unless_bad_input(None, run, Failed(data=error))  # type: ignore[arg-type]

    refused = _storage_failure(f"http://127.0.0.1:{free_port()}", attempts=2)
    assert refused.unreachable and "connection refused" in str(refused)
    assert [retried(refused, count) for count in (1, 2, 3)] == [True, False, False]
    with _endpoint_that_takes_no_connection() as endpoint:
        started = time.monotonic()
        timed_out = _storage_failure(endpoint, connect_seconds=1, attempts=2)
        assert time.monotonic() - started < 20  # 2 attempts of 1 s, not the default 4 of 5 s
    assert str(timed_out) == (f"'s3://bucket/images': timed out after 1 s connecting to {endpoint} (ConnectTimeoutError, "
                              "tried 2 times; storage_timeouts in the settings set the limits)")
    assert timed_out.unreachable and [retried(timed_out, count) for count in (1, 2)] == [False, False]
    from botocore.exceptions import ReadTimeoutError

    from cellseg.storage_errors import storage_error

    slow = storage_error("s3://bucket/images", ReadTimeoutError(endpoint_url=endpoint))
    assert slow is not None and not slow.unreachable and [retried(slow, count) for count in (1, 2, 3)] == [True] * 3
    # botocore's own error, raised where no URL was known, is judged as its StorageError is.
    from botocore.exceptions import EndpointConnectionError

    assert [retried(EndpointConnectionError(endpoint_url=endpoint), count) for count in (1, 2)] == [True, False]


def test_segment_images_against_a_dead_endpoint_fails_in_seconds_naming_it(prefect_harness, s3_test_credentials,
                                                                            monkeypatch, tmp_path):
    """Nothing listens at the S3 endpoint: the run fails with one line naming the endpoint after
    botocore's attempts and one task retry, not after three retries' 2 + 10 + 30 s of delays
    (about a minute, and minutes for an endpoint that never takes the connection)."""
    import fsspec

    from benchmarks.servers import free_port
    from cellseg.flows.segment import segment_images_flow
    from cellseg.storage_errors import StorageError

    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(fsspec.config, "conf", {})
    monkeypatch.setenv("CELLSEG_STORAGE__S3__ENDPOINT_URL", endpoint)
    with _run_logs() as logs, pytest.raises(StorageError) as raised:
        segment_images_flow(SegmentJob(source_url="s3://lab-images/incoming", store_url=str(tmp_path / "r.zarr"),
                                       model_version="bundled"))
    assert str(raised.value) == (f"'s3://lab-images/incoming': cannot connect to {endpoint} "
                                 "(connection refused: nothing listens there)")
    assert "Retry 1/3" in logs.getvalue() and "Retry 2/3" not in logs.getvalue()
    assert s3_test_credentials["AWS_SECRET_ACCESS_KEY"] not in logs.getvalue()


@contextmanager
def _run_logs() -> Iterator[io.StringIO]:
    """Every log record of the runs started inside (Prefect's and cellseg's), as text: Prefect's
    logging setup can leave pytest's caplog without them when a test starts the session's first run."""
    text = io.StringIO()
    handler = logging.StreamHandler(text)
    logging.getLogger().addHandler(handler)
    try:
        yield text
    finally:
        logging.getLogger().removeHandler(handler)


def _bucket_of_images(endpoint: str, credentials: dict[str, str], images: Path, count: int) -> str:
    """A new bucket on the S3 server at `endpoint` holding the first `count` of `images` under incoming/: its URL."""
    import s3fs

    bucket = f"iam-{time.monotonic_ns() % 10**9}"
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key=credentials["AWS_ACCESS_KEY_ID"],
                           secret=credentials["AWS_SECRET_ACCESS_KEY"], skip_instance_cache=True)
    fs.mkdir(bucket)
    for path in sorted(images.glob("*.png"))[:count]:
        fs.put_file(str(path), f"{bucket}/incoming/{path.name}")
    return f"s3://{bucket}"


def _use_s3(monkeypatch: pytest.MonkeyPatch, endpoint: str, key: str, secret: str) -> None:
    """The worker's settings: this endpoint and credentials (storage.s3), set as an operator sets them."""
    import fsspec

    monkeypatch.setattr(fsspec.config, "conf", {})
    for name, value in {"ENDPOINT_URL": endpoint, "KEY": key, "SECRET": secret}.items():
        monkeypatch.setenv(f"CELLSEG_STORAGE__S3__{name}", value)


def test_segment_images_with_credentials_the_endpoint_refuses_fails_at_once_naming_the_settings(
        prefect_harness, moto_iam, new_images, monkeypatch, tmp_path):
    """A wrong secret (moto checking credentials as AWS does): the run fails at its first call
    with one line naming the URL, the endpoint and the settings to check; no task retries, no
    secret in the logs, no store (before: 'access denied (The request signature ...)')."""
    from cellseg.flows.segment import segment_images_flow
    from cellseg.storage_errors import StorageError

    endpoint, admin, _ = moto_iam
    bucket = _bucket_of_images(endpoint, admin, new_images / "images", 2)
    _use_s3(monkeypatch, endpoint, admin["AWS_ACCESS_KEY_ID"], "wrong-secret-4711")
    started = time.monotonic()
    with _run_logs() as logs, pytest.raises(StorageError) as raised:
        segment_images_flow(SegmentJob(source_url=f"{bucket}/incoming", store_url=str(tmp_path / "r.zarr"),
                                       model_version="bundled"))
    assert str(raised.value).startswith(
        f"'{bucket}/incoming': {endpoint} refused the credentials (SignatureDoesNotMatch: "), raised.value
    assert "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or storage.s3.key" in str(raised.value)
    assert "Task run failed" not in logs.getvalue() and "Retry" not in logs.getvalue()
    assert "refused the credentials" in logs.getvalue() and time.monotonic() - started < 60
    assert "wrong-secret-4711" not in logs.getvalue() and admin["AWS_SECRET_ACCESS_KEY"] not in logs.getvalue()
    assert not (tmp_path / "r.zarr").exists()


def test_segment_images_into_a_store_its_credentials_may_only_read_stops_at_once_keeping_what_it_holds(
        prefect_harness, moto_iam, new_images, monkeypatch):
    """Credentials whose IAM policy allows reading everything and writing nothing: the run stops at
    its first write with one line naming the store and the denial, no task retries, and the image
    the store held is kept as it was."""
    from cellseg.flows.segment import segment_images_flow

    endpoint, admin, user = moto_iam
    bucket = _bucket_of_images(endpoint, admin, new_images / "images", 3)
    store_url = f"{bucket}/results.zarr"
    _use_s3(monkeypatch, endpoint, admin["AWS_ACCESS_KEY_ID"], admin["AWS_SECRET_ACCESS_KEY"])
    segment_images_flow(SegmentJob(source_url=f"{bucket}/incoming/synth_0000.png", store_url=store_url,
                                   model_version="bundled"))
    admin_options = {"endpoint_url": endpoint, "key": admin["AWS_ACCESS_KEY_ID"], "secret": admin["AWS_SECRET_ACCESS_KEY"]}
    kept = ResultStore.open(store_url, mode="r", storage_options=admin_options).read_mask("synth_0000")

    reader = user(f"reader-{time.monotonic_ns() % 10**9}",
                  [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*", "s3:Head*"], "Resource": "*"}])
    _use_s3(monkeypatch, endpoint, reader["AWS_ACCESS_KEY_ID"], reader["AWS_SECRET_ACCESS_KEY"])
    with _run_logs() as logs, pytest.raises(Exception) as raised:  # what matters is the line it says
        segment_images_flow(SegmentJob(source_url=f"{bucket}/incoming", store_url=store_url, model_version="bundled",
                                       shard_size=1))
    assert str(raised.value).startswith(f"cannot write to results store '{store_url}': Access Denied"), raised.value
    assert "Access Denied" in logs.getvalue() and "Retry" not in logs.getvalue()
    assert reader["AWS_SECRET_ACCESS_KEY"] not in logs.getvalue()
    after = ResultStore.open(store_url, mode="r", storage_options=admin_options)
    assert after.done_ids() == {"synth_0000"}
    np.testing.assert_array_equal(after.read_mask("synth_0000"), kept)


STALL_LIMITS = {"connect_seconds": 1, "read_seconds": 1, "attempts": 2}


def test_segment_images_against_an_endpoint_that_never_answers_fails_after_one_task_retry(
        prefect_harness, s3_test_credentials, monkeypatch, tmp_path):
    """An endpoint that takes connections and answers none (a hung server): every attempt of the
    first call times out, so it is treated as unreachable: one task retry, then one line saying so
    (before: three task retries, each waiting out every attempt again: 4 x 4 x 30 s plus 42 s of
    delays, about 9 minutes, with the default limits)."""
    from cellseg.flows.segment import segment_images_flow
    from cellseg.storage_errors import StorageError

    with black_hole() as port:
        endpoint = f"http://127.0.0.1:{port}"
        _use_s3(monkeypatch, endpoint, s3_test_credentials["AWS_ACCESS_KEY_ID"],
                s3_test_credentials["AWS_SECRET_ACCESS_KEY"])
        for name, value in STALL_LIMITS.items():
            monkeypatch.setenv(f"CELLSEG_STORAGE_TIMEOUTS__{name.upper()}", str(value))
        started = time.monotonic()
        with _run_logs() as logs, pytest.raises(StorageError) as raised:
            segment_images_flow(SegmentJob(source_url="s3://lab-images/incoming", store_url=str(tmp_path / "r.zarr"),
                                           model_version="bundled"))
        seconds = time.monotonic() - started
    assert str(raised.value) == (f"'s3://lab-images/incoming': timed out after 1 s waiting for {endpoint} to answer "
                                 "(ReadTimeoutError, tried 2 times; it took the connections but answered no request; "
                                 "storage_timeouts in the settings set the limits)")
    assert "Retry 1/3" in logs.getvalue() and "Retry 2/3" not in logs.getvalue()
    assert seconds < 40, f"{seconds:.0f} s"  # two runs of 2 attempts of 1 s, and the first delay of 2 s
    assert s3_test_credentials["AWS_SECRET_ACCESS_KEY"] not in logs.getvalue()


def test_a_read_timeout_from_an_endpoint_that_has_answered_keeps_every_task_retry(moto_endpoint, monkeypatch):
    """A slow answer from a server that answered before (overloaded, a large object) may pass: it
    keeps the task retries; only an endpoint that never answered is judged stalled."""
    import fsspec
    import s3fs
    from prefect.client.schemas.objects import TaskRun
    from prefect.states import Failed

    from cellseg.flows._common import retry_unless_bad_input
    from cellseg.settings import CellsegSettings, StorageTimeouts
    from cellseg.storage_errors import StorageError, storage_call
    from tests.reliability.faulty_proxy import Fault, FaultyProxy

    def retried(error: BaseException, run_count: int) -> bool:
        run = TaskRun(flow_run_id=None, task_key="plan-shards", dynamic_key="0", run_count=run_count)
        return retry_unless_bad_input(None, run, Failed(data=error))  # type: ignore[arg-type]

    bucket = f"slow-{time.monotonic_ns() % 10**9}"
    fs = s3fs.S3FileSystem(endpoint_url=moto_endpoint, skip_instance_cache=True)
    fs.mkdir(bucket)
    fs.pipe_file(f"{bucket}/fast/a.png", b"not decoded here")
    proxy = FaultyProxy(moto_endpoint, [Fault("stall", r"prefix=slow", methods=("GET",), stall_seconds=3, times=None)])
    monkeypatch.setattr(fsspec.config, "conf", {})
    CellsegSettings(storage={"s3": {"endpoint_url": proxy.url}},
                    storage_timeouts=StorageTimeouts(**STALL_LIMITS)).apply_storage()
    with proxy.running():
        assert list_images(f"s3://{bucket}/fast") == [f"s3://{bucket}/fast/a.png"]
        with pytest.raises(StorageError) as raised, storage_call(f"s3://{bucket}/slow"):
            list_images(f"s3://{bucket}/slow")
    slow = raised.value
    assert proxy.injected("stall") == 2 and "timed out after 1 s waiting for" in str(slow)
    assert "answered no request" not in str(slow)
    assert slow.transient and not slow.unreachable
    assert [retried(slow, count) for count in (1, 2, 3)] == [True, True, True]
    with black_hole() as port:
        endpoint = f"http://127.0.0.1:{port}"
        stalled = _storage_failure(endpoint, **STALL_LIMITS)
    assert stalled.transient and stalled.unreachable and "answered no request" in str(stalled)
    assert [retried(stalled, count) for count in (1, 2, 3)] == [True, False, False]


@pytest.mark.parametrize(("event", "shown"), [
    ("prefect.flow-run.heartbeat", None),
    ("prefect.artifact.created", "prefect.artifact.created was not sent: Prefect's events service had stopped"),
])
def test_an_event_sent_as_prefect_s_events_service_stops_is_no_traceback(event, shown):
    """Prefect's `emit_event` can find its events service running and send to it once stopped (a
    flow failing in its first second: CI saw the heartbeat's traceback in a one-line failure)."""
    import logging

    import prefect.events.utilities

    import cellseg.flows._common  # noqa: F401 - installs the filter

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = prefect.events.utilities.logger
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError("Cannot put items in a stopped service instance.")
        except RuntimeError:
            logger.exception(f"Error emitting event: {event}")  # as emit_event logs it
        try:
            raise RuntimeError("another failure")
        except RuntimeError:
            logger.exception("Error emitting event: prefect.flow-run.heartbeat")
    finally:
        logger.removeHandler(handler)
    kept = [(record.levelname, record.getMessage(), record.exc_info is not None) for record in records]
    assert kept == ([] if shown is None else [("WARNING", shown, False)]) + [
        ("ERROR", "Error emitting event: prefect.flow-run.heartbeat", True)]


def test_a_stopped_runs_warning_is_on_the_api_as_soon_as_it_is_logged(prefect_harness):
    """A cancelled run is marked Cancelled, or killed 30 s after its SIGTERM, before Prefect's next
    batch of log lines: the line saying what it kept is sent at once."""
    from prefect import flow, get_run_logger
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.runtime import flow_run

    from cellseg.flows._common import warn_now

    @flow
    def stopping() -> list[str]:
        warn_now(get_run_logger(), "segment-images cancelled: %d of its %d images were segmented and are kept", 4, 9)
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.get_id()])))
        return [log.message for log in logs]

    assert "segment-images cancelled: 4 of its 9 images were segmented and are kept" in stopping()
