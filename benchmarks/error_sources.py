"""Where a model's cell F1 is lost on a labelled dataset: its foreground, its split of touching
cells, or the outlines the dataset's annotators drew.

    python -m benchmarks.error_sources --dataset ../shared/data/dsb2018 --model nuclei
    python -m benchmarks.error_sources --dataset ../shared/data/dsb2018-train --model nuclei --recipe-val

Every image is predicted once the way `cellseg predict` predicts it (defaults, cell size
estimated), and its maps are labelled four ways, each scored against the true labels (cell F1 at
IoU 0.5, DSB score, median count error; overall and per modality):

- as predicted: the product's labels;
- true seeds: one seed per true nucleus (its innermost pixel, where the model's foreground holds
  it) flooded over the model's own foreground and map; what a perfect split would give;
- true foreground: the true mask (touching nuclei joined) split by the model's distance map;
  what a perfect foreground would give;
- both true, the model's map deciding only where touching nuclei meet.

It also prints how well the true nuclei were hit (each one's best IoU with a predicted cell), the
predicted/true area of the nuclei matched at IoU above 0.5 (a systematic difference there is an
outline convention), and, from the annotations alone, how loosely their outlines are drawn: per
nucleus of the fluorescence images, the share of its pixels below half its contrast over the
background (its 90th percentile over the median background around it), beside the same for the
shipped model's training collection.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential

from benchmarks.output import first_paragraph
from cellseg.appearance import image_appearance
from cellseg.build_bundled import recipe_validation_pairs
from cellseg.bundled import NucleiRecipe, shipped_checkpoint, shipped_name
from cellseg.config import PredictConfig
from cellseg.distance import inside_distance
from cellseg.infer import Predictor
from cellseg.io import read_image
from cellseg.pairs import pair_images_and_masks
from cellseg.postprocess import CellMaps, cell_labels
from cellseg.scoring import instance_scores, iou_matrix, summarise_instance_scores
from cellseg.stats import label_cells
from cellseg.targets import normalised_distance
from cellseg.watershed import flood_from_markers

MODALITIES = ("fluorescence", "brightfield", "tissue")
IOU_BINS = (0.0, 0.2, 0.35, 0.5, 0.7, 1.0)  # a true nucleus's best IoU: missed, ..., near miss, hit, good
OUTLINE_SAMPLE = 200  # training images read for the training collection's outline figure


def innermost_seeds(truth: np.ndarray, within: np.ndarray) -> np.ndarray:
    """int32 markers: at each true nucleus's pixel farthest from its outline, where `within` holds
    it, the nucleus's number among those kept (1..); 0 elsewhere."""
    seeds = np.zeros(truth.shape, dtype=np.int32)
    count = int(truth.max(initial=0))
    if not count:
        return seeds
    # Each nucleus's distance to its own outline, neighbours included: touching nuclei keep their centres.
    centres = ndimage.maximum_position(normalised_distance(truth), truth, range(1, count + 1))
    kept = [(row, column) for row, column in centres if within[row, column]]
    for number, (row, column) in enumerate(kept, start=1):
        seeds[row, column] = number
    return seeds


def labelled_ways(maps: CellMaps, truth: np.ndarray, config: PredictConfig) -> dict[str, np.ndarray]:
    """The four labellings of one image's maps (module docstring), by name."""
    predicted = cell_labels(maps, config)
    foreground, _ = label_cells(maps.probability > (0.5 if config.threshold is None else config.threshold),
                                config.min_cell_area)
    height = maps.distance if maps.distance is not None else inside_distance(foreground > 0)
    height = np.asarray(height, dtype=np.float32)
    true_inside = truth > 0
    true_mask = CellMaps(true_inside.astype(np.float32), maps.distance)
    return {
        "as predicted": predicted,
        "true seeds": _flooded(height, innermost_seeds(truth, foreground > 0), foreground > 0),
        "true foreground": cell_labels(true_mask, config.model_copy(update={"threshold": 0.5})),
        "both true": _flooded(height, innermost_seeds(truth, true_inside), true_inside),
    }


def _flooded(height: np.ndarray, seeds: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """`flood_from_markers`, with each part of `inside` that no seed reaches kept as a cell of its own."""
    labels = flood_from_markers(height, seeds, inside)
    unreached = inside & (labels == 0)
    if unreached.any():
        parts, _ = label_cells(unreached)
        labels[unreached] = parts[unreached] + labels.max()
    return labels


def hits(predicted: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each true nucleus's best IoU with a predicted cell, and predicted/true area of the pairs
    matched at IoU above 0.5."""
    iou = iou_matrix(predicted, truth)  # predicted rows, true columns
    if not iou.size:
        return np.zeros(int(truth.max(initial=0))), np.zeros(0)
    true_area = np.bincount(truth.ravel(), minlength=iou.shape[1] + 1)[1:]
    predicted_area = np.bincount(predicted.ravel(), minlength=iou.shape[0] + 1)[1:]
    rows, columns = np.nonzero(iou > 0.5)
    return iou.max(axis=0), predicted_area[rows] / true_area[columns]


def below_half_contrast(image: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per nucleus of a fluorescence image, the share of its annotated pixels below half its
    contrast: (its 90th percentile + the background) / 2, the background being the median of the
    pixels more than three pixels from any nucleus."""
    cells = truth > 0
    around = ~ndimage.binary_dilation(cells, iterations=3)
    if not around.any():
        return np.zeros(0)
    background = float(np.median(image[around]))
    shares = []
    for number, box in enumerate(ndimage.find_objects(truth), start=1):
        if box is None:
            continue
        values = image[box][truth[box] == number].astype(np.float64)
        half = (np.percentile(values, 90) + background) / 2
        shares.append(float(np.mean(values < half)))
    return np.asarray(shares)


def scored(rows: list[tuple[str, dict]]) -> dict:
    """`summarise_instance_scores` overall and per modality, headline figures only."""
    def figures(members: list[dict]) -> dict:
        summary = summarise_instance_scores(members)
        return {key: summary[key] for key in ("images", "f1_mean", "dsb_score_mean", "count_error_median")}

    result = {"all": figures([row for _, row in rows])}
    for modality in MODALITIES:
        members = [row for kind, row in rows if kind == modality]
        if members:
            result[modality] = figures(members)
    return result


def analyse(pairs: list[tuple[Path, Path]], predictor: Predictor,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """The module's figures for (image, label image) files predicted with `predictor`."""
    ways: dict[str, list[tuple[str, dict]]] = {}
    best_ious, area_ratios, outline = [], {modality: [] for modality in MODALITIES}, []
    for done, (image_path, label_path) in enumerate(pairs, start=1):
        image = read_image(str(image_path))
        truth = relabel_sequential(np.array(read_image(str(label_path)), dtype=np.int32))[0]
        modality = image_appearance(image, truth)
        (maps,) = predictor.cell_maps([image])
        labelled = labelled_ways(maps, truth, predictor.config)
        for name, labels in labelled.items():
            ways.setdefault(name, []).append((modality, instance_scores(labels, truth)))
        best, ratios = hits(labelled["as predicted"], truth)
        best_ious.append(best)
        area_ratios[modality].extend(ratios)
        if modality == "fluorescence":
            outline.extend(below_half_contrast(image, truth))
        if progress:
            progress(done, len(pairs))
    best_iou = np.concatenate(best_ious)
    counts = np.histogram(best_iou, bins=(-1.0, *IOU_BINS[1:]))[0]
    return {
        "images": len(pairs),
        "ways": {name: scored(rows) for name, rows in ways.items()},
        "true_nuclei": int(best_iou.size),
        "best_iou_shares": {f"{low:g}-{high:g}": count / max(best_iou.size, 1)
                            for low, high, count in zip(IOU_BINS[:-1], IOU_BINS[1:], counts, strict=True)},
        "missed": float(np.mean(best_iou == 0)) if best_iou.size else 0.0,
        "matched_area_ratio_median": {modality: float(np.median(values)) for modality, values in area_ratios.items() if values},
        "fluorescence_outline_below_half": {"nuclei": len(outline), "median": float(np.median(outline)) if outline else None},
    }


def training_outline(recipe: NucleiRecipe, images: int = OUTLINE_SAMPLE) -> dict:
    """`below_half_contrast` over the fluorescence images among the first `images` of the shipped
    model's training collection."""
    data = Path(recipe.data_dir)
    if not (data / "labels").is_dir():
        return {"nuclei": 0, "median": None}
    shares = []
    for pair in pair_images_and_masks(str(data / "images"), str(data / "labels"))[:images]:
        image, truth = read_image(pair.image_url), np.asarray(read_image(pair.mask_url))
        if truth.any() and image_appearance(image, truth) == "fluorescence":
            shares.extend(below_half_contrast(image, truth))
    return {"nuclei": len(shares), "median": float(np.median(shares)) if shares else None}


def print_report(result: dict) -> None:
    print(f"{result['images']} images, {result['true_nuclei']} true nuclei")
    print("| labels | cell F1 | DSB score | count error | " + " | ".join(f"F1 {m}" for m in MODALITIES) + " |")
    print("|---|---|---|---|" + "---|" * len(MODALITIES))
    for name, groups in result["ways"].items():
        every = groups["all"]
        per = " | ".join(f"{groups[m]['f1_mean']:.3f} ({groups[m]['images']})" if m in groups else "" for m in MODALITIES)
        print(f"| {name} | {every['f1_mean']:.3f} | {every['dsb_score_mean']:.3f} | {every['count_error_median']:.1%} | {per} |")
    shares = ", ".join(f"{span}: {share:.1%}" for span, share in result["best_iou_shares"].items())
    print(f"true nuclei by their best IoU with a predicted cell: {shares} (0 for {result['missed']:.1%}: missed outright)")
    print("predicted/true area of matched nuclei (median): "
          + ", ".join(f"{m} {ratio:.3f}" for m, ratio in result["matched_area_ratio_median"].items()))
    outline = result["fluorescence_outline_below_half"]
    line = f"annotated nucleus pixels below half its contrast (fluorescence, median per nucleus): {outline['median']:.3f} of {outline['nuclei']} nuclei"
    training = result.get("training_outline_below_half") or {}
    if training.get("median") is not None:
        line += f"; the training collection: {training['median']:.3f} of {training['nuclei']}"
    print(line)


def labelled_pairs(dataset: Path, recipe_val: bool = False) -> list[tuple[Path, Path]]:
    """(image, label image) files: every PNG of `dataset`/images with its namesake in labels/, or
    with `recipe_val` the validation images of the shipped nuclei model's recipe. Raises
    FileNotFoundError naming the dataset when there are none or a label image is missing."""
    if recipe_val:
        pairs = [(Path(pair.image_url), Path(pair.mask_url)) for pair in recipe_validation_pairs(NucleiRecipe(), dataset)]
    else:
        pairs = [(path, dataset / "labels" / path.name) for path in sorted((dataset / "images").glob("*.png"))]
    if not pairs or not all(label.exists() for _, label in pairs):
        raise FileNotFoundError(f"{dataset} needs images/ and labels/ with one label image per image")
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--dataset", required=True, type=Path, help="folder with images/ and labels/")
    parser.add_argument("--model", default="nuclei", help="a shipped model's name or a checkpoint file")
    parser.add_argument("--recipe-val", action="store_true",
                        help="only the validation images of the shipped nuclei model's recipe")
    parser.add_argument("--out", type=Path, help="JSON of the figures (default runs/error_sources/<model>-<dataset>.json)")
    args = parser.parse_args()
    recipe = NucleiRecipe()
    try:
        pairs = labelled_pairs(args.dataset, args.recipe_val)
    except FileNotFoundError as error:
        parser.error(str(error))
    checkpoint = shipped_checkpoint(args.model) if shipped_name(args.model) else args.model
    predictor = Predictor.from_checkpoint(checkpoint, PredictConfig())
    result = analyse(pairs, predictor, lambda done, total: print(f"  {done}/{total}", end="\r", flush=True))
    result["training_outline_below_half"] = training_outline(recipe)
    out = args.out or Path("runs/error_sources") / f"{Path(args.model).stem}-{args.dataset.name}{'-val' if args.recipe_val else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_report(result)


if __name__ == "__main__":
    main()
