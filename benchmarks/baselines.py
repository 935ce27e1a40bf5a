"""Reference baselines on the validation split that `cellseg train` uses: Otsu thresholding and a
notebook-style U-Net, so that the default configuration is compared on the same images.

    python -m benchmarks.baselines --dataset ../shared/data/isbi2012 [--minutes 25] [--skip-unet]

Otsu: per-image Otsu threshold; the polarity (cells above or below the threshold) is chosen per
image with the ground truth, so this is Otsu's best case. Where the dataset has instance labels
(`labels/`), Otsu + watershed is scored at cell level too: the mask's touching cells split as
`cellseg predict` splits them (its default split depth and smallest cell), then F1 at IoU 0.5,
the DSB2018 score and the median cell-count error; the notebook-style U-Net's masks likewise. Notebook-style U-Net: the classic loop
(base width 32, BatchNorm, no augmentation, whole images at batch size 1, intensities / 255,
Adam 1e-3, BCEWithLogitsLoss, early stopping on validation loss with patience 5), under the same
wall-clock budget as the default `cellseg train`. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu

from benchmarks.output import first_paragraph
from cellseg.config import ModelConfig, PredictConfig, TrainConfig
from cellseg.io import list_images, read_image, read_mask
from cellseg.metrics import MetricAccumulator, confusion_counts
from cellseg.model import UNet
from cellseg.pairs import index_by_stem, pair_images_and_masks, split_train_val
from cellseg.postprocess import split_touching_cells
from cellseg.scoring import HEADLINE_CELL_SCORES, instance_scores, summarise_instance_scores


def otsu_scores(pairs, labels_url: str | None = None) -> dict[str, float]:
    """Pixel scores of Otsu's best-polarity masks; with `labels_url`, cell scores of the masks
    split into cells."""
    masks = []
    for pair in pairs:
        image, truth = read_image(pair.image_url), read_mask(pair.mask_url)
        above = image > threshold_otsu(image)
        masks.append(max((above, ~above), key=lambda candidate: confusion_counts(candidate, truth).scores()["dice"]))
    return mask_scores(pairs, masks, labels_url)


def mask_scores(pairs, masks: list[np.ndarray], labels_url: str | None = None) -> dict[str, float]:
    """Dice (mean and pooled) of one mask per pair; with `labels_url`, the cell scores of the masks
    split into cells as `cellseg predict` splits them."""
    labels = index_by_stem(list_images(labels_url), "label") if labels_url else {}
    defaults = PredictConfig()
    accumulator = MetricAccumulator(confusion_counts(mask, read_mask(pair.mask_url)) for pair, mask in zip(pairs, masks, strict=True))
    scores = {"dice": accumulator.mean()["dice"], "dice_pooled": accumulator.pooled()["dice"]}
    if labels_url:
        summary = summarise_instance_scores([
            instance_scores(split_touching_cells(mask, defaults.min_cell_area, defaults.split_depth), read_image(labels[pair.id]))
            for pair, mask in zip(pairs, masks, strict=True)
        ])
        scores.update({key: summary[key] for key in HEADLINE_CELL_SCORES})
    return scores


def _tensor(image: np.ndarray) -> torch.Tensor:
    scale = 255.0 if image.dtype == np.uint8 else float(np.iinfo(image.dtype).max)
    return torch.from_numpy(image.astype(np.float32) / scale)[None, None]


def notebook_epoch(model: UNet, optimizer: torch.optim.Optimizer, data, deadline: float | None = None) -> None:
    """One epoch of the classic notebook loop: (x, y) pairs in random order, batch 1,
    BCEWithLogitsLoss; stops early once `time.monotonic()` passes `deadline`."""
    model.train()
    for index in torch.randperm(len(data)).tolist():
        x, y = data[index]
        loss = F.binary_cross_entropy_with_logits(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if deadline is not None and time.monotonic() > deadline:
            return


def notebook_unet_scores(
    train_pairs, val_pairs, minutes: float, seed: int = 0, labels_url: str | None = None
) -> dict[str, float]:
    torch.manual_seed(seed)

    def load(pairs):
        return [(_tensor(read_image(p.image_url)), torch.from_numpy(read_mask(p.mask_url)).float()[None, None]) for p in pairs]

    train_data, val_data = load(train_pairs), load(val_pairs)
    model = UNet(ModelConfig(base_width=32, norm="batch", dropout=0.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    best_loss, best_state, stale, epochs = float("inf"), None, 0, 0
    started = time.monotonic()
    while time.monotonic() - started < minutes * 60 and stale < 5:
        notebook_epoch(model, optimizer, train_data, deadline=started + minutes * 60)
        epochs += 1
        model.eval()
        with torch.no_grad():
            val_loss = sum(F.binary_cross_entropy_with_logits(model(x), y).item() for x, y in val_data) / len(val_data)
        if val_loss < best_loss:
            best_loss, best_state, stale = val_loss, {k: v.clone() for k, v in model.state_dict().items()}, 0
        else:
            stale += 1
        print(f"  notebook U-Net epoch {epochs}: val loss {val_loss:.4f}", flush=True)
    model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        masks = [(model(x) > 0)[0, 0].numpy() for x, _ in val_data]
    return {**mask_scores(val_pairs, masks, labels_url), "epochs": epochs,
            "minutes": round((time.monotonic() - started) / 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--dataset", required=True, help="folder with images/ and masks/")
    parser.add_argument("--minutes", type=float, default=TrainConfig().time_budget(fine_tuning=False))
    parser.add_argument("--skip-unet", action="store_true")
    parser.add_argument("--out", default="runs/benchmarks")
    args = parser.parse_args()
    dataset = Path(args.dataset)
    defaults = TrainConfig()
    pairs = pair_images_and_masks(str(dataset / "images"), str(dataset / "masks"))
    train_pairs, val_pairs = split_train_val(pairs, defaults.val_fraction, defaults.seed)
    labels_url = str(dataset / "labels") if (dataset / "labels").is_dir() else None
    results = {"dataset": dataset.name, "val_ids": [p.id for p in val_pairs], "otsu": otsu_scores(val_pairs, labels_url)}
    if not args.skip_unet:
        results["notebook_unet"] = notebook_unet_scores(train_pairs, val_pairs, args.minutes, labels_url=labels_url)
    print(f"{dataset.name}: validation images {len(val_pairs)}")
    for name in ("otsu", "notebook_unet"):
        if name in results:
            print(f"  {name:14} Dice (mean over images) {results[name]['dice']:.4f}   pooled {results[name]['dice_pooled']:.4f}")
            if "f1_mean" in results[name]:
                print(f"  {'':14} + watershed: cell F1 {results[name]['f1_mean']:.3f}, DSB score "
                      f"{results[name]['dsb_score_mean']:.3f}, count error {results[name]['count_error_median']:.0%}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"baselines-{dataset.name}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
