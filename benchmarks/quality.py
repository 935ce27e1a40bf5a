"""Quality of a trained model on its validation images, measured the way the README's quality
table is: pixel scores (Dice, IoU, pixel error) and, where the dataset has instance labels, cell
scores (F1 at IoU 0.5, DSB2018 score, median cell-count error). Pixel error comes both ways (see
`cellseg.metrics`): `pixel_error` is the mean fraction of misclassified pixels per image,
`pixel_error_isbi2012` the ISBI 2012 challenge's (and U-Net paper's) 1 - maximal F-score of the
cell pixels over probability thresholds 0.0-1.0, pooled over the validation images.

    python -m benchmarks.quality --dataset ../shared/data/dsb2018 --run runs/ref-dsb2018 [--tta] [--no-split]

Reads `<run>/split.json` (written by `cellseg train`) for the validation ids, links those images,
masks and labels into `<out>/val/`, segments them with `<run>/best.pt` into a fresh store and
scores it; prints a summary line and writes `<out>/quality.json`.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from cellseg.config import PredictConfig
from cellseg.evaluate import evaluate_store
from cellseg.io import image_stem, read_mask
from cellseg.jobs import SegmentJob, run_segmentation
from cellseg.scoring import HEADLINE_CELL_SCORES
from cellseg.store import ResultStore


def link_validation_images(dataset: Path, run: Path, out: Path) -> list[str]:
    """Symlink the run's validation images (and their masks and labels) into `out`."""
    val = set(json.loads((run / "split.json").read_text())["val"])
    for kind in ("images", "masks", "labels"):
        if not (dataset / kind).is_dir():
            continue
        (out / kind).mkdir(parents=True, exist_ok=True)
        for path in sorted((dataset / kind).iterdir()):
            if image_stem(path.name) in val:
                (out / kind / path.name).symlink_to(path.resolve())
    return sorted(val)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, type=Path, help="folder with images/, masks/ and maybe labels/")
    parser.add_argument("--run", required=True, type=Path, help="training output folder (best.pt, split.json)")
    parser.add_argument("--out", type=Path, help="working folder (default runs/quality/<run name>)")
    parser.add_argument("--tta", action="store_true")
    parser.add_argument("--no-split", action="store_true")
    args = parser.parse_args()
    out = args.out or Path("runs/quality") / (args.run.name + ("-tta" if args.tta else "") + ("-nosplit" if args.no_split else ""))
    summary = measure(args.dataset, args.run, out, PredictConfig(tta=args.tta, split_touching=not args.no_split))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
