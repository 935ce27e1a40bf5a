"""Quality of a trained model on its validation images, measured the way the README's quality
table is: pixel scores (Dice, IoU, pixel error) and, where the dataset has instance labels, cell
scores (F1 at IoU 0.5, DSB2018 score, median cell-count error). Pixel error comes both ways (see
`cellseg.metrics`): `pixel_error` is the mean fraction of misclassified pixels per image,
`pixel_error_isbi2012` the ISBI 2012 challenge's (and U-Net paper's) 1 - maximal F-score of the
cell pixels over probability thresholds 0.0-1.0, pooled over the validation images.

    python -m benchmarks.quality --dataset ../shared/data/dsb2018 --run runs/ref-dsb2018 [--tta] [--no-split]
    python -m benchmarks.quality --dataset ../shared/data/dsb2018 --model nuclei [--card]
    python -m benchmarks.quality --dataset ../shared/data/dsb2018-train --model nuclei --val-of runs/nuclei/training
    python -m benchmarks.quality --dataset ../shared/data/dsb2018-train --model nuclei --recipe-val --zoom 2

With `--run`: reads `<run>/split.json` (written by `cellseg train`) for the validation ids, links
those images, masks and labels into `<out>/val/`, segments them with `<run>/best.pt` into a fresh
store and scores it; prints a summary line and writes `<out>/quality.json`.

With `--model` (a shipped model's name or a checkpoint file): segments every image of the
dataset, a test set the model never saw, with no settings beyond the defaults (the cell size is
estimated per image), and prints the scores overall and per modality, and for a model at a cell
size how close the size model's estimate (the size each image was predicted at) and the median cell
found there came to the true median nucleus diameter, and which share of the
true nuclei were found (IoU above 0.5) by their contrast beside their image's median nucleus
(dim nuclei beside bright ones are the ones a model misses first), with their median area beside
the image's median nucleus. `--card` writes the
figures into the shipped model's card. With `--val-of RUN` as well, only RUN's validation images
of the dataset are segmented (linked into `<out>-images/`): two models on the same held-out images
of their training collection, per modality. `--recipe-val` takes the validation images of the
shipped nuclei model's recipe (its seed and fraction) instead of a run's. `--zoom F` shows every
image resampled by F (bilinear; masks and labels nearest), as if taken at another magnification:
the size estimate checked on cells larger or smaller than the collection's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.segmentation import relabel_sequential

from benchmarks.cell_size import size_agreement
from benchmarks.output import first_paragraph
from cellseg.appearance import image_appearance
from cellseg.build_bundled import recipe_validation_pairs
from cellseg.bundled import NucleiRecipe, model_card, shipped_name, shipped_paths
from cellseg.config import PredictConfig
from cellseg.evaluate import evaluate_store
from cellseg.io import image_stem, read_image, read_mask
from cellseg.jobs import SegmentJob, run_segmentation
from cellseg.scale import median_cell_diameter, resize, scaled_shape
from cellseg.scoring import HEADLINE_CELL_SCORES, IOU_THRESHOLDS, iou_matrix, summarise_instance_scores
from cellseg.store import ResultStore
from cellseg.synth import encode_png

# Bins of a true nucleus's contrast over the background, relative to its image's median nucleus's.
CONTRAST_BINS = (0.0, 0.5, 0.75, 1.0, 1.5, float("inf"))


def run_validation_ids(run: Path) -> set[str]:
    """The ids of a training run's validation images (its split.json)."""
    return set(json.loads((run / "split.json").read_text())["val"])


def link_validation_images(dataset: Path, run: Path, out: Path) -> list[str]:
    """Symlink the run's validation images (and their masks and labels) into `out`."""
    val = run_validation_ids(run)
    copy_images(dataset, out, val)
    return sorted(val)


def copy_images(dataset: Path, out: Path, ids: set[str] | None = None, zoom: float = 1.0) -> None:
    """`dataset`'s images, masks and labels (those of `ids`, else all) into `out`, laid out alike:
    links, or at `zoom` resampled copies (images bilinear, masks and labels nearest)."""
    for kind in ("images", "masks", "labels"):
        if not (dataset / kind).is_dir():
            continue
        (out / kind).mkdir(parents=True, exist_ok=True)
        for path in sorted((dataset / kind).iterdir()):
            if ids is not None and image_stem(path.name) not in ids:
                continue
            if zoom == 1.0:
                (out / kind / path.name).symlink_to(path.resolve())
                continue
            array = read_image(str(path))
            shape = scaled_shape(array.shape, zoom)
            if kind == "images":
                resampled = np.clip(np.rint(resize(array.astype(np.float32), shape, order=1)), 0, np.iinfo(array.dtype).max)
            else:
                resampled = resize(array, shape, order=0)
            (out / kind / f"{image_stem(path.name)}.png").write_bytes(encode_png(resampled.astype(array.dtype)))


def relative_contrasts(image: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each true cell's (labels 1..T, all present) contrast, the distance of its mean intensity
    from the background's median, and its area, each divided by its median over the image's cells."""
    plane = image.astype(np.float64) if image.ndim == 2 else image[..., :3].astype(np.float64).mean(axis=-1)
    labels = np.arange(1, int(truth.max()) + 1)
    contrast = np.abs(ndimage.mean(plane, truth, labels) - np.median(plane[truth == 0]))
    area = np.bincount(truth.ravel(), minlength=len(labels) + 1)[1:].astype(np.float64)
    return contrast / max(float(np.median(contrast)), 1e-9), area / float(np.median(area))


def found_cells(predicted: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Which true cells (labels 1..T, all present) a predicted cell matches, as the cell F1 matches
    them (IoU above 0.5, `cellseg.scoring.instance_scores`)."""
    return (iou_matrix(predicted, truth) > IOU_THRESHOLDS[0]).any(axis=0)


def found_by_contrast(contrasts: np.ndarray, areas: np.ndarray, found: np.ndarray) -> list[dict]:
    """Per CONTRAST_BINS bin: its bounds (the last with no upper one), the true cells in it, the
    share of them found and their median relative area."""
    rows = []
    for low, high in itertools.pairwise(CONTRAST_BINS):
        inside = (contrasts >= low) & (contrasts < high)
        rows.append({"low": low, "high": high if np.isfinite(high) else None, "cells": int(inside.sum()),
                     "found": float(found[inside].mean()) if inside.any() else None,
                     "median_relative_area": float(np.median(areas[inside])) if inside.any() else None})
    return rows


def measure(dataset: Path, run: Path, out: Path, config: PredictConfig) -> dict:
    if out.exists():
        shutil.rmtree(out)
    ids = link_validation_images(dataset, run, out / "val")
    # probabilities kept so that the ISBI 2012 pixel error can sweep its thresholds
    run_segmentation(SegmentJob(source_url=str(out / "val" / "images"), store_url=str(out / "val.zarr"),
                                checkpoint_url=str(run / "best.pt"),
                                predict=config.model_copy(update={"save_probabilities": True})))
    store = ResultStore.open(str(out / "val.zarr"), mode="r")
    has_labels = (out / "val" / "labels").is_dir()
    result = evaluate_store(store, str(out / "val" / "masks"), labels_url=str(out / "val" / "labels") if has_labels else None)
    errors = [np.mean(store.read_mask(i) != read_mask(str(out / "val" / "masks" / f"{i}.png"))) for i in ids]
    summary = {
        "dataset": dataset.name, "run": str(run), "images": len(ids), "tta": config.tta,
        "split_touching": config.split_touching,
        "dice": result["mean"]["dice"], "dice_pooled": result["pooled"]["dice"], "iou": result["mean"]["iou"],
        "pixel_error": float(np.mean(errors)),
        "pixel_error_isbi2012": result["pixel_error"]["isbi2012"],
        "isbi2012_threshold": result["pixel_error"]["isbi2012_threshold"],
    }
    if has_labels:
        cells = result["instances"]
        summary.update({key: cells[key] for key in HEADLINE_CELL_SCORES})
    (out / "quality.json").write_text(json.dumps({"summary": summary, "evaluation": result}, indent=1))
    return summary


def measure_model(dataset: Path, model: str, out: Path, config: PredictConfig) -> dict:
    """Scores of `model` (a shipped model's name or a checkpoint URL) on every image of `dataset`."""
    if out.exists():
        shutil.rmtree(out)
    shipped = shipped_name(model)
    job = SegmentJob(source_url=str(dataset / "images"), store_url=str(out / "test.zarr"),
                     model_version=model if shipped else "current", checkpoint_url=None if shipped else model,
                     predict=config)
    run_segmentation(job)
    store = ResultStore.open(str(out / "test.zarr"), mode="r")
    labels_url = str(dataset / "labels") if (dataset / "labels").is_dir() else None
    result = evaluate_store(store, str(dataset / "masks"), labels_url=labels_url)
    rows = {row["image_id"]: row for row in result["per_image"]}
    estimates, found_sizes, truths, contrasts, areas, found = [], [], [], [], [], []
    for image_id, row in rows.items():
        truth = read_image(f"{labels_url}/{image_id}.png") if labels_url else None
        image = read_image(str(dataset / "images" / f"{image_id}.png"))
        row["modality"] = image_appearance(image, truth) if truth is not None else "all"
        cells = store.read_cells(image_id) if truth is not None else None
        if truth is not None and truth.any():
            truth = relabel_sequential(truth.copy())[0]  # read_image gives a read-only array
            contrast, area = relative_contrasts(image, truth)
            contrasts.append(contrast)
            areas.append(area)
            found.append(found_cells(cells, truth))
        scale = store.record(image_id).get("scale") or {}
        estimated = scale.get("cell_diameter")  # the size model's estimate: the size the image was predicted at
        true_diameter = median_cell_diameter(truth) if truth is not None else None
        if estimated is not None and true_diameter is not None:
            found_diameter = median_cell_diameter(np.asarray(cells)) or 0.0  # the cells the product reports
            row |= {"estimated_diameter": estimated, "found_diameter": found_diameter, "true_diameter": true_diameter}
            estimates.append(estimated)
            found_sizes.append(found_diameter)
            truths.append(true_diameter)
    version = store.record(next(iter(rows)))["model"]["version"]
    summary: dict = {"dataset": dataset.name, "model": model, "model_version": version,
                     "images": len(rows), "groups": {}}
    for group in ["all", *sorted({row["modality"] for row in rows.values()} - {"all"})]:
        members = [row for row in rows.values() if group == "all" or row["modality"] == group]
        figures = {"images": len(members), "dice": float(np.mean([row["dice"] for row in members])),
                   "adapted_rand_error": float(np.mean([row["adapted_rand_error"] for row in members]))}
        if labels_url:
            cells = summarise_instance_scores([{key.removeprefix("instance_"): value for key, value in row.items()
                                                if key.startswith("instance_")} for row in members])
            figures |= {key: cells[key] for key in ("f1_mean", "dsb_score_mean", "count_error_median")}
        summary["groups"][group] = figures
    if contrasts:
        summary["found_by_contrast"] = found_by_contrast(*(np.concatenate(values) for values in (contrasts, areas, found)))
    if truths:
        summary["cell_size"] = {"images": len(truths), **size_agreement(estimates, truths),
                                **size_agreement(found_sizes, truths, prefix="found_")}
    (out / "quality.json").write_text(json.dumps({"summary": summary, "evaluation": result}, indent=1))
    return summary


def print_table(summary: dict) -> None:
    """The per-modality table as markdown."""
    columns = [key for key in ("images", "f1_mean", "dsb_score_mean", "dice", "count_error_median", "adapted_rand_error")
               if key in summary["groups"]["all"]]
    print(f"{summary['model']} ({summary['model_version']}) on {summary['dataset']}, no settings (cell size estimated)")
    print("| modality | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for group, figures in summary["groups"].items():
        cells = [f"{figures[key]}" if key == "images" else f"{figures[key]:.3f}" for key in columns]
        print(f"| {group} | " + " | ".join(cells) + " |")
    if "cell_size" in summary:
        size = summary["cell_size"]
        print(f"cell size within 25% of the true median diameter, of {size['images']} images: the size model's estimate "
              f"(the size predicted at) on {size['within_25_percent']:.0%} (median error {size['median_relative_error']:.0%}), "
              f"the median cell found on {size['found_within_25_percent']:.0%} "
              f"(median error {size['found_median_relative_error']:.0%})")
    if "found_by_contrast" in summary:
        shown = [row for row in summary["found_by_contrast"] if row["cells"]]
        spans = [f"{row['low']:g}-{row['high']:g}" if row["high"] is not None else f"{row['low']:g}+" for row in shown]
        print("true nuclei found (IoU > 0.5) by contrast relative to their image's median nucleus: "
              + ", ".join(f"{span}: {row['found']:.0%} of {row['cells']} (median area {row['median_relative_area']:.2f})"
                          for span, row in zip(spans, shown, strict=True)))


def write_card_figures(name: str, summary: dict) -> None:
    """Record the test figures in the shipped model's card."""
    _, card_path = shipped_paths(name)
    card = model_card(name)
    card["test"][summary["dataset"]] = {"command": f"python -m benchmarks.quality --dataset ../shared/data/"
                                                   f"{summary['dataset']} --model {name} --card",
                                        **{key: summary[key] for key in ("images", "groups", "cell_size") if key in summary}}
    card_path.write_text(json.dumps(card, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--dataset", required=True, type=Path, help="folder with images/, masks/ and maybe labels/")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, help="training output folder (best.pt, split.json): its validation images")
    source.add_argument("--model", help="a shipped model's name or a checkpoint file: every image of the dataset")
    parser.add_argument("--out", type=Path, help="working folder (default runs/quality/<run or model name>)")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--no-split", action="store_true")
    parser.add_argument("--card", action="store_true", help="with a shipped --model: write the figures into its card")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument("--val-of", type=Path, metavar="RUN",
                          help="with --model: only the validation images of this training run (its split.json)")
    held_out.add_argument("--recipe-val", action="store_true",
                          help="with --model: only the validation images of the shipped nuclei model's recipe")
    parser.add_argument("--zoom", type=float, default=1.0,
                        help="with --model: every image resampled by this factor, as at another magnification")
    args = parser.parse_args()
    config = PredictConfig(tta=args.tta, split_touching=False if args.no_split else None)
    suffix = ("-tta" if args.tta else "") + ("-nosplit" if args.no_split else "")
    chosen = args.val_of or args.recipe_val or args.zoom != 1.0
    if chosen and (not args.model or args.card):
        parser.error("--val-of, --recipe-val and --zoom go with --model, and not with --card (the card holds the test figures)")
    if not 0.1 <= args.zoom <= 10:
        parser.error(f"--zoom {args.zoom:g}: give a factor between 0.1 and 10")
    if args.model:
        name = Path(args.model).stem if not shipped_name(args.model) else args.model
        label = ("-val" if args.val_of or args.recipe_val else "") + (f"-zoom{args.zoom:g}" if args.zoom != 1.0 else "")
        out = args.out or Path("runs/quality") / f"{name}-{args.dataset.name}{label}{suffix}"
        dataset = args.dataset
        if chosen:
            dataset = out.with_name(out.name + "-images")
            if dataset.exists():
                shutil.rmtree(dataset)
            ids = (run_validation_ids(args.val_of) if args.val_of
                   else {pair.id for pair in recipe_validation_pairs(NucleiRecipe(), args.dataset)} if args.recipe_val
                   else None)
            copy_images(args.dataset, dataset, ids, args.zoom)
        summary = measure_model(dataset, args.model, out, config)
        print_table(summary)
        if args.card:
            write_card_figures(shipped_name(args.model) or parser.error("--card needs a shipped model's name"), summary)
        return
    out = args.out or Path("runs/quality") / (args.run.name + suffix)
    summary = measure(args.dataset, args.run, out, config)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
