"""Each image's cell size, read from what the network sees (after Cellpose's size model).

A model trained at one cell size (`ModelConfig.cell_diameter`) must know how large the cells of
a new image are before it can resample the image to its size. The contracting path already
describes an image's texture at every scale: `UNet.features` summarises it in one vector, and
a ridge regression from that vector to the logarithm of the median cell diameter, fitted when
training ends on the training images shown at many magnifications, reads the size off it.
Prediction reads it twice (`size_estimates`): two passes of the contracting path over a crop of
at most SIZE_CROP pixels a side.

The regression lives in the checkpoint (`Checkpoint.size_model`), as plain lists of floats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cellseg.checkpoint import SizeModelRecord
from cellseg.loaded_pairs import LoadedPair
from cellseg.model import UNet, padded_batches
from cellseg.runtime import autocast_context, model_pass
from cellseg.scale import (
    MAX_UPSCALED_PIXELS,
    SCALE_TOLERANCE,
    SizeEstimates,
    cells_of,
    median_cell_diameter,
    resize,
    scale_factor,
    scaled_shape,
)

SIZE_CROP = 512  # features are read from the central crop of at most this many pixels a side
MAGNIFICATIONS = 3  # training images are each shown at this many random magnifications
MAGNIFICATION_RANGE = 2.0  # drawn log-uniformly from [1/this, this] times the image's own
RIDGE_PENALTIES = (0.1, 1.0, 10.0, 100.0, 1000.0)  # tried by cross-validation
MIN_EXAMPLES = 10  # fewer (image, magnification) examples fit no size model

Features = Callable[[np.ndarray], np.ndarray]
"""A network's `UNet.features` of one normalised (H, W) image, as a 1-D array."""


@dataclass(frozen=True)
class SizeModel:
    """log(median cell diameter) = standardised features . coefficients + intercept."""

    coefficients: np.ndarray
    intercept: float
    feature_mean: np.ndarray
    feature_scale: np.ndarray
    penalty: float

    def diameter(self, features: np.ndarray) -> float:
        """The median cell diameter (pixels) of the image the features describe."""
        standardised = (features - self.feature_mean) / self.feature_scale
        return float(np.exp(standardised @ self.coefficients + self.intercept))

    def to_dict(self) -> dict[str, Any]:
        """The plain lists a checkpoint stores (`cellseg.checkpoint.SizeModelRecord`)."""
        return SizeModelRecord(coefficients=self.coefficients.tolist(), intercept=self.intercept,
                               feature_mean=self.feature_mean.tolist(), feature_scale=self.feature_scale.tolist(),
                               penalty=self.penalty).model_dump()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SizeModel:
        record = SizeModelRecord.model_validate(data)
        return cls(np.asarray(record.coefficients, np.float64), record.intercept,
                   np.asarray(record.feature_mean, np.float64), np.asarray(record.feature_scale, np.float64),
                   record.penalty)


def central_crop(image: np.ndarray, size: int = SIZE_CROP) -> np.ndarray:
    """The central `size` x `size` window of an (H, W) image (the whole of a smaller side)."""
    top, left = max(0, (image.shape[0] - size) // 2), max(0, (image.shape[1] - size) // 2)
    return image[top : top + size, left : left + size]


def size_estimates(
    size_model: SizeModel, features: Callable[[Sequence[np.ndarray]], np.ndarray], model_diameter: float
) -> SizeEstimates:
    """Each normalised image's median cell diameter, read by `size_model` from `features` twice:
    at the image's own scale, then from its central crop resampled to that first reading.

    A ridge regression pulls its answers toward the middle of the sizes it was fitted on, so
    cells far from the model's size read too close to it (nuclei 100 px across as 50). Resampled
    to the first reading, the cells are near the model's size, where the regression is most
    accurate; the second reading, brought back to the image's pixels, is the estimate. An
    enlarged crop is interpolated, and its soft edges read larger than the cells are, so where
    the first reading asks to enlarge, the estimate is the geometric mean of the two readings.
    """

    def estimate(images: Sequence[np.ndarray]) -> list[float]:
        diameters = [size_model.diameter(row) for row in features(images)]
        factors = [scale_factor(diameter, model_diameter, image.shape) for diameter, image in zip(diameters, images, strict=True)]
        again = [i for i, factor in enumerate(factors) if abs(factor - 1.0) >= SCALE_TOLERANCE]
        views = [_resampled_crop(images[i], factors[i]) for i in again]
        for i, row in zip(again, features(views) if views else [], strict=True):
            second = size_model.diameter(row) / factors[i]
            diameters[i] = second if factors[i] < 1.0 else float(np.sqrt(diameters[i] * second))
        return diameters

    return estimate


def _resampled_crop(image: np.ndarray, factor: float) -> np.ndarray:
    """The central crop of `image` that is SIZE_CROP a side once resampled by `factor`, resampled."""
    crop = central_crop(image, int(np.ceil(SIZE_CROP / factor)))
    return resize(np.asarray(crop, dtype=np.float32), scaled_shape(crop.shape, factor), order=1)


def network_features(model: UNet, device: torch.device, amp: bool = True) -> Features:
    """`Features` of a network: its `UNet.features` of an image's central crop, in eval mode."""
    of_many = batched_network_features(model, device, amp)
    return lambda image: of_many([image])[0]


def batched_network_features(
    model: UNet, device: torch.device, amp: bool = True, batch_size: int = 1
) -> Callable[[Sequence[np.ndarray]], np.ndarray]:
    """`network_features` of several images as (N, F), central crops that the network pads to
    one shape stacked into batches of up to `batch_size` (padded beforehand as it pads them, so
    that each row is what the image alone gives)."""

    def features(images: Sequence[np.ndarray]) -> np.ndarray:
        model.eval()
        crops = [np.asarray(central_crop(image), dtype=np.float32) for image in images]
        rows: list[np.ndarray | None] = [None] * len(crops)
        for positions, batch in padded_batches(crops, model.size_multiple, batch_size):
            x = torch.from_numpy(batch)[:, None].to(device)
            with torch.inference_mode(), model_pass(model.features, tuple(x.shape)) as forward, autocast_context(device, amp):
                summaries = forward(x).float().cpu().numpy().astype(np.float64)
            for position, row in zip(positions, summaries, strict=True):
                rows[position] = row
        return np.stack(rows) if rows else np.empty((0, 0))  # type: ignore[arg-type]

    return features


def size_examples(
    pairs: Sequence[LoadedPair], features: Features, seed: int = 0, magnifications: int = MAGNIFICATIONS
) -> tuple[np.ndarray, np.ndarray]:
    """(features, log median cell diameter) of each pair shown at `magnifications` random
    magnifications (resampled image and cells); pairs without cells are left out."""
    rows, targets = [], []
    for image, target in magnified_examples(pairs, seed, magnifications):
        rows.append(features(image))
        targets.append(target)
    return np.asarray(rows), np.asarray(targets)


def magnified_examples(
    pairs: Sequence[LoadedPair], seed: int = 0, magnifications: int = MAGNIFICATIONS
) -> Iterator[tuple[np.ndarray, float]]:
    """(central crop of the image resampled, log of its median cell diameter) of each pair shown
    at `magnifications` random magnifications; pairs without cells are left out."""
    rng = np.random.default_rng(seed)
    for pair in pairs:
        diameter = median_cell_diameter(cells_of(pair))
        if diameter is None:
            continue
        for _ in range(magnifications):
            factor = float(np.exp(rng.uniform(-np.log(MAGNIFICATION_RANGE), np.log(MAGNIFICATION_RANGE))))
            # Only the central crop is read: resample just enough of the image to fill it.
            window = central_crop(pair.image, int(np.ceil(SIZE_CROP / factor)) + 2)
            if window.size * factor**2 > MAX_UPSCALED_PIXELS:
                continue
            yield resize(window, scaled_shape(window.shape, factor), order=1), float(np.log(diameter * factor))


def fit_size_model(features: np.ndarray, targets: np.ndarray, folds: int = 5, seed: int = 0) -> SizeModel:
    """Ridge regression of `targets` on standardised `features`, its penalty chosen from
    RIDGE_PENALTIES by `folds`-fold cross-validation."""
    if len(targets) < max(folds, MIN_EXAMPLES):
        raise ValueError(f"{len(targets)} examples are too few to fit a size model (at least {MIN_EXAMPLES})")
    order = np.random.default_rng(seed).permutation(len(targets))
    fold_of = np.empty(len(targets), int)
    fold_of[order] = np.arange(len(targets)) % folds

    def errors(penalty: float) -> float:
        squared = 0.0
        for fold in range(folds):
            train, test = fold_of != fold, fold_of == fold
            model = _ridge(features[train], targets[train], penalty)
            predicted = np.log([model.diameter(row) for row in features[test]])
            squared += float(((predicted - targets[test]) ** 2).sum())
        return squared

    best = min(RIDGE_PENALTIES, key=errors)
    return _ridge(features, targets, best)


def _ridge(features: np.ndarray, targets: np.ndarray, penalty: float) -> SizeModel:
    mean = features.mean(axis=0)
    scale = features.std(axis=0)
    scale[scale < 1e-8] = 1.0
    x = (features - mean) / scale
    intercept = float(targets.mean())
    centred = targets - intercept
    if len(x) < x.shape[1]:
        # Fewer examples than features (a few dozen images against a wide network's thousands of
        # channel moments): the same solution from the examples' n x n system, X'(XX' + pI)^-1 y,
        # instead of the features' d x d one.
        coefficients = x.T @ np.linalg.solve(x @ x.T + penalty * np.eye(len(x)), centred)
    else:
        coefficients = np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ centred)
    return SizeModel(coefficients, intercept, mean, scale, penalty)
