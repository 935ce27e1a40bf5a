"""What estimating each image's cell size costs and how close it comes, on a test set:

    python -m benchmarks.cell_size [--model nuclei] [--dataset ../shared/data/dsb2018]

Times three ways of predicting every image with a model trained at a cell size: with the size
estimated (the default, no settings), with the true median nucleus diameter stated
(`--cell-diameter`: one pass at the right scale), and one plain forward pass at the image's own
scale. Prints the ratios and, per image, the estimated, found (the median cell segmented at the
estimate: the size the image's statistics report) and true diameters; and the cell F1 at
IoU 0.5 with the size estimated and with the true size stated, which says what the estimate's
misses cost in cells.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.output import first_paragraph
from cellseg.bundled import shipped_checkpoint, shipped_name
from cellseg.checkpoint import load_checkpoint
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.io import image_stem, list_images, read_image
from cellseg.postprocess import cell_labels
from cellseg.scale import median_cell_diameter
from cellseg.scoring import instance_scores

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIZE_TOLERANCE = 0.25  # a cell size counts as right within 25% of the true median diameter


def size_agreement(sizes: Sequence[float | None], truths: Sequence[float], prefix: str = "") -> dict:
    """The share of `sizes` within SIZE_TOLERANCE of `truths` and their median relative error, as
    `<prefix>within_25_percent` and `<prefix>median_relative_error` (None without sizes); a size of
    None (no cells found) counts as 0."""
    errors = np.abs(np.array([size or 0.0 for size in sizes], dtype=np.float64) / np.array(truths, dtype=np.float64) - 1)
    return {f"{prefix}within_25_percent": float(np.mean(errors <= SIZE_TOLERANCE)) if errors.size else None,
            f"{prefix}median_relative_error": float(np.median(errors)) if errors.size else None}


def bench_cell_size(model: str = "nuclei", dataset: Path = DATA / "dsb2018") -> dict:
    """Seconds for the three ways over the dataset's images, their ratios and the size estimates."""
    checkpoint = load_checkpoint(shipped_checkpoint(model) if shipped_name(model) else model)
    if not isinstance(checkpoint.model_config.cell_diameter, float | int):
        raise ValueError(f"'{model}' has no cell size: nothing to estimate")
    native_model = dataclasses.replace(checkpoint, model_config=checkpoint.model_config.model_copy(
        update={"cell_diameter": None}))
    urls = list_images(str(dataset / "images"))
    images = [read_image(url) for url in urls]
    labels = [read_image(str(dataset / "labels" / Path(url).name)) for url in urls]
    truths = [median_cell_diameter(image_labels) for image_labels in labels]
    config = PredictConfig(device="cpu")
    estimated = Predictor(checkpoint, config)
    native = Predictor(native_model, config)
    estimated.cell_maps(images[:1])  # warm-up: first-call allocations are not part of the cost
    seconds = {"estimated": 0.0, "stated": 0.0, "native": 0.0}
    rows: list[dict[str, Any]] = []
    for url, image, truth, image_labels in zip(urls, images, truths, labels, strict=True):
        started = time.perf_counter()
        (maps,) = estimated.cell_maps([image])
        seconds["estimated"] += time.perf_counter() - started
        stated = Predictor(checkpoint, config.model_copy(update={"cell_diameter": truth}))
        started = time.perf_counter()
        (stated_maps,) = stated.cell_maps([image])
        seconds["stated"] += time.perf_counter() - started
        started = time.perf_counter()
        native.cell_maps([image])
        seconds["native"] += time.perf_counter() - started
        scale = maps.scale or {}
        cells = cell_labels(maps, estimated.config)
        rows.append({"image_id": image_stem(url), "true_diameter": truth,
                     "estimated_diameter": scale.get("cell_diameter"),
                     "found_diameter": median_cell_diameter(cells),
                     "factor": scale.get("factor"),
                     "f1_estimated": instance_scores(cells, image_labels)["f1"],
                     "f1_stated": instance_scores(cell_labels(stated_maps, stated.config), image_labels)["f1"]})
    sized = [row for row in rows if row["estimated_diameter"] and row["true_diameter"]]
    truths = [row["true_diameter"] for row in sized]
    return {
        "model": model, "dataset": dataset.name, "images": len(images), "seconds": seconds,
        "estimated_vs_stated": seconds["estimated"] / seconds["stated"],
        "estimated_vs_native": seconds["estimated"] / seconds["native"],
        **size_agreement([row["estimated_diameter"] for row in sized], truths),
        **size_agreement([row["found_diameter"] for row in sized], truths, prefix="found_"),
        "f1_estimated": float(np.mean([row["f1_estimated"] for row in rows])),
        "f1_stated": float(np.mean([row["f1_stated"] for row in rows])),
        "per_image": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--model", default="nuclei", help="a shipped model's name or a checkpoint file")
    parser.add_argument("--dataset", type=Path, default=DATA / "dsb2018")
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    result = bench_cell_size(args.model, args.dataset)
    for row in result["per_image"]:
        print(f"{row['image_id']:<24} true {row['true_diameter']:6.1f}  estimated {row['estimated_diameter'] or 0:6.1f}"
              f"  found {row['found_diameter'] or 0:6.1f}")
    print(f"{result['images']} images: estimated size {result['seconds']['estimated']:.1f} s, stated size "
          f"{result['seconds']['stated']:.1f} s, plain pass at the image's scale {result['seconds']['native']:.1f} s; "
          f"{result['estimated_vs_stated']:.2f}x stated, {result['estimated_vs_native']:.2f}x plain; "
          f"estimate within 25% on {result['within_25_percent']:.0%}, median error {result['median_relative_error']:.0%}; "
          f"median cell found within 25% on {result['found_within_25_percent']:.0%}, "
          f"median error {result['found_median_relative_error']:.0%}; "
          f"cell F1 {result['f1_estimated']:.3f} with the size estimated, {result['f1_stated']:.3f} with the true size stated")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
