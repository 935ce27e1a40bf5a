"""Where the product's time per image goes, on `make bench`'s own images and model: each stage of
`segment-images` timed alone, on one thread, beside the forward pass.

    python -m benchmarks.product_stages --checkpoint runs/benchmarks/work/model-1/best.pt \
        --images runs/benchmarks/work/infer/images [--count 60] [--out FILE]

On a CPU the two shards' forward passes keep every core busy, so the other stages of an image add
to its time instead of hiding behind the model: with all of them overlapped perfectly, the
product reaches at most forward / (forward + the rest) of the model alone (`bound_vs_model_only`),
before Prefect's own cost per run. `make bench` prints it beside the measured ratio.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from benchmarks.output import first_paragraph, show_and_save
from cellseg.config import PredictConfig
from cellseg.infer import Predictor, forward_probabilities
from cellseg.io import list_images, read_image
from cellseg.measure import CELL_COLUMNS, cell_measurements
from cellseg.normalize import normalize_image
from cellseg.postprocess import cell_labels
from cellseg.runtime import set_threads
from cellseg.source_record import with_area_um2
from cellseg.stats import image_statistics
from cellseg.store import ResultStore

FORWARD_IMAGES = 20  # the forward pass is the slow stage: fewer images time it well enough


def _per_image_ms(run: Callable[[], Any], images: int) -> tuple[Any, float]:
    started = time.perf_counter()
    result = run()
    return result, (time.perf_counter() - started) / images * 1e3


def bench_product_stages(checkpoint: Path, image_urls: list[str], count: int = 60) -> dict:
    """Milliseconds per image of each stage, on one torch and one OpenCV thread (as each shard
    runs them)."""
    urls = image_urls[:count]
    threads_before = torch.get_num_threads(), cv2.getNumThreads()
    set_threads(1)
    try:
        predictor = Predictor.from_checkpoint(str(checkpoint), PredictConfig())
        config = predictor.config
        # Each compiled step is loaded (or compiled, on a fresh checkout) by a first call before it is timed.
        read_image(urls[0])
        images, read_ms = _per_image_ms(lambda: [read_image(url) for url in urls], len(urls))
        normalised, normalise_ms = _per_image_ms(
            lambda: [normalize_image(image, predictor.normalization) for image in images], len(urls))
        forward_probabilities(predictor.forward_model, normalised[0][None], predictor.device, config.amp)  # warm-up
        _, forward_ms = _per_image_ms(lambda: [
            forward_probabilities(predictor.forward_model, image[None], predictor.device, config.amp)
            for image in normalised[:FORWARD_IMAGES]], min(FORWARD_IMAGES, len(urls)))
        maps = predictor.normalised_cell_maps(normalised)
        cell_labels(maps[0], config)
        labels, split_ms = _per_image_ms(lambda: [cell_labels(m, config) for m in maps], len(urls))
        image_statistics(images[0], labels[0])
        cell_measurements(labels[0], images[0])
        statistics, statistics_ms = _per_image_ms(
            lambda: [image_statistics(image, cells) for image, cells in zip(images, labels, strict=True)], len(urls))
        tables, table_ms = _per_image_ms(
            lambda: [with_area_um2(CELL_COLUMNS, cell_measurements(cells, image), {})
                     for image, cells in zip(images, labels, strict=True)], len(urls))
        with tempfile.TemporaryDirectory(prefix="cellseg-stages-") as folder:
            store = ResultStore.open(str(Path(folder) / "stages.zarr"))

            def write(prefix: str, with_image: bool) -> None:
                for index, (image, cells, stats, table) in enumerate(zip(images, labels, statistics, tables, strict=True)):
                    store.write_result(f"{prefix}{index}", cells > 0, stats, urls[index], {"version": "bench"},
                                       replace=False, cells=cells, cell_table=table,
                                       image=image if with_image else None)

            # Alternated and the faster of two kept: the store's first writes also create its groups.
            plain, copied = [], []
            for round_index in range(2):
                plain.append(_per_image_ms(partial(write, f"plain{round_index}-", False), len(urls))[1])
                copied.append(_per_image_ms(partial(write, f"copy{round_index}-", True), len(urls))[1])
            write_ms, write_with_image_ms = min(plain), min(copied)
    finally:
        torch.set_num_threads(threads_before[0])
        cv2.setNumThreads(threads_before[1])
    stages = {"read": read_ms, "normalise": normalise_ms, "split": split_ms, "statistics": statistics_ms,
              "cell_table": table_ms, "write": write_ms, "image_copy": write_with_image_ms - write_ms}
    rest = sum(stages.values())
    return {"images": len(urls), "forward_ms": forward_ms, "stages_ms": stages, "rest_ms": rest,
            "rest_vs_forward": rest / forward_ms, "bound_vs_model_only": forward_ms / (forward_ms + rest),
            "cells_per_image": float(np.mean([cells.max() for cells in labels])),
            "foreground": float(np.mean([(cells > 0).mean() for cells in labels]))}


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    stages = ", ".join(f"{name} {ms:.1f}" for name, ms in result["stages_ms"].items())
    return [("product stages alone, ms per image (1 thread)",
             f"forward {result['forward_ms']:.0f}; {stages}",
             f"the rest {result['rest_vs_forward']:.2f} of a forward pass: product <= "
             f"{result['bound_vs_model_only']:.2f}x model only on cores the model fills")]


def ratios(result: dict) -> dict[str, float]:
    return {"product_stages_rest_vs_forward": result["rest_vs_forward"],
            "product_stages_bound_vs_model_only": result["bound_vs_model_only"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--images", required=True, help="a folder of images (make bench's: runs/benchmarks/work/infer/images)")
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    result = bench_product_stages(args.checkpoint, list_images(args.images), args.count)
    print(json.dumps(result, indent=1))
    show_and_save(table_rows(result), result, args.out)


if __name__ == "__main__":
    main()
