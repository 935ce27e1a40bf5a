"""Results written to S3 with obstore where it writes as s3fs would (cellseg.s3_direct): the same
objects on both local servers, a first failure hands the store to s3fs, a later one raises
naming the object, options that change a write keep s3fs, and the settings reach it."""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import timedelta

import numpy as np
import pytest
import s3fs
from zarr.core.sync import sync

from cellseg import s3_direct
from cellseg.settings import CellsegSettings, StorageTimeouts
from cellseg.store import ResultStore
from tests.test_zarr_writes import MODEL, objects, result, write


@pytest.fixture(autouse=True)
def direct_writes_on():
    was = s3_direct.enabled()
    s3_direct.enable(True)
    yield
    s3_direct.enable(was)


def writer_of(store: ResultStore) -> s3_direct.DirectS3Writer | None:
    return sync(s3_direct.direct_writer(store.root.store))


@pytest.mark.integration
def test_results_go_through_the_direct_writer_and_are_the_objects_s3fs_writes(s3_bucket):
    bucket, options = s3_bucket
    arrays = result(seed=2, side=300)
    direct = ResultStore.open(f"{bucket}/direct.zarr", storage_options=options)
    assert direct.done_ids() == set()  # s3fs lists the store (and may cache the listing) before the write
    assert write(direct, "img", arrays)
    assert direct.done_ids() == {"img"}  # the writes invalidated that listing
    writer = writer_of(direct)
    assert writer is not None and writer.proven and writer.failed is None

    s3_direct.enable(False)
    through_s3fs = ResultStore.open(f"{bucket}/s3fs.zarr", storage_options=options)
    assert writer_of(through_s3fs) is None
    assert write(through_s3fs, "img", arrays)

    written, expected = objects(f"{bucket}/direct.zarr", options), objects(f"{bucket}/s3fs.zarr", options)
    assert sorted(written) == sorted(expected) and len(written) > 10
    for key in expected:
        if key != "zarr.json":
            assert written[key] == expected[key], key
    reread = ResultStore.open(f"{bucket}/direct.zarr", mode="r", storage_options=options)
    assert reread.is_done("img")
    np.testing.assert_array_equal(reread.read_cells("img"), arrays["cells"])


def store_in_new_bucket(endpoint: str, bucket: str, path: str) -> tuple[s3fs.S3FileSystem, ResultStore]:
    """A results store at s3://bucket/path on the S3 server at `endpoint`, in a bucket made for it."""
    fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
    fs.mkdir(bucket)
    return fs, ResultStore.open(f"s3://{bucket}/{path}", storage_options={"endpoint_url": endpoint})


@pytest.mark.integration
def test_a_first_write_that_fails_hands_the_store_to_s3fs_and_says_why_without_the_secret(seaweedfs_endpoint, caplog):
    _, store = store_in_new_bucket(seaweedfs_endpoint, "direct-fallback", "run.zarr")
    zarr_store = store.root.store
    # A writer whose credentials the server refuses (s3fs's are right).
    writer = s3_direct.DirectS3Writer(refused_store(seaweedfs_endpoint, "direct-fallback", "run.zarr"),
                                      "direct-fallback", "run.zarr", zarr_store.fs)
    s3_direct._writers.setdefault(zarr_store.fs, {})[(zarr_store.path, os.getpid())] = writer

    with caplog.at_level(logging.WARNING, logger="cellseg.s3_direct"):
        assert write(store, "img", result(seed=3, side=120))
    assert writer.failed is not None and not writer.proven
    assert "written through s3fs instead" in caplog.text and "s3://direct-fallback/run.zarr" in caplog.text
    assert "not-the-secret-4711" not in caplog.text and "not-the-secret-4711" not in repr(writer)
    assert ResultStore.open("s3://direct-fallback/run.zarr", mode="r",
                            storage_options={"endpoint_url": seaweedfs_endpoint}).is_done("img")
    assert sync(writer.write([("other/zarr.json", b"{}")])) is False  # given up for good


@pytest.mark.integration
def test_first_writes_that_fail_together_say_why_once(seaweedfs_endpoint, caplog):
    """The shards of a run write their first images at the same time: when the direct writes all
    fail (credentials that may not write, say), the store goes to s3fs with one warning, not one
    per write under way (before: a warning for each)."""
    import asyncio

    _, store = store_in_new_bucket(seaweedfs_endpoint, "direct-fallback-once", "run.zarr")
    writer = s3_direct.DirectS3Writer(refused_store(seaweedfs_endpoint, "direct-fallback-once", "run.zarr"),
                                      "direct-fallback-once", "run.zarr", store.root.store.fs)

    async def three_at_once() -> list[bool]:
        return await asyncio.gather(*(writer.write([(f"img{index}/zarr.json", b"{}")]) for index in range(3)))

    with caplog.at_level(logging.WARNING, logger="cellseg.s3_direct"):
        assert sync(three_at_once()) == [False, False, False]
    assert caplog.text.count("written through s3fs instead") == 1 and writer.failed is not None


@pytest.mark.integration
def test_keys_are_written_as_they_are_and_those_obstore_cannot_name_go_through_s3fs(seaweedfs_endpoint):
    fs, store = store_in_new_bucket(seaweedfs_endpoint, "direct-keys", "a run%.zarr")
    writer = writer_of(store)
    assert writer is not None
    # Image ids come from file names: anything but '/', '.', '..' and the store's own names.
    odd = ["with space", "per%cent", "plus+sign", "hash#x", "q?mark", "ümlaut", "amp&x", "star*x", "tilde~x",
           "brace{x}", "quote'x", "lt<gt>", "dquote\"x", "back`tick", "pipe|x"]
    assert sync(writer.write([(f"{name}/zarr.json", name.encode()) for name in odd])) and writer.proven
    control = ["esc\x1b[0m", "new\nline", "tab\tx", "del\x7f"]
    for name in control:
        assert sync(writer.write([(f"{name}/zarr.json", b"{}")])) is False  # the caller writes it through s3fs
    assert writer.failed is None
    arrays = result(seed=5, side=64)
    for name in odd + control[:1]:
        assert write(store, name, arrays)
    reread = ResultStore.open("s3://direct-keys/a run%.zarr", mode="r", storage_options={"endpoint_url": seaweedfs_endpoint})
    assert reread.done_ids() == set(odd + control[:1])
    for name in odd + control[:1]:
        np.testing.assert_array_equal(reread.read_cells(name), arrays["cells"])
        assert fs.cat_file(f"direct-keys/a run%.zarr/{name}/zarr.json")  # at the key as named, not percent-encoded


def refused_store(endpoint: str, bucket: str, prefix: str):
    """An obstore store with a secret SeaweedFS refuses (it checks credentials; moto does not)."""
    from obstore.store import S3Store

    return S3Store(bucket, prefix=prefix, endpoint=endpoint, region="us-east-1",
                   credential_provider=s3_direct._Credentials("cellseg-test-key", "not-the-secret-4711", None),
                   client_options={"allow_http": True}, retry_config={"max_retries": 0})


@pytest.mark.integration
def test_once_proven_a_failed_write_raises_naming_the_object(seaweedfs_endpoint):
    _, store = store_in_new_bucket(seaweedfs_endpoint, "direct-raises", "run.zarr")
    writer = writer_of(store)
    assert writer is not None
    assert sync(writer.write([("probe/zarr.json", b"{}")])) and writer.proven
    writer.store = refused_store(seaweedfs_endpoint, "direct-raises", "run.zarr")  # credentials revoked mid-run
    with pytest.raises(PermissionError, match=r"cannot write 's3://direct-raises/run.zarr/img/zarr.json'") as raised:
        sync(writer.write([("img/zarr.json", b"{}")]))
    assert "not-the-secret-4711" not in str(raised.value)
    assert writer.failed is None  # a proven writer stays in use: the next image may be written


def test_an_endpoint_that_refuses_or_never_answers_fails_in_bounded_time_as_s3fs_errors_do():
    from obstore.store import S3Store

    from cellseg.storage_errors import storage_error

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (the kernel does) and never answers
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    refused_port = closed.getsockname()[1]
    closed.close()
    try:
        for port, kind, line in ((silent.getsockname()[1], TimeoutError, "timed out"),
                                 (refused_port, ConnectionError, "cannot connect")):
            store = S3Store("bucket", endpoint=f"http://127.0.0.1:{port}", region="us-east-1",
                            credential_provider=s3_direct._Credentials("k", "s", None),
                            client_options={"allow_http": True, "connect_timeout": timedelta(seconds=1),
                                            "read_timeout": timedelta(seconds=1)},
                            retry_config={"max_retries": 1, "retry_timeout": timedelta(seconds=30)})
            filesystem = s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}", key="k", secret="s",
                                           skip_instance_cache=True)
            writer = s3_direct.DirectS3Writer(store, "bucket", "run.zarr", filesystem, proven=True)
            started = time.monotonic()
            with pytest.raises(kind, match=r"cannot write 's3://bucket/run.zarr/img/zarr.json'") as raised:
                sync(writer.write([("img/zarr.json", b"{}")]))
            assert time.monotonic() - started < 10  # two tries of a second each, and the backoff
            translated = storage_error("s3://bucket/run.zarr", raised.value)
            assert translated is not None and line in str(translated) and translated.transient
    finally:
        silent.close()


def test_options_that_change_a_write_or_aws_endpoints_keep_s3fs():
    endpoint = "http://127.0.0.1:9"  # nothing listens: making a writer sends no request
    plain = s3fs.S3FileSystem(endpoint_url=endpoint, key="k", secret="s", skip_instance_cache=True)
    assert s3_direct._unsupported(plain) is None
    tuned = s3fs.S3FileSystem(endpoint_url=endpoint, key="k", secret="s", skip_instance_cache=True,
                              config_kwargs={"max_pool_connections": 50, "tcp_keepalive": True})
    assert s3_direct._unsupported(tuned) is None  # settings of the connection, not of what is written
    changing = [{"s3_additional_kwargs": {"ServerSideEncryption": "AES256"}}, {"requester_pays": True},
                {"version_aware": True}, {"anon": True}, {"client_kwargs": {"verify": False}},
                {"config_kwargs": {"signature_version": "s3"}}, {"config_kwargs": {"s3": {"use_accelerate_endpoint": True}}}]
    for options in changing:
        filesystem = s3fs.S3FileSystem(endpoint_url=endpoint, key="k", secret="s", skip_instance_cache=True, **options)
        assert s3_direct._unsupported(filesystem) is not None, options

    class Store:  # what a zarr FsspecStore on s3fs offers the writer
        def __init__(self, fs, path):
            self.fs, self.path = fs, path

    async def writer(fs, path="bucket/prefix"):
        return await s3_direct.direct_writer(Store(fs, path))

    made = sync(writer(plain))
    assert made is not None and (made.bucket, made.prefix) == ("bucket", "prefix")
    assert made.store.config["endpoint"] == endpoint and made.store.config["virtual_hosted_style_request"] == "false"
    # The addressing style botocore would use, with the endpoint it implies.
    for style, expected in (("virtual", ("http://bucket.example.org:9", "true")), ("path", ("http://s3.example.org:9/base", "false"))):
        base = "http://example.org:9" if style == "virtual" else "http://s3.example.org:9/base"
        styled = s3fs.S3FileSystem(endpoint_url=base, key="k", secret="s", skip_instance_cache=True,
                                   config_kwargs={"s3": {"addressing_style": style}})
        assert s3_direct._unsupported(styled) is None
        made = sync(writer(styled))
        assert made is not None and (made.store.config["endpoint"], made.store.config["virtual_hosted_style_request"]) == expected
    aws = s3fs.S3FileSystem(key="k", secret="s", skip_instance_cache=True)
    assert sync(writer(aws)) is None
    s3_direct.enable(False)
    assert sync(writer(s3fs.S3FileSystem(endpoint_url=endpoint, key="k", secret="s", skip_instance_cache=True))) is None


def test_the_settings_timeouts_and_switch_reach_the_direct_writer(monkeypatch):
    limits = StorageTimeouts(connect_seconds=3, read_seconds=7, attempts=2).fsspec_options()["s3"]
    filesystem = s3fs.S3FileSystem(endpoint_url="https://s3.example.org", key="k", secret="s",
                                   skip_instance_cache=True, **limits)
    options = s3_direct._client_options(filesystem, "https://s3.example.org")
    assert options["connect_timeout"] == timedelta(seconds=3) and options["read_timeout"] == timedelta(seconds=7)
    assert "allow_http" not in options
    assert s3_direct._retry_config(filesystem)["max_retries"] == 1
    assert s3_direct._client_options(filesystem, "http://127.0.0.1:9")["allow_http"] is True

    monkeypatch.setenv("CELLSEG_DIRECT_S3_WRITES", "false")
    CellsegSettings().apply_storage()
    assert not s3_direct.enabled()
    monkeypatch.setenv("CELLSEG_DIRECT_S3_WRITES", "true")
    CellsegSettings().apply_storage()
    assert s3_direct.enabled()


def test_a_certificate_bundle_botocore_trusts_is_trusted_and_bounded(tmp_path, monkeypatch):
    bundle = tmp_path / "ca.pem"
    bundle.write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    monkeypatch.setenv("AWS_CA_BUNDLE", str(bundle))
    filesystem = s3fs.S3FileSystem(endpoint_url="https://s3.example.org", key="k", secret="s", skip_instance_cache=True)
    assert s3_direct._client_options(filesystem, "https://s3.example.org")["root_certificate"] == bundle.read_bytes()
    monkeypatch.setattr(s3_direct, "MAX_CERTIFICATE_BYTES", 8)
    with pytest.raises(ValueError, match=r"ca\.pem"):
        s3_direct._client_options(filesystem, "https://s3.example.org")


def test_local_stores_never_take_the_direct_writer(tmp_path):
    store = ResultStore.open(str(tmp_path / "local.zarr"))
    assert writer_of(store) is None
    assert write(store, "img", result(seed=4, side=64))
    assert MODEL["version"] in str(store.root["img"].attrs["cellseg"]["model"])
