"""Image/mask pairs: pairing by file name, the deterministic train/val split, loading (decode,
validate, normalise) once, and the content hash of a dataset."""

from __future__ import annotations

import hashlib
import io
import logging
import posixpath
from collections import defaultdict
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import tifffile
from scipy import ndimage
from skimage import measure

from cellseg.appearance import image_appearance
from cellseg.config import NormalizationConfig
from cellseg.io import (
    DecodedMask,
    StorageOptions,
    binarize_mask,
    decode_image,
    decode_mask,
    image_stem,
    list_images,
    lossy_binary,
    mask_name_base,
    names_one_file,
    read_bytes,
)
from cellseg.normalize import normalize_image
from cellseg.redact import redact_url

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the files at fault."""


@dataclass(frozen=True)
class ImagePair:
    """An image and its mask, matched by file stem (`id`)."""

    id: str
    image_url: str
    mask_url: str


# Annotation tools and segmenters name a mask after its image plus a suffix: Cellpose writes
# `img_masks.tif` (its GUI `img_cp_masks.png`), and labs commonly use `img_mask.png` or `img_labels.tif`.
MASK_NAMES = "'<image>.<ext>' or '<image>_mask', '_masks', '_label', '_labels', '_cp_masks' before the extension"
LISTED_PER_PROBLEM = 5


def group_by_stem(urls: Sequence[str]) -> dict[str, list[str]]:
    """Each file stem with the URLs that have it (more than one: a.png and a.tif)."""
    by_stem: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_stem[image_stem(url)].append(url)
    return by_stem


def index_by_stem(urls: Sequence[str], role: str) -> dict[str, str]:
    """Map each file stem to its URL; two files with one stem (a.png, a.tif) are an error."""
    return _unique(group_by_stem(urls), f"{role} files share a stem")


def _unique(found_by_key: dict[str, list[str]], what: str) -> dict[str, str]:
    """One URL per key; DatasetError naming every key with several (`what` says what they share)."""
    clashes = {key: found for key, found in found_by_key.items() if len(found) > 1}
    if clashes:
        described = "; ".join(
            f"{key!r}: " + ", ".join(posixpath.basename(u) for u in found) for key, found in sorted(clashes.items())
        )
        raise DatasetError(f"{what}, so the pairing is ambiguous: {described}")
    return {key: found[0] for key, found in found_by_key.items()}


def _some(names: Sequence[str]) -> str:
    """The first LISTED_PER_PROBLEM of `names`, and how many more."""
    more = len(names) - LISTED_PER_PROBLEM
    return ", ".join(names[:LISTED_PER_PROBLEM]) + (f" and {more} more" if more > 0 else "")


def split_one_folder(urls: Sequence[str]) -> tuple[list[str], list[str]]:
    """(images, masks) of a folder holding both, as Cellpose keeps them: masks are the files whose
    stem ends in a mask suffix (`MASK_NAME_SUFFIX`). Without any, every file is returned as both
    (each then its own mask, which `load_pair` refuses for an image of grey levels)."""
    masks = [url for url in urls if mask_name_base(image_stem(url)) is not None]
    if not masks:
        return list(urls), list(urls)
    return [url for url in urls if mask_name_base(image_stem(url)) is None], masks


def pair_by_stem(image_urls: Sequence[str], mask_urls: Sequence[str], images_url: str, masks_url: str) -> list[ImagePair]:
    """Pair listed image and mask URLs: a mask has its image's stem, or that stem and a mask suffix
    (`img01_mask.png`, `img01_masks.tif`: `MASK_NAME_SUFFIX`); images and masks may share one folder.
    Raises DatasetError naming files left unpaired."""
    if set(image_urls) & set(mask_urls):
        image_urls, mask_urls = split_one_folder(image_urls)
    images = index_by_stem(image_urls, "image")
    if not images:
        raise DatasetError(f"no images (.png, .tif, .tiff, .jpg) found directly under '{redact_url(images_url)}' "
                           "(subfolders are not searched)")
    masks, orphan_masks, by_suffix = masks_of_images(mask_urls, images.keys())
    lonely_images = [images[stem] for stem in sorted(images.keys() - masks.keys())]
    problems = [f"image '{redact_url(url)}' has no mask in '{redact_url(masks_url)}'"
                for url in lonely_images[:LISTED_PER_PROBLEM]]
    if len(lonely_images) > LISTED_PER_PROBLEM:
        problems.append(f"and {len(lonely_images) - LISTED_PER_PROBLEM} more of the {len(lonely_images)} images "
                        "without a mask")
    problems += [f"mask '{redact_url(url)}' has no image in '{redact_url(images_url)}'"
                 for url in orphan_masks[:LISTED_PER_PROBLEM]]
    if len(orphan_masks) > LISTED_PER_PROBLEM:
        problems.append(f"and {len(orphan_masks) - LISTED_PER_PROBLEM} more of the {len(orphan_masks)} masks "
                        "without an image")
    if problems:
        raise DatasetError("; ".join(problems) + f" (a mask is named {MASK_NAMES})")
    logger.info("paired %d images under '%s' with their masks under '%s'%s", len(images), redact_url(images_url),
                redact_url(masks_url), f" ({by_suffix} named with a mask suffix)" if by_suffix else "")
    return [ImagePair(stem, images[stem], masks[stem]) for stem in sorted(images)]


def masks_of_images(mask_urls: Sequence[str], image_ids: Collection[str],
                    role: str = "mask") -> tuple[dict[str, str], list[str], int]:
    """(each image id's mask URL, the masks that name no image, how many were matched by a mask
    suffix): a mask has its image's stem, or that stem and a mask suffix (`MASK_NAME_SUFFIX`).
    DatasetError where two files name one image."""
    masks_by_image: dict[str, list[str]] = defaultdict(list)
    orphans, by_suffix = [], 0
    for stem, url in index_by_stem(mask_urls, role).items():
        base = stem if stem in image_ids else mask_name_base(stem)
        if base is not None and base in image_ids:
            masks_by_image[base].append(url)
            by_suffix += base != stem
        else:
            orphans.append(url)
    masks = _unique(masks_by_image, f"{role} files name one image (one with a {role} suffix)")
    if orphans and (by_case := _paired_ignoring_case(orphans, [i for i in image_ids if i not in masks])):
        masks.update(by_case)
        orphans = [url for url in orphans if url not in by_case.values()]
        image_id, url = min(by_case.items())
        logger.info("paired %d %s files with images whose names differ only in case (e.g. '%s' with image '%s')",
                    len(by_case), role, posixpath.basename(url), image_id)
    return masks, orphans, by_suffix


def _paired_ignoring_case(mask_urls: Sequence[str], image_ids: Collection[str]) -> dict[str, str]:
    """{image id: mask URL} of the masks whose stem (or its base, `mask_name_base`) names one of
    `image_ids` ignoring case, where that match is unique both ways: never when two images (a, A)
    or two masks would take it."""
    images_by_folded: dict[str, list[str]] = defaultdict(list)
    for image_id in image_ids:
        images_by_folded[image_id.casefold()].append(image_id)
    claims: dict[str, list[str]] = defaultdict(list)
    for url in mask_urls:
        stem = image_stem(url)
        for base in (stem, mask_name_base(stem)):
            if base is not None and len(found := images_by_folded.get(base.casefold(), [])) == 1:
                claims[found[0]].append(url)
                break
    return {image_id: urls[0] for image_id, urls in claims.items() if len(urls) == 1}


def pair_images_and_masks(
    images_url: str, masks_url: str, storage_options: StorageOptions = None
) -> list[ImagePair]:
    """Pair every image under `images_url` with the mask of the same stem under `masks_url`.

    Raises DatasetError naming each image without a mask and each mask without an image.
    """
    with folders_not_files(images_url, masks_url, storage_options):
        return pair_by_stem(list_images(images_url, storage_options), list_images(masks_url, storage_options, kind="mask"),
                            images_url, masks_url)


@contextmanager
def folders_not_files(images_url: str, masks_url: str, storage_options: StorageOptions = None) -> Iterator[None]:
    """Pairing inside, where a URL naming one file is listed as a folder of that file alone and
    pairs nothing: its DatasetError becomes one naming the folder to give instead. The URLs are
    looked at only once pairing has failed."""
    try:
        yield
    except DatasetError:
        for kind, url in (("images", images_url), ("masks", masks_url)):
            if names_one_file(url, storage_options):
                folder = posixpath.dirname(url.rstrip("/")) or "."
                raise DatasetError(f"the {kind} URL '{redact_url(url)}' names one file: training reads a folder "
                                   f"of {kind}, so name its folder ('{redact_url(folder)}')") from None
        raise


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
    image_bytes = read_bytes(pair.image_url, storage_options)
    mask_bytes = read_bytes(pair.mask_url, storage_options)
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


TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def stacked_planes(data: bytes) -> int:
    """How many planes of its first page's size a TIFF holds (a z-stack, time series or channels
    saved as pages; thumbnails are not counted); 1 for any other file."""
    if data[:4] not in TIFF_SIGNATURES:
        return 1
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        first = tif.pages[0].shape
        return sum(page.shape == first for page in tif.pages)


def check_one_plane(role: str, url: str, data: bytes) -> None:
    """Raise DatasetError naming the file when an image or mask file is a stack (`stacked_planes`):
    decoding reads its first plane, which need not be the one the mask was drawn on."""
    if (planes := stacked_planes(data)) > 1:
        raise DatasetError(f"{role} '{redact_url(url)}' is a stack of {planes} planes (z, time points or channels); "
                           "training takes 2-D images and masks: save the annotated plane of each as a file "
                           "of its own")


def mask_and_labels(decoded: DecodedMask, url: str) -> tuple[np.ndarray, np.ndarray | None]:
    """A mask file's boolean cell mask, and its cell labels where it is a label image
    (`instance_labels`): the mask is then where the labels are, else `binarize_mask`'s. A file
    that is neither, a microscopy image given as a mask, is refused (DatasetError)."""
    pixels = whole_numbers(decoded.pixels, url)
    labels = instance_labels(pixels, url, decoded.colour)
    if labels is None and not decoded.colour and (problem := not_a_mask(pixels)):
        raise DatasetError(f"mask '{redact_url(url)}' {problem}: it looks like an image, not a mask (0 background, "
                           "cells any other value) or a label image (one value per cell); is it the image folder?")
    return (labels > 0 if labels is not None else binarize_mask(pixels)), labels


def whole_numbers(pixels: np.ndarray, url: str) -> np.ndarray:
    """A floating-point mask's pixels as uint32 when they are whole numbers from 0 (a label image or
    a 0/1 mask saved as float, as numpy arrays and Fiji's 32-bit images are), so that they are judged
    as integer masks are; other pixels unchanged. Fractions or negative values (a probability map)
    are refused, naming the file: read as 'above 0 is cell', nearly every pixel was a cell."""
    if pixels.dtype.kind != "f" or not pixels.size:
        return pixels
    not_whole = pixels[(pixels != np.floor(pixels)) | (pixels < 0)]
    if not_whole.size or float(pixels.max()) > np.iinfo(np.uint32).max:
        example = float(not_whole[0]) if not_whole.size else float(pixels.max())
        raise DatasetError(f"mask '{redact_url(url)}' holds {pixels.dtype} values that are not whole numbers "
                           f"from 0 ({example:g} among them): give 0 for background and a whole number for cells "
                           "(one per cell in a label image); threshold a probability map first")
    return pixels.astype(np.uint32)


# A binary mask keeps most of its pixels at 0 and its top value, even saved lossily (`lossy_binary`);
# a microscopy image's pixels spread over many levels in between. Read as a mask, any value above
# 0 was cell: an image gave a mask of nearly all cell, scored and trained on without a word.
MASK_MID_LEVELS = 16  # distinct values strictly between 0 and the top value, at least
MASK_EDGE_SHARE = 0.5  # of the pixels at 0 or the top value, less than


def not_a_mask(pixels: np.ndarray) -> str | None:
    """What makes a grey integer mask that is no label image an image instead, or None (colour
    masks are judged by their colours: `instance_labels`)."""
    if pixels.dtype.kind not in "iu" or not pixels.size:
        return None
    top = int(pixels.max())
    edge_share = float(np.count_nonzero((pixels == 0) | (pixels == top))) / pixels.size
    if edge_share >= MASK_EDGE_SHARE or lossy_binary(pixels):
        return None
    middle = np.unique(pixels[(pixels > 0) & (pixels < top)]).size
    if middle < MASK_MID_LEVELS:
        return None
    return f"holds {middle} levels between 0 and {top}, with {1 - edge_share:.0%} of its pixels among them"


def instance_labels(decoded_mask: np.ndarray, url: str, colour: bool = False) -> np.ndarray | None:
    """Cell labels of a mask file that is an instance label image (`label_image`), else None.

    Integer images of 16 bits or more are label images (as cellpose, StarDist and the DSB2018
    annotations store them), unless one value covers several separate regions: a binary mask
    saved in 16 bits (0/1 or 0/65535, as ImageJ and MATLAB write them). An 8-bit mask is a label
    image only when its grey levels are cells (`labels_in_eight_bits`); otherwise it is binary,
    since a compressed or resampled 0/255 mask has stray grey values that are not cells.
    A `colour` file's colours (`io.decode_mask`) are its cells, one colour each, unless one colour
    covers several separate regions (cells in one colour: a binary mask) or its colours lie mostly
    in specks, as a JPEG-compressed mask's do (`speck_share`): those are binary masks.
    """
    if decoded_mask.dtype.kind not in "iu":
        return None
    if colour:
        if one_value_in_pieces(decoded_mask):
            return None
        cells = numbered_cells(decoded_mask)
        specks, share = speck_share(cells)
        return None if specks >= SPECKS_JUDGED and share > MAX_SPECK_SHARE else cells
    if decoded_mask.dtype.itemsize >= 2:
        return None if one_value_in_pieces(decoded_mask) else _cells_not_specks(decoded_mask, url)
    warn_if_wrapped(decoded_mask, url)
    return _cells_not_specks(decoded_mask, url) if labels_in_eight_bits(decoded_mask) else None


# An 8-bit mask whose grey levels are cells: at least 3 of them, forming at most 1.5 regions per
# level, and no level holding half the labelled pixels. 650 of DSB2018's 657 label images that fit
# in 8 bits pass; none of its 664 binary masks do, nor any of those masks compressed as JPEG
# (quality 75 or 95) or resampled bilinearly by 1.5, whose stray grey levels lie in many specks.
EIGHT_BIT_LABEL_LEVELS = 3
EIGHT_BIT_REGIONS_PER_LEVEL = 1.5


def labels_in_eight_bits(mask: np.ndarray) -> bool:
    """Whether an 8-bit mask is a label image: its grey levels are cells, each one region (see
    EIGHT_BIT_REGIONS_PER_LEVEL), rather than the 0/255 of a binary mask and its stray values."""
    mask = judged_window(mask)
    counts = np.bincount(mask.ravel(), minlength=256)[1:]
    levels = int(np.count_nonzero(counts))
    if levels < EIGHT_BIT_LABEL_LEVELS or counts.max() * 2 >= counts.sum():
        return False
    regions = int(measure.label(mask, background=0, connectivity=1).max())
    return regions <= EIGHT_BIT_REGIONS_PER_LEVEL * levels


def one_value_in_pieces(labels: np.ndarray) -> int:
    """How many separate regions the labelled pixels form when they all hold one value (a binary
    mask); 0 when they hold several values or form one region."""
    labelled = labels[labels > 0]
    if labelled.size == 0 or labelled.min() != labelled.max():
        return 0
    regions = int(ndimage.label(labels > 0)[1])
    return regions if regions > 1 else 0


# A cell of a label image is a region of one value; a microscope image read as labels is mostly
# specks of one grey level. Of DSB2018's 709 label images none has more than 0.1% of its labelled
# pixels in regions under SPECK_PIXELS pixels; its 709 images, read as labels, have 13-91%, and
# ISBI 2012's EM slices over 99%. A few specks (a hand-made label image of tiny cells) are not judged.
SPECK_PIXELS = 4
MAX_SPECK_SHARE = 0.25
SPECKS_JUDGED = 50


def label_image(labels: np.ndarray, url: str) -> np.ndarray:
    """`numbered_cells` of the integer label image read from `url`; a DatasetError naming the file
    when it is a binary mask (`one_value_in_pieces`) or its cells are mostly specks, as when an
    image is given as its own mask."""
    if regions := one_value_in_pieces(labels):
        raise DatasetError(f"'{redact_url(url)}' is not a label image: its {regions} separate regions all hold one "
                           "value, as in a binary mask; give label images (one value per cell) or binary masks as masks")
    warn_if_wrapped(labels, url)
    return _cells_not_specks(labels, url)


# An 8-bit label image of more than 255 cells wraps: cell 256 becomes background, 257 shares label 1
# with cell 1, and so on. Such a file uses (nearly) every value from 1 to 255, and some values each
# label separate regions far apart; a cell cut in two by another lies within a few of its own sizes.
WRAPPED_LEVELS = 250  # of the 255 non-zero values, at least
FAR_APART_SIZES = 4  # centres further apart than this many times the larger piece's side (square root of its area)


def wrapped_label_values(labels: np.ndarray) -> int:
    """How many values of an 8-bit label image each label several regions far apart (4-connected,
    `FAR_APART_SIZES`), when it uses at least WRAPPED_LEVELS values: the sign of more than 255
    cells saved in 8 bits; 0 for any other image, judged on its `judged_window`."""
    if labels.dtype != np.uint8:
        return 0
    window = judged_window(labels)
    if np.count_nonzero(np.bincount(window.ravel(), minlength=256)[1:]) < WRAPPED_LEVELS:
        return 0
    regions = measure.label(window, background=0, connectivity=1)
    count = int(regions.max())
    value = np.zeros(count + 1, np.int64)
    value[regions.ravel()] = window.ravel()
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    centres = np.array(ndimage.center_of_mass(np.ones(window.shape), regions, np.arange(1, count + 1))).reshape(-1, 2)
    wrapped = 0
    for level in np.flatnonzero(np.bincount(value[1:], minlength=256) > 1):
        pieces = np.flatnonzero(value[1:] == level)
        gaps = np.linalg.norm(centres[pieces][:, None] - centres[pieces][None], axis=-1)
        sides = np.sqrt(np.maximum.outer(sizes[pieces + 1], sizes[pieces + 1]))
        wrapped += bool((gaps > FAR_APART_SIZES * sides).any())
    return wrapped


def warn_if_wrapped(labels: np.ndarray, url: str) -> None:
    """Log a warning naming the file when an 8-bit label image looks wrapped (`wrapped_label_values`)."""
    if wrapped := wrapped_label_values(labels):
        logger.warning("label image '%s' looks wrapped: it is 8-bit, uses nearly all 255 cell values, and %d of them "
                       "each label separate cells far apart, as when more than 255 cells are saved in 8 bits (cells "
                       "then share labels, and every 256th is background); save labels as 16-bit PNG or TIFF",
                       redact_url(url), wrapped)


def _cells_not_specks(labels: np.ndarray, url: str) -> np.ndarray:
    """`numbered_cells` of a label image; a DatasetError naming it when its cells are mostly specks."""
    cells = numbered_cells(labels)
    specks, share = speck_share(cells)
    if specks >= SPECKS_JUDGED and share > MAX_SPECK_SHARE:
        raise DatasetError(
            f"'{redact_url(url)}' is not a label image: {share:.0%} of its labelled pixels lie in specks of one value "
            f"smaller than {SPECK_PIXELS} pixels, as in a microscope image (a label image's cells are regions); "
            "give binary masks or instance label images"
        )
    return cells


def speck_share(labels: np.ndarray) -> tuple[int, float]:
    """The specks of a label image (4-connected regions of one non-zero value smaller than
    SPECK_PIXELS pixels): how many, and their share of the labelled pixels."""
    labels = judged_window(labels)
    labelled = int(np.count_nonzero(labels))
    if not labelled:
        return 0, 0.0
    regions = measure.label(labels, background=0, connectivity=1)
    sizes = np.bincount(regions.ravel())
    small = sizes < SPECK_PIXELS
    small[0] = False
    return int(np.count_nonzero(small)), float(sizes[small].sum() / labelled)


JUDGED_SIDE = 2048  # what a mask is, is judged on its central window of at most this side


def judged_window(mask: np.ndarray) -> np.ndarray:
    """The central JUDGED_SIDE x JUDGED_SIDE window of a mask (all of a smaller one): judging its
    regions then takes bounded memory, whatever the mask's size."""
    top, left = (max(0, (side - JUDGED_SIDE) // 2) for side in mask.shape[:2])
    return mask[top:top + JUDGED_SIDE, left:left + JUDGED_SIDE]


def numbered_cells(labels: np.ndarray) -> np.ndarray:
    """int32 cell labels of an integer label image: as they are when every label is a number from
    1 to the image's pixel count, else renumbered 1..K in the order of their values (nothing but
    a positive label is a cell). What is allocated per cell (scores, targets, measurements) then
    follows the cells, not the largest number in a file, and labels past 2^31 keep their cells."""
    if labels.size == 0 or (int(labels.min()) >= 0 and int(labels.max()) <= labels.size):
        return labels.astype(np.int32, copy=False)
    cells = labels > 0
    numbered = np.zeros(labels.shape, np.int32)
    numbered[cells] = np.unique(labels[cells], return_inverse=True)[1].reshape(-1) + 1
    return numbered


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
