"""Object storage that misbehaves: a fault-injecting proxy in front of the loopback moto server.

Transient failures (throttling, 5xx, stalls past the client's timeout) are retried with backoff
by s3fs/botocore and the run completes with every result intact; permanent ones (a missing
bucket, denied access) fail at once with a message naming the URL, without task retries.
"""

from __future__ import annotations

import time

import fsspec
import numpy as np
import pytest
import s3fs

from cellseg.config import PredictConfig
from cellseg.io import list_images, read_image
from cellseg.jobs import SegmentJob
from cellseg.model_source import ModelSource, load_predictor
from cellseg.segment import model_record, pending_images, segment_images
from cellseg.store import ResultStore
from cellseg.synth import write_dataset
from tests.reliability.faulty_proxy import Fault, FaultyProxy

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("incoming")
    write_dataset(str(root), count=6, size=80, seed=5)
    return root / "images"


@pytest.fixture()
def s3_endpoint(moto_endpoint) -> str:
    """Buckets on moto alone: the proxy below fronts moto."""
    return moto_endpoint


@pytest.fixture()
def bucket_with_images(s3_bucket, images):
    bucket, options = s3_bucket
    s3fs.S3FileSystem(**options).put(str(images) + "/", f"{bucket[5:]}/incoming/", recursive=True)
    return bucket, options


@pytest.fixture()
def proxy(moto_endpoint, monkeypatch):
    """A FaultyProxy (no faults yet) that every s3:// URL in this test goes through."""
    faulty = FaultyProxy(moto_endpoint)
    # A short read timeout so that a stalled answer becomes a timeout quickly (default: 60 s).
    monkeypatch.setitem(fsspec.config.conf, "s3", {"endpoint_url": faulty.url,
                                                    "config_kwargs": {"read_timeout": 2, "connect_timeout": 2}})
    with faulty.running():
        yield faulty


def reference_masks(registry: str, images, tmp_path) -> ResultStore:
    predictor = load_predictor(ModelSource(registry, "current"), PredictConfig())
    store = ResultStore.open(str(tmp_path / "reference.zarr"))
    todo, _ = pending_images(list_images(str(images)), store)
    segment_images(todo, store, predictor, model_record(predictor, registry))
    return store


def test_reading_retries_throttling_and_server_errors(bucket_with_images, proxy):
    bucket, _ = bucket_with_images
    proxy.faults += [Fault("throttled", r"/incoming/synth_0000\.png", methods=("GET",), status=503, code="SlowDown", times=2),
                     Fault("server error", r"/incoming/synth_0000\.png", methods=("GET",), status=500, code="InternalError", times=1)]
    image = read_image(f"{bucket}/incoming/synth_0000.png")
    assert image.shape == (80, 80)
    assert proxy.injected() == 3


def test_reading_retries_a_stalled_answer(bucket_with_images, proxy):
    bucket, _ = bucket_with_images
    proxy.faults.append(Fault("stall", r"/incoming/synth_0001\.png", methods=("GET",), stall_seconds=4, times=1))
    started = time.monotonic()
    assert read_image(f"{bucket}/incoming/synth_0001.png").shape == (80, 80)
    assert proxy.injected("stall") == 1 and time.monotonic() - started >= 2  # timed out once, then succeeded


def test_segment_images_survives_flaky_storage_with_every_result_intact(
    prefect_harness, registry, images, bucket_with_images, proxy, tmp_path
):
    from cellseg.flows.segment import segment_images_flow

    bucket, _options = bucket_with_images
    proxy.faults += [
        Fault("listing throttled", r"list-type=2", methods=("GET",), status=503, code="SlowDown", times=1),
        Fault("reads throttled", r"/incoming/synth_000[0-3]\.png", methods=("GET",), status=503, code="SlowDown", times=3),
        Fault("read stalled", r"/incoming/synth_0004\.png", methods=("GET",), stall_seconds=4, times=1),
        Fault("writes failing", r"/results\.zarr/.*/labels/mask/0/c\.", methods=("PUT",), status=500, code="InternalError", times=3),
        Fault("metadata writes throttled", r"/results\.zarr/.*zarr\.json", methods=("PUT",), status=503, code="SlowDown", times=3),
    ]
    summary = segment_images_flow(SegmentJob(source_url=f"{bucket}/incoming", store_url=f"{bucket}/results.zarr",
                                  registry_url=registry, shard_size=2))
    assert (summary["done"], summary["failed"]) == (6, [])
    assert {fault.name: fault.injected for fault in proxy.faults} == {
        "listing throttled": 1, "reads throttled": 3, "read stalled": 1, "writes failing": 3,
        "metadata writes throttled": 3}
    from cellseg import s3_direct

    # The failing and throttled writes were the direct writer's (cellseg.s3_direct), which retried them.
    writers = s3_direct.writers_of(f"{bucket[5:]}/results.zarr")
    assert writers and all(writer is not None and writer.proven and writer.failed is None for writer in writers)

    proxy.faults.clear()
    store = ResultStore.open(f"{bucket}/results.zarr", mode="r", storage_options={"endpoint_url": proxy.url})
    reference = reference_masks(registry, images, tmp_path)
    assert store.done_ids() == reference.done_ids() and len(store.done_ids()) == 6
    for image_id in reference.done_ids():
        np.testing.assert_array_equal(store.read_mask(image_id), reference.read_mask(image_id))
        assert store.record(image_id)["statistics"] == reference.record(image_id)["statistics"]


def _failed_run_message(run) -> tuple[str, float]:
    started = time.monotonic()
    with pytest.raises(Exception) as raised:
        run()
    return str(raised.value), time.monotonic() - started


def test_missing_bucket_fails_fast_naming_it(prefect_harness, registry, proxy, tmp_path):
    from cellseg.flows.segment import segment_images_flow

    message, seconds = _failed_run_message(lambda: segment_images_flow(SegmentJob(
        source_url="s3://no-such-bucket-here/incoming", store_url=str(tmp_path / "out.zarr"), registry_url=registry)))
    assert "s3://no-such-bucket-here/incoming" in message
    assert seconds < 10  # no task retries (they would wait 2 + 10 + 30 s)


def test_denied_access_fails_fast_naming_the_url(prefect_harness, registry, bucket_with_images, proxy, tmp_path):
    from cellseg.flows.segment import segment_images_flow

    bucket, _ = bucket_with_images
    proxy.faults.append(Fault("denied", f"/{bucket[5:]}", status=403, code="AccessDenied", times=None))
    message, seconds = _failed_run_message(lambda: segment_images_flow(SegmentJob(
        source_url=f"{bucket}/incoming", store_url=str(tmp_path / "out.zarr"), registry_url=registry)))
    assert f"{bucket}/incoming" in message and "denied" in message.lower()
    assert seconds < 10
    assert proxy.injected("denied") >= 1


def test_no_credential_reaches_logs_artifacts_or_the_store(
    prefect_harness, registry, bucket_with_images, proxy, caplog
):
    import os

    from prefect.artifacts import Artifact

    from cellseg.flows.segment import segment_images_flow

    bucket, _ = bucket_with_images
    secret, key_id = os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]
    caplog.set_level("DEBUG")
    proxy.faults.append(Fault("throttled", r"/incoming/", methods=("GET",), status=503, code="SlowDown", times=2))
    summary = segment_images_flow(SegmentJob(source_url=f"{bucket}/incoming", store_url=f"{bucket}/results.zarr",
                                  registry_url=registry, shard_size=3))
    assert summary["done"] == 6 and proxy.injected() == 2
    fs = s3fs.S3FileSystem(endpoint_url=proxy.url, skip_instance_cache=True)
    metadata = [fs.cat_file(path).decode() for path in fs.find(f"{bucket[5:]}/results.zarr") if path.endswith("zarr.json")]
    assert len(metadata) > 6
    # The secret appears nowhere, not even in third-party DEBUG logs. botocore's own DEBUG logs
    # show the key id inside request signatures (never forwarded to Prefect); the product's
    # logs, which are what Prefect stores with the run, show neither.
    product_logs = "\n".join(r.getMessage() for r in caplog.records if r.name.split(".")[0] in ("cellseg", "prefect", "flows"))
    assert "segmented 6" in product_logs
    assert secret not in caplog.text
    texts = {"product logs": product_logs, "artifact": Artifact.get("segment-images-summary").data,
             "summary": repr(summary), "store metadata": "\n".join(metadata)}
    for where, text in texts.items():
        assert secret not in text and key_id not in text, where
