"""Tile settings that made `predict` crawl or refuse its own documented minimum (issue 19, class 6).

`--tile-size 129` on a 192-pixel image once overlapped tiles by 128 pixels, a step of one pixel:
4096 tiles and 175 s instead of 4 tiles and a second. The overlap now follows the tile (128, or
half the tile under 256) and may be at most three quarters of it, so tiles always advance by a
quarter tile or more; `--tile-size 64`, the documented minimum, works with the default overlap.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cellseg.config import PredictConfig
from cellseg.synth import encode_png, generate_sample
from cellseg.tiling import predict_tiled, tile_starts
from tests.conftest import cellseg

pytestmark = pytest.mark.integration


def test_tiles_advance_by_a_quarter_tile_or_more_whatever_the_settings():
    for tile in (64, 65, 100, 128, 129, 170, 200, 255, 256, 511, 1024):
        for overlap in (PredictConfig(tile_size=tile).tile_overlap, tile * 3 // 4):  # the default, the most allowed
            PredictConfig(tile_size=tile, tile_overlap=overlap)  # both are valid settings
            for length in (tile + 1, 192, 3 * tile + 7, 4000):
                starts = tile_starts(length, tile, overlap)
                steps = np.diff(starts)[:-1]  # the last tile is moved flush with the end: its step may be less
                assert (steps >= tile / 4).all(), (tile, overlap, length)
                assert len(starts) <= math.ceil(4 * length / tile) + 1, (tile, overlap, length)

    calls = []
    image = np.zeros((192, 192), np.float32)
    predict_tiled(lambda tile: calls.append(tile.shape) or tile, image, 129, PredictConfig(tile_size=129).tile_overlap)
    assert calls == [(128, 128)] * 4  # was 64 x 64 = 4096 tiles, one per pixel of step (fitted: 128, not 129)
    with pytest.raises(ValueError, match=r"at most three quarters of it \(96\)"):
        tile_starts(192, 129, 128)


def test_the_documented_minimum_tile_works_and_a_sliver_step_is_refused_by_name(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "cells.png").write_bytes(encode_png(generate_sample(np.random.default_rng(4), (100, 100)).image))
    store = tmp_path / "minimum.zarr"
    common = ("predict", "--model", "general", "--images", str(images), "--device", "cpu")

    minimum = cellseg(*common, "--out", str(store), "--tile-size", "64", check=False)
    assert minimum.returncode == 0, (minimum.stdout, minimum.stderr)
    assert "segmented 1, skipped 0 already done, failed 0" in minimum.stdout
    record = json.loads((store / "cells" / "zarr.json").read_text())["attributes"]["cellseg"]
    assert record["status"] == "done"
    assert (record["model"]["predict"]["tile_size"], record["model"]["predict"]["tile_overlap"]) == (64, 32)

    refused_store = tmp_path / "refused.zarr"
    sliver = cellseg(*common, "--out", str(refused_store), "--tile-size", "129", "--tile-overlap", "128", check=False)
    assert sliver.returncode == 2 and "Traceback" not in sliver.stderr
    assert "tile_overlap (128) must be at most three quarters of tile_size (129)" in sliver.stderr
    assert len(sliver.stderr.strip().splitlines()) == 1, sliver.stderr
    assert not refused_store.exists()  # refused before any work
