"""The zarr results store: creation, round trips, completion marks, failures, ids, S3, two writers."""

from __future__ import annotations

import errno
import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from cellseg import __version__
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError, StoreWriteError, unwritable, validate_image_id
from cellseg.store_layout import LAYOUT_VERSION

MODEL = {"version": "0123456789ab", "checkpoint": "runs/x/best.pt", "threshold": 0.5}
STATS = {
    "cell_count": 2,
    "total_cell_area": 5,
    "mean_cell_area": 2.5,
    "median_cell_area": 2.5,
    "foreground_fraction": 5 / 12,
    "mean_intensity_inside": 10.0,
    "mean_intensity_outside": None,
}
MASK = np.array([[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1]], dtype=bool)


@pytest.fixture()
def store(tmp_path) -> ResultStore:
    return ResultStore.open(str(tmp_path / "results.zarr"))


def test_open_creates_a_cellseg_store(tmp_path):
    url = str(tmp_path / "results.zarr")
    store = ResultStore.open(url)
    assert store.url == url
    meta = zarr.open_group(url, mode="r").attrs["cellseg"]
    assert meta["layout"] == LAYOUT_VERSION
    assert meta["cellseg_version"] == __version__
    assert store.done_ids() == set() and store.statistics() == [] and store.failures() == []


def test_a_store_and_a_table_are_opened_and_written_at_a_path_as_at_its_string(tmp_path):
    """A notebook passes pathlib paths: `ResultStore.open(Path)` failed ('PosixPath' has no 'startswith')."""
    from cellseg.tables import write_table

    store = ResultStore.open(tmp_path / "results.zarr")
    assert store.url == str(tmp_path / "results.zarr")
    assert ResultStore.open(tmp_path / "results.zarr", mode="r").done_ids() == set()
    assert write_table([{"image_id": "a", "cell_count": 3}], tmp_path / "images.csv") == 1
    assert (tmp_path / "images.csv").read_text() == "image_id,cell_count\na,3\n"


def test_reopening_keeps_results_and_creation_time(store):
    store.write_result("a", MASK, STATS, "/images/a.png", MODEL)
    created = store.root.attrs["cellseg"]["created"]
    again = ResultStore.open(store.url)
    reader = ResultStore.open(store.url, mode="r")
    assert again.done_ids() == reader.done_ids() == {"a"}
    assert again.root.attrs["cellseg"]["created"] == created


def test_write_result_round_trip(store):
    store.write_result("img_01", MASK, STATS, "s3://bucket/images/img_01.png", MODEL)
    assert store.done_ids() == {"img_01"}
    mask = store.read_mask("img_01")
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, MASK)
    record = store.record("img_01")
    assert record["status"] == "done"
    assert record["source_url"] == "s3://bucket/images/img_01.png"
    assert record["shape"] == [3, 4]
    assert record["model"] == MODEL
    assert record["statistics"] == STATS  # None survives as JSON null
    assert store.statistics() == [
        {"image_id": "img_01", "source_url": "s3://bucket/images/img_01.png", "model_version": "0123456789ab",
         **STATS, "status": "done"}
    ]
    assert store.root["img_01/labels/mask/0"].dtype == np.uint8
    assert "img_01/probabilities" not in store.root



def test_a_local_source_is_recorded_by_its_absolute_path(store, tmp_path, monkeypatch):
    """`cellseg predict --images data/` recorded 'data/a.png', which names nothing once the store
    is read from another directory."""
    monkeypatch.chdir(tmp_path)
    store.write_result("a", MASK, STATS, "data/a.png", MODEL)
    store.record_failure("b", "data/b.png", "ImageReadError: file is empty", MODEL)
    assert store.record("a")["source_url"] == str(tmp_path / "data" / "a.png")
    assert store.failures()[0]["source_url"] == str(tmp_path / "data" / "b.png")
    store.write_result("c", MASK, STATS, "file:///in/c.png", MODEL)  # a URL is kept as given
    assert store.record("c")["source_url"] == "file:///in/c.png"

def test_probabilities_are_stored_as_float16(store):
    probabilities = np.array([[0.1, 0.9], [0.5, 0.25]], dtype=np.float32)
    store.write_result("p", probabilities > 0.5, STATS, "p.png", MODEL, probabilities)
    stored = store.root["p/probabilities/0"][...]
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored, probabilities, atol=1e-3)
    assert store.has_probabilities("p")
    read = store.read_probabilities("p")
    assert read.dtype == np.float32
    np.testing.assert_allclose(read, probabilities, atol=1e-3)


def test_reading_probabilities_of_an_image_stored_without_them_names_the_flag(store):
    store.write_result("q", np.ones((2, 2), dtype=bool), STATS, "q.png", MODEL)
    assert not store.has_probabilities("q")
    with pytest.raises(StoreError, match=r"'q'.*--save-probabilities"):
        store.read_probabilities("q")


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (30, 50), (1100, 20)])  # 1100 rows: two chunks
def test_masks_of_different_sizes(store, shape):
    mask = np.random.default_rng(sum(shape)).random(shape) > 0.5
    store.write_result("m", mask, STATS, "m.png", MODEL)
    np.testing.assert_array_equal(store.read_mask("m"), mask)
    assert store.record("m")["shape"] == list(shape)


def test_images_of_different_sizes_side_by_side(store):
    small, large = MASK, np.eye(40, 60, dtype=bool)
    store.write_result("small", small, STATS, "small.png", MODEL)
    store.write_result("large", large, STATS, "large.png", MODEL)
    np.testing.assert_array_equal(store.read_mask("small"), small)
    np.testing.assert_array_equal(store.read_mask("large"), large)
    assert [row["image_id"] for row in store.statistics()] == ["large", "small"]  # id order


def test_rewriting_replaces_the_mask(store):
    store.write_result("r", np.ones((10, 10), bool), STATS, "r.png", MODEL)
    store.write_result("r", MASK, {**STATS, "cell_count": 9}, "r.png", MODEL)
    np.testing.assert_array_equal(store.read_mask("r"), MASK)
    assert store.record("r")["statistics"]["cell_count"] == 9


def interrupted_write(url: str, image_id: str, mask: np.ndarray) -> None:
    """What a writer leaves behind when it dies after the arrays but before the done mark."""
    group = zarr.open_group(url, mode="a").require_group(image_id)
    group.attrs["cellseg"] = {"status": "writing", "source_url": f"{image_id}.png"}
    group.require_group("labels").require_group("mask").create_array("0", data=mask.astype(np.uint8))


def test_interrupted_write_is_not_done_and_cannot_be_read(store):
    store.write_result("finished", MASK, STATS, "finished.png", MODEL)
    interrupted_write(store.url, "half", MASK)
    reopened = ResultStore.open(store.url)
    assert reopened.done_ids() == {"finished"}
    assert [row["image_id"] for row in reopened.statistics()] == ["finished"]
    assert reopened.failures() == []
    assert reopened.record("half")["status"] == "writing"
    with pytest.raises(StoreError, match=r"'half'.*not completely written"):
        reopened.read_mask("half")


def test_done_among_names_only_the_completely_written_images(store):
    for image_id in ("done_1", "done_2", "done_3"):
        store.write_result(image_id, MASK, STATS, f"{image_id}.png", MODEL)
    interrupted_write(store.url, "half", MASK)
    store.record_failure("bad", "bad.png", "ImageReadError: file is empty", MODEL)
    zarr.open_group(store.url, mode="a").create_array("stray", data=np.zeros(3))  # an array, not an image
    asked = ["done_3", "half", "bad", "absent", "stray", "done_1"]
    reopened = ResultStore.open(store.url)
    assert reopened.done_among(asked) == {"done_1", "done_3"}
    assert reopened.done_among(["done_2"]) == {"done_2"} and reopened.done_among([]) == set()


def test_rewriting_an_interrupted_image_completes_it(store):
    interrupted_write(store.url, "half", np.zeros((5, 5), bool))
    store.write_result("half", MASK, STATS, "half.png", MODEL)
    assert store.done_ids() == {"half"}
    np.testing.assert_array_equal(store.read_mask("half"), MASK)


def test_failure_is_listed_and_not_done(store):
    store.write_result("good", MASK, STATS, "good.png", MODEL)
    store.record_failure("bad", "/images/bad.png", "ImageReadError: file is empty", MODEL)
    assert store.done_ids() == {"good"}
    assert store.failures() == [
        {"image_id": "bad", "source_url": "/images/bad.png", "error": "ImageReadError: file is empty"}
    ]
    assert store.record("bad")["model"] == MODEL
    with pytest.raises(StoreError, match="'bad'"):
        store.read_mask("bad")
    assert [row["image_id"] for row in store.statistics()] == ["good"]


def test_success_after_failure_clears_it(store):
    store.record_failure("retry", "retry.png", "OSError: flaky", MODEL)
    store.write_result("retry", MASK, STATS, "retry.png", MODEL)
    assert store.failures() == []
    assert store.done_ids() == {"retry"}


def test_record_of_unknown_image_raises(store):
    with pytest.raises(StoreError, match="no image 'ghost'"):
        store.record("ghost")
    with pytest.raises(StoreError, match="ghost"):
        store.read_mask("ghost")


@pytest.mark.parametrize("image_id", ["", ".", "..", "a/b", "a\\b", "__x", "__", "zarr.json", ".zattrs", ".zgroup"])
def test_validate_image_id_rejects(image_id):
    with pytest.raises(StoreError, match="cannot name a store entry"):
        validate_image_id(image_id)


@pytest.mark.parametrize("image_id", ["synth_0001", "a.b", "_x", "x__", "..a", "image 1"])
def test_validate_image_id_accepts(image_id):
    assert validate_image_id(image_id) == image_id


def test_validate_image_id_names_the_source():
    with pytest.raises(StoreError, match=r"'__meta'.*from 's3://b/__meta\.png'"):
        validate_image_id("__meta", "s3://b/__meta.png")


@pytest.mark.parametrize("image_id", ["..", "a/b", "__x"])
def test_bad_ids_are_refused_before_anything_is_written(store, image_id):
    with pytest.raises(StoreError):
        store.write_result(image_id, MASK, STATS, "x.png", MODEL)
    with pytest.raises(StoreError):
        store.record_failure(image_id, "x.png", "error", MODEL)
    assert list(store.root.group_keys()) == []


def test_non_cellseg_group_is_refused(tmp_path):
    url = str(tmp_path / "other.zarr")
    zarr.open_group(url, mode="w").require_group("something")
    with pytest.raises(StoreError, match=r"not a cellseg results store; choose a new folder$"):
        ResultStore.open(url)
    # Read (results, export, evaluate): a new folder is not what the reader needs (it was told to choose one)
    with pytest.raises(StoreError, match=r"not a cellseg results store; give a store that cellseg predict wrote$"):
        ResultStore.open(url, mode="r")
    assert "cellseg" not in zarr.open_group(url, mode="r").attrs  # left untouched


def test_empty_non_cellseg_group_is_refused_read_only(tmp_path):
    url = str(tmp_path / "empty.zarr")
    zarr.open_group(url, mode="w")
    with pytest.raises(StoreError, match="not a cellseg results store"):
        ResultStore.open(url, mode="r")


def test_missing_store_read_only_is_refused(tmp_path):
    with pytest.raises(StoreError, match=r"no results store at .*absent\.zarr"):
        ResultStore.open(str(tmp_path / "absent.zarr"), mode="r")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, where no folder can be made")
def test_a_store_where_no_folder_can_be_made_is_refused_as_one_that_cannot_be_created():
    with pytest.raises(StoreError, match=r"cannot create a results store at '/proc/cellseg-test\.zarr'"):
        ResultStore.open("/proc/cellseg-test.zarr")


def test_a_file_url_opens_the_store_at_its_path(tmp_path):
    """file:// stores are the plain path's store (zarr's LocalStore), whose writes make their folders."""
    (tmp_path / "empty.zarr").mkdir()
    for path in (tmp_path / "new/results.zarr", tmp_path / "empty.zarr"):
        ResultStore.open(path.as_uri()).write_result("a", MASK, STATS, "/images/a.png", MODEL)
        assert ResultStore.open(str(path), mode="r").done_ids() == {"a"}
        np.testing.assert_array_equal(ResultStore.open(path.as_uri(), mode="r").read_mask("a"), MASK)


def test_other_layout_version_is_refused(tmp_path):
    url = str(tmp_path / "future.zarr")
    zarr.open_group(url, mode="w").attrs["cellseg"] = {"layout": LAYOUT_VERSION + 1}
    with pytest.raises(StoreError, match=f"layout {LAYOUT_VERSION + 1}"):
        ResultStore.open(url)


def test_an_image_of_a_store_given_as_the_store_names_the_store_to_give(store):
    """`results.zarr/<image id>` is what napari opens; given to cellseg it is not a store of another layout."""
    store.write_result("a", MASK, STATS, "a.png", MODEL)
    with pytest.raises(StoreError, match=r"'.*results\.zarr/a' is one image of a results store, not a store: "
                                         r"give the store, '.*results\.zarr'$"):
        ResultStore.open(f"{store.url}/a", mode="r")


def test_an_array_of_a_store_given_as_the_store_is_refused_naming_it(store):
    store.write_result("a", MASK, STATS, "a.png", MODEL)
    with pytest.raises(StoreError, match=r"'.*results\.zarr/a/labels/mask/0' is a zarr array, not a results store"):
        ResultStore.open(f"{store.url}/a/labels/mask/0", mode="r")


def test_two_writers_in_threads_both_finish(tmp_path):
    url = str(tmp_path / "shared.zarr")
    ResultStore.open(url)
    barrier = threading.Barrier(2)
    errors = []

    def writer(prefix: str) -> None:
        try:
            store = ResultStore.open(url)
            barrier.wait()
            for index in range(6):
                mask = np.full((12, 8 + index), index % 2 == 0)
                store.write_result(f"{prefix}{index}", mask, {"cell_count": index}, f"{prefix}{index}.png", MODEL)
        except Exception as error:  # noqa: BLE001 - surfaced by `assert errors == []` below; a thread's exception is otherwise lost
            errors.append(error)

    threads = [threading.Thread(target=writer, args=(prefix,)) for prefix in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    store = ResultStore.open(url, mode="r")
    assert store.done_ids() == {f"{p}{i}" for p in "ab" for i in range(6)}
    for prefix in "ab":
        for index in range(6):
            np.testing.assert_array_equal(store.read_mask(f"{prefix}{index}"), np.full((12, 8 + index), index % 2 == 0))
            assert store.record(f"{prefix}{index}")["statistics"] == {"cell_count": index}


@pytest.mark.integration
def test_store_on_s3(s3_bucket):
    bucket, options = s3_bucket
    url = f"{bucket}/results.zarr"
    store = ResultStore.open(url, storage_options=options)
    store.write_result("s3img", MASK, STATS, f"{bucket}/images/s3img.png", MODEL)
    store.record_failure("broken", f"{bucket}/images/broken.png", "ImageReadError: empty", MODEL)
    interrupted = store.root.require_group("half")
    interrupted.attrs["cellseg"] = {"status": "writing"}

    reader = ResultStore.open(url, mode="r", storage_options=options)
    assert reader.done_ids() == {"s3img"}
    np.testing.assert_array_equal(reader.read_mask("s3img"), MASK)
    assert reader.statistics()[0]["model_version"] == "0123456789ab"
    assert [row["image_id"] for row in reader.failures()] == ["broken"]
    with pytest.raises(StoreError):
        reader.read_mask("half")


@pytest.mark.integration
def test_missing_store_on_s3_read_only_is_refused(s3_bucket):
    bucket, options = s3_bucket
    with pytest.raises(StoreError):
        ResultStore.open(f"{bucket}/absent.zarr", mode="r", storage_options=options)


def test_without_replace_a_done_result_is_kept(store):
    assert store.write_result("once", MASK, STATS, "once.png", MODEL) is True
    assert store.write_result("once", ~MASK, {**STATS, "cell_count": 7}, "once.png", MODEL, replace=False) is False
    np.testing.assert_array_equal(store.read_mask("once"), MASK)
    assert store.record("once")["statistics"] == STATS


def test_a_failure_never_replaces_a_done_result(store):
    store.write_result("kept", MASK, STATS, "kept.png", MODEL)
    store.record_failure("kept", "kept.png", "OSError: another run's transient error", MODEL)
    assert store.done_ids() == {"kept"} and store.failures() == []
    np.testing.assert_array_equal(store.read_mask("kept"), MASK)


def test_rewriting_a_half_written_image_keeps_its_array_and_overwrites_in_place(store):
    interrupted_write(store.url, "half", np.zeros(MASK.shape, bool))
    # A file inside the array's directory survives only if the array is not deleted and recreated
    # (deleting first would open a moment in which a concurrent writer's done mask has no chunks).
    sentinel = Path(store.url) / "half/labels/mask/0/sentinel"
    sentinel.write_text("still here")
    store.write_result("half", MASK, STATS, "half.png", MODEL, replace=False)
    assert sentinel.exists()
    np.testing.assert_array_equal(store.read_mask("half"), MASK)


def test_cell_labels_are_stored_beside_the_mask(store):
    cells = np.array([[1, 1, 0, 0], [0, 0, 0, 2], [0, 0, 2, 2]], dtype=np.int32)
    store.write_result("cells", cells > 0, STATS, "cells.png", MODEL, cells=cells)
    np.testing.assert_array_equal(store.read_cells("cells"), cells)
    assert store.root["cells/labels/cells/0"].dtype == np.int32


def test_results_without_cell_labels_read_as_connected_components(store):
    store.write_result("plain", MASK, STATS, "plain.png", MODEL)
    labels = store.read_cells("plain")
    assert labels.max() == 2 and np.array_equal(labels > 0, MASK)


@pytest.mark.parametrize(("error", "stops"), [
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError(errno.EROFS, "Read-only file system"), True),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
    (OSError(errno.EFBIG, "File too large"), True),
    (PermissionError(errno.EACCES, "Permission denied"), True),
    (OSError(errno.EIO, "Input/output error"), False),  # one file: the image fails, the run goes on
    (FileNotFoundError(errno.ENOENT, "No such file or directory"), False),
    (KeyError("labels"), False),
])
def test_only_errors_that_no_later_write_can_escape_stop_a_run(error, stops):
    found = unwritable("out.zarr", error)
    assert (found is not None) == stops
    if found is not None:
        assert isinstance(found, StoreWriteError)
        assert str(found) == f"cannot write to results store 'out.zarr': [Errno {error.errno}] {error.strerror}"


@pytest.mark.parametrize(("options", "name"), [
    ({"endpoint_urll": "http://127.0.0.1:9"}, "takes no storage option 'endpoint_urll'"),
    ({"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "endpoint_url": "http://127.0.0.1:8"},
     "storage option 'endpoint_url' sets what another option sets too"),
], ids=["unknown", "given-twice"])
def test_a_storage_option_given_in_code_that_the_filesystem_refuses_is_named(options, name):
    """Not the TypeError of botocore's session ('AioSession.__init__() got an unexpected keyword
    argument'), and never the option's value: it may be a secret."""
    from cellseg.formats import list_sources
    from cellseg.settings import CellsegSettings
    from cellseg.storage_errors import StorageError

    with pytest.raises(StorageError, match=rf"^'s3://bucket/r\.zarr': s3:// {name} \(in the storage options given\)$"):
        ResultStore.open("s3://bucket/r.zarr", storage_options=options)
    with pytest.raises(StorageError, match=rf"^'s3://bucket/images': s3:// {name} "):
        list_sources("s3://bucket/images", CellsegSettings().predict.selection, storage_options=options)


@pytest.mark.parametrize("endpoint", ["htp://127.0.0.1:9", "127.0.0.1:9"], ids=["scheme-typo", "no-scheme"])
def test_an_endpoint_url_botocore_refuses_is_one_line_naming_the_setting(endpoint, monkeypatch):
    """An endpoint from fsspec's own configuration (FSSPEC_S3_ENDPOINT_URL), which the settings
    do not check: botocore's EndpointResolutionError was a traceback (exit 1) and, in a flow,
    retried three times; a missing scheme a line naming no setting."""
    import fsspec

    from cellseg.formats import list_sources
    from cellseg.settings import CellsegSettings
    from cellseg.storage_errors import StorageError

    monkeypatch.setattr(fsspec.config, "conf", {"s3": {"endpoint_url": endpoint}})
    named = re.escape(f"the endpoint URL '{endpoint}' is not an http:// or https:// URL: fix storage.s3.endpoint_url "
                      "in the settings (or FSSPEC_S3_ENDPOINT_URL)")
    with pytest.raises(StorageError, match=rf"^'s3://bucket/images': {named}$") as raised:
        list_sources("s3://bucket/images", CellsegSettings().predict.selection)
    assert not raised.value.transient
    with pytest.raises(StorageError, match=rf"^'s3://bucket/r\.zarr': {named}$"):
        ResultStore.open("s3://bucket/r.zarr")


@pytest.mark.integration
def test_a_store_opened_with_refused_credentials_names_it_and_the_settings_to_check(moto_iam):
    """moto checking credentials as AWS does. An existing store read with a wrong secret: the
    endpoint's refusal, named. A new one: S3 answers the HEAD of its metadata with a bare 403,
    which cannot say whether the credentials or their permissions are wrong, so both are named
    (before: 'access denied (Forbidden)' alone, as if only permissions were missing)."""
    import time

    import s3fs

    from cellseg.storage_errors import StorageError

    endpoint, admin, _ = moto_iam
    bucket = f"s3://refused-store-{time.monotonic_ns() % 10**8}"
    good = {"endpoint_url": endpoint, "key": admin["AWS_ACCESS_KEY_ID"], "secret": admin["AWS_SECRET_ACCESS_KEY"]}
    s3fs.S3FileSystem(**good, skip_instance_cache=True).mkdir(bucket)
    ResultStore.open(f"{bucket}/kept.zarr", storage_options=good).write_result("kept", MASK, STATS, "kept.png", MODEL)
    wrong = {**good, "secret": "wrong-secret-4711"}
    settings = ("check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or storage.s3.key and .secret "
                "in the settings")

    with pytest.raises(StorageError) as raised:
        ResultStore.open(f"{bucket}/kept.zarr", mode="r", storage_options=wrong)
    assert str(raised.value).startswith(f"'{bucket}/kept.zarr': the S3 endpoint refused the credentials "
                                        "(SignatureDoesNotMatch: "), raised.value
    assert settings in str(raised.value) and not raised.value.transient
    with pytest.raises(StorageError) as raised:
        ResultStore.open(f"{bucket}/new.zarr", storage_options=wrong)
    assert f"'{bucket}/new.zarr'" in str(raised.value) and "access denied" in str(raised.value)
    assert str(raised.value).endswith(f"the endpoint gave no reason: {settings}, and their permissions")
    for error in ("wrong-secret-4711", admin["AWS_SECRET_ACCESS_KEY"]):
        assert error not in str(raised.value)
    assert ResultStore.open(f"{bucket}/kept.zarr", mode="r", storage_options=good).done_ids() == {"kept"}


@pytest.mark.integration
def test_a_store_in_a_bucket_that_does_not_exist_says_so_and_creates_no_bucket(moto_endpoint):
    """A misspelt bucket must not be created: the error names it and what to do."""
    import s3fs

    from cellseg.storage_errors import StorageError

    options = {"endpoint_url": moto_endpoint}
    with pytest.raises(StorageError) as raised:
        ResultStore.open("s3://no-such-results-bucket/nightly.zarr", storage_options=options).write_result(
            "a", MASK, STATS, "a.png", MODEL)
    assert str(raised.value) == ("'s3://no-such-results-bucket/nightly.zarr': the bucket 'no-such-results-bucket' "
                                 "does not exist (NoSuchBucket): check its name, or create it; cellseg never creates one")
    assert not raised.value.transient
    assert not s3fs.S3FileSystem(**options, skip_instance_cache=True).exists("no-such-results-bucket")


def test_a_store_is_read_record_by_record_with_a_bounded_read_ahead(tmp_path):
    """Every image's record was read at once (Executor.map submits every call up front) and held
    until taken: 4.5 KB an image, GBs for a store of millions, whatever the reader needed."""
    from cellseg.store_records import READ_AHEAD

    store = ResultStore.open(str(tmp_path / "r.zarr"))
    count = READ_AHEAD * 2 + 5
    for index in range(count):
        store.write_result(f"im{index:04d}", np.ones((4, 4), bool), {"cell_count": 1}, f"im{index}.png", {"version": "v"})
    scanned, lock, scan = [], threading.Lock(), store.scan

    def counted_scan(name: str):
        with lock:
            scanned.append(name)
        return scan(name)

    store.scan = counted_scan  # type: ignore[method-assign]
    entries = store.entries()
    assert next(entries)[0] == "im0000"
    time.sleep(0.3)  # room for a pool that would run ahead
    assert len(scanned) <= 1 + READ_AHEAD, len(scanned)
    assert [name for name, _, _ in entries] == [f"im{index:04d}" for index in range(1, count)]
    assert sorted(scanned) == [f"im{index:04d}" for index in range(count)]
