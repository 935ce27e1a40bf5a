"""`python -m benchmarks.quality`, `benchmarks.pixel_ceiling` and the Otsu baseline, the commands behind
the README's quality section, on synthetic data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.baselines import otsu_scores
from benchmarks.pixel_ceiling import (
    boundary_pixels,
    shrink_labels,
    wrong_pixel_distances,
)
from benchmarks.pixel_ceiling import measure as pixel_ceiling
from benchmarks.quality import found_by_contrast, found_cells, measure, measure_model, relative_contrasts
from cellseg.config import PredictConfig
from cellseg.io import read_image
from cellseg.pairs import pair_images_and_masks, split_train_val
from cellseg.scale import median_cell_diameter
from cellseg.store import ResultStore


def training_run(folder, checkpoint, dataset) -> tuple:
    """A folder laid out as `cellseg train` leaves it (best.pt, split.json) for `checkpoint`, split
    as `cellseg train` splits `dataset` by default; returns (folder, validation pairs)."""
    folder.mkdir()
    (folder / "best.pt").symlink_to(checkpoint)
    pairs = pair_images_and_masks(str(dataset / "images"), str(dataset / "masks"))
    train_pairs, val_pairs = split_train_val(pairs, 0.2, 0)
    (folder / "split.json").write_text(json.dumps({"train": [p.id for p in train_pairs], "val": [p.id for p in val_pairs]}))
    return folder, val_pairs


def test_quality_of_a_run_on_its_validation_images(tiny_checkpoint, synthetic_dataset, tmp_path):
    run, val_pairs = training_run(tmp_path / "run", tiny_checkpoint, synthetic_dataset)
    summary = measure(synthetic_dataset, run, tmp_path / "quality", PredictConfig(device="cpu"))
    assert summary["images"] == len(val_pairs) == 5
    assert 0.8 < summary["dice"] <= 1.0 and 0.0 <= summary["pixel_error"] < 0.1
    # swept over thresholds from the stored probabilities: never worse than the masks' own F-score
    assert summary["isbi2012_threshold"] in [step / 10 for step in range(11)]
    assert 0.0 <= summary["pixel_error_isbi2012"] <= 1 - summary["dice_pooled"] + 1e-3
    assert 0.0 < summary["f1_mean"] <= 1.0 and 0.0 < summary["dsb_score_mean"] <= summary["f1_mean"]
    assert isinstance(summary["count_error_median"], float)
    saved = json.loads((tmp_path / "quality" / "quality.json").read_text())
    assert saved["summary"] == summary
    assert sorted(row["image_id"] for row in saved["evaluation"]["per_image"]) == sorted(p.id for p in val_pairs)


def test_a_model_scored_on_the_validation_images_of_a_run(tiny_checkpoint, synthetic_dataset, tmp_path):
    run, val_pairs = training_run(tmp_path / "run", tiny_checkpoint, synthetic_dataset)
    command = [sys.executable, "-m", "benchmarks.quality", "--dataset", str(synthetic_dataset), "--model",
               str(tiny_checkpoint), "--val-of", str(run), "--out", str(tmp_path / "q"), "--no-split"]
    printed = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout
    assert "| all | 5 |" in printed and "| fluorescence | 5 |" in printed  # synthetic cells are bright
    assert "true nuclei found (IoU > 0.5) by contrast" in printed
    saved = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert sorted(row["image_id"] for row in saved["evaluation"]["per_image"]) == sorted(p.id for p in val_pairs)
    by_contrast = saved["summary"]["found_by_contrast"]
    true_cells = sum(row["instance_true_cells"] for row in saved["evaluation"]["per_image"])
    assert sum(row["cells"] for row in by_contrast) == true_cells and by_contrast[-1]["high"] is None
    assert sorted(path.stem for path in (tmp_path / "q-images" / "labels").iterdir()) == sorted(p.id for p in val_pairs)
    refused = subprocess.run([*command, "--card"], check=False, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert refused.returncode == 2 and "go with --model, and not with --card" in refused.stderr


def test_a_model_scored_on_images_shown_at_another_magnification(tiny_checkpoint, synthetic_dataset, tmp_path):
    """`--zoom 2`: every image, mask and label image resampled to twice its size, labels kept whole."""
    command = [sys.executable, "-m", "benchmarks.quality", "--dataset", str(synthetic_dataset), "--model",
               str(tiny_checkpoint), "--zoom", "2", "--out", str(tmp_path / "q"), "--no-split"]
    subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    zoomed = tmp_path / "q-images"
    originals = sorted((synthetic_dataset / "images").iterdir())
    assert sorted(path.name for path in (zoomed / "images").iterdir()) == [path.name for path in originals]
    for kind in ("images", "masks", "labels"):
        before, after = read_image(str(synthetic_dataset / kind / originals[0].name)), read_image(str(zoomed / kind / originals[0].name))
        assert after.shape == (2 * before.shape[0], 2 * before.shape[1]) and after.dtype == before.dtype
        if kind == "labels":
            assert set(np.unique(after)) == set(np.unique(before))  # nearest: no label invented or lost
    saved = json.loads((tmp_path / "q" / "quality.json").read_text())
    assert saved["summary"]["images"] == len(originals)
    command[command.index("--zoom") + 1] = "20"
    refused = subprocess.run(command, check=False, capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert refused.returncode == 2 and "--zoom 20" in refused.stderr


def test_boundary_pixels_are_both_sides_of_each_boundary():
    truth = np.zeros((5, 6), dtype=bool)
    truth[1:4, 1:3] = True  # a 3x2 cell
    boundary = boundary_pixels(truth)
    assert boundary[1:4, 1:3].all()  # every cell pixel touches background (the cell is 2 wide)
    assert boundary[0, 1] and boundary[2, 3] and boundary[2, 0]  # background beside it
    assert not boundary[0, 0] and not boundary[2, 4]  # diagonal or two pixels off
    wrong = truth.copy()
    wrong[2, 3] = True  # one pixel on the boundary
    wrong[2, 5] = True  # two pixels from the nearest boundary pixel
    assert wrong_pixel_distances(wrong, truth) == (2, 1, 1)
    assert wrong_pixel_distances(truth, truth) == (0, 0, 0)


def test_pixel_ceiling_of_a_run(tiny_checkpoint, synthetic_dataset, tmp_path):
    run, _ = training_run(tmp_path / "run", tiny_checkpoint, synthetic_dataset)
    result = pixel_ceiling(synthetic_dataset, [run, run])
    assert result["images"] == 5
    assert all(0.5 < dice < 1.0 for dice in result["shifted_truth"].values())
    assert result["runs"][str(run)] == result["ensemble"] > 0.8  # the same model twice averages to itself
    wrong = result["wrong_pixels"]
    assert wrong["total"] > 0 and 0.0 <= wrong["on_boundary"] <= wrong["within_1px_of_boundary"] <= 1.0
    for change in ("grown_1px", "shrunk_1px", "moved_1px"):  # most synthetic cells are large enough to still match
        assert 0.9 < result["shifted_labels"][change]["f1"] <= 1.0
        assert 0.3 < result["shifted_labels"][change]["dsb_score"] < result["shifted_labels"][change]["f1"]


def test_shrinking_labels_erodes_each_cell_on_its_own():
    labels = np.zeros((5, 8), dtype=np.int32)
    labels[1:4, 1:4] = 1
    labels[1:4, 4:7] = 2  # touching cell 1
    labels[2:5, 7] = 3  # one pixel wide
    shrunk = shrink_labels(labels)
    assert (shrunk == 1).sum() == 1 and shrunk[2, 2] == 1
    assert (shrunk == 2).sum() == 1 and shrunk[2, 5] == 2
    assert (shrunk == 3).sum() == 0


def test_shrinking_labels_keeps_the_image_edge():
    labels = np.zeros((5, 8), dtype=np.int32)
    labels[2:5, 5:8] = 1  # in the bottom right corner
    assert np.argwhere(shrink_labels(labels) == 1).tolist() == [[3, 6], [3, 7], [4, 6], [4, 7]]


def test_otsu_baseline_scores_cells_where_labels_exist(synthetic_dataset):
    pairs = pair_images_and_masks(str(synthetic_dataset / "images"), str(synthetic_dataset / "masks"))
    _, val_pairs = split_train_val(pairs, 0.2, 0)
    pixels_only = otsu_scores(val_pairs)
    with_cells = otsu_scores(val_pairs, str(synthetic_dataset / "labels"))
    assert set(pixels_only) == {"dice", "dice_pooled"} and 0.5 < pixels_only["dice"] <= 1.0
    assert with_cells["dice"] == pixels_only["dice"]
    assert 0.0 < with_cells["dsb_score_mean"] < with_cells["f1_mean"] <= 1.0
    assert with_cells["true_cells_total"] > 0 and isinstance(with_cells["count_error_median"], float)


def test_cells_found_by_their_contrast_beside_the_images_median_cell():
    truth = np.zeros((40, 60), dtype=np.int32)
    image = np.full(truth.shape, 10, dtype=np.uint8)
    for index, (left, brightness) in enumerate([(2, 110), (14, 60), (26, 210), (38, 35)], start=1):
        truth[10:20, left : left + 8] = index
        image[10:20, left : left + 8] = brightness
    truth[10:15, 38:46] = 0  # the dimmest cell half the size of the others
    contrasts, areas = relative_contrasts(image, truth)  # 100, 50, 200, 25 over the background; median 75
    np.testing.assert_allclose(contrasts, [100 / 75, 50 / 75, 200 / 75, 25 / 75])
    np.testing.assert_allclose(areas, [1, 1, 1, 0.5])
    np.testing.assert_allclose(relative_contrasts(255 - image, truth)[0], contrasts)  # dark nuclei alike
    predicted = np.where(np.isin(truth, [1, 3]), truth, 0)  # the two bright cells found, the dim ones not
    predicted[predicted == 3] = 7
    found = found_cells(predicted, truth)
    assert found.tolist() == [True, False, True, False]
    assert not found_cells(np.zeros_like(truth), truth).any()
    rows = found_by_contrast(contrasts, areas, found)
    assert [(row["low"], row["cells"], row["found"], row["median_relative_area"]) for row in rows] == [
        (0.0, 1, 0.0, 0.5), (0.5, 1, 0.0, 1.0), (0.75, 0, None, None), (1.0, 1, 1.0, 1.0), (1.5, 1, 1.0, 1.0)]


def test_a_model_at_a_cell_size_reports_its_estimate_and_the_cells_found(synthetic_dataset, tmp_path):
    """For the shipped nuclei model (trained at a cell size) each image's size is scored twice: the
    size model's estimate, which the image was predicted at, and the median cell found there."""
    dataset = tmp_path / "four"
    for kind in ("images", "masks", "labels"):
        (dataset / kind).mkdir(parents=True)
        for path in sorted((synthetic_dataset / kind).iterdir())[:4]:
            (dataset / kind / path.name).symlink_to(path)
    summary = measure_model(dataset, "nuclei", tmp_path / "q", PredictConfig(device="cpu"))
    saved = json.loads((tmp_path / "q" / "quality.json").read_text())
    store = ResultStore.open(str(tmp_path / "q" / "test.zarr"), mode="r")
    estimate_errors, found_errors = [], []
    for row in saved["evaluation"]["per_image"]:
        truth = median_cell_diameter(read_image(str(dataset / "labels" / f"{row['image_id']}.png")))
        assert row["estimated_diameter"] == store.record(row["image_id"])["scale"]["cell_diameter"]
        assert row["found_diameter"] == median_cell_diameter(np.asarray(store.read_cells(row["image_id"])))
        assert row["true_diameter"] == truth
        estimate_errors.append(abs(row["estimated_diameter"] / truth - 1))
        found_errors.append(abs(row["found_diameter"] / truth - 1))
    size = summary["cell_size"]
    assert size["images"] == 4
    assert size["within_25_percent"] == np.mean(np.array(estimate_errors) <= 0.25)
    assert size["found_within_25_percent"] == np.mean(np.array(found_errors) <= 0.25)
    assert size["found_median_relative_error"] == np.median(found_errors)
    assert estimate_errors != found_errors  # two readings of the size, not one copied
