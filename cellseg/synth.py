"""Synthetic fluorescence-like cell images with exact masks and instance labels.

Cells are irregular ellipses of varying size and brightness, some placed so that they touch,
on an uneven background, blurred by a Gaussian point-spread function and corrupted by shot and
read noise. Everything is a function of the seed, so datasets are reproducible.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image
from scipy import ndimage

from cellseg.io import StorageOptions, filesystem, join_url
from cellseg.redact import redact_url
from cellseg.store_checks import enclosing_zarr_store

DATASET_FOLDERS = ("images", "masks", "labels")


@dataclass(frozen=True)
class SyntheticSample:
    """image: (H, W) uint8 or uint16; mask: (H, W) bool; labels: (H, W) uint16, 0 = background."""

    image: np.ndarray
    mask: np.ndarray
    labels: np.ndarray


def _background(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    gradient = rng.uniform(-1, 1) * rows / shape[0] + rng.uniform(-1, 1) * cols / shape[1]
    blotches = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=min(shape) / 6)
    blotches /= np.abs(blotches).max() + 1e-6
    return 0.12 + 0.05 * gradient + 0.05 * blotches


def _draw_cell(labels: np.ndarray, label: int, center: tuple[float, float], radius: float, rng: np.random.Generator) -> None:
    """Paint an irregular ellipse into `labels` where it is still background (earlier cells win)."""
    aspect = rng.uniform(0.65, 1.0)
    angle = rng.uniform(0, np.pi)
    harmonics = [(k, rng.uniform(0, 0.08), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)]
    extent = int(np.ceil(radius * 1.3)) + 1
    cy, cx = center
    top, left = max(0, int(cy) - extent), max(0, int(cx) - extent)
    bottom, right = min(labels.shape[0], int(cy) + extent + 1), min(labels.shape[1], int(cx) + extent + 1)
    if top >= bottom or left >= right:
        return
    yy, xx = np.mgrid[top:bottom, left:right].astype(np.float32)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    theta = np.arctan2(v, u)
    boundary = radius * (1 + sum(amp * np.cos(k * theta + phase) for k, amp, phase in harmonics))
    inside = np.hypot(u, v) <= boundary
    window = labels[top:bottom, left:right]
    window[inside & (window == 0)] = label


def generate_sample(
    rng: np.random.Generator,
    shape: tuple[int, int] = (128, 128),
    bit_depth: Literal[8, 16] = 8,
    polarity: Literal["bright", "dark"] = "bright",
) -> SyntheticSample:
    """One synthetic image with its exact mask and instance labels."""
    height, width = shape
    labels = np.zeros(shape, dtype=np.uint16)
    scale = min(shape) / 128
    n_cells = int(rng.integers(6, 16) * max(1.0, height * width / 128**2))
    centers: list[tuple[float, float, float]] = []
    for label in range(1, n_cells + 1):
        radius = rng.uniform(5, 14) * max(0.75, min(scale, 1.5))
        if centers and rng.random() < 0.3:  # touch a previous cell
            py, px, pr = centers[int(rng.integers(len(centers)))]
            direction = rng.uniform(0, 2 * np.pi)
            distance = (pr + radius) * 0.95
            cy, cx = py + distance * np.sin(direction), px + distance * np.cos(direction)
        else:
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        centers.append((cy, cx, radius))
        _draw_cell(labels, label, (cy, cx), radius, rng)
    labels = _relabel_sequential(labels)

    brightness = np.concatenate([[0.0], rng.uniform(0.35, 1.0, int(labels.max()))]).astype(np.float32)
    texture = 1 + 0.25 * ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.5)
    signal = _background(rng, shape) + brightness[labels] * texture
    signal = ndimage.gaussian_filter(signal, sigma=rng.uniform(0.8, 1.6))
    photons = rng.uniform(80, 300)
    signal = rng.poisson(np.clip(signal, 0, None) * photons) / photons
    signal = signal + rng.normal(0, 0.02, shape)
    if polarity == "dark":
        signal = signal.max() - signal
    top = 255 if bit_depth == 8 else 65535
    scaled = np.clip(signal / max(np.percentile(signal, 99.9), 1e-6) * 0.9 * top, 0, top)
    image = scaled.astype(np.uint8 if bit_depth == 8 else np.uint16)
    return SyntheticSample(image=image, mask=labels > 0, labels=labels)


def _relabel_sequential(labels: np.ndarray) -> np.ndarray:
    present = np.unique(labels[labels > 0])  # 0 stays background even when no pixel is background
    lookup = np.zeros(int(labels.max()) + 1, dtype=np.uint16)
    lookup[present] = np.arange(1, len(present) + 1, dtype=np.uint16)
    return lookup[labels]


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a 2-D uint8, uint16 or bool array."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


MIN_SIDE = 16
MAX_SIDE = 8192  # up to 61,440 cells, which 16-bit label PNGs number; a larger image would overflow them


def write_dataset(
    out_url: str,
    count: int = 24,
    size: int = 128,
    seed: int = 0,
    bit_depth: Literal[8, 16] = 8,
    polarity: Literal["bright", "dark", "mixed"] = "bright",
    vary_size: bool = False,
    storage_options: StorageOptions = None,
    overwrite: bool = False,
) -> list[str]:
    """Write `count` samples as `images/`, `masks/` (0/255) and `labels/` PNGs under `out_url`.

    With `vary_size`, each side is drawn from [3/4 size, size]. Returns the image ids. A dataset
    already there (files in any of the three folders) is refused (ValueError), or with
    `overwrite` replaced: those folders' files are deleted first, so no earlier image stays
    beside the new ones.
    """
    if count < 1 or not MIN_SIDE <= size <= MAX_SIDE:
        raise ValueError(f"a synthetic dataset needs at least 1 image of {MIN_SIDE} to {MAX_SIDE} pixels a side "
                         f"(asked: {count} of {size})")
    fs, root = filesystem(out_url, storage_options)
    if store := enclosing_zarr_store(fs, join_url(root, DATASET_FOLDERS[0])):
        where = "is" if store == (root.rstrip("/") or root) else "is inside"
        raise ValueError(f"'{redact_url(out_url)}' {where} the zarr store '{redact_url(store)}', which a dataset "
                         "written there would damage (its folders read back as broken images); choose a folder "
                         "outside it")
    folders = [join_url(root, folder) for folder in DATASET_FOLDERS]
    held = [folder for folder in folders if fs.isdir(folder) and fs.ls(folder, detail=False)]
    if held and not overwrite:
        names = [name for name, folder in zip(DATASET_FOLDERS, folders, strict=True) if folder in held]
        raise ValueError(f"'{redact_url(out_url)}' already holds a dataset (files in {', '.join(f'{name}/' for name in names)}); "
                         "replace it (--overwrite; overwrite=True from Python) or choose another folder")
    for folder in held:
        fs.rm(folder, recursive=True)
    for folder in folders:
        fs.makedirs(folder, exist_ok=True)
    ids = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        shape = (size, size)
        if vary_size:
            height, width = (int(side) for side in rng.integers(size * 3 // 4, size + 1, 2))
            shape = (height, width)
        sample_polarity = polarity if polarity != "mixed" else ("bright", "dark")[index % 2]
        sample = generate_sample(rng, shape, bit_depth, sample_polarity)
        image_id = f"synth_{index:04d}"
        for folder, array in zip(DATASET_FOLDERS, (sample.image, sample.mask, sample.labels), strict=True):
            fs.pipe_file(join_url(root, f"{folder}/{image_id}.png"), encode_png(array))
        ids.append(image_id)
    return ids


def mosaic_tiles(
    shape: tuple[int, int], tile: int = 512, seed: int = 0, cells: Callable[[int, int], bool] = lambda row, col: True,
) -> Iterator[tuple[int, int, SyntheticSample]]:
    """A synthetic mosaic of `shape`, as (top, left, sample) tiles of up to `tile` pixels a side in
    raster order, each its own sample (seeded by its position), so that an image far larger than
    memory is written tile by tile; a tile for which `cells(row, col)` is false is background only
    (zeros), as most of a slide is."""
    height, width = shape
    for top in range(0, height, tile):
        for left in range(0, width, tile):
            size = (min(tile, height - top), min(tile, width - left))
            if cells(top // tile, left // tile):
                sample = generate_sample(np.random.default_rng([seed, top, left]), size)
            else:
                empty = np.zeros(size, dtype=np.uint16)
                sample = SyntheticSample(empty.astype(np.uint8), empty > 0, empty)
            yield top, left, sample
