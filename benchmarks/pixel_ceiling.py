"""How close a model's pixel errors are to the precision of the labels themselves: the numbers
behind the README's isbi2012 Dice paragraph.

    python -m benchmarks.pixel_ceiling --dataset ../shared/data/isbi2012 --runs runs/a runs/b ...

On the validation images of the first run (`<run>/split.json`) it prints, as one JSON object:
- `shifted_truth`: mean Dice of the ground truth against itself with every cell grown by one
  pixel, shrunk by one pixel, and moved one pixel sideways: what a one-pixel disagreement about
  where the boundaries lie costs, with no other error at all.
- `runs`: each run's mean Dice (its `best.pt`, threshold 0.5), and `ensemble`: the Dice of the
  runs' probabilities averaged.
- `wrong_pixels`: where the first run's wrong pixels lie: the share on the boundary itself (a
  cell pixel next to background or the reverse, in the ground truth) and within one more pixel.
- `shifted_labels`, where the dataset has instance labels: F1 at IoU 0.5 and the DSB2018 score of
  the true labels against themselves with every cell grown, shrunk or moved by one pixel: what
  such a boundary disagreement alone costs at cell level.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.segmentation import expand_labels

from benchmarks.output import first_paragraph
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.io import read_image, read_mask
from cellseg.metrics import MetricAccumulator, confusion_counts, segmentation_scores
from cellseg.scoring import instance_scores, summarise_instance_scores


def boundary_pixels(truth: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour of the other class: both sides of every cell/background boundary."""
    return ndimage.binary_dilation(truth) & ~ndimage.binary_erosion(truth, border_value=1)


def shifted_truth_dice(truth: np.ndarray) -> dict[str, float]:
    return {
        "grown_1px": segmentation_scores(ndimage.binary_dilation(truth), truth)["dice"],
        "shrunk_1px": segmentation_scores(ndimage.binary_erosion(truth, border_value=1), truth)["dice"],
        "moved_1px": segmentation_scores(np.roll(truth, 1, axis=1), truth)["dice"],
    }


def shrink_labels(labels: np.ndarray) -> np.ndarray:
    """Every cell of an instance label image eroded by one pixel (cells may touch, so one by one)."""
    shrunk = np.zeros_like(labels)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None:
            # one pixel of margin, so that only the image's own edge counts as inside the cell
            window = tuple(slice(max(side.start - 1, 0), side.stop + 1) for side in box)
            shrunk[window][ndimage.binary_erosion(labels[window] == index, border_value=1)] = index
    return shrunk


def shifted_labels_scores(labels: list[np.ndarray]) -> dict[str, dict[str, float]]:
    changes = {"grown_1px": lambda cells: expand_labels(cells, 1), "shrunk_1px": shrink_labels,
               "moved_1px": lambda cells: np.roll(cells, 1, axis=1)}
    result = {}
    for name, change in changes.items():
        summary = summarise_instance_scores([instance_scores(change(cells), cells) for cells in labels])
        result[name] = {"f1": summary["f1_mean"], "dsb_score": summary["dsb_score_mean"]}
    return result


def wrong_pixel_distances(prediction: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    """(wrong pixels, of them on a boundary pixel, of them within one pixel of one)."""
    wrong = prediction != truth
    distance = ndimage.distance_transform_edt(~boundary_pixels(truth))
    return int(wrong.sum()), int((wrong & (distance == 0)).sum()), int((wrong & (distance <= 1)).sum())


def measure(dataset: Path, runs: list[Path]) -> dict:
    ids = sorted(json.loads((runs[0] / "split.json").read_text())["val"])
    images = {i: read_image(str(dataset / "images" / f"{i}.png")) for i in ids}
    truths = {i: read_mask(str(dataset / "masks" / f"{i}.png")) for i in ids}
    probabilities = {}
    for run in runs:
        predictor = Predictor.from_checkpoint(str(run / "best.pt"), PredictConfig(device="cpu"))
        probabilities[run] = {i: maps.probability for i, maps in zip(ids, predictor.cell_maps([images[i] for i in ids]), strict=True)}

    def mean_dice(probability_of: dict[str, np.ndarray]) -> float:
        scores = MetricAccumulator(confusion_counts(probability_of[i] > 0.5, truths[i]) for i in ids)
        return scores.mean()["dice"]

    averaged = {i: np.mean([probabilities[run][i] for run in runs], axis=0) for i in ids}
    wrong, on_boundary, near_boundary = np.sum([wrong_pixel_distances(probabilities[runs[0]][i] > 0.5, truths[i])
                                                for i in ids], axis=0)
    shifted = [shifted_truth_dice(truths[i]) for i in ids]
    result = {
        "dataset": dataset.name, "images": len(ids),
        "shifted_truth": {key: float(np.mean([row[key] for row in shifted])) for key in shifted[0]},
        "runs": {str(run): mean_dice(probabilities[run]) for run in runs},
        "ensemble": mean_dice(averaged),
        "wrong_pixels": {"run": str(runs[0]), "total": int(wrong), "on_boundary": float(on_boundary / max(wrong, 1)),
                         "within_1px_of_boundary": float(near_boundary / max(wrong, 1))},
    }
    if (dataset / "labels").is_dir():
        result["shifted_labels"] = shifted_labels_scores([read_image(str(dataset / "labels" / f"{i}.png")) for i in ids])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--dataset", required=True, type=Path, help="folder with images/, masks/ and maybe labels/")
    parser.add_argument("--runs", required=True, type=Path, nargs="+", help="training output folders (best.pt, split.json)")
    args = parser.parse_args()
    print(json.dumps(measure(args.dataset, args.runs), indent=1))


if __name__ == "__main__":
    main()
