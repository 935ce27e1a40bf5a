"""Training-time augmentation of (image, mask) crops: the symmetries of the square, a small
affine warp, elastic deformation as in the U-Net paper, dim cells beside bright ones, and
intensity changes.

Geometry is applied to image and mask together (bilinear for the image, nearest for the mask),
so a pixel keeps its label wherever it moves. Intensity changes touch the image only. Every
draw comes from the `rng` passed in, so a sample is a function of (seed, epoch, index).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cellseg.config import AugmentationConfig


def flip_and_rotate(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One of the 8 symmetries of the square, the same for image and mask (H, W) or (C, H, W)."""
    turns = int(rng.integers(0, 4))
    image, mask = np.rot90(image, turns, axes=(-2, -1)), np.rot90(mask, turns, axes=(-2, -1))
    if rng.integers(0, 2):
        image, mask = image[..., ::-1], mask[..., ::-1]
    return image, mask


def sampling_grid(shape: tuple[int, int], config: AugmentationConfig, rng: np.random.Generator) -> np.ndarray | None:
    """Source coordinates (2, H, W) of each output pixel under a random affine + elastic warp,
    or None when neither is drawn."""
    height, width = shape
    affine = rng.random() < config.affine_probability
    elastic = rng.random() < config.elastic_probability
    if not (affine or elastic):
        return None
    rows, cols = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32), indexing="ij")
    if affine:
        angle = np.deg2rad(rng.uniform(-config.rotation_degrees, config.rotation_degrees))
        scale = np.exp(rng.uniform(-np.log(config.max_scale), np.log(config.max_scale)))
        center_r, center_c = (height - 1) / 2, (width - 1) / 2
        cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
        r, c = rows - center_r, cols - center_c
        rows, cols = cos * r - sin * c + center_r, sin * r + cos * c + center_c
    if elastic:
        # U-Net paper: random displacements on a coarse grid (std `elastic_std` pixels),
        # interpolated smoothly to every pixel.
        grid = (max(2, round(height / config.elastic_grid) + 1), max(2, round(width / config.elastic_grid) + 1))
        for axis_coordinates in (rows, cols):  # displaced in place
            coarse = rng.normal(0.0, config.elastic_std, size=grid).astype(np.float32)
            displacement = ndimage.zoom(coarse, (height / grid[0], width / grid[1]), order=3)[:height, :width]
            np.add(axis_coordinates, displacement, out=axis_coordinates)
    return np.stack([rows, cols])


def warp(image: np.ndarray, mask: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Resample image (bilinear) and mask (nearest) at `grid`, mirroring beyond the edges.

    A boolean (H, W) mask stays boolean; a float (C, H, W) target stack (target and loss
    weights) is resampled channel by channel, nearest too, so its values stay as they were.
    """
    warped_image = ndimage.map_coordinates(image, grid, order=1, mode="mirror").astype(np.float32, copy=False)
    if mask.ndim == 3:
        return warped_image, np.stack([ndimage.map_coordinates(c, grid, order=0, mode="mirror") for c in mask])
    warped_mask = ndimage.map_coordinates(mask.astype(np.uint8), grid, order=0, mode="mirror") > 0
    return warped_image, warped_mask


def adjust_intensity(image: np.ndarray, config: AugmentationConfig, rng: np.random.Generator) -> np.ndarray:
    """Random contrast (scale), brightness (offset), gamma and Gaussian noise on a [0, 1] image."""
    if rng.random() >= config.intensity_probability:
        return image
    gamma = np.exp(rng.uniform(-np.log(config.max_gamma), np.log(config.max_gamma)))
    image = np.clip(image, 0.0, 1.0) ** gamma
    image = image * rng.uniform(1 - config.contrast, 1 + config.contrast) + rng.uniform(-config.brightness, config.brightness)
    if config.noise_std > 0:
        image = image + rng.normal(0.0, rng.uniform(0, config.noise_std), size=image.shape)
    return image.astype(np.float32)


DIMMED_SHARE = 0.5  # of a crop's cells, when its cells are dimmed
DIM_EDGE_REACH = 2  # pixels beyond a cell's label that dim with it: the blurred rim of a nucleus


def dim_some_cells(image: np.ndarray, cells: np.ndarray, config: AugmentationConfig, rng: np.random.Generator
                   ) -> np.ndarray:
    """With `dim_cells_probability`, about half the cells of a [0, 1] crop pulled towards its
    background level, each keeping a share of its contrast drawn log-uniformly in
    [`min_cell_contrast`, 1], so that the model meets dim nuclei beside bright ones. `cells` is the
    crop's boolean cell mask whose touching cells are cut apart (`separated_target`): its
    8-connected components are the cells. Draws nothing when the probability is 0."""
    if config.dim_cells_probability <= 0 or rng.random() >= config.dim_cells_probability:
        return image
    labels, count = ndimage.label(cells, structure=np.ones((3, 3), dtype=bool))
    background = ~ndimage.binary_dilation(cells, iterations=DIM_EDGE_REACH + 1)
    if count == 0 or not background.any():
        return image
    level = float(np.median(image[background]))
    kept = np.exp(rng.uniform(np.log(config.min_cell_contrast), 0.0, size=count + 1))
    kept[0] = 1.0
    kept[1:][rng.random(count) >= DIMMED_SHARE] = 1.0
    lost = ndimage.grey_dilation((1.0 - kept[labels]).astype(np.float32), size=2 * DIM_EDGE_REACH + 1)
    lost = ndimage.gaussian_filter(lost, 1.0)
    return (level + (image - level) * (1.0 - lost)).astype(np.float32)


def augment_pair(
    image: np.ndarray, mask: np.ndarray, config: AugmentationConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """All enabled augmentations of one training crop; `mask` is a boolean (H, W) mask or a
    (C, H, W) target stack, moved exactly as the image is."""
    if config.flips:
        image, mask = flip_and_rotate(image, mask, rng)
    grid = sampling_grid(image.shape[-2:], config, rng)
    if grid is not None:
        image, mask = warp(np.ascontiguousarray(image), np.ascontiguousarray(mask), grid)
    image = dim_some_cells(image, (mask[0] > 0.5) if mask.ndim == 3 else mask, config, rng)
    return adjust_intensity(image, config, rng), mask
