"""What each step after the forward pass costs, beside the forward pass itself:

    python -m benchmarks.postprocess_stages [--images 8] [--dataset ../shared/data/dsb2018] [--out FILE]

Realistic maps: the shipped nuclei model on dsb2018 test images scaled and cropped to 512x512
(synthetic images from `cellseg.synth` where the dataset is absent). Per stage: CPU milliseconds
per image (the fastest of a few repeats, so that a busy neighbour does not decide it) and the
fraction of one forward pass of the same model on the same images (one torch thread, bf16 where
the CPU has it, as each of the product's shards runs it). Where the library replaced a recipe,
the old one (`reference_*` below, kept for this and for tests/test_postprocess.py) runs beside
it, with how far its labels agree.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from skimage.measure import regionprops_table
from skimage.morphology import local_maxima, reconstruction
from skimage.segmentation import watershed

from benchmarks.output import first_paragraph
from cellseg.bundled import shipped_checkpoint
from cellseg.checkpoint import load_checkpoint
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.io import list_images, read_image
from cellseg.measure import REGIONPROPS_PROPERTIES, cell_measurements
from cellseg.normalize import normalize_image
from cellseg.postprocess import split_at_distance_peaks, split_touching_cells, threshold_probabilities
from cellseg.scoring import instance_scores
from cellseg.stats import image_statistics, label_cells
from cellseg.synth import generate_sample

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SIDE = 512
_EIGHT = np.ones((3, 3), dtype=bool)


# The recipes the library replaced, as they were: scipy's labelling; per object, scipy's distance
# transform, skimage's h-maxima by reconstruction and a watershed of the object's box.
def reference_label_cells(mask: np.ndarray, min_cell_area: int = 0) -> np.ndarray:
    """`label_cells` with scipy's labelling."""
    labels, count = ndimage.label(mask, structure=_EIGHT)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    lookup = np.zeros(count + 1, dtype=np.int32)
    lookup[1:][areas >= min_cell_area] = np.arange(1, int((areas >= min_cell_area).sum()) + 1)
    return lookup[labels]


def reference_dome_markers(height: np.ndarray, h: float, inside: np.ndarray) -> tuple[np.ndarray, int]:
    """h-maxima markers as skimage finds them (the regional maxima of the reconstruction)."""
    domes = reconstruction(height - h, height, method="dilation")
    return ndimage.label(local_maxima(domes) & inside, structure=_EIGHT)


def reference_split_touching_cells(mask: np.ndarray, min_cell_area: int = 0, split_depth: float = 0.5) -> np.ndarray:
    """`split_touching_cells` as it was: each object's distance smoothed inside its own box."""
    smallest_pair = 2 * np.pi * split_depth**2

    def split(cell: np.ndarray, _: tuple[slice, ...]) -> np.ndarray | None:
        if cell.sum() < smallest_pair:
            return None
        distance = ndimage.gaussian_filter(ndimage.distance_transform_edt(cell), sigma=1.0)
        peaks = (distance == ndimage.maximum_filter(distance, size=5)) & (distance >= split_depth) & cell
        if ndimage.label(peaks, structure=_EIGHT)[1] < 2:
            return None
        markers, count = reference_dome_markers(distance, split_depth, cell)
        return watershed(-distance, markers, mask=cell, connectivity=2) if count >= 2 else None

    return _reference_split_objects(reference_label_cells(mask, min_cell_area), split)


def reference_split_at_distance_peaks(mask: np.ndarray, distance: np.ndarray, min_cell_area: int = 0,
                                      prominence: float = 0.1) -> np.ndarray:
    """`split_at_distance_peaks` as it was: h-maxima and a watershed per object."""
    smooth = ndimage.gaussian_filter(distance.astype(np.float32, copy=False), sigma=1.0)

    def split(cell: np.ndarray, box: tuple[slice, ...]) -> np.ndarray | None:
        peaks = np.where(cell, smooth[box], 0.0)
        markers, count = reference_dome_markers(peaks, prominence, cell)
        return watershed(-peaks, markers, mask=cell, connectivity=2) if count >= 2 else None

    return _reference_split_objects(reference_label_cells(mask, min_cell_area), split)


def _reference_split_objects(components: np.ndarray,
                             split: Callable[[np.ndarray, tuple[slice, ...]], np.ndarray | None]) -> np.ndarray:
    labels = components.copy()
    next_label = int(components.max(initial=0)) + 1
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        padded = tuple(slice(max(side.start - 1, 0), side.stop + 1) for side in box)
        pieces = split(components[padded] == index, padded)
        if pieces is not None:
            region = labels[padded]
            region[pieces > 1] = pieces[pieces > 1] + (next_label - 2)
            next_label += int(pieces.max()) - 1
    return labels


def square_images(count: int, dataset: Path) -> tuple[str, list[np.ndarray]]:
    """`count` SIDE x SIDE images: the dataset's (spread over its list; scaled up so that the
    shorter side is SIDE, then centre-cropped), else synthetic ones."""
    folder = dataset / "images"
    if not folder.is_dir():
        rng = np.random.default_rng(7)
        return "synthetic", [generate_sample(rng, (SIDE, SIDE)).image for _ in range(count)]
    urls = list_images(str(folder))
    images = []
    for url in urls[:: max(1, len(urls) // count)][:count]:
        image = read_image(url)
        scale = SIDE / min(image.shape)
        if scale > 1:
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        top, left = (image.shape[0] - SIDE) // 2, (image.shape[1] - SIDE) // 2
        images.append(np.ascontiguousarray(image[top : top + SIDE, left : left + SIDE]))
    return dataset.name, images


def cpu_ms(function: Callable[[], Any], repeats: int) -> float:
    """Fewest CPU milliseconds (all threads of this process) of `repeats` calls."""
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        function()
        best = min(best, time.process_time() - started)
    return best * 1000


def bench_postprocess(images: int = 8, dataset: Path = DATA / "dsb2018", repeats: int = 3) -> dict:
    """Per stage: CPU ms per SIDE x SIDE image, its fraction of the forward pass, and the old
    recipe's ms and agreement where one was replaced."""
    source, raw = square_images(images, dataset)
    predictor = Predictor(load_checkpoint(shipped_checkpoint("nuclei")), PredictConfig(device="cpu"))
    config = predictor.config
    maps = predictor.cell_maps(raw)
    normalised = [normalize_image(image, predictor.normalization) for image in raw]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        predictor.forward_one(normalised[0])  # first-call allocations are not part of the cost
        forward = float(np.mean([cpu_ms(lambda x=x: predictor.forward_one(x), repeats) for x in normalised]))
    finally:
        torch.set_num_threads(threads)

    masks = [threshold_probabilities(m.probability, config.threshold or 0.5) for m in maps]
    distances = [m.distance for m in maps]
    assert all(d is not None for d in distances), "the nuclei model predicts a distance map"
    area, depth, prominence = config.min_cell_area, config.split_depth, config.centre_prominence
    peaks = [split_at_distance_peaks(mask, d, area, prominence) for mask, d in zip(masks, distances, strict=True)]

    def per_image(function: Callable[..., Any], arguments: list[tuple]) -> float:
        return float(np.mean([cpu_ms(lambda a=a: function(*a), repeats) for a in arguments]))

    def agreement(new: Callable[..., np.ndarray], old: Callable[..., np.ndarray], arguments: list[tuple]) -> dict:
        pairs = [(new(*a), old(*a)) for a in arguments]
        scores = [instance_scores(ours, theirs) for ours, theirs in pairs]
        tp, fp, fn = (sum(score[key] for score in scores) for key in ("tp", "fp", "fn"))
        return {"identical_images": sum(bool((ours == theirs).all()) for ours, theirs in pairs),
                "f1_vs_before": 2 * tp / max(2 * tp + fp + fn, 1),
                "pixels_in_another_cell": float(np.mean([moved_pixels(ours, theirs) for ours, theirs in pairs]))}

    masks_only = [(mask, area) for mask in masks]
    with_map = [(mask, d, area, prominence) for mask, d in zip(masks, distances, strict=True)]
    necks = [(mask, area, depth) for mask in masks]
    measured = list(zip(peaks, raw, strict=True))
    stages: dict[str, dict[str, Any]] = {
        "threshold": {"ms": per_image(threshold_probabilities, [(m.probability, 0.5) for m in maps])},
        "connected_components": {"ms": per_image(label_cells, masks_only),
                                 "before_ms": per_image(reference_label_cells, masks_only),
                                 **agreement(lambda *a: label_cells(*a)[0], reference_label_cells, masks_only)},
        "split_distance_peaks": {"ms": per_image(split_at_distance_peaks, with_map),
                                 "before_ms": per_image(reference_split_at_distance_peaks, with_map),
                                 **agreement(split_at_distance_peaks, reference_split_at_distance_peaks, with_map)},
        "split_necks": {"ms": per_image(split_touching_cells, necks),
                        "before_ms": per_image(reference_split_touching_cells, necks),
                        **agreement(split_touching_cells, reference_split_touching_cells, necks)},
        "statistics": {"ms": per_image(lambda cells, image: image_statistics(image, cells), measured)},
        "cell_table": {"ms": per_image(cell_measurements, measured),
                       "before_ms": per_image(lambda cells, image: regionprops_table(
                           cells, intensity_image=image.astype(np.float64), properties=REGIONPROPS_PROPERTIES), measured)},
    }
    for stage in stages.values():
        stage["fraction_of_forward"] = stage["ms"] / forward
    # As `cellseg predict` runs it for this model: threshold, split at the map's peaks (which
    # includes the connected components), statistics and the per-cell table.
    chain = ("threshold", "split_distance_peaks", "statistics", "cell_table")
    total = sum(stages[name]["ms"] for name in chain)
    before = sum(stages[name].get("before_ms", stages[name]["ms"]) for name in chain)
    return {"source": source, "images": len(raw), "side": SIDE, "model": "nuclei", "repeats": repeats,
            "cells_per_image": float(np.mean([cells.max() for cells in peaks])), "forward_ms": forward,
            "stages": stages, "postprocess_ms": total, "postprocess_before_ms": before,
            "postprocess_vs_forward": total / forward, "postprocess_before_vs_forward": before / forward}


def moved_pixels(ours: np.ndarray, theirs: np.ndarray) -> float:
    """Fraction of cell pixels of `theirs` not in the cell of `ours` that overlaps their cell most."""
    inside = theirs > 0
    if not inside.any():
        return 0.0
    pairs, counts = np.unique(np.stack([theirs[inside], ours[inside]]), axis=1, return_counts=True)
    best = np.zeros(int(theirs.max()) + 1, dtype=np.int64)
    np.maximum.at(best, pairs[0], counts)
    return 1 - best.sum() / inside.sum()


def ratios(result: dict) -> dict[str, float]:
    """The stable `ratios.*` keys of `make bench`: CPU time over the forward pass's, per 512^2 image."""
    stages = result["stages"]
    return {"postprocess_vs_forward": result["postprocess_vs_forward"],
            "postprocess_before_vs_forward": result["postprocess_before_vs_forward"],
            "postprocess_split_vs_forward": stages["split_distance_peaks"]["fraction_of_forward"],
            "postprocess_split_necks_vs_forward": stages["split_necks"]["fraction_of_forward"],
            "postprocess_table_vs_forward": stages["cell_table"]["fraction_of_forward"],
            "postprocess_statistics_vs_forward": stages["statistics"]["fraction_of_forward"]}


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    """(name, value, ratio / target) rows for `make bench`'s table, one per stage and the total."""
    forward = result["forward_ms"]
    rows = [(f"post-processing stages, {result['source']} 512^2", f"forward pass {forward:.0f} ms CPU per image",
             f"{result['cells_per_image']:.0f} cells per image, {result['model']} model")]
    for name, stage in result["stages"].items():
        before = f", was {stage['before_ms']:.1f} ms ({stage['before_ms'] / forward:.3f})" if "before_ms" in stage else ""
        rows.append((f"  {name.replace('_', ' ')}", f"{stage['ms']:.2f} ms per image",
                     f"{stage['fraction_of_forward']:.3f} of forward{before}"))
    rows.append(("  post-processing, all stages", f"{result['postprocess_ms']:.1f} ms per image",
                 f"{result['postprocess_vs_forward']:.3f} of forward (target with writes <= 0.15), "
                 f"was {result['postprocess_before_vs_forward']:.3f}"))
    return rows


def print_stages(result: dict) -> None:
    """The table: per stage ms per image, the fraction of the forward pass, the old recipe beside it."""
    print(f"{result['images']} {result['side']}^2 images ({result['source']}, {result['cells_per_image']:.0f} cells each), "
          f"{result['model']} model; forward pass {result['forward_ms']:.0f} ms CPU per image")
    print(f"{'stage':<22} {'ms/image':>9} {'of forward':>11}   before (ms, of forward, labels)")
    for name, stage in result["stages"].items():
        line = f"{name:<22} {stage['ms']:9.2f} {stage['fraction_of_forward']:11.3f}"
        if "before_ms" in stage:
            line += f"   {stage['before_ms']:.2f} ms, {stage['before_ms'] / result['forward_ms']:.3f}"
        if "f1_vs_before" in stage:
            line += (f", identical on {stage['identical_images']}/{result['images']} images, F1 {stage['f1_vs_before']:.4f}, "
                     f"{stage['pixels_in_another_cell']:.4%} of cell pixels moved")
        print(line)
    print(f"{'post-processing':<22} {result['postprocess_ms']:9.2f} {result['postprocess_vs_forward']:11.3f}   "
          f"{result['postprocess_before_ms']:.2f} ms, {result['postprocess_before_vs_forward']:.3f}  "
          "(threshold + split at peaks + statistics + cell table; target with writes <= 0.15)")


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--dataset", type=Path, default=DATA / "dsb2018")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    result = bench_postprocess(args.images, args.dataset, args.repeats)
    print_stages(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
