"""What resampling costs a model at a cell size, per image: SciPy's way against the product's.

    python -m benchmarks.resampling [--dataset ../shared/data/dsb2018] [--model-diameter 19]

Each image of the dataset is resampled as prediction at its cell size resamples it: the image to
the scale where its median nucleus (from its labels) is `--model-diameter` across (the shipped
nuclei model's size), then two output maps of that scale back to the image's grid. Timed on one
thread, side by side in turns, with `scipy.ndimage` (Gaussian smoothing when shrinking, then
`zoom`, which `cellseg.scale.resize` did before) and with `cellseg.scale.resize` (OpenCV); prints
the milliseconds per resampled image, the ratio and the largest difference between the two.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from benchmarks.output import first_paragraph
from cellseg.config import NormalizationConfig
from cellseg.io import list_images, read_image
from cellseg.normalize import normalize_image
from cellseg.scale import SCALE_TOLERANCE, median_cell_diameter, resize, scale_factor, scaled_shape

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ROUNDS = 3


def scipy_resize(array: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Order-1 resampling the SciPy way: smoothed by a Gaussian of sigma (1 / factor - 1) / 2 on
    each shrunk axis, then `zoom` with pixel areas aligned and edges repeated."""
    factors = (shape[0] / array.shape[0], shape[1] / array.shape[1])
    if min(factors) < 1.0:
        array = ndimage.gaussian_filter(array, [max(0.0, (1.0 / f - 1.0) / 2.0) for f in factors], mode="nearest")
    return ndimage.zoom(array, factors, order=1, mode="nearest", grid_mode=True)


def bench_resampling(dataset: Path = DATA / "dsb2018", model_diameter: float = 19.0) -> dict:
    urls = list_images(str(dataset / "images"))
    work = []
    for url in urls:
        diameter = median_cell_diameter(read_image(str(dataset / "labels" / Path(url).name)))
        image = normalize_image(read_image(url), NormalizationConfig())
        factor = scale_factor(diameter, model_diameter, image.shape)
        if diameter and abs(factor - 1.0) >= SCALE_TOLERANCE:
            maps = np.random.default_rng(len(work)).random((2, *scaled_shape(image.shape, factor)), dtype=np.float32)
            work.append((image, maps))
    if not work:
        raise FileNotFoundError(f"no image of {dataset} needs resampling")

    def run(method: Callable[[np.ndarray, tuple[int, int]], np.ndarray]) -> tuple[float, list[np.ndarray]]:
        started, results = time.perf_counter(), []
        for image, maps in work:
            results.append(method(image, maps.shape[1:]))
            results.extend(method(channel, image.shape) for channel in maps)
        return (time.perf_counter() - started) / len(work) * 1e3, results

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        timings: dict[str, list[float]] = {"scipy": [], "opencv": []}
        for _ in range(ROUNDS):
            scipy_ms, expected = run(scipy_resize)
            opencv_ms, got = run(lambda array, shape: resize(array, shape, order=1))
            timings["scipy"].append(scipy_ms)
            timings["opencv"].append(opencv_ms)
    finally:
        cv2.setNumThreads(threads)
    scipy_ms, opencv_ms = min(timings["scipy"]), min(timings["opencv"])
    return {"images": len(urls), "resampled_images": len(work), "scipy_ms_per_image": scipy_ms,
            "opencv_ms_per_image": opencv_ms, "speedup": scipy_ms / opencv_ms,
            "largest_difference": max(float(np.abs(a - b).max()) for a, b in zip(expected, got, strict=True))}


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    return [("resampling to the cell size and back, ms per image (1 thread)",
             f"scipy {result['scipy_ms_per_image']:.1f}, opencv {result['opencv_ms_per_image']:.1f} "
             f"({result['resampled_images']} of {result['images']} images)",
             f"{result['speedup']:.1f}x faster, largest difference {result['largest_difference']:.1e}")]


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--dataset", type=Path, default=DATA / "dsb2018")
    parser.add_argument("--model-diameter", type=float, default=19.0)
    args = parser.parse_args()
    result = bench_resampling(args.dataset, args.model_diameter)
    print(json.dumps(result, indent=1))
    for row in table_rows(result):
        print(" | ".join(row))


if __name__ == "__main__":
    main()
