"""zarr metadata read bounded in size (`cellseg.zarr_stores`): results stores on disk and on S3,
and zarr images given as input."""

from __future__ import annotations

import json
import os
import tracemalloc

import numpy as np
import pytest
import zarr

from cellseg.store import ResultStore
from cellseg.store_checks import DamagedImage, DamagedStore
from cellseg.zarr_stores import MAX_METADATA_BYTES

TOO_LARGE = "larger than the 16 MiB that any zarr metadata may take; not read"


def _padded(document: dict, size: int) -> bytes:
    """`document` as JSON, padded with whitespace to `size` bytes: valid, and too large."""
    data = json.dumps(document).encode()
    return data + b" " * (size - len(data))


def _sparse_file(path, size: int) -> None:
    with open(path, "wb") as file:
        file.truncate(size)  # a hole: no disk used, read back as zeros


def test_an_image_metadata_document_past_the_bound_is_damage_named_without_being_read(tiny_store, tmp_path):
    """A 1 GiB zarr.json was read whole (1 GiB, and more to parse it) before zarr could say it was wrong."""
    from cellseg.verify import verify_store

    store_url, image_id = tiny_store
    _sparse_file(tmp_path / "store.zarr" / image_id / "zarr.json", 2**30)
    store = ResultStore.open(store_url, mode="r")
    tracemalloc.start()
    try:
        with pytest.raises(DamagedImage, match=TOO_LARGE):
            store.record(image_id)
        assert store.done_ids() == set()
        [damage] = verify_store(store_url).broken
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert damage.image_id == image_id and TOO_LARGE in damage.problem
    assert peak < 2**30 // 4, peak  # a few bounded reads at once (a whole read: 1 GiB and its parse)
    verify_store(store_url, repair=True)
    assert verify_store(store_url).broken == [] and ResultStore.open(store_url, mode="r").done_ids() == set()


def test_metadata_just_under_the_bound_is_read(tiny_store, tmp_path):
    store_url, image_id = tiny_store
    path = tmp_path / "store.zarr" / image_id / "zarr.json"
    record = ResultStore.open(store_url, mode="r").record(image_id)
    path.write_bytes(_padded(json.loads(path.read_bytes()), MAX_METADATA_BYTES))
    assert ResultStore.open(store_url, mode="r").record(image_id) == record


def test_a_store_whose_own_metadata_is_too_large_is_refused_and_repaired(tiny_store, tmp_path):
    from cellseg.store_open import repair_store_metadata

    store_url, image_id = tiny_store
    root = tmp_path / "store.zarr" / "zarr.json"
    root.write_bytes(_padded(json.loads(root.read_bytes()), MAX_METADATA_BYTES + 1))
    for mode in ("r", "a"):
        with pytest.raises(DamagedStore, match=f"cannot be read \\('.*zarr.json' is {TOO_LARGE}\\)"):
            ResultStore.open(store_url, mode=mode)
    repair_store_metadata(store_url)
    assert ResultStore.open(store_url, mode="r").done_ids() == {image_id}


def test_a_zarr_image_with_too_large_metadata_is_an_error_naming_it(tmp_path):
    from cellseg.config import SelectionConfig
    from cellseg.formats import read_plane
    from cellseg.io import ImageReadError

    url = str(tmp_path / "cells.zarr")
    zarr.create_array(url, data=np.zeros((64, 64), dtype=np.uint8), dimension_names=["y", "x"])
    assert read_plane(url, SelectionConfig()).shape == (64, 64)
    # An input's documents may hold an HCS plate's consolidated metadata: a larger limit
    metadata = tmp_path / "cells.zarr" / "zarr.json"
    metadata.write_bytes(_padded(json.loads(metadata.read_bytes()), MAX_METADATA_BYTES + 1))
    assert read_plane(url, SelectionConfig()).shape == (64, 64)
    _sparse_file(metadata, 2**30)
    with pytest.raises(ImageReadError, match=f"'{url}': not a readable zarr store \\(.*is larger than the 256 MiB that "
                                             "any zarr metadata may take; not read"):
        read_plane(url, SelectionConfig())


def test_on_s3_metadata_past_the_bound_is_refused_too(s3_bucket, tiny_store, tmp_path):
    import s3fs

    bucket_url, options = s3_bucket
    _, image_id = tiny_store
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    remote = f"{bucket_url}/store.zarr"
    fs.put(str(tmp_path / "store.zarr") + "/", remote + "/", recursive=True)
    record = ResultStore.open(remote, mode="r", storage_options=options).record(image_id)
    assert record["status"] == "done"
    fs.pipe_file(f"{remote}/{image_id}/zarr.json", _padded({"zarr_format": 3, "node_type": "group"},
                                                          MAX_METADATA_BYTES + 1))
    with pytest.raises(DamagedImage, match=TOO_LARGE):
        ResultStore.open(remote, mode="r", storage_options=options).record(image_id)


@pytest.fixture
def tiny_store(tmp_path, tiny_checkpoint, synthetic_dataset) -> tuple[str, str]:
    """A store on disk holding one image segmented by the tiny model: (its URL, the image's id)."""
    from cellseg.jobs import SegmentJob, run_segmentation

    store_url = str(tmp_path / "store.zarr")
    report = run_segmentation(SegmentJob(source_url=os.fspath(synthetic_dataset / "images" / "synth_0000.png"),
                                         store_url=store_url, checkpoint_url=str(tiny_checkpoint)))
    assert report.done == ["synth_0000"]
    return store_url, "synth_0000"
