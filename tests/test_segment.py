"""Segmenting a directory into a store with the tiny model: skipping, failures, stored masks and statistics."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from cellseg import __version__
from cellseg.checkpoint import CheckpointError
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.io import list_images, read_image
from cellseg.measure import CELL_COLUMNS
from cellseg.model_source import ModelSource, shipped_predictor
from cellseg.runtime import CoreShare
from cellseg.segment import (
    CPU_STAGES,
    SegmentReport,
    cpu_line,
    model_record,
    pending_images,
    segment_arrays,
    segment_images,
)
from cellseg.stats import STATISTIC_FIELDS
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError

GOOD = ["small", "synth_0000", "synth_0001", "synth_0002"]
CORRUPT = ["empty", "notes"]
MIN_CELL_AREA = 80  # large enough that the tiny model's smallest blobs on these images are dropped


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint) -> Predictor:
    config = PredictConfig(device="cpu", batch_size=2, min_cell_area=MIN_CELL_AREA)
    return Predictor.from_checkpoint(str(tiny_checkpoint), config)


@pytest.fixture()
def image_dir(tmp_path, synthetic_dataset):
    """Three 96x96 synthetic images, one 64x80 crop, a zero-byte .png and a text file named .png."""
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id in GOOD[1:]:
        shutil.copy(synthetic_dataset / "images" / f"{image_id}.png", folder)
    crop = np.asarray(Image.open(synthetic_dataset / "images" / "synth_0003.png"))[:64, :80]
    Image.fromarray(crop).save(folder / "small.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image\n")
    return folder


@pytest.fixture()
def store(tmp_path) -> ResultStore:
    return ResultStore.open(str(tmp_path / "results.zarr"))


def url_of(image_dir, image_id: str) -> str:
    return f"{image_dir}/{image_id}.png"


def expected_mask(predictor: Predictor, image: np.ndarray) -> tuple[np.ndarray, int]:
    """Thresholded probabilities without 8-connected components below MIN_CELL_AREA; and how many were dropped."""
    raw = predictor.probabilities([image])[0] > predictor.config.threshold
    labels, count = ndimage.label(raw, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    small = np.flatnonzero(areas < MIN_CELL_AREA)
    small = small[small > 0]
    return raw & ~np.isin(labels, small), len(small)


def run(image_dir, store, predictor, **kwargs) -> SegmentReport:
    todo, _ = pending_images(list_images(str(image_dir)), store)
    return segment_images(todo, store, predictor, model_record(predictor, "tiny/best.pt"), **kwargs)


def test_pending_images_lists_everything_in_a_new_store(image_dir, store):
    todo, done = pending_images(list_images(str(image_dir)), store)
    assert todo == [(image_id, url_of(image_dir, image_id)) for image_id in sorted(GOOD + CORRUPT)]
    assert done == []


def test_pending_images_skips_done_ids_only(image_dir, store):
    store.write_result("synth_0001", np.zeros((2, 2), bool), {}, "x", {})
    store.record_failure("notes", url_of(image_dir, "notes"), "earlier failure", {})
    store.write_result("elsewhere", np.zeros((2, 2), bool), {}, "y", {})  # done, but not in this listing
    todo, done = pending_images(list_images(str(image_dir)), store)
    assert [image_id for image_id, _ in todo] == ["empty", "notes", "small", "synth_0000", "synth_0002"]
    assert done == ["synth_0001"]


def test_pending_images_reads_only_the_records_of_the_images_listed(image_dir, store):
    """A nightly store grows by every night's images, while the night's source holds a few: the
    plan reads one store listing and the records of the listed images, not every record the store
    holds (on object storage, a request each). A damaged image elsewhere in the store is not read."""
    store.write_result("synth_0001", np.zeros((2, 2), bool), {}, "x", {})
    for other in ("older_a", "older_b"):
        store.write_result(other, np.zeros((2, 2), bool), {}, "y", {})
    (Path(store.url) / "older_b/zarr.json").write_bytes(b"\x00 not json")
    todo, done = pending_images(list_images(str(image_dir)), store)
    assert done == ["synth_0001"] and "synth_0001" not in dict(todo)
    assert store.damaged == {}  # older_b was never read (a full scan notes it damaged)
    assert [image_id for image_id, _ in store.records()] == ["older_a", "synth_0001"] and "older_b" in store.damaged


def test_pending_images_refuses_ids_that_cannot_name_an_entry(store):
    with pytest.raises(StoreError, match="__meta"):
        pending_images(["/data/a.png", "/data/__meta.png"], store)


def test_pending_images_refuses_two_files_with_one_stem(store):
    with pytest.raises(StoreError, match=r"a\.png, a\.tif"):
        pending_images(["/data/a.png", "/data/a.tif"], store)


def test_pending_images_can_reject_bad_names_and_keep_the_rest(store):
    rejected: list[dict[str, str]] = []
    todo, done = pending_images(["/data/a.png", "/data/a.tif", "/data/__meta.png", "/data/b.png"], store, rejected)
    assert todo == [("b", "/data/b.png")] and done == []
    assert [(r["image_id"], r["source_url"]) for r in rejected] == [
        ("a", "/data/a.png"), ("a", "/data/a.tif"), ("__meta", "/data/__meta.png")]
    assert all("a.png, a.tif" in r["error"] for r in rejected[:2]) and "__meta" in rejected[2]["error"]


def test_segment_images_records_corrupt_files_and_finishes_the_rest(image_dir, store, predictor):
    seen = []
    report = run(image_dir, store, predictor, on_image=seen.append)

    assert sorted(report.done) == GOOD
    assert sorted(seen) == sorted(GOOD + CORRUPT)
    assert report.pixels == 3 * 96 * 96 + 64 * 80
    failed = sorted(report.failed, key=lambda item: item["image_id"])
    assert [(item["image_id"], item["source_url"]) for item in failed] == [
        (image_id, url_of(image_dir, image_id)) for image_id in CORRUPT
    ]
    assert "ImageReadError" in failed[0]["error"] and "empty (0 bytes)" in failed[0]["error"]
    assert "ImageReadError" in failed[1]["error"] and "not a readable image" in failed[1]["error"]

    assert store.done_ids() == set(GOOD)
    assert store.failures() == [
        {"image_id": item["image_id"], "source_url": item["source_url"], "error": item["error"]} for item in failed
    ]
    assert store.read_mask("small").shape == (64, 80)
    # Each stage's CPU time in the threads that ran it, per done image: every stage did work.
    per_image = report.summary()["cpu_ms_per_image"]
    assert list(per_image) == list(CPU_STAGES) and all(per_image[stage] > 0 for stage in CPU_STAGES)
    assert sum(report.cpu_seconds.values()) <= time.process_time()


def test_label_worker_processes_store_the_same_results(image_dir, tmp_path, tiny_checkpoint, predictor):
    config = PredictConfig(device="cpu", batch_size=2, min_cell_area=MIN_CELL_AREA, postprocess_workers=2)
    with_processes = Predictor.from_checkpoint(str(tiny_checkpoint), config)
    assert (predictor.postprocess_workers, with_processes.postprocess_workers) == (0, 2)  # none by default on CPU
    one, four = ResultStore.open(str(tmp_path / "one.zarr")), ResultStore.open(str(tmp_path / "four.zarr"))
    serial, parallel = run(image_dir, one, predictor), run(image_dir, four, with_processes)

    assert sorted(parallel.done) == sorted(serial.done) == GOOD
    assert sorted(item["image_id"] for item in parallel.failed) == CORRUPT
    for image_id in GOOD:
        np.testing.assert_array_equal(four.read_cells(image_id), one.read_cells(image_id))
        np.testing.assert_array_equal(four.read_cell_table(image_id)[1], one.read_cell_table(image_id)[1])
    def by_image(store: ResultStore) -> list[dict]:
        return sorted(store.statistics(), key=lambda row: row["image_id"])

    assert len(by_image(four)) == len(GOOD) and by_image(four) == by_image(one)


def test_shards_of_one_process_share_its_label_worker_processes(image_dir, tmp_path, tiny_checkpoint):
    """Starting fresh interpreters costs seconds, more than a shard of 32 images takes on a GPU."""
    import psutil

    def python_children() -> set[int]:  # spawned workers, not multiprocessing's resource tracker
        return {child.pid for child in psutil.Process().children()
                if "spawn_main" in " ".join(command := child.cmdline()) and "resource_tracker" not in " ".join(command)}

    config = PredictConfig(device="cpu", min_cell_area=MIN_CELL_AREA, postprocess_workers=1)
    with_processes = Predictor.from_checkpoint(str(tiny_checkpoint), config)
    before = python_children()
    first = run(image_dir, ResultStore.open(str(tmp_path / "first.zarr")), with_processes)
    after_first = python_children() - before
    second = run(image_dir, ResultStore.open(str(tmp_path / "second.zarr")), with_processes)
    assert sorted(first.done) == sorted(second.done) == GOOD
    assert after_first and python_children() - before == after_first  # the same worker, kept for the next shard


def test_a_run_uses_its_predictors_threads_whatever_the_process_set_since(image_dir, store, tiny_checkpoint):
    """A cached predictor (one per worker process) made for one torch thread, then the process's
    count changed (another run's predictor, a benchmark): a run in a new thread still uses one."""
    import threading

    config = PredictConfig(device="cpu", min_cell_area=MIN_CELL_AREA, compile=False, threads=1)
    predictor = Predictor.from_checkpoint(str(tiny_checkpoint), config)
    before = torch.get_num_threads()
    seen: list[int] = []
    torch.set_num_threads(2)
    try:
        worker = threading.Thread(target=lambda: run(image_dir, store, predictor,
                                                     on_image=lambda _: seen.append(torch.get_num_threads())))
        worker.start()
        worker.join(timeout=120)
    finally:
        torch.set_num_threads(before)
    assert len(seen) == len(GOOD) + len(CORRUPT) and set(seen) == {1}


def test_cores_are_split_between_the_loops_running_now():
    before = torch.get_num_threads()
    torch.set_num_threads(3)  # a count that no share below leaves by chance
    share = CoreShare(4)
    with share.taking_part() as first:
        assert first() == 4
        with share.taking_part() as second, share.taking_part() as third:
            assert first() == second() == third() == 1
        with share.taking_part() as second:
            assert first() == second() == 2
        assert first() == 4
    with CoreShare(1).taking_part() as alone:
        assert alone() == 1
    # A loop run on this thread leaves its torch threads as it found them: left at 4 on two cores
    # (and a second test process), this test process's later training ran ten times slower.
    try:
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def test_opencvs_thread_count_is_the_callers_again_once_the_loops_have_finished():
    """A notebook that ran a segmentation was left with OpenCV on the loops' last share."""
    import cv2

    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(3)
        share = CoreShare(8)
        torch_before = torch.get_num_threads()
        with share.taking_part() as first, share.taking_part() as second:
            assert first() == second() == 4 and cv2.getNumThreads() == 4
        assert cv2.getNumThreads() == 3 and torch.get_num_threads() == torch_before
    finally:
        cv2.setNumThreads(before)


def test_a_loop_takes_the_cores_that_a_finished_one_leaves(image_dir, store, tiny_checkpoint):
    """Without a thread count in its settings, a loop beside another runs on its half of the cores,
    and on all of them once the other has finished (the last shard of a run, or a short one)."""
    import threading

    config = PredictConfig(device="cpu", min_cell_area=MIN_CELL_AREA, compile=False)
    predictor = Predictor.from_checkpoint(str(tiny_checkpoint), config)
    cores = CoreShare(4)
    other = cores.taking_part()
    other.__enter__()  # another shard's loop, running while this one starts
    seen: list[int] = []

    def finished(_: str) -> None:
        seen.append(torch.get_num_threads())
        if len(seen) == 1:
            other.__exit__(None, None, None)

    worker = threading.Thread(target=lambda: run(image_dir, store, predictor, on_image=finished, cores=cores))
    worker.start()
    worker.join(timeout=120)
    assert len(seen) == len(GOOD) + len(CORRUPT)
    assert seen[0] == 2 and seen[-1] == 4


def test_second_run_skips_done_images_and_retries_failures(image_dir, store, predictor):
    run(image_dir, store, predictor)
    written = {image_id: store.record(image_id)["written"] for image_id in GOOD}

    todo, done = pending_images(list_images(str(image_dir)), store)
    assert done == GOOD
    assert [image_id for image_id, _ in todo] == CORRUPT
    report = segment_images(todo, store, predictor, model_record(predictor, "tiny/best.pt"))
    assert report.done == []
    assert sorted(item["image_id"] for item in report.failed) == CORRUPT
    assert {image_id: store.record(image_id)["written"] for image_id in GOOD} == written


def test_stored_mask_is_the_thresholded_prediction_without_small_cells(image_dir, store, predictor):
    run(image_dir, store, predictor)
    dropped = 0
    for image_id in GOOD:
        image = read_image(url_of(image_dir, image_id))
        expected, removed = expected_mask(predictor, image)
        dropped += removed
        np.testing.assert_array_equal(store.read_mask(image_id), expected)
    assert dropped > 0  # the removal of small components was exercised


def test_statistics_rows_describe_the_stored_masks(image_dir, store, predictor):
    run(image_dir, store, predictor)
    rows = {row["image_id"]: row for row in store.statistics()}
    assert sorted(rows) == GOOD
    for image_id, row in rows.items():
        assert set(row) == {"image_id", "source_url", "model_version", "status", *STATISTIC_FIELDS}
        assert row["model_version"] == predictor.model_version
        assert row["source_url"] == url_of(image_dir, image_id)
        image = read_image(url_of(image_dir, image_id))
        mask = store.read_mask(image_id)
        labels = store.read_cells(image_id)
        np.testing.assert_array_equal(labels > 0, mask)
        _, components = ndimage.label(mask, structure=np.ones((3, 3)))
        cells = int(labels.max())
        assert set(np.unique(labels)) == set(range(cells + 1))  # numbered 1..N without gaps
        # Touching cells are split: at least one cell per connected component, often more.
        assert cells >= components > 0 and row["cell_count"] == cells
        assert row["total_cell_area"] == mask.sum()
        assert row["foreground_fraction"] == pytest.approx(mask.mean())
        assert row["mean_cell_area"] == pytest.approx(mask.sum() / cells)
        assert row["mean_intensity_inside"] == pytest.approx(image[mask].mean())
        assert row["mean_intensity_outside"] == pytest.approx(image[~mask].mean())


def test_model_record_is_stored_with_each_result(image_dir, store, predictor):
    run(image_dir, store, predictor)
    expected = {
        "version": predictor.model_version,
        "checkpoint": "tiny/best.pt",
        "predict": predictor.config.model_dump(mode="json"),
        "model_config": predictor.checkpoint.model_config.model_dump(mode="json"),
        "cellseg_version": __version__,
    }
    assert model_record(predictor, "tiny/best.pt") == expected
    assert store.record("synth_0000")["model"] == expected
    assert store.record("empty")["model"] == expected


def test_probabilities_are_saved_when_asked(image_dir, store, predictor):
    config = predictor.config.model_copy(update={"save_probabilities": True})
    saving = Predictor(predictor.checkpoint, config, predictor.model_version)
    segment_images([("synth_0002", url_of(image_dir, "synth_0002"))], store, saving, {})
    expected = predictor.probabilities([read_image(url_of(image_dir, "synth_0002"))])[0]
    np.testing.assert_allclose(store.root["synth_0002/probabilities/0"][...], expected, atol=2e-3)


def test_segment_arrays_gives_what_segment_images_stores(image_dir, store, predictor):
    run(image_dir, store, predictor)
    images = [read_image(url_of(image_dir, image_id)) for image_id in GOOD]
    results = segment_arrays(predictor, images)
    assert len(results) == len(GOOD)
    for image_id, result in zip(GOOD, results, strict=True):
        np.testing.assert_array_equal(result.labels, store.read_cells(image_id))
        assert result.labels.dtype == np.int32
        np.testing.assert_array_equal(result.mask, store.read_mask(image_id))
        stored = next(row for row in store.statistics() if row["image_id"] == image_id)
        assert result.statistics == {name: stored[name] for name in STATISTIC_FIELDS}
        columns, rows = store.read_cell_table(image_id)
        assert tuple(result.cells) == tuple(columns) == CELL_COLUMNS
        for index, name in enumerate(columns):
            np.testing.assert_array_equal(result.cells[name], rows[:, index])
        cells = int(result.labels.max())
        assert result.cells["label"].tolist() == list(range(1, cells + 1)) and result.cells["label"].dtype == np.int64
        assert result.cells["area"].tolist() == np.bincount(result.labels.ravel())[1:].tolist()


def test_segment_arrays_without_cell_measurements_and_of_a_flat_image(predictor):
    quiet = Predictor(predictor.checkpoint, predictor.config.model_copy(update={"measure_cells": False}))
    (flat,) = segment_arrays(quiet, [np.full((40, 30), 7, np.uint16)])
    assert flat.cells == {} and flat.labels.shape == (40, 30) and not flat.labels.any()
    assert flat.statistics["cell_count"] == 0
    assert flat.warnings == ("image is constant (value 7): no cells",)
    with pytest.raises(ValueError, match=r"image 0 has shape \(40, 30, 3\)"):
        segment_arrays(quiet, [np.zeros((40, 30, 3), np.uint8)])


def test_shipped_predictor_segments_arrays_as_predict_records_it(synthetic_dataset):
    nuclei = shipped_predictor("nuclei", {"device": "cpu"})
    assert nuclei.model_version == ModelSource("", "nuclei").recorded_version()
    assert nuclei.model_version.startswith("nuclei-")
    assert shipped_predictor().model_version == nuclei.model_version  # 'bundled': the default, nuclei
    image = read_image(str(synthetic_dataset / "images" / "synth_0000.png"))
    truth = read_image(str(synthetic_dataset / "labels" / "synth_0000.png"))
    (found,) = segment_arrays(nuclei, [image.astype(np.float32) / 255])  # float intensities, another scale
    assert abs(int(found.labels.max()) - len(np.unique(truth[truth > 0]))) <= 2
    assert found.statistics["cell_count"] == found.labels.max() == len(found.cells["label"])
    with pytest.raises(CheckpointError, match=r"no shipped model named 'nucleus'; the package has nuclei, general"):
        shipped_predictor("nucleus")


def test_report_summary():
    report = SegmentReport(done=["a", "b", "c"], skipped=["e"], failed=[{"image_id": "f"}], seconds=2.0, pixels=3_000_000,
                           cpu_images=3)
    report.add_cpu({"model": 0.3, "write": 0.03})
    report.add_cpu({"model": 0.06, "labels": 0.009})
    assert report.summary() == {
        "done": 3, "skipped": 1, "failed": 1, "warnings": 0, "seconds": 2.0, "images_per_second": 1.5,
        "megapixels_per_second": 1.5,
        "cpu_ms_per_image": {"read": 0.0, "model": 120.0, "labels": 3.0, "write": 10.0},
    }
    assert cpu_line(report.summary()["cpu_ms_per_image"]) == "model 120 ms, labels 3 ms, write 10 ms, read 0 ms"
    assert SegmentReport().summary()["images_per_second"] is None
    assert SegmentReport().summary()["cpu_ms_per_image"] == {}
    assert SegmentReport(done=["big"]).summary()["cpu_ms_per_image"] == {}  # block-wise: no CPU counted per image


@pytest.mark.integration
def test_images_and_store_on_s3(s3_bucket, image_dir, predictor):
    import s3fs

    bucket, options = s3_bucket
    fs = s3fs.S3FileSystem(**options, skip_instance_cache=True)
    for name in ("synth_0000.png", "empty.png"):
        fs.pipe(f"{bucket}/images/{name}", (image_dir / name).read_bytes())
    store = ResultStore.open(f"{bucket}/results.zarr", storage_options=options)
    todo, _ = pending_images(list_images(f"{bucket}/images", options), store)
    report = segment_images(todo, store, predictor, model_record(predictor, "tiny/best.pt"), options)
    assert report.done == ["synth_0000"]
    assert store.failures()[0]["source_url"] == f"{bucket}/images/empty.png"
    expected, _ = expected_mask(predictor, read_image(str(image_dir / "synth_0000.png")))
    np.testing.assert_array_equal(store.read_mask("synth_0000"), expected)


def fresh_predictor(tiny_checkpoint, batch_size: int) -> Predictor:
    config = PredictConfig(device="cpu", batch_size=batch_size, min_cell_area=MIN_CELL_AREA, compile=False)
    return Predictor.from_checkpoint(str(tiny_checkpoint), config)


def test_a_batch_out_of_device_memory_is_predicted_image_by_image_and_later_batches_halved(
    image_dir, store, tiny_checkpoint, caplog
):
    """Fault injected into the model: passes of more than two images raise torch's out-of-memory
    error, as a GPU too small for a batch does. The images of that call are predicted one at a
    time, the next call's batches hold two, and every result is the one a run at batch size 1
    stores."""
    copies = [f"synth_copy_{letter}" for letter in "abcdefghijkl"]  # listed after the others
    for copy in copies:
        shutil.copy(image_dir / "synth_0000.png", image_dir / f"{copy}.png")
    predictor = fresh_predictor(tiny_checkpoint, batch_size=4)
    passes: list[int] = []

    def device_memory(_module, args):
        passes.append(args[0].shape[0])
        if args[0].shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 18.00 GiB")

    predictor.model.register_forward_pre_hook(device_memory)
    with caplog.at_level("WARNING", logger="cellseg"):
        report = run(image_dir, store, predictor)
    assert sorted(report.done) == sorted(GOOD + copies)
    assert sorted(item["image_id"] for item in report.failed) == sorted(CORRUPT)
    # The first call takes four batches' worth, 16 of the 18 files: the two unreadable ones, small
    # (alone: its own shape), and 13 of 96x96, whose first batch of four runs out of memory; then
    # each of the 14 alone. The second call holds the last two copies, in one batch of two.
    assert passes == [1, 4, *[1] * 14, 2] and predictor.batch_size == 2
    assert ("a batch of up to 4 images ran out of device memory; predicting these 14 one at a time, and batches "
            "of 2 from now on") in caplog.text
    reference = fresh_predictor(tiny_checkpoint, batch_size=1)
    for image_id in GOOD + copies:
        expected, _ = expected_mask(reference, read_image(url_of(image_dir, image_id)))
        np.testing.assert_array_equal(store.read_mask(image_id), expected)


def test_images_of_one_shape_share_passes_across_the_batches_of_a_call(
    tmp_path, synthetic_dataset, tiny_checkpoint, monkeypatch
):
    """Images of two shapes, alternating in the listing: a call of several batches' worth stacks
    those of one shape together, where batches taken in listing order would pass each alone; a
    call stops taking batches once its images hold MAX_CALL_PIXELS; the masks are those of batch
    size 1 either way."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(4):
        image = np.asarray(Image.open(synthetic_dataset / "images" / f"synth_{i:04d}.png"))
        Image.fromarray(image).save(folder / f"{i}a.png")  # 96x96
        Image.fromarray(image[:64, :80]).save(folder / f"{i}b.png")
    reference = fresh_predictor(tiny_checkpoint, batch_size=1)

    def passes_of_a_run(pixel_limit: int) -> list[tuple[int, ...]]:
        monkeypatch.setattr("cellseg.segment.MAX_CALL_PIXELS", pixel_limit)
        predictor = fresh_predictor(tiny_checkpoint, batch_size=2)
        assert predictor.images_per_call == 8
        passes: list[tuple[int, ...]] = []
        predictor.model.register_forward_pre_hook(lambda _module, args: passes.append(tuple(args[0].shape)))
        results = ResultStore.open(str(tmp_path / f"limit-{pixel_limit}.zarr"))
        report = run(folder, results, predictor)
        assert sorted(report.done) == sorted(f"{i}{shape}" for i in range(4) for shape in "ab")
        for image_id in report.done:
            expected, _ = expected_mask(reference, read_image(f"{folder}/{image_id}.png"))
            np.testing.assert_array_equal(results.read_mask(image_id), expected)
        return passes

    assert sorted(passes_of_a_run(2**30)) == [(2, 1, 64, 80)] * 2 + [(2, 1, 96, 96)] * 2
    # A limit below the first batch's pixels: each call is one batch, one image of each shape.
    assert sorted(passes_of_a_run(96 * 96)) == [(1, 1, 64, 80)] * 4 + [(1, 1, 96, 96)] * 4


def test_an_image_that_fails_in_a_batch_fails_alone(image_dir, store, tiny_checkpoint, caplog):
    """Fault injected into the model for the one 64x80 image: the batch it came in is predicted
    again image by image, and only that image is recorded as failed, with the model's error."""
    predictor = fresh_predictor(tiny_checkpoint, batch_size=4)

    def fails_on_the_small_image(_module, args):
        if tuple(args[0].shape[-2:]) == (64, 80):
            raise RuntimeError("the model cannot take this image")

    predictor.model.register_forward_pre_hook(fails_on_the_small_image)
    with caplog.at_level("WARNING", logger="cellseg"):
        report = run(image_dir, store, predictor)
    assert sorted(report.done) == sorted(set(GOOD) - {"small"})
    small = [item for item in report.failed if item["image_id"] == "small"]
    assert len(small) == 1 and small[0]["error"] == "RuntimeError: the model cannot take this image"
    assert predictor.batch_size == 4
    assert "failed (RuntimeError: the model cannot take this image); predicting them one at a time" in caplog.text
    assert store.done_ids() == set(GOOD) - {"small"}
