"""zstd chunks bounded before they inflate (`cellseg.store_codecs`), on a real store on disk."""

from __future__ import annotations

import numcodecs.zstd
import numpy as np
import pytest

from cellseg.store_codecs import zstd_decoded_bound


def _frame(array: np.ndarray, level: int = 1) -> bytes:
    return bytes(numcodecs.zstd.compress(array, level))


def test_the_bound_is_what_the_frames_declare_summed_over_frames_and_past_skippable_ones():
    one, two = _frame(np.arange(300_000, dtype=np.int32)), _frame(np.zeros(70_000, dtype=np.uint8))
    assert zstd_decoded_bound(one) == 1_200_000
    assert zstd_decoded_bound(one + two) == 1_270_000  # the codec decodes every frame, one after the other
    skippable = (0x184D2A5E).to_bytes(4, "little") + (5).to_bytes(4, "little") + b"12345"
    assert zstd_decoded_bound(skippable + two) == 70_000
    assert zstd_decoded_bound(b"") == 0
    for damaged in (one[:-3], one[:5], b"not zstd at all", skippable[:6]):
        assert zstd_decoded_bound(damaged) is None  # left to libzstd, which names the damage


def test_a_chunk_that_would_inflate_past_its_size_is_a_damaged_image_not_a_gigabyte(tmp_path, tiny_store):
    """1 GB of zeros compresses to 32 KB: a mask chunk replaced by it made `verify --read-data` take
    1.1 GB before zarr found it too big; it is now refused from its headers."""
    from cellseg.verify import verify_store

    store_url, image_id = tiny_store
    chunk = next((tmp_path / "store.zarr" / image_id / "labels" / "mask" / "0").glob("c.*"))
    chunk.write_bytes(_frame(np.zeros(64 * 1024 * 1024, dtype=np.uint8)))  # 64 MiB: enough to tell, quick to make

    assert verify_store(store_url).broken == []  # its metadata is whole: only decoding finds it
    [damage] = verify_store(store_url, read_data=True).broken
    assert damage.image_id == image_id
    assert "cannot be decoded (InflatedChunk: a zstd chunk decodes to 67108864 bytes, more than the" in damage.problem
    assert damage.problem.endswith("chunk holds (a decompression bomb))"), damage.problem


@pytest.fixture
def tiny_store(tmp_path, tiny_checkpoint, synthetic_dataset) -> tuple[str, str]:
    """A store holding one image segmented by the tiny model: (its URL, the image's id)."""
    from cellseg.jobs import SegmentJob, run_segmentation

    store_url = str(tmp_path / "store.zarr")
    report = run_segmentation(SegmentJob(source_url=str(synthetic_dataset / "images" / "synth_0000.png"),
                                         store_url=store_url, checkpoint_url=str(tiny_checkpoint)))
    assert report.done == ["synth_0000"]
    return store_url, "synth_0000"
