"""What a mask file's pixels are read as: a binary cell mask or instance labels (label images,
colour labels, whole-number floats, 8-bit labels and wrapped ones), and what is refused as no mask
(a microscopy image, a probability map, cells mostly specks)."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage
from skimage import measure

from cellseg.dataset_errors import DatasetError
from cellseg.io import DecodedMask, binarize_mask, lossy_binary
from cellseg.redact import redact_url

logger = logging.getLogger(__name__)


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
