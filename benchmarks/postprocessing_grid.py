"""Every post-processing choice of a model scored on labelled images, beside the one its training made.

    python -m benchmarks.postprocessing_grid --dataset ../shared/data/dsb2018-train --model nuclei --recipe-val
    python -m benchmarks.postprocessing_grid --dataset ../shared/data/dsb2018 --model nuclei

Each image is predicted once, as `cellseg predict` predicts it (its cell size estimated), and its
maps are labelled at every probability threshold and centre prominence of the grid, with touching
cells split and kept whole, as `cellseg.evaluate.postprocessing_decision` judges a model's choices
when its training ends (the grid here is wider than training's). Prints, per choice, the mean
cell F1 at IoU 0.5, the DSB score, the median count error and the merged and split nuclei, and
marks the checkpoint's own choice and the best F1 here. On validation images this shows how
sharp the training's decision was; on test images it is for reading only, never for choosing.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.error_sources import labelled_pairs
from benchmarks.output import first_paragraph
from cellseg.bundled import shipped_checkpoint, shipped_name
from cellseg.config import PredictConfig
from cellseg.evaluate import postprocessing_decision
from cellseg.infer import Predictor
from cellseg.io import read_image

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.6)
PROMINENCES = (0.05, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3)
COLUMNS = ("f1_mean", "dsb_score_mean", "count_error_median", "merged_total", "split_total")


def grid_scores(predictor: Predictor, pairs: Sequence[tuple[Path, Path]], thresholds: Sequence[float] = THRESHOLDS,
                prominences: Sequence[float] = PROMINENCES) -> dict:
    """The scores of every choice on the (image, instance labels) files of `pairs`, the
    checkpoint's own choice and the best cell F1 of the grid."""
    maps = [predictor.cell_maps([read_image(str(image))])[0] for image, _ in pairs]
    truths = [read_image(str(labels)).astype(np.int32) for _, labels in pairs]
    best, scores = postprocessing_decision(maps, truths, predictor.config, labelled=True,
                                           thresholds=thresholds, prominences=prominences)
    own = (predictor.checkpoint.split_touching, predictor.checkpoint.threshold, predictor.checkpoint.centre_prominence)
    return {"images": len(pairs), "own_choice": list(own), "best_choice": list(best),
            "rows": [{"split_touching": split, "threshold": threshold, "centre_prominence": prominence,
                      **{column: found[column] for column in COLUMNS}}
                     for (split, threshold, prominence), found in sorted(scores.items())]}


def print_table(result: dict) -> None:
    print(f"{result['images']} images; (split, threshold, prominence): the checkpoint's {tuple(result['own_choice'])}, "
          f"the best F1 here {tuple(result['best_choice'])}")
    print("| split | threshold | prominence | cell F1 | DSB score | count error | merged | split apart | |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in result["rows"]:
        choice = [row["split_touching"], row["threshold"], row["centre_prominence"]]
        marks = " ".join(mark for mark, chosen in (("checkpoint", result["own_choice"]), ("best", result["best_choice"]))
                         if choice == chosen)
        prominence = f"{row['centre_prominence']:g}" if row["split_touching"] else "-"
        print(f"| {'yes' if row['split_touching'] else 'no'} | {row['threshold']:g} | {prominence} | {row['f1_mean']:.4f} | "
              f"{row['dsb_score_mean']:.4f} | {row['count_error_median']:.1%} | {row['merged_total']} | "
              f"{row['split_total']} | {marks} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--dataset", required=True, type=Path, help="folder with images/ and labels/")
    parser.add_argument("--model", default="nuclei", help="a shipped model's name or a checkpoint file")
    parser.add_argument("--recipe-val", action="store_true",
                        help="only the validation images of the shipped nuclei model's recipe")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    try:
        pairs = labelled_pairs(args.dataset, args.recipe_val)
    except FileNotFoundError as error:
        parser.error(str(error))
    checkpoint = shipped_checkpoint(args.model) if shipped_name(args.model) else args.model
    result = grid_scores(Predictor.from_checkpoint(checkpoint, PredictConfig()), pairs)
    print_table(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
