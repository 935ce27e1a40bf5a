"""Pixel-level segmentation metrics: IoU, Dice, precision and recall.

Edge cases (no cell pixels in the prediction and/or the ground truth) are defined so that a
correct "nothing here" answer scores perfectly and a wrong one scores zero:

| truth empty | prediction empty | IoU | Dice | precision | recall |
|-------------|------------------|-----|------|-----------|--------|
| yes         | yes              | 1   | 1    | 1         | 1      |
| yes         | no               | 0   | 0    | 0         | 1      |
| no          | yes              | 0   | 0    | 1         | 0      |

Precision with no predicted cells is 1 (no false positives were made) and recall with no true
cells is 1 (nothing was missed). Aggregates come two ways: `mean` averages per-image scores (each
image counts once), `pooled` sums pixel counts over all images first (each pixel counts once).

"Pixel error" means two things in the field. Here `misclassified` is the plain fraction of pixels
whose class is wrong. The ISBI 2012 EM challenge, and the U-Net paper's 0.0611 with it, define
pixel error as 1 minus the maximal F-score of the foreground (cell interior) over the probability
thresholds 0.0, 0.1, ..., 1.0, counts pooled over the stack (Arganda-Carreras et al. 2015; the
challenge's Fiji `PixelError` metric): `ThresholdSweep`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

METRIC_NAMES = ("iou", "dice", "precision", "recall")
ISBI2012_THRESHOLDS = tuple(step / 10 for step in range(11))  # 0.0, 0.1, ..., 1.0


@dataclass(frozen=True)
class ConfusionCounts:
    """Pixel counts of one or more binary predictions against ground truth."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def from_totals(cls, tp: int, predicted: int, actual: int, pixels: int) -> ConfusionCounts:
        """The counts of `pixels` pixels with `predicted` cell pixels predicted, `actual` true and `tp` both."""
        return cls(tp=tp, fp=predicted - tp, fn=actual - tp, tn=pixels - predicted - actual + tp)

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        return ConfusionCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def misclassified(self) -> float:
        """Fraction of all pixels whose class is wrong (0 for no pixels)."""
        total = self.tp + self.fp + self.fn + self.tn
        return 0.0 if total == 0 else (self.fp + self.fn) / total

    def scores(self) -> dict[str, float]:
        """IoU, Dice, precision and recall with the edge cases in the module docstring."""
        return {
            "iou": _ratio(self.tp, self.tp + self.fp + self.fn),
            "dice": _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn),
            "precision": _ratio(self.tp, self.tp + self.fp),
            "recall": _ratio(self.tp, self.tp + self.fn),
        }


def _ratio(numerator: int, denominator: int) -> float:
    return 1.0 if denominator == 0 else numerator / denominator


def confusion_counts(prediction: Any, truth: Any) -> ConfusionCounts:
    """Counts for boolean arrays/tensors of equal shape (numpy or torch)."""
    if tuple(prediction.shape) != tuple(truth.shape):
        raise ValueError(f"prediction is {tuple(prediction.shape)}, ground truth is {tuple(truth.shape)}")
    tp = int((prediction & truth).sum())
    predicted, actual = int(prediction.sum()), int(truth.sum())
    total = 1
    for side in prediction.shape:
        total *= int(side)
    return ConfusionCounts.from_totals(tp, predicted, actual, total)


def segmentation_scores(prediction: Any, truth: Any) -> dict[str, float]:
    """IoU, Dice, precision and recall of one boolean prediction against its truth."""
    return confusion_counts(prediction, truth).scores()


@dataclass
class MetricAccumulator:
    """Collects per-image counts and reports mean-over-images and pooled scores."""

    per_image: list[ConfusionCounts]

    def __init__(self, counts: Iterable[ConfusionCounts] = ()):
        self.per_image = list(counts)

    def add(self, counts: ConfusionCounts) -> None:
        self.per_image.append(counts)

    def mean(self) -> dict[str, float]:
        """Per-image scores averaged over images; empty accumulator gives NaN."""
        if not self.per_image:
            return {name: float("nan") for name in METRIC_NAMES}
        per_image = [counts.scores() for counts in self.per_image]
        return {name: sum(s[name] for s in per_image) / len(per_image) for name in METRIC_NAMES}

    def total(self) -> ConfusionCounts:
        """The counts summed over all images."""
        return sum(self.per_image, ConfusionCounts())

    def pooled(self) -> dict[str, float]:
        """Scores of the summed counts over all images."""
        return self.total().scores()


class ThresholdSweep:
    """Pooled confusion counts of probability maps at several thresholds (a pixel is cell where its
    probability exceeds the threshold), for the ISBI 2012 pixel error: 1 - the best pooled Dice
    (the F-score of the cell pixels) over the thresholds."""

    def __init__(self, thresholds: Iterable[float] = ISBI2012_THRESHOLDS):
        self.counts = {float(threshold): ConfusionCounts() for threshold in thresholds}
        if not self.counts:
            raise ValueError("ThresholdSweep needs at least one threshold")

    def add(self, probability: Any, truth: Any) -> None:
        for threshold, counts in self.counts.items():
            self.counts[threshold] = counts + confusion_counts(probability > threshold, truth)

    def best(self) -> tuple[float, float]:
        """(threshold, pooled Dice) of the threshold whose pooled Dice is highest; the lowest such
        threshold on ties."""
        return max(((threshold, counts.scores()["dice"]) for threshold, counts in self.counts.items()),
                   key=lambda pair: (pair[1], -pair[0]))

    def isbi_pixel_error(self) -> float:
        return 1.0 - self.best()[1]


def mask_agreement(masks: Iterable[Any], references: Iterable[Any]) -> dict[str, float]:
    """How closely two sets of masks of the same images agree (e.g. a fast path against plain fp32).

    Returns the fraction of all pixels on which they agree and the pooled Dice between them.
    """
    counts = ConfusionCounts()
    for mask, reference in zip(masks, references, strict=True):
        counts = counts + confusion_counts(mask, reference)
    total = counts.tp + counts.fp + counts.fn + counts.tn
    return {"pixel_agreement": 1.0 if total == 0 else (counts.tp + counts.tn) / total, "dice": counts.scores()["dice"]}
