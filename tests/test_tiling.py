"""Tiled prediction: coverage, blending weights, and agreement with untiled prediction."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from cellseg.config import ModelConfig, PredictConfig
from cellseg.infer import Predictor, forward_probabilities
from cellseg.model import UNet
from cellseg.synth import generate_sample
from cellseg.tiling import edge_ramp, predict_tiled, tile_starts


@pytest.mark.parametrize(("length", "tile", "overlap"), [(1000, 256, 64), (257, 256, 64), (512, 128, 32), (90, 128, 32)])
def test_tiles_cover_the_axis_and_overlap_enough(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    covered = np.zeros(length, dtype=bool)
    for start in starts:
        covered[start : start + tile] = True
    assert covered.all()
    assert starts[0] == 0 and starts[-1] + min(tile, length) == length
    assert all(previous + tile - start >= overlap for previous, start in pairwise(starts))


def test_neighbouring_weights_sum_to_one_and_ignore_the_outer_quarter():
    left, right = edge_ramp(256, 64, False, True), edge_ramp(256, 64, True, False)
    np.testing.assert_allclose(left[-64:] + right[:64], 1.0)
    assert (left[-16:] == 0).all() and (right[:16] == 0).all()
    assert (left[:192] == 1).all() and (right[64:] == 1).all()
    assert (edge_ramp(100, 32, False, False) == 1).all()


def test_blending_identical_tiles_reproduces_the_input():
    image = np.random.default_rng(0).random((700, 530), dtype=np.float32)
    tiled = predict_tiled(lambda tile: tile.copy(), image, tile=256, overlap=64)
    np.testing.assert_allclose(tiled, image, rtol=1e-6)


def test_channels_are_blended_alike():
    image = np.random.default_rng(2).random((300, 410), dtype=np.float32)
    tiled = predict_tiled(lambda tile: np.stack([tile, 1 - tile]), image, tile=128, overlap=32)
    assert tiled.shape == (2, 300, 410)
    np.testing.assert_allclose(tiled[0], image, rtol=1e-6)
    np.testing.assert_allclose(tiled[1], 1 - image, atol=1e-6)


def test_tiled_equals_untiled_for_a_model_whose_receptive_field_fits_the_margin():
    # Depth 2 and no per-image normalisation: a receptive-field half-width of about 20 pixels,
    # within the 24-pixel clean margin of a 96-pixel overlap.
    torch.manual_seed(0)
    model = UNet(ModelConfig(depth=2, base_width=4, norm="none", dropout=0.0)).eval()
    image = np.random.default_rng(1).random((400, 360), dtype=np.float32)

    def predict(x):
        return forward_probabilities(model, x[None], torch.device("cpu"), amp=False)[0]

    untiled = predict(image)
    tiled = predict_tiled(predict, image, tile=160, overlap=96, multiple=model.size_multiple)
    np.testing.assert_allclose(tiled, untiled, atol=1e-5)


def test_predictor_tiles_large_images_and_keeps_the_masks(tiny_checkpoint):
    from cellseg.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(str(tiny_checkpoint))
    image = generate_sample(np.random.default_rng(5), (480, 400)).image
    whole = Predictor(checkpoint, PredictConfig(tile_size=1024, amp=False)).masks([image])[0]
    tiled = Predictor(checkpoint, PredictConfig(tile_size=320, tile_overlap=128, amp=False)).masks([image])[0]
    assert tiled.shape == whole.shape
    # InstanceNorm normalises each tile by its own statistics, so agreement is close, not exact;
    # it grows with the tile (0.994 here at 320 px, 0.986 at 192 px).
    assert (tiled == whole).mean() > 0.99


def test_overlap_must_be_smaller_than_the_tile():
    with pytest.raises(ValueError, match="smaller than the tile"):
        predict_tiled(lambda tile: tile, np.zeros((300, 300), np.float32), tile=64, overlap=64)
    with pytest.raises(ValueError, match="tile_overlap"):
        PredictConfig(tile_size=128, tile_overlap=128)


@pytest.mark.parametrize("shape", [(1, 5000), (2, 5000), (5000, 1)])
def test_a_thin_long_image_is_tiled_along_its_long_side_only(shape):
    # A short side within one tile has no neighbour to overlap; it used to be taken for a tile
    # too small for the overlap and refused. Same model as above: tiled equals untiled.
    torch.manual_seed(0)
    model = UNet(ModelConfig(depth=2, base_width=4, norm="none", dropout=0.0)).eval()
    image = np.random.default_rng(3).random(shape, dtype=np.float32)
    tiles: list[tuple[int, ...]] = []

    def predict(x):
        tiles.append(x.shape)
        return forward_probabilities(model, x[None], torch.device("cpu"), amp=False)[0]

    tiled = predict_tiled(predict, image, tile=160, overlap=96, multiple=model.size_multiple)
    short_axis = int(np.argmin(shape))
    assert len(tiles) > 1 and all(tile[short_axis] == shape[short_axis] and max(tile) <= 160 for tile in tiles)
    untiled = forward_probabilities(model, image[None], torch.device("cpu"), amp=False)[0]
    np.testing.assert_allclose(tiled, untiled, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 2])
def test_predictor_segments_a_thin_long_image_in_tiles(tiny_checkpoint, rows):
    from cellseg.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(str(tiny_checkpoint))
    image = np.concatenate([generate_sample(np.random.default_rng(seed), (64, 1000)).image for seed in range(5)],
                           axis=1)[30:30 + rows]
    tiled = Predictor(checkpoint, PredictConfig(amp=False)).masks([image])[0]
    whole = Predictor(checkpoint, PredictConfig(tile_size=8192, amp=False)).masks([image])[0]
    assert tiled.shape == whole.shape == (rows, 5000)
    # Each tile is normalised by its own statistics (InstanceNorm), so agreement is close, not exact (0.99).
    assert tiled.any() and (tiled == whole).mean() > 0.98
