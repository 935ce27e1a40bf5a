"""The training dataset: random crops of loaded pairs with augmentation and the extra target
channels (border weights, distance map), reproducible from (seed, epoch, index)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from cellseg.appearance import balanced_counts
from cellseg.augment import augment_pair
from cellseg.config import AugmentationConfig
from cellseg.dataset_errors import DatasetError
from cellseg.loaded_pairs import LoadedPair
from cellseg.stats import label_cells
from cellseg.targets import border_weight_map, normalised_distance, separated_target


def crop_or_pad(image: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random `size` x `size` window of an (H, W) image and its (H, W) mask or (C, H, W) target
    stack; sides shorter than `size` are mirror-padded first."""
    pad_h, pad_w = max(0, size - image.shape[0]), max(0, size - image.shape[1])
    if pad_h or pad_w:
        padding = ((pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2))
        image = np.pad(image, padding, mode="symmetric")
        mask = np.pad(mask, ((0, 0),) * (mask.ndim - 2) + padding, mode="symmetric")
    top = int(rng.integers(0, image.shape[0] - size + 1))
    left = int(rng.integers(0, image.shape[1] - size + 1))
    window = (slice(top, top + size), slice(left, left + size))
    return image[window], mask[(..., *window)]


def crops_by_area(shape: tuple[int, ...], patch_size: int, patches_per_image: int) -> int:
    """Crops per epoch from an image of `shape`: `patches_per_image` times the square root of its
    area in patches, rounded, between 1 and 4 times `patches_per_image`."""
    patches = shape[-2] * shape[-1] / patch_size**2
    return int(np.clip(round(patches_per_image * np.sqrt(patches)), 1, 4 * patches_per_image))


class TrainingDataset(Dataset):
    """Training or validation samples from loaded pairs.

    Training (`patch_size` set): `patches_per_image` random crops per image per epoch (with
    `patch_sampling` 'by_area', scaled by the square root of the image's area in patches; with
    `balance_appearance`, rarer kinds of image repeated: `cellseg.appearance.balanced_counts`), with
    optional augmentation (`cellseg.augment`); randomness is a function of (seed, epoch, index) only, so runs and
    resumed runs see the same samples. Validation (`patch_size` None): whole images.
    Items are (image, target) float32 tensors of shape (1, H, W).

    Training targets keep touching cells apart where the pair has instance labels
    (`cellseg.targets.separated_target`). Extra target channels follow the mask, in this order:
    per-pixel loss weights with `border_weight` > 0 (`cellseg.targets.border_weight_map`), and
    each cell's normalised distance map with `distance_map` (`cellseg.targets.normalised_distance`;
    from the mask's connected components when the pair has no instance labels);
    `TrainingTarget.unpack` takes them apart again. Validation targets are always the plain cell mask.
    """

    def __init__(
        self,
        pairs: Sequence[LoadedPair],
        patch_size: int | None = None,
        patches_per_image: int = 1,
        augment: bool = False,
        seed: int = 0,
        augmentation: AugmentationConfig = AugmentationConfig(),
        border_weight: float = 0.0,
        border_sigma: float = 5.0,
        distance_map: bool = False,
        patch_sampling: str = "per_image",
        balance_appearance: float = 0.0,
    ):
        if not pairs:
            raise DatasetError("the dataset is empty")
        self.pairs = list(pairs)
        self.border_weight = border_weight
        self.border_sigma = border_sigma
        self.layout = TrainingTarget(weighted=border_weight > 0, distance_map=distance_map)
        self._targets: dict[int, np.ndarray] = {}
        self.patch_size = patch_size
        self.patches_per_image = patches_per_image if patch_size else 1
        counts = [self.patches_per_image] * len(self.pairs)
        if patch_size and patch_sampling == "by_area":
            counts = [crops_by_area(pair.image.shape, patch_size, self.patches_per_image) for pair in self.pairs]
        if patch_size and balance_appearance:
            counts = balanced_counts(counts, [pair.appearance for pair in self.pairs], balance_appearance)
        self._pair_of_item = np.repeat(np.arange(len(self.pairs)), counts)
        self.augment = augment
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0

    def crops_by_appearance(self) -> dict[str, int]:
        """An epoch's items per kind of image (`LoadedPair.appearance`)."""
        kinds = [self.pairs[int(index)].appearance for index in self._pair_of_item]
        return {kind: kinds.count(kind) for kind in sorted(set(kinds))}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._pair_of_item)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair_index = int(self._pair_of_item[index])
        pair = self.pairs[pair_index]
        image, mask = pair.image, pair.mask
        if self.patch_size:
            mask = self._training_target(pair_index)
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image, mask = crop_or_pad(image, mask, self.patch_size, rng)
            if self.augment:
                image, mask = augment_pair(image, mask, self.augmentation, rng)
        target = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
        return torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None], target.reshape(-1, *image.shape)

    def prepare_targets(self) -> None:
        """Compute every pair's training target now rather than on first use."""
        for pair_index in range(len(self.pairs)):
            self._training_target(pair_index)

    def _training_target(self, pair_index: int) -> np.ndarray:
        """The pair's boolean training mask, or a (C, H, W) float stack of it and the extra target
        channels (see `TrainingTarget`); computed once per pair."""
        if pair_index not in self._targets:
            pair = self.pairs[pair_index]
            target = pair.mask if pair.instances is None else separated_target(pair.instances)
            channels = [target.astype(np.float32)]
            if self.layout.weighted:
                channels.append(border_weight_map(target, self.border_weight, self.border_sigma))
            if self.layout.distance_map:
                cells = pair.instances if pair.instances is not None else label_cells(pair.mask)[0]
                channels.append(normalised_distance(cells))
            self._targets[pair_index] = target if len(channels) == 1 else np.stack(channels)
        return self._targets[pair_index]


@dataclass(frozen=True)
class TrainingTarget:
    """Which channels a batch of training targets (N, C, H, W) has after the cell mask."""

    weighted: bool = False
    distance_map: bool = False

    def unpack(self, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(cell mask, loss weights or None, distance map or None), each (N, 1, H, W)."""
        weights = targets[:, 1:2] if self.weighted else None
        distance = targets[:, -1:] if self.distance_map else None
        return targets[:, :1], weights, distance
