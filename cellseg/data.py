"""Image/mask pairing, intensity normalisation, train/val split and the training dataset."""

from __future__ import annotations

import hashlib
import posixpath
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from cellseg.augment import augment_pair
from cellseg.config import AugmentationConfig, NormalizationConfig
from cellseg.io import (
    StorageOptions,
    binarize_mask,
    decode_image,
    image_stem,
    list_images,
    read_bytes,
)
from cellseg.stats import label_cells
from cellseg.weights import border_weight_map, normalised_distance, separated_target


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the files at fault."""


@dataclass(frozen=True)
class ImagePair:
    """An image and its mask, matched by file stem (`id`)."""

    id: str
    image_url: str
    mask_url: str


def group_by_stem(urls: Sequence[str]) -> dict[str, list[str]]:
    """Each file stem with the URLs that have it (more than one: a.png and a.tif)."""
    by_stem: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_stem[image_stem(url)].append(url)
    return by_stem


def index_by_stem(urls: Sequence[str], role: str) -> dict[str, str]:
    """Map each file stem to its URL; two files with one stem (a.png, a.tif) are an error."""
    by_stem = group_by_stem(urls)
    clashes = {stem: found for stem, found in by_stem.items() if len(found) > 1}
    if clashes:
        described = "; ".join(
            f"{stem!r}: " + ", ".join(posixpath.basename(u) for u in found) for stem, found in sorted(clashes.items())
        )
        raise DatasetError(f"{role} files share a stem, so the pairing is ambiguous: {described}")
    return {stem: found[0] for stem, found in by_stem.items()}


def pair_by_stem(image_urls: Sequence[str], mask_urls: Sequence[str], images_url: str, masks_url: str) -> list[ImagePair]:
    """Pair listed image and mask URLs by stem; raises DatasetError naming every file left unpaired."""
    images = index_by_stem(image_urls, "image")
    masks = index_by_stem(mask_urls, "mask")
    if not images:
        raise DatasetError(f"no images (.png, .tif, .tiff, .jpg) found under '{images_url}'")
    problems = [f"image '{images[s]}' has no mask in '{masks_url}'" for s in sorted(images.keys() - masks.keys())]
    problems += [f"mask '{masks[s]}' has no image in '{images_url}'" for s in sorted(masks.keys() - images.keys())]
    if problems:
        raise DatasetError("; ".join(problems))
    return [ImagePair(stem, images[stem], masks[stem]) for stem in sorted(images)]


def pair_images_and_masks(
    images_url: str, masks_url: str, storage_options: StorageOptions = None
) -> list[ImagePair]:
    """Pair every image under `images_url` with the mask of the same stem under `masks_url`.

    Raises DatasetError naming each image without a mask and each mask without an image.
    """
    return pair_by_stem(
        list_images(images_url, storage_options), list_images(masks_url, storage_options), images_url, masks_url
    )


def check_same_size(image_url: str, image_shape: tuple[int, ...], mask_url: str, mask_shape: tuple[int, ...]) -> None:
    """Raise DatasetError naming both files when a mask's size differs from its image's."""
    if tuple(image_shape) != tuple(mask_shape):
        raise DatasetError(
            f"mask '{mask_url}' is {mask_shape[1]}x{mask_shape[0]} (WxH), "
            f"image '{image_url}' is {image_shape[1]}x{image_shape[0]}"
        )


def split_train_val(pairs: Sequence[ImagePair], val_fraction: float, seed: int) -> tuple[list[ImagePair], list[ImagePair]]:
    """Deterministic split by seed over the id-sorted pairs; at least one of each when possible."""
    ordered = sorted(pairs, key=lambda pair: pair.id)
    if val_fraction <= 0 or len(ordered) < 2:
        return ordered, []
    n_val = min(len(ordered) - 1, max(1, round(len(ordered) * val_fraction)))
    order = np.random.default_rng(seed).permutation(len(ordered))
    val_index = set(order[:n_val].tolist())
    train = [pair for i, pair in enumerate(ordered) if i not in val_index]
    val = [pair for i, pair in enumerate(ordered) if i in val_index]
    return train, val


def intensity_skewness(image: np.ndarray) -> float:
    """Sample skewness of the pixel intensities (0 for a flat image)."""
    pixels = image.astype(np.float64, copy=False).ravel()
    centred = pixels - pixels.mean()
    spread = np.sqrt(np.mean(centred**2))
    return 0.0 if spread == 0 else float(np.mean(centred**3) / spread**3)


def _histogram_statistics(counts: np.ndarray, percentiles: Sequence[float]) -> tuple[list[float], float]:
    """np.percentile's linear-interpolation percentiles and the skewness of an integer image, from
    its histogram: one pass over the pixels instead of a partial sort and several float passes."""
    total = int(counts.sum())
    cumulative = np.cumsum(counts)
    values = []
    for percentile in percentiles:
        position = (total - 1) * percentile / 100
        below = int(np.floor(position))
        low_value = float(np.searchsorted(cumulative, below, side="right"))
        high_value = float(np.searchsorted(cumulative, min(below + 1, total - 1), side="right"))
        fraction = position - below
        # numpy's lerp, including its symmetric form for fractions of one half and above
        values.append(high_value - (high_value - low_value) * (1 - fraction) if fraction >= 0.5
                      else low_value + (high_value - low_value) * fraction)
    levels = np.arange(len(counts), dtype=np.float64)
    mean = float(counts @ levels) / total
    centred = levels - mean
    spread = np.sqrt(float(counts @ centred**2) / total)
    skewness = 0.0 if spread == 0 else float(counts @ centred**3) / total / spread**3
    return values, skewness


def normalize_image(image: np.ndarray, config: NormalizationConfig = NormalizationConfig()) -> np.ndarray:
    """Map (H, W) intensities to float32 in [0, 1] between the configured percentiles.

    With polarity 'auto', a negatively skewed image (mostly bright, with a dark minority such as
    dark nuclei on brightfield) is inverted, so one model sees objects bright in both modalities.
    8- and 16-bit images go through their histogram and a lookup table (20x faster here, equal to
    the np.percentile path within float32 rounding); other dtypes through np.percentile.
    """
    percentiles = [config.low_percentile, config.high_percentile]
    if image.dtype in (np.uint8, np.uint16):
        (low, high), skewness = _histogram_statistics(np.bincount(image.ravel()), percentiles)
        levels: np.ndarray = np.arange(int(image.max()) + 1, dtype=np.float32)
    else:
        levels = image.astype(np.float32, copy=False)
        low, high = np.percentile(levels, percentiles)
        skewness = intensity_skewness(levels) if config.polarity == "auto" else 0.0
    if high <= low:  # flat image: nothing to stretch
        return np.zeros(image.shape, dtype=np.float32)
    scaled = np.clip((levels - low) / (high - low), 0.0, 1.0).astype(np.float32, copy=False)
    if config.polarity == "auto" and skewness < 0:
        scaled = 1.0 - scaled
    return scaled[image] if image.dtype in (np.uint8, np.uint16) else scaled


@dataclass(frozen=True)
class LoadedPair:
    """A decoded, validated pair: normalised float32 image and boolean mask, both (H, W).

    `instances` holds the cell labels (int32, 0 = background) when the mask file was an
    instance label image (16 bits or more per pixel); `mask` is then their union.
    """

    source: ImagePair
    image: np.ndarray
    mask: np.ndarray
    image_sha256: str
    mask_sha256: str
    dtype: str
    instances: np.ndarray | None = None

    @property
    def id(self) -> str:
        return self.source.id

    def manifest_entry(self) -> dict[str, object]:
        """What the dataset manifest records about this pair."""
        return {
            "id": self.id,
            "image_url": self.source.image_url,
            "mask_url": self.source.mask_url,
            "image_sha256": self.image_sha256,
            "mask_sha256": self.mask_sha256,
            "shape": list(self.image.shape),
            "dtype": self.dtype,
        }


def load_pair(pair: ImagePair, normalization: NormalizationConfig, storage_options: StorageOptions = None) -> LoadedPair:
    """Read, validate and normalise one pair; a size mismatch names both files."""
    image_bytes = read_bytes(pair.image_url, storage_options)
    mask_bytes = read_bytes(pair.mask_url, storage_options)
    image = decode_image(image_bytes, pair.image_url)
    decoded_mask = decode_image(mask_bytes, pair.mask_url)
    check_same_size(pair.image_url, image.shape, pair.mask_url, decoded_mask.shape)
    return LoadedPair(
        source=pair,
        image=normalize_image(image, normalization),
        mask=binarize_mask(decoded_mask),
        image_sha256=hashlib.sha256(image_bytes).hexdigest(),
        mask_sha256=hashlib.sha256(mask_bytes).hexdigest(),
        dtype=str(image.dtype),
        instances=instance_labels(decoded_mask),
    )


def instance_labels(decoded_mask: np.ndarray) -> np.ndarray | None:
    """Cell labels of a mask file that is an instance label image, else None.

    Integer images of 16 bits or more are label images (as cellpose, StarDist and the DSB2018
    annotations store them); 8-bit masks are read as binary, since a compressed or resampled
    0/255 mask has stray grey values that are not cells.
    """
    if decoded_mask.dtype.kind in "iu" and decoded_mask.dtype.itemsize >= 2:
        return decoded_mask.astype(np.int32, copy=False)
    return None


def dataset_hash(checksums: Iterable[tuple[str, str, str]]) -> str:
    """Content hash of a dataset from (id, image sha256, mask sha256) triples, in any order."""
    digest = hashlib.sha256()
    for image_id, image_sha, mask_sha in sorted(checksums):
        digest.update(f"{image_id}\0{image_sha}\0{mask_sha}\n".encode())
    return digest.hexdigest()


def manifest_hash(pairs: Sequence[LoadedPair]) -> str:
    """Content hash of loaded pairs: ids and file checksums, independent of where the files live."""
    return dataset_hash((pair.id, pair.image_sha256, pair.mask_sha256) for pair in pairs)


def load_pairs(
    pairs: Sequence[ImagePair], normalization: NormalizationConfig, storage_options: StorageOptions = None
) -> list[LoadedPair]:
    """Load pairs concurrently (object storage is latency bound), keeping their order."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda pair: load_pair(pair, normalization, storage_options), pairs))


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


class ImgDataset(Dataset):
    """Training or validation samples from loaded pairs.

    Training (`patch_size` set): `patches_per_image` random crops per image per epoch, with
    optional augmentation (`cellseg.augment`); randomness is a function of (seed, epoch, index) only, so runs and
    resumed runs see the same samples. Validation (`patch_size` None): whole images.
    Items are (image, target) float32 tensors of shape (1, H, W).

    Training targets keep touching cells apart where the pair has instance labels
    (`cellseg.weights.separated_target`). Extra target channels follow the mask, in this order:
    per-pixel loss weights with `border_weight` > 0 (`cellseg.weights.border_weight_map`), and
    each cell's normalised distance map with `distance_map` (`cellseg.weights.normalised_distance`;
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
        self.augment = augment
        self.augmentation = augmentation
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs) * self.patches_per_image

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pair_index = index // self.patches_per_image
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
