"""Sliding-window prediction for images larger than a tile: overlapping tiles, blended.

Pure functions: the predictor is passed in, as in MONAI's `sliding_window_inference`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of `tile` covering [0, length), neighbours overlapping by >= `overlap`.

    The overlap may be at most three quarters of the tile (`check_overlap`), so the step is at
    least a quarter tile: at most 4 * length / tile + 1 windows, never a window per pixel. A side
    within one tile has no neighbours to overlap, whatever the overlap.
    """
    if length <= tile:
        return [0]
    check_overlap(tile, overlap)
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return [*starts, length - tile]


def fitted_tile(length: int, tile: int, overlap: int, multiple: int = 1) -> int:
    """The tile side, at most `tile`, that covers `length` pixels in as few tiles overlapping by
    `overlap` as `tile` needs, all of one size: `tile_starts` otherwise ends on a tile that mostly
    repeats its neighbour (a 2176-pixel side: three tiles of 816 instead of three of 1024). The
    side is rounded up to a `multiple` (the model's `size_multiple`), so that no tile is padded
    where the image is not. A side within one tile is its own tile: a 2 x 5000 image is tiled
    along its width only, in tiles 2 pixels high, which overlap nothing along the height."""
    if length <= tile:
        return length
    check_overlap(tile, overlap)
    count = -(-(length - overlap) // (tile - overlap))
    fitted = max(-(-(length + (count - 1) * overlap) // count), -(-4 * overlap // 3))
    return min(tile, -(-fitted // multiple) * multiple)


def check_overlap(tile: int, overlap: int) -> None:
    """Refuse an overlap over three quarters of the tile: tiles would advance by a sliver each
    (a 129-pixel tile overlapping by 128 means one tile per pixel)."""
    if not 0 <= overlap <= tile * 3 // 4:
        raise ValueError(f"tile overlap ({overlap}) must be smaller than the tile ({tile}): at most three quarters "
                         f"of it ({tile * 3 // 4}), so that tiles advance by a quarter tile or more")


def edge_ramp(size: int, overlap: int, ramp_start: bool, ramp_end: bool) -> np.ndarray:
    """1-D blending weights of a tile that overlaps its neighbours by `overlap` at ramped ends.

    Over each overlap the weight is 0 for the outer quarter (where the tile's own edge, not the
    image, shaped the prediction), rises linearly over the middle half, and is 1 beyond, so the
    weights of two neighbours sum to exactly 1 across their shared strip.
    """
    weights = np.ones(size, dtype=np.float32)
    overlap = min(overlap, size)
    if overlap > 0:
        positions = np.arange(overlap, dtype=np.float32) + 0.5
        rising = np.clip((positions - overlap / 4) / (overlap / 2), 0.0, 1.0)
        if ramp_start:
            weights[:overlap] = np.minimum(weights[:overlap], rising)
        if ramp_end:
            weights[-overlap:] = np.minimum(weights[-overlap:], rising[::-1])
    return weights


def predict_tiled(
    predict: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    tile: int = 1024,
    overlap: int = 128,
    multiple: int = 1,
) -> np.ndarray:
    """Blend `predict` over overlapping tiles of a normalised (H, W) float32 image.

    `predict` maps a (h, w) tile to (h, w) float32 probabilities, or to (C, h, w) channels, which
    are blended alike. Tiles are at most `tile` a side, fitted to each axis (`fitted_tile`, sides
    a `multiple` of the model's: a 2048-pixel side in three of 768, not three of 1024 whose last
    mostly repeats the one before; a side within `tile` in one). Neighbouring tiles overlap by at
    least `overlap` pixels and are blended there (see `edge_ramp`); image borders keep full
    weight. A pixel more than overlap/4 from every tile edge it is blended from gets the same
    value as untiled prediction wherever the model's receptive field is narrower than that margin
    and its normalisation does not depend on the input's extent. Memory: (C + 1) (H, W) float32 accumulators plus one tile's activations.
    """
    check_overlap(tile, overlap)
    height, width = image.shape
    if height <= tile and width <= tile:
        return predict(image)
    total: np.ndarray | None = None
    weight = np.zeros((height, width), dtype=np.float32)
    tile_height, tile_width = (fitted_tile(side, tile, overlap, multiple) for side in (height, width))
    rows, cols = tile_starts(height, tile_height, overlap), tile_starts(width, tile_width, overlap)
    for top in rows:
        bottom = min(top + tile_height, height)
        row_weights = edge_ramp(bottom - top, overlap, top > 0, bottom < height)
        for left in cols:
            right = min(left + tile_width, width)
            col_weights = edge_ramp(right - left, overlap, left > 0, right < width)
            window = np.outer(row_weights, col_weights)
            prediction = predict(image[top:bottom, left:right])
            if total is None:
                total = np.zeros((*prediction.shape[:-2], height, width), dtype=np.float32)
            total[..., top:bottom, left:right] += prediction * window
            weight[top:bottom, left:right] += window
    assert total is not None  # tile_starts gives every side at least one tile
    total /= weight
    return total
