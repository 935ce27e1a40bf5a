"""Prototype, not product code: a second U-Net output trained on each cell's normalised distance
map, and cells split by a watershed of that map (issue 7, the README's quality section).

    python -m benchmarks.distance_prototype --dataset ../shared/data/dsb2018 --out runs/dist-cd18 [--cell-diameter 18]

Trains with the default schedule on `<dataset>/labels` (instance labels needed), the model at
`--cell-diameter`, then scores the validation images: the mask channel split the default way,
and split by the distance channel (h-maxima seeds at h 0.05/0.1/0.2; seeds from cores above
0.3-0.6). Training is `cellseg.train.train` with its target, loss and eval output replaced here
for the experiment; nothing of it is wired into the CLI or the flows.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

import cellseg.data
import cellseg.train
from cellseg.checkpoint import load_checkpoint
from cellseg.config import ModelConfig, PredictConfig, TrainConfig
from cellseg.data import load_pairs, pair_images_and_masks, split_train_val
from cellseg.instances import instance_scores, summarise_instance_scores
from cellseg.model import UNet
from cellseg.predict import SCALE_TOLERANCE, Predictor
from cellseg.scale import median_cell_diameter, resize, scale_factor, scaled_shape
from cellseg.stats import label_cells
from cellseg.weights import separated_target


def normalised_distance(labels: np.ndarray) -> np.ndarray:
    """Each cell's distance to its outline divided by its largest (1 at the centre), 0 outside."""
    out = np.zeros(labels.shape, np.float32)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None:
            continue
        cell = labels[box] == index
        distance = ndimage.distance_transform_edt(np.pad(cell, 1))[1:-1, 1:-1]
        view = out[box]
        view[cell] = (distance / distance.max())[cell]
    return out


def _target_with_distance(self, pair_index: int) -> np.ndarray:
    if pair_index not in self._targets:
        labels = self.pairs[pair_index].instances
        self._targets[pair_index] = np.stack([separated_target(labels).astype(np.float32), normalised_distance(labels)])
    return self._targets[pair_index]


def _two_channel_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    return (F.binary_cross_entropy_with_logits(logits[:, :1], targets[:, :1])
            + F.binary_cross_entropy_with_logits(logits[:, 1:], targets[:, 1:]))


class _MaskInEval(UNet):
    """Both channels in training; the mask channel only in evaluation (validation metrics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.training else out[:, :1]


def train_prototype(dataset: Path, out: Path, cell_diameter: float) -> list[str]:
    cellseg.data.ImgDataset._training_target = _target_with_distance
    cellseg.train.segmentation_loss = _two_channel_loss
    counts = cellseg.train.confusion_counts
    cellseg.train.confusion_counts = lambda predicted, truth: counts(predicted[:, :1], truth)
    cellseg.train.UNet = _MaskInEval
    model_config, config = ModelConfig(out_channels=2, cell_diameter=cell_diameter), TrainConfig(max_minutes=None)
    pairs = pair_images_and_masks(str(dataset / "images"), str(dataset / "labels"))
    train_pairs, val_pairs = split_train_val(pairs, config.val_fraction, config.seed)
    result = cellseg.train.train(load_pairs(train_pairs, model_config.normalization),
                                 load_pairs(val_pairs, model_config.normalization), out, model_config, config)
    print(f"{result.stop_reason}; best epoch {result.best_epoch} of {len(result.history)}")
    return [pair.id for pair in val_pairs]


def score(dataset: Path, checkpoint_path: Path, val_ids: list[str]) -> dict[str, dict]:
    checkpoint = load_checkpoint(str(checkpoint_path))
    model, predictor = checkpoint.build_model(), Predictor(checkpoint, PredictConfig(device="cpu"))
    pairs = load_pairs([p for p in pair_images_and_masks(str(dataset / "images"), str(dataset / "labels"))
                        if p.id in val_ids], checkpoint.model_config.normalization)

    def both_channels(image: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(image, np.float32))[None, None]).float())[0].numpy()

    rows: dict[str, list] = {}
    for pair in pairs:
        first = both_channels(pair.image)
        factor = scale_factor(median_cell_diameter(predictor.cell_labels(first[0])),
                              checkpoint.model_config.cell_diameter, pair.image.shape)
        if abs(factor - 1.0) >= SCALE_TOLERANCE:  # as Predictor.normalised_probabilities
            scaled = both_channels(resize(pair.image, scaled_shape(pair.image.shape, factor), order=1))
            first = np.stack([resize(channel, pair.image.shape, order=1) for channel in scaled])
        probability, distance = first
        mask = probability > 0.5
        variants = {"mask channel, default split": predictor.cell_labels(probability)}
        smooth = ndimage.gaussian_filter(distance, 1.0)
        for h in (0.05, 0.1, 0.2):
            seeds = ndimage.label(h_maxima(smooth, h) & mask, structure=np.ones((3, 3)))[0]
            variants[f"distance h-maxima {h}"] = _cells(watershed(-smooth, seeds, mask=mask), mask)
        for core in (0.3, 0.4, 0.5, 0.6):
            seeds = label_cells(mask & (distance > core), 0)[0]
            variants[f"distance cores > {core}"] = _cells(watershed(-distance, seeds, mask=mask), mask)
        for name, labels in variants.items():
            rows.setdefault(name, []).append(instance_scores(labels, pair.instances))
    return {name: summarise_instance_scores(scores) for name, scores in rows.items()}


def _cells(labels: np.ndarray, mask: np.ndarray, min_cell_area: int = 10) -> np.ndarray:
    """Watershed labels plus the mask's objects no seed reached, without cells under min_cell_area."""
    unseeded = label_cells(mask & (labels == 0), 0)[0]
    labels = np.where(unseeded > 0, unseeded + labels.max(), labels)
    labels[np.isin(labels, np.flatnonzero(np.bincount(labels.ravel()) < min_cell_area))] = 0
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, type=Path, help="folder with images/ and labels/")
    parser.add_argument("--out", required=True, type=Path, help="training output folder")
    parser.add_argument("--cell-diameter", type=float, default=18.0)
    parser.add_argument("--score-only", action="store_true", help="score OUT/best.pt without training")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.score_only:
        val_ids = json.loads((args.out / "split.json").read_text())["val"]
    else:
        val_ids = train_prototype(args.dataset, args.out, args.cell_diameter)
        (args.out / "split.json").write_text(json.dumps({"val": val_ids}))
    for name, summary in score(args.dataset, args.out / "best.pt", val_ids).items():
        print(f"{name}: F1 {summary['f1_mean']:.3f}, DSB score {summary['dsb_score_mean']:.3f}, "
              f"count error {summary['count_error_median']:.1%}, merged {summary['merged_total']}, "
              f"split {summary['split_total']}, missed {summary['missed_total']}, extra {summary['extra_total']}")


if __name__ == "__main__":
    main()
