"""Image/mask pairs by file name: pairing each image with its mask (mask suffixes, one folder for
both, names that differ in case), and the deterministic train/val split of the pairs."""

from __future__ import annotations

import logging
import posixpath
from collections import defaultdict
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from cellseg import plates
from cellseg.dataset_errors import DatasetError
from cellseg.io import StorageOptions, image_stem, list_images, mask_name_base, names_one_file
from cellseg.redact import redact_url

logger = logging.getLogger(__name__)


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


def group_by_stem(urls: Sequence[str], root: str | None = None) -> dict[str, list[str]]:
    """Each file stem with the URLs that have it (more than one: a.png and a.tif); with `root`, the
    folder they were listed under, each image id (`cellseg.plates.image_id`: subfolders before the stem)."""
    by_stem: dict[str, list[str]] = defaultdict(list)
    for url in urls:
        by_stem[image_stem(url) if root is None else plates.image_id(url, root)].append(url)
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
    if set(image_urls) == set(mask_urls):  # one folder of both (not one file of the images given as the masks)
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
