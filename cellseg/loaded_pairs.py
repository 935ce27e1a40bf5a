"""Pairs loaded once: each image and mask read, validated (same size, one plane, a mask that is
no image) and normalised, with their checksums; the content hash of a dataset."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from cellseg.appearance import image_appearance
from cellseg.config import NormalizationConfig
from cellseg.dataset_errors import DatasetError
from cellseg.io import StorageOptions, decode_image, decode_mask, read_image_bytes, stacked_planes
from cellseg.mask_pixels import mask_and_labels
from cellseg.normalize import normalize_image
from cellseg.pairs import ImagePair
from cellseg.redact import redact_url

logger = logging.getLogger(__name__)


def check_same_size(image_url: str, image_shape: tuple[int, ...], mask_url: str, mask_shape: tuple[int, ...]) -> None:
    """Raise DatasetError naming both files when a mask's size differs from its image's."""
    if tuple(image_shape) != tuple(mask_shape):
        raise DatasetError(
            f"mask '{mask_url}' is {mask_shape[1]}x{mask_shape[0]} (WxH), "
            f"image '{image_url}' is {image_shape[1]}x{image_shape[0]}"
        )


@dataclass(frozen=True)
class LoadedPair:
    """A decoded, validated pair: normalised float32 image and boolean mask, both (H, W).

    `instances` holds the cell labels (int32, 0 = background) when the mask file was an
    instance label image (`instance_labels`); `mask` is then their union. `appearance`
    is the kind of image, judged before normalisation (`cellseg.appearance.image_appearance`).
    """

    source: ImagePair
    image: np.ndarray
    mask: np.ndarray
    image_sha256: str
    mask_sha256: str
    dtype: str
    instances: np.ndarray | None = None
    appearance: str = "fluorescence"

    @property
    def id(self) -> str:
        return self.source.id

    def manifest_entry(self) -> dict[str, object]:
        """What the dataset manifest records about this pair."""
        return {
            "id": self.id,
            "image_url": redact_url(self.source.image_url),  # the manifest keeps no credentials
            "mask_url": redact_url(self.source.mask_url),
            "image_sha256": self.image_sha256,
            "mask_sha256": self.mask_sha256,
            "shape": list(self.image.shape),
            "dtype": self.dtype,
        }


# A mask drawn black on white (0 for cells) is mostly "cell": DSB2018's 709 nuclei masks cover 11% at
# the median (59% at most), so inverted, 89%. ISBI 2012's EM cell interiors cover up
# to 81%, so that dense, real masks stay below the warning.
MOSTLY_CELL_SHARE = 0.9


def load_pair(pair: ImagePair, normalization: NormalizationConfig, storage_options: StorageOptions = None) -> LoadedPair:
    """Read, validate and normalise one pair; a size mismatch names both files."""
    image_bytes = read_image_bytes(pair.image_url, storage_options)  # no larger than decode_image takes
    mask_bytes = read_image_bytes(pair.mask_url, storage_options)
    image = decode_image(image_bytes, pair.image_url)
    decoded = decode_mask(mask_bytes, pair.mask_url)
    decoded_mask = decoded.pixels
    check_same_size(pair.image_url, image.shape, pair.mask_url, decoded_mask.shape)
    check_one_plane("image", pair.image_url, image_bytes)
    check_one_plane("mask", pair.mask_url, mask_bytes)
    # A binary image that equals its mask is consistent; an image of grey levels is no mask.
    same = mask_bytes == image_bytes or np.array_equal(image, decoded_mask)
    if same and np.unique(image).size > 2:
        raise DatasetError(f"mask '{redact_url(pair.mask_url)}' holds the same pixels as its image "
                           f"'{redact_url(pair.image_url)}': are the masks the image folder?")
    mask, instances = mask_and_labels(decoded, pair.mask_url)
    if mask.size and (cell_share := float(np.count_nonzero(mask)) / mask.size) > MOSTLY_CELL_SHARE:
        logger.warning("mask '%s' marks %.0f%% of its pixels as cell (any value above 0): is it inverted, cells dark "
                       "on a light background? Masks mark the background 0", redact_url(pair.mask_url),
                       100 * cell_share)
    return LoadedPair(
        source=pair,
        image=normalize_image(image, normalization),
        mask=mask,
        image_sha256=hashlib.sha256(image_bytes).hexdigest(),
        mask_sha256=hashlib.sha256(mask_bytes).hexdigest(),
        dtype=str(image.dtype),
        instances=instances,
        appearance=image_appearance(image, decoded_mask),
    )


def check_one_plane(role: str, url: str, data: bytes) -> None:
    """Raise DatasetError naming the file when an image or mask file is a stack (`stacked_planes`):
    decoding reads its first plane, which need not be the one the mask was drawn on."""
    if (planes := stacked_planes(data)) > 1:
        raise DatasetError(f"{role} '{redact_url(url)}' is a stack of {planes} planes (z, time points or channels); "
                           "training takes 2-D images and masks: save the annotated plane of each as a file "
                           "of its own")


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
