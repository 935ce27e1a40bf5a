"""Scoring a results store against ground-truth mask files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cellseg.evaluate import evaluate_store
from cellseg.metrics import segmentation_scores
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError
from cellseg.synth import encode_png, generate_sample


def mask(rows: list[str]) -> np.ndarray:
    """Boolean mask from strings: '#' is cell, '.' is background."""
    return np.array([[char == "#" for char in row] for row in rows], dtype=bool)


# a: tp 2, fp 1, fn 1.  b: empty truth, empty prediction (a perfect "nothing here").
PREDICTIONS = {"a": mask(["###", "..."]), "b": mask(["...", "..."])}
TRUTHS = {"a": mask(["##.", "#.."]), "b": mask(["...", "..."]), "c": mask(["#..", "..."])}


PIXEL_KEYS = ("image_id", "iou", "dice", "precision", "recall")


def write_truths(folder, truths: dict[str, np.ndarray]) -> str:
    folder.mkdir()
    for image_id, truth in truths.items():
        (folder / f"{image_id}.png").write_bytes(encode_png(truth))  # 0/255
    return str(folder)


@pytest.fixture()
def store(tmp_path) -> ResultStore:
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    for image_id, prediction in PREDICTIONS.items():
        store.write_result(image_id, prediction, {}, f"{image_id}.png", {"version": "v1"})
    store.write_result("z", mask(["#"]), {}, "z.png", {"version": "v1"})  # no ground truth: ignored
    store.record_failure("c", "c.png", "ImageReadError: broken", {"version": "v1"})
    return store


def test_scores_match_hand_computed_values(store, tmp_path):
    result = evaluate_store(store, write_truths(tmp_path / "truth", TRUTHS))
    assert result["images"] == 2
    per_image = {row["image_id"]: {key: row[key] for key in PIXEL_KEYS} for row in result["per_image"]}
    assert per_image["a"] == pytest.approx({"image_id": "a", "iou": 2 / 4, "dice": 4 / 6, "precision": 2 / 3, "recall": 2 / 3})
    assert per_image["b"] == {"image_id": "b", "iou": 1.0, "dice": 1.0, "precision": 1.0, "recall": 1.0}
    assert result["mean"] == pytest.approx({"iou": 3 / 4, "dice": 5 / 6, "precision": 5 / 6, "recall": 5 / 6})
    # pooled: b adds no pixels, so the totals are a's
    assert result["pooled"] == pytest.approx({"iou": 2 / 4, "dice": 4 / 6, "precision": 2 / 3, "recall": 2 / 3})


def test_per_image_scores_equal_the_metrics_module(store, tmp_path):
    result = evaluate_store(store, write_truths(tmp_path / "truth", TRUTHS))
    assert [row["image_id"] for row in result["per_image"]] == ["a", "b"]
    for row in result["per_image"]:
        expected = segmentation_scores(PREDICTIONS[row["image_id"]], TRUTHS[row["image_id"]])
        assert {key: row[key] for key in PIXEL_KEYS if key != "image_id"} == expected


def test_pixel_error_both_ways_from_the_masks(store, tmp_path):
    result = evaluate_store(store, write_truths(tmp_path / "truth", TRUTHS))
    # a: fp 1 + fn 1 of 6 pixels, b: none of 6; ISBI: 1 - pooled Dice (4/6) of the masks
    assert result["pixel_error"] == pytest.approx({"misclassified": 2 / 12, "isbi2012": 2 / 6, "isbi2012_threshold": None})


def test_isbi_pixel_error_sweeps_thresholds_when_probabilities_are_stored(tmp_path):
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    # a's probabilities: thresholded at 0.5 they give PREDICTIONS["a"]; above 0.2 the missed cell pixel is found
    probabilities = {"a": np.array([[0.9, 0.8, 0.6], [0.3, 0.1, 0.1]]), "b": np.full((2, 3), 0.2)}
    for image_id, probability in probabilities.items():
        store.write_result(image_id, probability > 0.5, {}, f"{image_id}.png", {"version": "v1"}, probability)
    result = evaluate_store(store, write_truths(tmp_path / "truth", TRUTHS))
    # > 0.2: a has tp 3, fp 1, fn 0 and b no cell pixel -> Dice 6/7, the best (> 0.1 takes all of b, > 0.3 loses
    # a's (1, 0)); the stored masks score 4/6
    assert result["pixel_error"] == pytest.approx({"misclassified": 2 / 12, "isbi2012": 1 / 7, "isbi2012_threshold": 0.2})
    assert result["pooled"]["dice"] == pytest.approx(4 / 6)


def test_truths_without_a_finished_prediction_are_listed(store, tmp_path, capsys):
    truths = {**TRUTHS, "d": mask(["..#", "..."])}
    result = evaluate_store(store, write_truths(tmp_path / "truth", truths))
    assert result["missing_predictions"] == ["c", "d"]  # c failed, d was never segmented
    assert result["images"] == 2

    from cellseg.cli import main

    assert main(["evaluate", "--pred", store.url, "--masks", str(tmp_path / "truth")]) == 0
    assert ("2 images with a ground-truth mask and no finished prediction, left out of the scores: c, d"
            in capsys.readouterr().out.splitlines())


def test_done_images_without_a_truth_are_listed_and_no_match_at_all_names_both_sides(store, tmp_path):
    result = evaluate_store(store, write_truths(tmp_path / "truth", {"a": TRUTHS["a"]}))
    assert result["missing_truths"] == ["b", "z"]  # done, but no mask to score them against
    assert [row["image_id"] for row in result["per_image"]] == ["a"]

    renamed = write_truths(tmp_path / "renamed", {"mask_a": TRUTHS["a"], "mask_b": TRUTHS["b"]})
    with pytest.raises(StoreError, match=r"masks are matched to images by name: the store has a, b, z, the masks "
                                         r"are mask_a, mask_b\)$"):
        evaluate_store(store, renamed)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StoreError, match=r"^no mask images under '.*empty': nothing to score"):
        evaluate_store(store, str(tmp_path / "empty"))


def test_masks_named_with_a_mask_suffix_are_matched_as_training_pairs_them(store, tmp_path):
    """`train` pairs `a_mask.png` with image a; `evaluate` found no truth for any image named so."""
    plain = evaluate_store(store, write_truths(tmp_path / "plain", {"a": TRUTHS["a"], "b": TRUTHS["b"]}))
    suffixed = evaluate_store(store, write_truths(tmp_path / "suffixed", {"a_mask": TRUTHS["a"], "b_masks": TRUTHS["b"],
                                                                          "q_mask": TRUTHS["a"]}))
    assert suffixed["per_image"] == plain["per_image"] and suffixed["mean"] == plain["mean"]
    assert suffixed["missing_predictions"] == ["q"] and suffixed["missing_truths"] == ["z"]


def test_masks_beside_their_images_in_one_folder_are_scored_as_cellpose_keeps_them(store, tmp_path):
    """A folder of a.png and a_masks.png (as `train` takes it) was refused: 'the pairing is ambiguous'."""
    both = tmp_path / "both"
    both.mkdir()
    for image_id, truth in TRUTHS.items():
        (both / f"{image_id}.png").write_bytes(encode_png(np.full(truth.shape, 90, np.uint8)))  # the image
        (both / f"{image_id}_masks.png").write_bytes(encode_png(truth))
    apart = evaluate_store(store, write_truths(tmp_path / "truth", TRUTHS))
    assert evaluate_store(store, str(both)) == apart
    # A masks folder with a mask named as its image and another with a suffix: ambiguous, not guessed
    (tmp_path / "truth" / "a_mask.png").write_bytes(encode_png(np.zeros((2, 3), bool)))
    with pytest.raises(ValueError, match=r"mask files name one image .*'a': a\.png, a_mask\.png"):
        evaluate_store(store, str(tmp_path / "truth"))


def test_unfinished_prediction_is_not_scored(store, tmp_path):
    group = store.root.require_group("d")
    group.attrs["cellseg"] = {"status": "writing"}  # interrupted write
    result = evaluate_store(store, write_truths(tmp_path / "truth", {**TRUTHS, "d": mask(["...", "..."])}))
    assert "d" in result["missing_predictions"]
    assert [row["image_id"] for row in result["per_image"]] == ["a", "b"]


def test_masks_valued_one_count_as_cells(store, tmp_path):
    folder = tmp_path / "truth"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode_png(TRUTHS["a"].astype(np.uint8)))  # 0/1, not 0/255
    result = evaluate_store(store, str(folder))
    assert result["per_image"][0]["iou"] == pytest.approx(2 / 4)


def test_no_overlap_raises_naming_both(store, tmp_path):
    truth_url = write_truths(tmp_path / "truth", {"other": mask(["#"])})
    with pytest.raises(StoreError, match=rf"{store.url}.*{truth_url}"):
        evaluate_store(store, truth_url)


def test_size_mismatch_raises_naming_both_sizes(store, tmp_path):
    truth_url = write_truths(tmp_path / "truth", {"a": np.zeros((4, 5), bool)})
    with pytest.raises(StoreError, match=r"a\.png' is 5x4, prediction for 'a' is 3x2"):
        evaluate_store(store, truth_url)
    # Compared before the prediction is read (a slide's would be gigabytes): its pixels, made
    # unreadable here, are never decoded.
    chunks = [path for path in (Path(store.url) / "a" / "labels" / "mask" / "0").rglob("*")
              if path.is_file() and path.name != "zarr.json"]
    assert chunks
    for chunk in chunks:
        chunk.write_bytes(b"not zstd")
    with pytest.raises(StoreError, match=r"a\.png' is 5x4, prediction for 'a' is 3x2"):
        evaluate_store(store, truth_url)


def test_a_stack_of_masks_is_refused_naming_it(store, tmp_path):
    """Page 0 of a multi-page mask TIFF was scored without a word: Dice 0 where it was empty."""
    import tifffile

    truth = tmp_path / "truth"
    write_truths(truth, {"b": TRUTHS["b"]})
    planes = np.stack([np.zeros((2, 3), np.uint8)] + [TRUTHS["a"].astype(np.uint8) * 255] * 4)
    with tifffile.TiffWriter(truth / "a.tif") as writer:
        for plane in planes:
            writer.write(plane, metadata=None)
    with pytest.raises(ValueError, match=rf"^mask '{truth}/a\.tif' is a stack of 5 planes \(z, time points or "
                                         r"channels\); a mask or label image is one plane: save the plane that belongs "
                                         r"to its image as a file of its own$"):
        evaluate_store(store, str(truth))
    tifffile.imwrite(truth / "a.tif", planes[1])
    assert evaluate_store(store, str(truth))["images"] == 2


def test_every_image_with_a_chunk_that_cannot_be_decoded_is_named(store, tmp_path):
    """Only the first was named: the run stopped at it, as docs/store.md said it would not."""
    truth_url = write_truths(tmp_path / "truth", TRUTHS)
    for image_id in ("a", "b"):
        chunks = [path for path in (Path(store.url) / image_id / "labels" / "mask" / "0").rglob("*")
                  if path.is_file() and path.name != "zarr.json"]
        assert chunks
        for chunk in chunks:
            chunk.write_bytes(b"not zstd")
    with pytest.raises(StoreError, match=r"^no score: 2 images") as raised:
        evaluate_store(store, truth_url)
    assert "'a'" in str(raised.value) and "'b'" in str(raised.value)


def test_a_label_image_of_another_size_than_its_mask_names_both_as_width_x_height(store, tmp_path, caplog):
    truth_url = write_truths(tmp_path / "truth", TRUTHS)
    (tmp_path / "truth" / "extra").mkdir()  # a subfolder beside the masks: named, not searched
    labels = tmp_path / "labels"
    labels.mkdir()
    for image_id in TRUTHS:
        (labels / f"{image_id}.png").write_bytes(encode_png(np.zeros((4, 5), np.uint8)))
    with caplog.at_level("INFO", logger="cellseg"), pytest.raises(
            StoreError, match=rf"^label image '{labels}/a\.png' is 5x4, its mask '{tmp_path}/truth/a\.png' 3x2$"):
        evaluate_store(store, truth_url, labels_url=str(labels))
    assert f"not searching the 1 subfolder(s) of '{truth_url}' (extra): name the folder that holds the masks" in \
        caplog.messages


def test_a_damaged_mask_file_is_refused_in_one_line_naming_it(store, tmp_path):
    truth = tmp_path / "truth"
    write_truths(truth, TRUTHS)
    (truth / "a.png").write_bytes((truth / "a.png").read_bytes()[:16])
    with pytest.raises(ValueError, match=rf"^'{truth}/a\.png': not a readable image"):
        evaluate_store(store, str(truth))


def test_missing_truth_directory_raises(store, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mask folder '.*absent' does not exist"):
        evaluate_store(store, str(tmp_path / "absent"))


@pytest.mark.parametrize(("bits", "refusal"), [
    (8, r"mask '.*a\.png' holds \d+ levels between 0 and \d+, with \d+% of its pixels among them: it looks like an "
        r"image, not a mask"),
    (16, r"'.*a\.png' is not a label image: .* as in a microscope image"),
])
def test_images_given_as_the_masks_are_refused_naming_the_file(bits, refusal, tmp_path):
    """Read as masks (any value above 0 a cell), microscopy images scored as masks of nearly all
    cell: Dice 0.29 and a mixed-kinds note instead of an error."""
    sample = generate_sample(np.random.default_rng(3), (96, 96), bit_depth=bits)
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    store.write_result("a", sample.mask, {}, "a.png", {"version": "v1"})
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(encode_png(sample.image))
    with pytest.raises(ValueError, match=refusal):
        evaluate_store(store, str(tmp_path / "images"))


def test_validation_cell_scores_match_what_predict_stores(tiny_checkpoint, synthetic_dataset, tmp_path):
    from cellseg.checkpoint import load_checkpoint
    from cellseg.config import PredictConfig
    from cellseg.evaluate import validation_cell_scores
    from cellseg.infer import Predictor
    from cellseg.loaded_pairs import load_pairs
    from cellseg.pairs import pair_images_and_masks
    from cellseg.scoring import instance_scores, summarise_instance_scores
    from cellseg.segment import model_record, segment_images

    checkpoint = load_checkpoint(str(tiny_checkpoint))
    normalization = checkpoint.model_config.normalization
    with_masks = load_pairs(pair_images_and_masks(str(synthetic_dataset / "images"), str(synthetic_dataset / "masks"))[:3],
                            normalization)
    config = PredictConfig(device="cpu", min_cell_area=5)
    predictor = Predictor(checkpoint, config)
    assert validation_cell_scores(predictor, with_masks) == {}  # binary masks: no cells to match

    with_labels = load_pairs(pair_images_and_masks(str(synthetic_dataset / "images"),
                                                   str(synthetic_dataset / "labels"))[:3], normalization)
    cells = validation_cell_scores(predictor, with_labels)
    store = ResultStore.open(str(tmp_path / "store.zarr"))
    segment_images([(pair.id, pair.source.image_url) for pair in with_labels], store, predictor,
                   model_record(predictor, str(tiny_checkpoint)))
    expected = summarise_instance_scores([instance_scores(store.read_cells(pair.id), pair.instances)
                                          for pair in with_labels])
    assert cells == expected
    assert cells["images"] == 3
    assert cells["true_cells_total"] == sum(len(np.unique(pair.instances)) - 1 for pair in with_labels)


# The region measure of EM (adapted Rand error) and the per-model split decision ----------------


def test_adapted_rand_error_is_zero_for_the_truth_and_grows_with_a_wrong_split():
    from cellseg.scoring import region_scores, truth_regions

    truth = truth_regions(mask(["##.##", "##.##", "##.##"]))  # two regions apart, 4-connected
    assert truth.max() == 2
    assert region_scores(truth, truth)["adapted_rand_error"] == pytest.approx(0.0)
    cut = truth.copy()
    cut[2, :2] = 3  # one region cut in two: 6 pixels as 4 + 2
    scores = region_scores(cut, truth)
    # SNEMI3D definition, by hand, over the 12 region pixels and pairs of distinct pixels:
    # pairs together in both: 4*4 + 2*2 + 6*6 - 12 = 44; together in the truth: 6*6 + 6*6 - 12 = 60;
    # together in the prediction: 44. One of precision/recall is 44/60, the other 1.
    assert sorted([scores["adapted_rand_precision"], scores["adapted_rand_recall"]]) == pytest.approx([44 / 60, 1.0])
    assert scores["adapted_rand_error"] == pytest.approx(1 - 2 * (44 / 60) / (1 + 44 / 60))
    assert region_scores(np.zeros((2, 2), int), np.zeros((2, 2), int))["adapted_rand_error"] == 0.0
    # Cells where there are none: every one wrong, not an error of 1 beside a precision of 1.
    assert region_scores(np.eye(2, dtype=int), np.zeros((2, 2), int)) == {
        "adapted_rand_error": 1.0, "adapted_rand_precision": 0.0, "adapted_rand_recall": 1.0}


def test_region_scores_are_skimages_adapted_rand_error_exactly_for_any_labels():
    """Counted without scipy.sparse's table (40 bytes a pixel, 10x slower), to the same floats;
    label numbers in the billions too, which skimage's table cannot hold."""
    from skimage.metrics import adapted_rand_error

    from cellseg.scoring import region_scores

    rng = np.random.default_rng(5)
    compared = 0
    for trial in range(300):
        height, width = rng.integers(1, 40, 2)
        truth = rng.integers(0, rng.integers(1, 6), (height, width)) * rng.integers(1, 3)
        predicted = rng.integers(0, rng.integers(1, 6), (height, width))
        if trial % 11 == 0:
            predicted[:] = 0  # all predicted background: one region
        if not truth.any():
            continue
        with np.errstate(invalid="ignore", divide="ignore"):  # one true pixel: 0 / 0, nan in both
            error, precision, recall = adapted_rand_error(truth, predicted)
            expected = {"adapted_rand_error": error, "adapted_rand_precision": precision, "adapted_rand_recall": recall}
            for scores in (region_scores(predicted, truth), region_scores(predicted * 10**9, np.where(truth > 0, truth * 10**9 + 7, 0))):
                np.testing.assert_equal(scores, expected)
        compared += 1
    assert compared > 200


def test_evaluate_reports_the_adapted_rand_error_against_the_masks_components(store, tmp_path, capsys):
    from cellseg.cli import main

    truths = write_truths(tmp_path / "truth", TRUTHS)
    result = evaluate_store(store, truths)
    per_image = {row["image_id"]: row for row in result["per_image"]}
    assert per_image["b"]["adapted_rand_error"] == 0.0  # nothing predicted where nothing is
    assert 0.0 < per_image["a"]["adapted_rand_error"] < 1.0
    assert result["regions"]["adapted_rand_error_mean"] == pytest.approx(
        (per_image["a"]["adapted_rand_error"] + 0.0) / 2)
    assert main(["evaluate", "--pred", store.url, "--masks", truths]) == 0
    printed = capsys.readouterr().out
    assert f"adapted Rand error {result['regions']['adapted_rand_error_mean']:.4f}" in printed
    assert "4-connected components of the masks" in printed


def test_masks_that_are_label_images_give_the_cell_scores_as_labels_do(store, tmp_path, capsys):
    """`train` reads 16-bit masks as instance labels; `evaluate --masks` of the same folder scores the
    cells too, exactly as with `--labels`, where before it fell back to the masks' components."""
    from PIL import Image

    from cellseg.cli import main

    label_folder = tmp_path / "labels"
    label_folder.mkdir()
    for image_id, truth in TRUTHS.items():
        Image.fromarray(truth.astype(np.uint16) * 7).save(label_folder / f"{image_id}.png")  # one cell, label 7
    binary = write_truths(tmp_path / "binary", TRUTHS)

    from_masks = evaluate_store(store, str(label_folder))
    given = evaluate_store(store, binary, labels_url=str(label_folder))
    assert "instances" not in evaluate_store(store, binary)  # 8-bit masks stay binary
    assert from_masks["instances"] == given["instances"]
    assert from_masks["instances"]["true_cells_total"] == 1
    assert from_masks["per_image"] == given["per_image"] and from_masks["mean"] == given["mean"]
    assert main(["evaluate", "--pred", store.url, "--masks", str(label_folder)]) == 0
    printed = capsys.readouterr().out
    assert "cells against the true labels" in printed and "cells: F1@0.5" in printed

    (label_folder / "b.png").write_bytes((tmp_path / "binary" / "b.png").read_bytes())  # one 8-bit mask among them
    mixed = evaluate_store(store, str(label_folder))
    assert "instances" not in mixed
    assert main(["evaluate", "--pred", store.url, "--masks", str(label_folder)]) == 0
    printed = capsys.readouterr().out
    assert "the true labels of 1 image and the masks' 4-connected components of 1 image" in printed
    assert "cells: F1@0.5" not in printed


def test_cells_numbered_in_the_billions_are_scored_as_cells_numbered_1_2_3(tmp_path):
    """A label image's numbers do not size anything: before, the overlap table had a column per
    number up to the largest (2e9 here: tens of GB), and 3e9 wrapped to a negative int32."""
    import tifffile

    from tests.test_pairs import sparse_labels

    sparse, small = sparse_labels(np.uint32)
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    store.write_result("x", small > 0, {}, "x.png", {"version": "v1"})
    for name, labels in (("sparse", sparse), ("small", small.astype(np.uint16))):
        (tmp_path / name).mkdir()
        tifffile.imwrite(tmp_path / name / "x.tif", labels)
    as_masks = evaluate_store(store, str(tmp_path / "sparse"))
    as_labels = evaluate_store(store, str(tmp_path / "small"), labels_url=str(tmp_path / "sparse"))
    expected = evaluate_store(store, str(tmp_path / "small"))
    assert expected["instances"]["true_cells_total"] == 3
    assert as_masks["instances"] == as_labels["instances"] == expected["instances"]


def dumbbells(count: int) -> tuple[np.ndarray, np.ndarray]:
    """A mask of `count` dumbbells (two discs joined by a narrow neck) and labels with one cell per disc."""
    rows, cols = np.mgrid[0:40, 0 : 40 * count]
    labels = np.zeros(rows.shape, np.int32)
    for index in range(count):
        left, right = 40 * index + 10, 40 * index + 28
        labels[(rows - 20) ** 2 + (cols - left) ** 2 <= 49] = 2 * index + 1
        labels[(rows - 20) ** 2 + (cols - right) ** 2 <= 49] = 2 * index + 2
        labels[19:22, left:right] = np.where(labels[19:22, left:right] == 0, 2 * index + 1, labels[19:22, left:right])
    return labels > 0, labels


def test_the_split_is_decided_by_what_the_truth_calls_a_cell():
    from cellseg.config import PredictConfig
    from cellseg.evaluate import postprocessing_decision
    from cellseg.postprocess import CellMaps
    from cellseg.scoring import truth_regions

    cells, labels = dumbbells(3)
    maps = [CellMaps(cells.astype(np.float32))]  # a model that predicts the mask exactly
    config = PredictConfig(device="cpu")
    # Nuclei: each disc is a cell, so the neck must be cut.
    (split, threshold, prominence), scores = postprocessing_decision(maps, [labels], config, labelled=True)
    assert split and threshold == 0.5  # every threshold cuts a 0/1 map alike: the tie goes to 0.5
    assert prominence == 0.1  # a model without a distance map keeps the default
    assert scores[(True, 0.5, 0.1)]["f1_mean"] == 1.0 > scores[(False, 0.5, 0.1)]["f1_mean"]
    assert len(scores) == 8  # 2 x 4 thresholds, one prominence
    # EM: the mask's components are the regions, so cutting them is wrong.
    (split, _, _), scores = postprocessing_decision(maps, [truth_regions(cells)], config, labelled=False)
    assert not split
    assert scores[(False, 0.5, 0.1)]["adapted_rand_error_mean"] == 0.0 < scores[(True, 0.5, 0.1)]["adapted_rand_error_mean"]


def test_the_threshold_is_the_one_that_finds_the_cells_best():
    from cellseg.config import PredictConfig
    from cellseg.evaluate import postprocessing_decision
    from cellseg.postprocess import CellMaps

    cells, labels = dumbbells(2)
    faint = CellMaps(np.where(cells, 0.45, 0.05).astype(np.float32))  # a model unsure of every cell
    (split, threshold, _), scores = postprocessing_decision([faint], [labels], PredictConfig(device="cpu"), labelled=True)
    assert split and threshold == 0.4  # nearest 0.5 of the thresholds that find them
    assert scores[(True, 0.5, 0.1)]["f1_mean"] == 0.0 and scores[(True, 0.3, 0.1)]["f1_mean"] == 1.0


def two_peaked_map() -> tuple[np.ndarray, np.ndarray]:
    """The mask and distance map of one elliptic object whose map has two centres of height 1,
    22 px apart, with a saddle about 0.13 below them (two Gaussians along the long axis)."""
    rows, cols = np.mgrid[0:40, 0:60]
    inside = ((rows - 20) / 12.0) ** 2 + ((cols - 30) / 26.0) ** 2 <= 1
    along = np.exp(-(((cols - 19) / 8.75) ** 2) / 2) + np.exp(-(((cols - 41) / 8.75) ** 2) / 2)
    across = np.clip(1 - ((rows - 20) / 12.0) ** 2, 0, 1)
    return inside, np.where(inside, along / along.max() * across, 0)


def test_a_distance_map_model_gets_the_centre_prominence_that_finds_the_cells_best():
    from cellseg.config import PredictConfig
    from cellseg.evaluate import PROMINENCES, postprocessing_decision
    from cellseg.postprocess import CellMaps, split_at_distance_peaks

    mask, distance = two_peaked_map()
    assert split_at_distance_peaks(mask, distance, 0, 0.1).max() == 2 == split_at_distance_peaks(mask, distance, 0, 0.05).max()
    assert split_at_distance_peaks(mask, distance, 0, 0.15).max() == 1
    maps = [CellMaps(mask.astype(np.float32), distance.astype(np.float32))]
    config = PredictConfig(device="cpu")
    # The truth calls it one cell (a dented nucleus): only prominences above the dent keep it whole.
    choice, scores = postprocessing_decision(maps, [mask.astype(np.int32)], config, labelled=True)
    assert choice == (True, 0.5, 0.15)  # of the prominences that keep it whole, the one nearest 0.1
    assert {prominence for _, _, prominence in scores} == set(PROMINENCES)
    assert scores[(True, 0.5, 0.1)]["f1_mean"] < scores[(True, 0.5, 0.2)]["f1_mean"] == 1.0
    # The truth calls it two cells, parted at the dent: the default prominence is kept.
    halves = np.where(mask, 1 + (np.mgrid[0:40, 0:60][1] >= 30), 0).astype(np.int32)
    choice, _ = postprocessing_decision(maps, [halves], config, labelled=True)
    assert choice == (True, 0.5, 0.1)
    # A prominence the settings state is kept as stated.
    choice, scores = postprocessing_decision(maps, [halves], config, labelled=True, prominences=(0.2,))
    assert choice[2] == 0.2 and set(scores) == {(True, t, 0.2) for t in (0.3, 0.4, 0.5, 0.6)} | {
        (False, t, 0.2) for t in (0.3, 0.4, 0.5, 0.6)}


def test_the_decision_is_recorded_in_the_checkpoint_and_used_unless_overridden(tiny_checkpoint, tmp_path):
    from cellseg.checkpoint import load_checkpoint, save_checkpoint
    from cellseg.config import PredictConfig
    from cellseg.infer import Predictor

    checkpoint = load_checkpoint(str(tiny_checkpoint))
    assert checkpoint.centre_prominence == 0.1  # before any decision
    checkpoint.split_touching, checkpoint.threshold, checkpoint.centre_prominence = False, 0.3, 0.15
    save_checkpoint(checkpoint, str(tmp_path / "kept-whole.pt"))
    decided = Predictor.from_checkpoint(str(tmp_path / "kept-whole.pt"), PredictConfig(device="cpu")).config
    assert decided.split_touching is False and decided.threshold == 0.3 and decided.centre_prominence == 0.15
    forced = Predictor.from_checkpoint(str(tmp_path / "kept-whole.pt"), PredictConfig(
        device="cpu", split_touching=True, threshold=0.6, centre_prominence=0.05)).config
    assert forced.split_touching is True and forced.threshold == 0.6 and forced.centre_prominence == 0.05


@pytest.mark.parametrize("flag", ["--masks", "--labels"])
def test_a_microscope_image_given_as_truth_is_refused_naming_it(tmp_path, capsys, flag):
    from PIL import Image

    from cellseg.cli import main
    from cellseg.synth import generate_sample

    sample = generate_sample(np.random.default_rng(1), (64, 64), bit_depth=16)
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    store.write_result("x", sample.mask, {}, "x.png", {"version": "v1"})
    for folder, truth in (("labels", sample.labels), ("raw", sample.image), ("binary", sample.mask.astype(np.uint8) * 255)):
        (tmp_path / folder).mkdir()
        Image.fromarray(truth).save(tmp_path / folder / "x.png")
    masks = str(tmp_path / ("raw" if flag == "--masks" else "binary"))
    given = ["--labels", str(tmp_path / "raw")] if flag == "--labels" else []
    assert main(["evaluate", "--pred", store.url, "--masks", masks, *given]) == 2
    assert f"'{tmp_path / 'raw' / 'x.png'}' is not a label image" in capsys.readouterr().err
    scored = evaluate_store(store, str(tmp_path / "binary"), labels_url=str(tmp_path / "labels"))
    assert scored["instances"]["true_cells_total"] == len(np.unique(sample.labels)) - 1  # real labels are scored


def test_eight_bit_label_images_as_masks_give_the_cell_scores(tmp_path):
    from PIL import Image

    from cellseg.synth import generate_sample

    sample = generate_sample(np.random.default_rng(2), (64, 64))
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    store.write_result("x", sample.mask, {}, "x.png", {"version": "v1"})
    for folder, dtype in (("labels8", np.uint8), ("labels16", np.uint16)):
        (tmp_path / folder).mkdir()
        Image.fromarray(sample.labels.astype(dtype)).save(tmp_path / folder / "x.png")
    eight, sixteen = (evaluate_store(store, str(tmp_path / folder)) for folder in ("labels8", "labels16"))
    assert eight["labelled_images"] == 1 and eight["instances"] == sixteen["instances"]
    assert eight["instances"]["true_cells_total"] == len(np.unique(sample.labels)) - 1



def test_colour_label_images_as_masks_or_labels_give_the_cell_scores(tmp_path):
    """A label image saved as one colour per cell scores as its 16-bit original does, given as the
    masks or as the labels."""
    from PIL import Image

    from cellseg.synth import generate_sample

    sample = generate_sample(np.random.default_rng(2), (64, 64))
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    store.write_result("x", sample.mask, {}, "x.png", {"version": "v1"})
    rng = np.random.default_rng(4)
    colours = rng.integers(1, 256, (int(sample.labels.max()) + 1, 3)).astype(np.uint8)
    colours[0] = 0
    for folder, pixels in (("labels16", sample.labels.astype(np.uint16)), ("colour", colours[sample.labels])):
        (tmp_path / folder).mkdir()
        Image.fromarray(pixels).save(tmp_path / folder / "x.png")
    reference = evaluate_store(store, str(tmp_path / "labels16"))
    assert evaluate_store(store, str(tmp_path / "colour"))["instances"] == reference["instances"]
    given_as_labels = evaluate_store(store, str(tmp_path / "labels16"), labels_url=str(tmp_path / "colour"))
    assert given_as_labels["instances"] == reference["instances"]
    assert reference["instances"]["true_cells_total"] == len(np.unique(sample.labels)) - 1


def test_the_postprocessing_decision_reads_each_images_maps_once_and_lets_them_go():
    """At the end of training every choice was tried on every image's maps held at once: 12 bytes
    a pixel of the whole validation set. Now an image's maps go once its choices are scored."""
    import gc
    import weakref

    from cellseg.config import PredictConfig
    from cellseg.evaluate import postprocessing_decision
    from cellseg.postprocess import CellMaps

    mask, distance = two_peaked_map()
    held: list[weakref.ref] = []

    def maps_one_at_a_time():
        for _ in range(4):
            gc.collect()
            assert all(ref() is None for ref in held[:-1]), "the maps of an image scored before are still held"
            maps = CellMaps(mask.astype(np.float32), distance.astype(np.float32))
            held.append(weakref.ref(maps.probability))
            yield maps
            del maps

    choice, scores = postprocessing_decision(maps_one_at_a_time(), [mask.astype(np.int32)] * 4,
                                             PredictConfig(device="cpu"), labelled=True)
    assert len(held) == 4 and choice == (True, 0.5, 0.15)
    assert all(found["images"] == 4 for found in scores.values())
