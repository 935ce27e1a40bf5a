"""Images bigger than memory, segmented block by block and stitched (cellseg.blocks, cellseg.stitch).

The comparisons with the in-memory path use the shipped `general` model with its InstanceNorm
layers frozen to fixed statistics and fp32 (`frozen_general`): tiled prediction then equals whole
prediction away from tile edges, so any difference left is the block path's own (seams, stitching,
normalisation). With InstanceNorm and bf16, two tilings of one image differ by a few cells anyway
(benchmarks/large.py measures that too)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from logging.handlers import BufferingHandler
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from benchmarks.large import bench_exact, compare, frozen_checkpoint
from cellseg.blocks import blockwise_shape, segment_blockwise
from cellseg.blocks_finish import finish_image
from cellseg.blocks_levels import image_levels
from cellseg.blocks_measure import _cell_rows, measure_block
from cellseg.blocks_plan import PLAN_WAIT, ImageInUse, _claim_plan, prepare_image
from cellseg.blocks_predict import _local_numbers, predict_block
from cellseg.blocks_scratch import ACTIVE_WAIT, SUM_COLUMNS, Scratch
from cellseg.blocks_stitch import stitch_image
from cellseg.config import BlockConfig, NormalizationConfig, PredictConfig
from cellseg.jobs import SegmentJob, run_segmentation
from cellseg.measure import CELL_COLUMNS, cell_measurements
from cellseg.model_source import ModelSource, load_predictor
from cellseg.normalize import histogram_lut, normalize_image
from cellseg.postprocess import cell_labels
from cellseg.stats import image_statistics
from cellseg.stitch import (
    PREDICTED,
    BlockGrid,
    halve,
    join_labels,
    pack_edges,
    pack_ring,
    seam_pairs,
    unpack_ring,
    written_labels,
)
from cellseg.store import ResultStore
from cellseg.store_checks import StoreError
from cellseg.synth import generate_sample, mosaic_tiles
from cellseg.tiling import fitted_tile, tile_starts
from cellseg.verify import verify_store
from tests.conftest import cellseg

SIDE, BLOCK, OVERLAP = 1024, 256, 64  # 16 blocks: 24 seams, 9 inner corners


def mosaic(shape: tuple[int, int], seed: int = 1, cells=lambda row, col: True) -> np.ndarray:
    """A synthetic mosaic of 512-pixel tiles (cellseg.synth.mosaic_tiles), uint8."""
    image = np.zeros(shape, dtype=np.uint8)
    for top, left, sample in mosaic_tiles(shape, 512, seed, cells):
        image[top: top + sample.image.shape[0], left: left + sample.image.shape[1]] = sample.image
    return image


@pytest.fixture(scope="module")
def frozen_general(tmp_path_factory) -> Path:
    """The shipped general model with its InstanceNorm frozen to fixed statistics (translation-invariant)."""
    return frozen_checkpoint(tmp_path_factory.mktemp("frozen") / "frozen.pt")


BLOCKWISE = PredictConfig(amp=False, threads=2, blocks=BlockConfig(block_size=BLOCK, overlap=OVERLAP, above_pixels=1))


@pytest.fixture(scope="module")
def blockwise_run(frozen_general, tmp_path_factory):
    """A 1024x1024 mosaic segmented whole (tiled) and block by block (zarr array in, store out)."""
    root = tmp_path_factory.mktemp("blockwise")
    image = mosaic((SIDE, SIDE))
    source = zarr.create_array(str(root / "mosaic.zarr"), shape=image.shape, dtype=image.dtype, chunks=(256, 256))
    source[...] = image
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    reference = cell_labels(predictor.cell_maps([image])[0], predictor.config)
    store = ResultStore.open(str(root / "results.zarr"))
    record = segment_blockwise(store, "mosaic", str(root / "mosaic.zarr"), lambda: source, predictor, {"version": "x"},
                               workers=2)
    return image, reference, store, record


# Pure parts ---------------------------------------------------------------------------------------


def test_fitted_tiles_cover_a_window_in_as_few_tiles_of_one_size():
    for length in (1000, 1025, 1152, 2048, 2176, 2304, 4096, 4224):
        for multiple in (1, 16):
            tile = fitted_tile(length, 1024, 128, multiple)
            starts = tile_starts(length, tile, 128)
            assert tile <= 1024 and starts[-1] + tile == max(length, tile)
            assert len(starts) == len(tile_starts(length, 1024, 128))
            assert tile == length or tile % multiple == 0
    assert fitted_tile(2176, 1024, 128) == 811  # three tiles of 811 instead of three of 1024
    assert fitted_tile(2176, 1024, 128, multiple=16) == 816  # no tile padded to the model's multiple
    assert fitted_tile(1872, 1000, 128, multiple=16) == 1000  # never above the tile asked for


def test_grid_cores_are_whole_chunks_and_rings_surround_them():
    grid = BlockGrid((1000, 700), 256, 64)
    assert (grid.rows, grid.cols, grid.count) == (4, 3, 12)
    assert grid.core(4) == (256, 512, 256, 512) and grid.window(4) == (192, 576, 192, 576)
    assert grid.core(11) == (768, 1000, 512, 700) and grid.window(11) == (704, 1000, 448, 700)
    assert grid.neighbourhood(0) == [0, 1, 3, 4] and len(grid.neighbourhood(4)) == 9
    assert list(grid.parts((250, 260, 510, 514))) == [(1, (250, 256, 510, 512)), (2, (250, 256, 512, 514)),
                                                      (4, (256, 260, 510, 512)), (5, (256, 260, 512, 514))]
    # The ring of block 4 is the window minus the core, once; packed and unpacked unchanged.
    labels = np.arange(384 * 384, dtype=np.int32).reshape(384, 384)
    strips = list(unpack_ring(grid, 4, pack_ring(grid, 4, labels, grid.window(4))))
    assert sum(strip.size for _, strip in strips) == 384 * 384 - 256 * 256
    for (top, bottom, left, right), strip in strips:
        np.testing.assert_array_equal(strip, labels[top - 192: bottom - 192, left - 192: right - 192])
    assert [box for box in grid.ring(0) if box[0] == box[1] or box[2] == box[3]] == [(0, 0, 0, 320), (0, 256, 0, 0)]


def test_seam_pairs_join_mutual_best_overlaps_only():
    view = np.array([1, 1, 1, 1, 2, 2, 2, 0, 3, 3, 3, 3, 0, 0, 0])
    written = np.array([7, 7, 7, 8, 8, 8, 0, 9, 9, 9, 0, 0, 9, 9, 9])
    # 1-7: IoU 3/4, joined (1 also touches 8, but 8 overlaps 2 more); 2-8: IoU 2/4, joined;
    # 3-9: each the other's best, but IoU 2/8: two cells, not joined.
    assert seam_pairs(view, written, np.zeros(15)).tolist() == [[1, 7], [2, 8]]
    assert seam_pairs(np.array([1, 1, 0]), np.array([0, 0, 4]), np.zeros(3)).shape == (0, 2)


def test_a_view_reaching_into_three_neighbours_is_matched_in_each_of_their_seams():
    # A cell at a corner of four blocks: the block's view of it covers parts of three neighbours'
    # cores (owners 1, 3, 4), each of which wrote its part under its own label. Counted over the
    # whole ring, view 1 overlaps each part by a third (IoU 1/3): none would be joined.
    view = np.array([1] * 12 + [0, 0])
    written = np.array([11] * 4 + [31] * 4 + [41] * 4 + [0, 0])
    owners = np.array([1] * 4 + [3] * 4 + [4] * 4 + [1, 3])
    assert seam_pairs(view, written, owners).tolist() == [[1, 11], [1, 31], [1, 41]]
    # Within one neighbour's part the rule is unchanged: view 1 spills into owner 3's background.
    written[4:8] = 0
    assert seam_pairs(view, written, owners).tolist() == [[1, 11], [1, 41]]
    owners[4:8] = 1  # 8 pixels of view 1 in owner 1's part, 4 of them written 11: IoU 1/2
    assert seam_pairs(view, written, owners).tolist() == [[1, 11], [1, 41]]
    written[8:10] = 0  # 41 now half of view 1's part in owner 4: IoU 2/4, still joined
    written[0] = 0  # 11 now 3 of view 1's 8 pixels in owner 1's part: IoU 3/8, not joined
    assert seam_pairs(view, written, owners).tolist() == [[1, 41]]
    # A sliver: 2 of view 1's 42 ring pixels in owner 2's part, where owner 2 wrote a cell of its
    # own. IoU 1 there, but under a tenth of the view's ring: no evidence that 10 and 20 are one.
    view, written, owners = np.array([1] * 42), np.array([10] * 40 + [20] * 2), np.array([1] * 40 + [2] * 2)
    assert seam_pairs(view, written, owners).tolist() == [[1, 10]]
    owners[:36], written[:36] = 3, 30  # 6 of 42 (a seventh) in owner 2's part, all written 20: joined
    owners[36:42], written[36:42] = 2, 20
    assert seam_pairs(view, written, owners).tolist() == [[1, 20], [1, 30]]


def test_seam_pairs_follow_the_rule_on_labels_of_many_cells():
    rng = np.random.default_rng(5)
    for _ in range(40):
        view = rng.integers(0, rng.integers(2, 40), 3000)
        written = np.where(rng.random(3000) < 0.2, 0, view * 3 + 1000 + rng.integers(0, 3, 3000))
        # A written label lies in one neighbour's core; the background in any of them.
        owners = np.where(written > 0, written % 3, rng.integers(0, 3, 3000)) * 5 + 2
        pairs = {(a, b) for a, b in seam_pairs(view, written, owners).tolist()}
        # The rule spelled out pair by pair, in each neighbour's part of the ring: each the other's
        # largest overlap there (the smaller label on a tie), intersection over union at least 0.5,
        # the part holding at least a tenth of the view label's ring.
        overlap = {}
        for a, b, owner in zip(view.tolist(), written.tolist(), owners.tolist(), strict=True):
            if a and b:
                overlap[a, b, owner] = overlap.get((a, b, owner), 0) + 1
        best_view = {(a, o): min((-n, b) for (x, b, y), n in overlap.items() if (x, y) == (a, o))[1]
                     for a, _, o in overlap}
        best_written = {b: min((-n, a) for (a, y, _), n in overlap.items() if y == b)[1] for _, b, _ in overlap}
        in_part = {(a, o): np.count_nonzero((view == a) & (owners == o)) for a, _, o in overlap}
        expected = {(a, b) for (a, b, o), n in overlap.items() if best_view[a, o] == b and best_written[b] == a
                    and n >= 0.5 * (in_part[a, o] + np.count_nonzero(written == b) - n)
                    and in_part[a, o] >= 0.1 * np.count_nonzero(view == a)}
        assert pairs == expected


@pytest.mark.parametrize("shape", [(1000, 700), (1030, 790)])  # last cores of 6 and 22 pixels: under the overlap
def test_edge_bands_give_back_what_the_neighbours_wrote_over_every_ring(shape):
    grid = BlockGrid(shape, 256, 64)
    labels = np.random.default_rng(6).integers(0, 1 << 20, shape).astype(np.int32)
    edges = {index: pack_edges(grid, index, labels[(core := grid.core(index))[0]:core[1], core[2]:core[3]])
             for index in range(grid.count)}
    for index in range(grid.count):
        for top, bottom, left, right in grid.ring(index):
            np.testing.assert_array_equal(written_labels(grid, (top, bottom, left, right), edges.__getitem__),
                                          labels[top:bottom, left:right])
    with pytest.raises(ValueError, match="outside its edge bands"):
        written_labels(grid, (300, 400, 300, 400), edges.__getitem__)  # the middle of block 4's core


def test_join_labels_numbers_each_joined_set_once_in_order():
    lookup, first = join_labels(6, np.array([[5, 2], [3, 6], [6, 5]]))
    # Sets {1}, {2, 3, 5, 6}, {4}: numbered by their smallest label.
    assert lookup.tolist() == [0, 1, 2, 2, 3, 2, 2]
    assert np.flatnonzero(first).tolist() == [1, 2, 4]


@pytest.mark.parametrize("background", [True, False])
def test_a_window_s_cell_sums_match_the_full_measurement_with_or_without_background(background):
    """A block's window may lie wholly inside its cells (a confluent sheet): no label 0 there."""
    rng = np.random.default_rng(4)
    cells = np.repeat(np.repeat(np.arange(1, 10, dtype=np.int32).reshape(3, 3), 20, axis=0), 20, axis=1)
    if background:
        cells[25:35, :] = 0
    image = rng.random(cells.shape).astype(np.float32)
    full = cell_measurements(cells, image)
    wanted = full[:, [CELL_COLUMNS.index(name) for name in SUM_COLUMNS]]
    np.testing.assert_allclose(_cell_rows(cells, image, measure=False), wanted)
    assert _cell_rows(cells, image, measure=False)[:, 0].tolist() == list(range(1, 10))


@pytest.mark.parametrize("dtype, polarity", [(np.uint8, "auto"), (np.uint16, "auto"), (np.uint16, "keep")])
def test_blocks_are_normalised_exactly_as_the_whole_image(dtype, polarity):
    image = generate_sample(np.random.default_rng(2), (300, 280), bit_depth=16 if dtype == np.uint16 else 8,
                            polarity="dark").image
    config = NormalizationConfig(polarity=polarity)
    levels, histogram = image_levels(image, BlockGrid(image.shape, 128, 32), config, workers=2)
    np.testing.assert_array_equal(levels.normalise(image, histogram_lut(histogram, config)), normalize_image(image, config))
    assert levels.block_max[0] == image[:128, :128].max() and sum(levels.block_sum) == image.sum()


def test_block_settings_keep_cores_whole_chunks():
    with pytest.raises(ValueError, match="multiple of 1024"):
        BlockConfig(block_size=1536)
    with pytest.raises(ValueError, match="at most half"):
        BlockConfig(block_size=256, overlap=200)


def test_a_time_point_of_any_file_read_region_by_region_is_segmented_block_by_block(tmp_path):
    # `blockwise_shape` tested the address itself for an OME-Zarr or CZI/ND2/LIF suffix, so a time
    # point (`<url>#t=N`, as `list_sources` lists them with --t all) of any but a TIFF was read
    # whole, however large; the time point is stripped first now, as `open_plane` strips it.
    movie = zarr.create_array(str(tmp_path / "movie.zarr"), shape=(2, 64, 48), dtype=np.uint8, chunks=(1, 64, 48),
                              dimension_names=("t", "y", "x"))
    movie[...] = 1
    tifffile.imwrite(tmp_path / "movie.tif", np.ones((2, 64, 48), np.uint8), imagej=True, metadata={"axes": "TYX"})
    config = PredictConfig(blocks=BlockConfig(above_pixels=1))
    for name in ("movie.zarr", "movie.tif"):
        assert blockwise_shape(f"{tmp_path}/{name}#t=1", config) == (64, 48), name
        assert blockwise_shape(f"{tmp_path}/{name}", config) is None, name  # two time points, none chosen
    small = PredictConfig(blocks=BlockConfig(above_pixels=64 * 48))
    assert blockwise_shape(f"{tmp_path}/movie.zarr#t=1", small) is None
    assert blockwise_shape(f"{tmp_path}/movie.png#t=1", config) is None  # PNG and JPEG are decoded whole


# A mosaic, block by block ---------------------------------------------------------------------------


def test_a_mosaic_in_blocks_has_the_cells_of_the_in_memory_tiled_path(blockwise_run):
    image, reference, store, record = blockwise_run
    cells = store.read_cells("mosaic")
    found = compare(reference, cells)
    assert found["cells"] == found["reference_cells"] > 400
    assert found["below_iou_0.95"] == 0 and found["cut"] == 0
    assert record["blocks"]["joined"] > 50  # cells crossing seams were joined
    # Labels unique across the image, 1..N, and measured once, after stitching.
    assert np.array_equal(np.unique(cells), np.arange(found["cells"] + 1))
    columns, table = store.read_cell_table("mosaic")
    assert tuple(columns) == CELL_COLUMNS
    np.testing.assert_allclose(table, cell_measurements(cells, image), rtol=1e-9)
    statistics = store.record("mosaic")["statistics"]
    for name, value in image_statistics(image, cells).items():
        assert statistics[name] == pytest.approx(value, rel=1e-9), name
    np.testing.assert_array_equal(store.read_image("mosaic"), image)
    assert verify_store(store.url).broken == []


def test_a_cell_on_a_corner_of_four_blocks_is_one_cell(frozen_general, tmp_path):
    # Discs centred on the 4 inner corners of a 3x3 grid of blocks, each in four cores, and on
    # seams; the mosaic above has no cell exactly on a corner.
    side = 3 * BLOCK
    rows, cols = np.mgrid[:side, :side]
    image = np.full((side, side), 20, dtype=np.uint8)
    corners = [(row, col) for row in (BLOCK, 2 * BLOCK) for col in (BLOCK, 2 * BLOCK)]
    for row, col in [*corners, (BLOCK, BLOCK // 2), (BLOCK // 2, 2 * BLOCK), (side // 2, side // 2)]:
        image[(rows - row) ** 2 + (cols - col) ** 2 < 14 ** 2] = 200
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    reference = cell_labels(predictor.cell_maps([image])[0], predictor.config)
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    segment_blockwise(store, "corners", "corners", lambda: image, predictor, {"version": "x"})
    cells = store.read_cells("corners")
    found = compare(reference, cells)
    assert found["cells"] == found["reference_cells"] == 7
    assert found["below_iou_0.95"] == 0 and found["cut"] == 0
    assert len({int(cells[row, col]) for row, col in corners} - {0}) == 4


def test_statistics_without_the_cell_table_are_those_of_the_image_in_memory(frozen_general, tmp_path):
    # Without measure_cells the blocks keep only each cell's area and intensity sum (SUM_COLUMNS):
    # the image's statistics follow from them as from the image in memory (stats.statistics_from_sums).
    image = mosaic((512, 512), seed=3)
    config = BLOCKWISE.model_copy(update={"measure_cells": False})
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), config)
    store = ResultStore.open(str(tmp_path / "results.zarr"))
    record = segment_blockwise(store, "m", "m", lambda: image, predictor, {"version": "x"})
    statistics = store.record("m")["statistics"]
    assert statistics == record["statistics"] and statistics["cell_count"] > 50
    for name, value in image_statistics(image, store.read_cells("m")).items():
        assert statistics[name] == pytest.approx(value, rel=1e-9), name


@pytest.mark.integration
def test_a_4096_mosaic_in_1024_blocks_has_the_cells_of_the_in_memory_path(tmp_path):
    # Issue 21's own case, as `make bench-large` runs it: the in-memory path predicts the whole
    # image at once (its tile size raised to the image's), each block its 1152² window in tiles;
    # 16 blocks, 24 seams.
    found = bench_exact(tmp_path, 4096, 1024)
    assert found["cells"] == found["reference_cells"] > 5000
    assert found["below_iou_0.95"] == 0 and found["cut"] == found["cut_at_a_seam"] == 0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.bool_, np.float32])
def test_an_image_level_is_the_mean_of_each_2x2_square_rounded_half_to_even(dtype):
    assert halve(np.array([[1, 2, 9], [2, 2, 9]], dtype=np.uint8), average=True).tolist() == [[2, 9]]  # 1.75, 9
    assert halve(np.array([[1, 1, 2, 2], [2, 2, 3, 3]], dtype=np.uint8), average=True).tolist() == [[2, 2]]  # 1.5, 2.5
    rng = np.random.default_rng(3)
    for shape in [(7, 9), (8, 8), (1, 1), (33, 64)]:
        if np.dtype(dtype).kind in "iu":
            limits = np.iinfo(dtype)
            region = rng.integers(limits.min, limits.max, shape, endpoint=True, dtype=dtype)
        else:
            region = (rng.random(shape) * 1000).astype(dtype)
        padded = np.pad(region, ((0, shape[0] % 2), (0, shape[1] % 2)), mode="edge").astype(np.float64)
        mean = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).mean(axis=(1, 3))
        expected = (mean if np.dtype(dtype).kind == "f" else np.rint(mean)).astype(dtype)
        halved = halve(region, average=True)
        assert halved.dtype == region.dtype
        np.testing.assert_array_equal(halved, expected)
    np.testing.assert_array_equal(halve(region, average=False), region[::2, ::2])


def test_the_labels_are_a_pyramid_ome_zarr_opens_at_every_level(blockwise_run):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Reader

    _, _, store, record = blockwise_run
    cells = store.read_cells("mosaic")
    nodes = list(Reader(parse_url(f"{store.url}/mosaic"))())
    levels = {node.metadata["name"]: node.data for node in nodes if node.load(Label)}
    assert record["blocks"]["levels"] == 3 and sorted(levels) == ["cells", "mask"]
    assert [level.shape for level in levels["cells"]] == [(1024, 1024), (512, 512), (256, 256)]
    np.testing.assert_array_equal(np.asarray(levels["cells"][2]), cells[::4, ::4])
    np.testing.assert_array_equal(np.asarray(levels["mask"][1]), cells[::2, ::2] > 0)
    assert [level.shape for level in nodes[0].data] == [(1024, 1024), (512, 512), (256, 256)]  # the image copy
    scales = [dataset["coordinateTransformations"][0]["scale"]
              for dataset in store.root["mosaic/labels/cells"].attrs["ome"]["multiscales"][0]["datasets"]]
    assert scales == [[1.0, 1.0], [2.0, 2.0], [4.0, 4.0]]


def test_a_scratch_left_by_a_cellseg_with_other_arrays_starts_over(frozen_general, tmp_path):
    image = mosaic((SIDE, SIDE), seed=7)
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    count, todo = prepare_image(store, "m", "m", image, predictor)
    predict_block(store, "m", todo[0], image, predictor)
    assert prepare_image(store, "m", "m", image, predictor) == (count, todo[1:])  # taken up where it was left
    scratch = store.root["m/blocks"]
    attributes = dict(scratch.attrs)
    scratch.attrs.put({**attributes, "plan": {**attributes["plan"], "scratch": 1}})  # as a version without edge bands left it
    del store.root["m/blocks/active"]  # nor the mark of its last step
    assert prepare_image(store, "m", "m", image, predictor) == (count, todo)
    assert "edges" in store.root["m/blocks"] and store.root["m/blocks"].attrs["plan"] == attributes["plan"]


class FailingReads:
    """A source whose reads fail: a block-wise run whose blocks cannot be read."""

    def __init__(self, image: np.ndarray):
        self.shape, self.dtype = image.shape, image.dtype

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        raise OSError("the share went away")


def test_a_plan_with_other_settings_is_left_to_its_run_while_it_works_and_replaced_once_it_stopped(frozen_general,
                                                                                                 tmp_path):
    """Two runs with other settings on one large image: the second refuses while the first takes
    steps, instead of deleting the first's blocks under it; a run that stopped (said so, or whose
    last step aged out) is replaced, and its blocks are never written into the new plan."""
    image = mosaic((SIDE, SIDE), seed=7)
    first = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    second = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)),
                            BLOCKWISE.model_copy(update={"threshold": 0.4}))
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    count, todo = prepare_image(store, "m", "m", image, first)
    assert predict_block(store, "m", todo[0], image, first) == "predicted"

    with pytest.raises(ImageInUse, match=r"another run with other settings or another model \(its last step \d+ s ago\)"):
        prepare_image(store, "m", "m", image, second)
    # A whole run with the other settings records the image as failed and leaves the first run's blocks.
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "m.tif", image)
    job = SegmentJob(source_url=str(tmp_path / "in"), store_url=str(tmp_path / "r.zarr"),
                     checkpoint_url=str(frozen_general), predict=second.config)
    report = run_segmentation(job)
    assert [failure["image_id"] for failure in report.failed] == ["m"]
    assert "another run with other settings" in report.failed[0]["error"]
    assert report.seconds > 0  # the time spent on the failed image (the summary said "in 0.0s")
    assert Scratch.open(store, "m").state()[todo[0], 0] == PREDICTED
    assert 0 < time.time() - float(store.root["m/blocks/active"][0]) < ACTIVE_WAIT

    # The first run's last step ages out (killed): the other settings make a plan of their own, and
    # the first run, were it to come back, may not write its blocks into that plan.
    store.root["m/blocks/active"][0] = time.time() - ACTIVE_WAIT - 1
    assert prepare_image(store, "m", "m", image, second) == (count, todo)
    with pytest.raises(StoreError, match="replaced by another run with other settings"):
        predict_block(store, "m", todo[1], image, first)
    assert not Scratch.open(store, "m").state()[:, 0].any()

    # A run whose block fails says it stopped: a run with other settings takes over at once.
    opens = iter([image])
    with pytest.raises(OSError, match="the share went away"):
        segment_blockwise(store, "m", "m", lambda: next(opens, FailingReads(image)), second, {"version": "x"})
    assert float(store.root["m/blocks/active"][0]) == 0.0
    assert prepare_image(store, "m", "m", image, first) == (count, todo)
    assert store.root["m/blocks"].attrs["plan"]["predict"]["threshold"] == first.config.threshold




class HeldImage:
    """An image whose first read waits until `go` is set (`reading` is set meanwhile): a run held in
    the middle of planning it."""

    def __init__(self, image: np.ndarray):
        self.image, self.reading, self.go = image, threading.Event(), threading.Event()

    @property
    def shape(self) -> tuple[int, ...]:
        return self.image.shape

    @property
    def dtype(self) -> np.dtype:
        return self.image.dtype

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        self.reading.set()
        assert self.go.wait(60)
        return self.image[key]


def _prepare_in_a_thread(store, image, predictor) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(prepare_image(store, "m", "m", image, predictor))
        except Exception as error:  # noqa: BLE001 - the test asserts on it
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_a_plan_another_run_made_while_this_one_planned_is_taken_up_with_its_blocks(frozen_general, tmp_path):
    """Two runs plan the same image at once; the second to finish planning takes up the first's plan,
    instead of making its arrays again, which deleted the blocks the first had written meanwhile."""
    image = mosaic((SIDE, SIDE), seed=7)
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    held = HeldImage(image)
    thread, outcome = _prepare_in_a_thread(store, held, predictor)
    assert held.reading.wait(60)
    count, todo = prepare_image(store, "m", "m", image, predictor)
    assert predict_block(store, "m", todo[0], image, predictor) == "predicted"
    written = np.asarray(store.root["m/labels/mask/0"][:BLOCK, :BLOCK])
    held.go.set()
    thread.join(60)
    assert outcome == [(count, todo[1:])]
    assert Scratch.open(store, "m").state()[todo[0], 0] == PREDICTED
    np.testing.assert_array_equal(store.root["m/labels/mask/0"][:BLOCK, :BLOCK], written)
    assert written.any()


def test_a_plan_being_written_is_waited_for_and_one_left_by_a_stopped_run_replaced(frozen_general, tmp_path, caplog,
                                                                                   monkeypatch):
    monkeypatch.setattr("cellseg.blocks_plan.PLAN_POLL", 0.05)
    image = mosaic((SIDE, SIDE), seed=7)
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    reference = ResultStore.open(str(tmp_path / "reference.zarr"))
    count, todo = prepare_image(reference, "m", "m", image, predictor)
    predict_block(reference, "m", todo[0], image, predictor)

    # Left by runs that stopped while planning: a claim older than PLAN_WAIT, and an older cellseg's scratch without one.
    for name, attributes in (("stale", {"claim": {"token": "a", "since": time.time() - PLAN_WAIT - 1}}), ("bare", {})):
        store = ResultStore.open(str(tmp_path / f"{name}.zarr"))
        store.root.create_group("m/blocks", attributes=attributes)
        assert prepare_image(store, "m", "m", image, predictor) == (count, todo), name

    # A run that fails after claiming the plan withdraws its claim: the next one plans at once.
    store = ResultStore.open(str(tmp_path / "failed.zarr"))
    store.root.create_array("m/labels", shape=(1,), dtype="uint8")  # an array where the labels' group belongs
    with pytest.raises(ValueError, match="is an array"):
        prepare_image(store, "m", "m", image, predictor)
    assert "m/blocks" not in store.root
    del store.root["m/labels"]
    started = time.monotonic()
    assert prepare_image(store, "m", "m", image, predictor) == (count, todo)
    assert time.monotonic() - started < PLAN_WAIT / 4

    # Another run claimed the plan a moment ago and writes it now: this run waits, then takes it up.
    store = ResultStore.open(str(tmp_path / "claimed.zarr"))
    store.root.create_group("m/blocks", attributes={"claim": {"token": "b", "since": time.time()}})
    with caplog.at_level(logging.INFO, logger="cellseg.blocks"):
        thread, outcome = _prepare_in_a_thread(store, image, predictor)
        deadline = time.monotonic() + 60
        while "waiting for the block-wise plan another run is writing" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert thread.is_alive() and not outcome
        scratch = tmp_path / "reference.zarr/m"
        for path in sorted(scratch.rglob("*")):  # the plan's own metadata last, as the run that claimed it writes it
            if path.is_file() and path != scratch / "blocks/zarr.json":
                (tmp_path / "claimed.zarr/m" / path.relative_to(scratch)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, tmp_path / "claimed.zarr/m" / path.relative_to(scratch))
        shutil.copyfile(scratch / "blocks/zarr.json", tmp_path / "claimed.zarr/m/blocks/zarr.json.new")
        os.replace(tmp_path / "claimed.zarr/m/blocks/zarr.json.new", tmp_path / "claimed.zarr/m/blocks/zarr.json")
        thread.join(60)
    assert outcome == [(count, todo[1:])]

    # A plan with other settings is left to the run that made it.
    other = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE.model_copy(update={"threshold": 0.4}))
    store.root["m/blocks"].attrs.put({"claim": {"token": "c", "since": time.time()}})
    thread, outcome = _prepare_in_a_thread(store, image, other)
    time.sleep(0.3)
    store.root["m/blocks"].attrs.put(dict(reference.root["m/blocks"].attrs))
    thread.join(60)
    assert isinstance(outcome[0], StoreError) and "another run with other settings" in str(outcome[0])
    assert Scratch.open(store, "m").state()[todo[0], 0] == PREDICTED


def test_a_block_that_fits_a_tile_is_predicted_in_one_pass_with_its_overlap(frozen_general, tmp_path):
    image = mosaic((1536, 1536), seed=3)  # 3 x 3 blocks of 512: block 4's window is 640 a side
    for tile_size, passes in ((512, [(640, 640)]), (384, [(384, 384)] * 4)):
        config = BLOCKWISE.model_copy(update={"tile_size": tile_size, "tile_overlap": 128,
                                              "blocks": BlockConfig(block_size=512, overlap=64, above_pixels=1)})
        predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), config)
        seen: list[tuple[int, ...]] = []
        hook = predictor.model.register_forward_pre_hook(
            lambda _module, inputs, seen=seen: seen.append(tuple(inputs[0].shape[-2:])))
        try:
            store = ResultStore.open(str(tmp_path / f"tile-{tile_size}.zarr"))
            prepare_image(store, "m", "m", image, predictor)
            assert predict_block(store, "m", 4, image, predictor) == "predicted"
        finally:
            hook.remove()
        assert seen == passes, tile_size


def _core_first_reference(labels: np.ndarray, core: tuple[slice, slice]) -> tuple[np.ndarray, int, int]:
    """What `_local_numbers` must give, in plain numpy."""
    present = np.unique(labels[labels > 0])
    in_core = np.unique(labels[core][labels[core] > 0])
    order = np.concatenate([in_core, np.setdiff1d(present, in_core)])
    lookup = np.zeros(int(labels.max(initial=0)) + 1, dtype=np.int32)
    lookup[order] = np.arange(1, len(order) + 1)
    return lookup[labels], len(in_core), len(order)


def test_block_local_numbers_put_the_cells_of_the_core_first():
    rng = np.random.default_rng(5)
    cases = [(rng.integers(0, 60, (90, 130)).astype(np.int32), (slice(10, 80), slice(0, 50))),
             (np.where(rng.random((64, 64)) < 0.9, 0, rng.integers(1, 2**20, (64, 64))).astype(np.int32),
              (slice(16, 48), slice(16, 48))),
             (np.zeros((5, 5), dtype=np.int32), (slice(1, 3), slice(1, 3))),
             (np.array([[0, 7, 7], [3, 0, 9]], dtype=np.int32), (slice(0, 1), slice(0, 2)))]
    for labels, core in cases:
        numbered, in_core, total = _local_numbers(labels, core)
        expected, expected_in_core, expected_total = _core_first_reference(labels, core)
        np.testing.assert_array_equal(numbered, expected)
        assert (in_core, total) == (expected_in_core, expected_total)
    with pytest.raises(ValueError, match="non-negative"):
        _local_numbers(np.array([[0, -1]], dtype=np.int32), (slice(0, 1), slice(0, 1)))



def _predicted_and_stitched(store: ResultStore, image_id: str, image: np.ndarray, predictor) -> list[int]:
    """Plan `image` block-wise in `store`, predict every block and stitch them; the blocks predicted."""
    _, todo = prepare_image(store, image_id, image_id, image, predictor)
    for index in todo:
        predict_block(store, image_id, index, image, predictor)
    stitch_image(store, image_id)
    return todo

def test_scratch_labels_past_the_stitched_ones_are_refused_when_measured(frozen_general, tmp_path):
    image = mosaic((768, 768), seed=9)
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    _predicted_and_stitched(store, "m", image, predictor)
    labels = store.root["m/blocks/labels"]
    core = np.asarray(labels[:BLOCK, :BLOCK])
    core[np.nonzero(core)[0][0], np.nonzero(core)[1][0]] = 2**30  # a corrupt scratch: a label no block numbered
    labels[:BLOCK, :BLOCK] = core
    with pytest.raises(StoreError, match="block 0: its scratch labels reach past the stitched labels"):
        measure_block(store, "m", 0, image)
    assert measure_block(store, "m", 1, image) == "measured"  # the other blocks are measured as before


def test_an_image_another_run_finished_while_this_one_planned_is_left_as_it_is(blockwise_run):
    """A run reading a large image for its plan (minutes) found no scratch once another run had
    finished the image and removed its own, claimed a plan and made blank arrays over the done ones."""
    _, _, store, _ = blockwise_run
    labels = store.read_cells("mosaic")
    assert _claim_plan(store, "mosaic", {"shape": [SIDE, SIDE]}, "mosaic") == (None, (0, []))
    assert "blocks" not in store.root["mosaic"] and store.is_done("mosaic")
    np.testing.assert_array_equal(store.read_cells("mosaic"), labels)


def test_a_step_whose_plan_was_replaced_meanwhile_writes_nothing_into_the_new_one(frozen_general, tmp_path):
    """A run whose last step aged out (`ACTIVE_WAIT`) while it stitched: another run with other
    settings replaced the plan, and the stale stitch record was merged into the new plan."""
    image = mosaic((768, 768), seed=9)
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    prepare_image(store, "m", "m", image, predictor)
    stale = Scratch.open(store, "m")
    replaced = {**stale.attrs, "plan": {**stale.attrs["plan"], "model": "another"}}
    store.root["m/blocks"].attrs.put(replaced)
    with pytest.raises(StoreError, match="its block-wise plan was removed or replaced meanwhile"):
        stale.update(stitch={"cells": 1})
    assert dict(store.root["m/blocks"].attrs) == replaced


@pytest.mark.parametrize("race", ["stale attributes written back", "a second stitch"])
def test_two_runs_on_one_plan_keep_every_measured_cell_row(frozen_general, tmp_path, race):
    """Two runs with the same settings take steps on one image. A run that had read the scratch's
    attributes before the other stitched wrote them back when it took the plan up, erasing the stitch
    record; a stitch after it, or one that had passed its "already stitched?" check before the other
    recorded its stitch, made a blank table over the rows already measured: the image was finished
    with those cells' rows all zeros, and `verify` called it whole."""
    image = mosaic((768, 768), seed=9)
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    reference = ResultStore.open(str(tmp_path / "reference.zarr"))
    _predicted_and_stitched(reference, "m", image, predictor)
    for index in range(9):
        measure_block(reference, "m", index, image)
    finish_image(reference, "m", {"version": "x"})

    store = ResultStore.open(str(tmp_path / "r.zarr"))
    _, todo = prepare_image(store, "m", "m", image, predictor)
    for index in todo:
        predict_block(store, "m", index, image, predictor)
    read_before_the_stitch = Scratch.open(store, "m")
    stitch_image(store, "m")
    for index in range(9):
        measure_block(store, "m", index, image)
    if race == "stale attributes written back":
        read_before_the_stitch.update(resumed=9)  # as taking the plan up does
    else:  # the other run's record not there yet when this one looked
        scratch = Scratch.open(store, "m")
        scratch.group.attrs.put({key: value for key, value in scratch.attrs.items() if key != "stitch"})
    stitch_image(store, "m")
    finish_image(store, "m", {"version": "x"})
    columns, rows = store.read_cell_table("m")
    assert len(rows) > 50 and np.all(rows[:, list(columns).index("area")] > 0)
    np.testing.assert_array_equal(rows, reference.read_cell_table("m")[1])


@pytest.mark.parametrize("lost", ["table", "labels"])
def test_scratch_chunks_lost_since_a_run_stopped_make_the_rerun_start_over_not_drop_cells(blockwise_run, frozen_general,
                                                                                          tmp_path, caplog, lost):
    # A run stopped after measuring every block; then one chunk its blocks wrote is lost. Zarr reads it as zeros:
    # the rerun wrote a block's table rows as zeros (cells of area 0, statistics off) or failed on the block's
    # labels every time. It now sees the loss and segments the image from the start.
    image, _, reference, _ = blockwise_run
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    todo = _predicted_and_stitched(store, "mosaic", image, predictor)
    for index in todo:
        measure_block(store, "mosaic", index, image)
    (tmp_path / "r.zarr/mosaic/blocks" / lost / ("c.5.0" if lost == "table" else "c.1.1")).unlink()
    with caplog.at_level(logging.WARNING, logger="cellseg"):
        record = segment_blockwise(store, "mosaic", "mosaic", lambda: image, predictor, {"version": "x"}, workers=2)
    assert record["statistics"] == reference.record("mosaic")["statistics"]
    np.testing.assert_array_equal(store.read_cells("mosaic"), reference.read_cells("mosaic"))
    np.testing.assert_array_equal(store.read_cell_table("mosaic")[1], reference.read_cell_table("mosaic")[1])
    assert f"'mosaic/blocks/{lost}' is missing 1 of the" in caplog.text and record["blocks"]["resumed"] == 0


@pytest.mark.integration
def test_a_large_image_is_written_block_by_block_into_an_s3_store_as_into_a_folder(s3_bucket, tmp_path):
    """The block steps write and read their chunks directly (`zarr_writes.write_region`,
    `read_region`); on S3 they must give the same store as in a local folder."""
    bucket, options = s3_bucket
    (tmp_path / "images").mkdir()
    tifffile.imwrite(tmp_path / "images/mosaic.tif", mosaic((1100, 1030), seed=11))
    env = {"FSSPEC_S3_ENDPOINT_URL": options["endpoint_url"]}
    stores = {"s3": f"{bucket}/results.zarr", "folder": str(tmp_path / "results.zarr")}
    for url in stores.values():
        cellseg("--quiet", "predict", "--model", "general", "--images", str(tmp_path / "images"), "--out", url,
                "--blockwise-above", "1", "--block-size", "512", env=env)
    on_s3 = ResultStore.open(stores["s3"], storage_options=options, mode="r")
    in_folder = ResultStore.open(stores["folder"], mode="r")
    assert on_s3.record("mosaic")["blocks"]["count"] == 9 and "blocks" not in on_s3.root["mosaic"]  # scratch removed
    np.testing.assert_array_equal(on_s3.read_cells("mosaic"), in_folder.read_cells("mosaic"))
    np.testing.assert_array_equal(on_s3.read_image("mosaic"), in_folder.read_image("mosaic"))
    assert on_s3.read_cell_table("mosaic")[1].tolist() == in_folder.read_cell_table("mosaic")[1].tolist()
    assert on_s3.record("mosaic")["statistics"] == in_folder.record("mosaic")["statistics"]
    for level in ("1", "2"):
        np.testing.assert_array_equal(on_s3.root[f"mosaic/labels/cells/{level}"][...],
                                      in_folder.root[f"mosaic/labels/cells/{level}"][...])
    assert verify_store(stores["s3"], storage_options=options, read_data=True).broken == []

# Subprocesses: memory and a killed run ------------------------------------------------------------

PEAK_RSS = """
import json, sys
from cellseg.cli import main
status = main(sys.argv[1:])
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) / 1024
print(json.dumps({"status": status, "peak_mb": peak}))
"""
RSS_BOUND_MB = 1500  # the 30000^2 image alone is 900 MB, its int32 labels 3600 MB


@pytest.mark.integration
def test_a_mostly_background_30k_image_runs_in_bounded_memory(tmp_path):
    side = 30_000
    source = zarr.create_array(str(tmp_path / "slide" / "slide.zarr"), shape=(side, side), dtype=np.uint8,
                               chunks=(1024, 1024), fill_value=0)  # chunks never written read as zeros
    source[:2048, :3072] = mosaic((2048, 3072), seed=3)  # 24 tiles of cells in a corner, the rest background
    run = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, "predict", "--images", str(tmp_path / "slide"), "--out", str(tmp_path / "r.zarr"),
         "--model", "general", "--no-image", "--no-measure", "--blockwise-above", str(8192 * 8192)],
        capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["status"] == 0 and result["peak_mb"] < RSS_BOUND_MB, result
    record = ResultStore.open(str(tmp_path / "r.zarr"), mode="r").record("slide")
    assert record["blocks"]["count"] == 225 and record["blocks"]["empty"] == 223  # only the two blocks with cells ran
    assert record["statistics"]["cell_count"] > 3000 and record["blocks"]["levels"] == 6


@pytest.mark.integration
def test_a_killed_run_is_rerun_redoing_only_its_unfinished_blocks(frozen_general, tmp_path):
    (tmp_path / "in").mkdir()
    image = mosaic((SIDE, SIDE), seed=4)
    tifffile.imwrite(tmp_path / "in" / "big.tif", image, tile=(256, 256))
    flags = ["--images", str(tmp_path / "in"), "--model", str(frozen_general), "--no-amp", "--blockwise-above", "1",
             "--block-size", str(BLOCK), "--block-overlap", str(OVERLAP)]
    child = subprocess.Popen([sys.executable, "-m", "cellseg.cli", "predict", *flags, "--out", str(tmp_path / "r.zarr")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def predicted() -> int:
        try:
            return int(np.count_nonzero(np.asarray(zarr.open_array(str(tmp_path / "r.zarr/big/blocks/state"), mode="r")[:, 0])))
        except Exception:  # noqa: BLE001 - not created yet, or a chunk being written
            return 0

    deadline = time.monotonic() + 300
    while predicted() < 3 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = predicted()
    assert 3 <= finished < 16
    store = ResultStore.open(str(tmp_path / "r.zarr"), mode="r")
    assert not store.is_done("big")

    job = SegmentJob(source_url=str(tmp_path / "in"), store_url=str(tmp_path / "r.zarr"),
                     checkpoint_url=str(frozen_general), predict=BLOCKWISE)
    heard: list[tuple[str, str, int, int]] = []
    report = run_segmentation(job, on_block=lambda *step: heard.append(step))
    assert report.done == ["big"] and report.failed == []
    assert store.record("big")["blocks"]["resumed"] == finished
    # Progress: each block the rerun predicted (only those left), then each block measured, counted up.
    left = 16 - finished
    assert heard == [("big", "predict", done, left) for done in range(1, left + 1)] + \
        [("big", "measure", done, 16) for done in range(1, 17)]
    fresh = run_segmentation(job.model_copy(update={"store_url": str(tmp_path / "fresh.zarr")}))
    assert fresh.done == ["big"]
    again = ResultStore.open(str(tmp_path / "fresh.zarr"), mode="r")
    np.testing.assert_array_equal(store.read_cells("big"), again.read_cells("big"))
    np.testing.assert_array_equal(store.read_cell_table("big")[1], again.read_cell_table("big")[1])


def test_ctrl_c_stops_a_blockwise_run_at_the_blocks_under_way_and_a_rerun_takes_them_up(frozen_general, tmp_path):
    # Ctrl-C reaches the main thread while it waits for the blocks (here: as the first is heard of). It used
    # to wait for every block already queued on the pool: the rest of the image, minutes to hours.
    image = mosaic((SIDE, SIDE), seed=8)
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        segment_blockwise(store, "big", "big.tif", lambda: image, predictor, {"version": "x"}, workers=1, on_block=interrupt)
    predicted = int(np.count_nonzero(Scratch.open(store, "big").state()[:, 0]))
    assert 1 <= predicted <= 2  # the block heard of, and at most the one under way
    record = segment_blockwise(store, "big", "big.tif", lambda: image, predictor, {"version": "x"}, workers=1)
    assert record["blocks"]["resumed"] == predicted and store.is_done("big")


@pytest.mark.integration
def test_segment_images_runs_the_blocks_of_a_large_image_as_tasks(frozen_general, prefect_harness, tmp_path):
    from prefect.artifacts import Artifact
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName, TaskRunFilterStartTime

    from cellseg.flows.segment import segment_images_flow
    from cellseg.synth import encode_png

    began = datetime.now(timezone.utc)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "big.tif", mosaic((SIDE, SIDE), seed=6), tile=(256, 256))
    (tmp_path / "in" / "small.png").write_bytes(encode_png(mosaic((256, 256), seed=7)))
    job = SegmentJob(source_url=str(tmp_path / "in"), store_url=str(tmp_path / "flow.zarr"),
                     checkpoint_url=str(frozen_general), predict=BLOCKWISE.model_copy(update={
                         "blocks": BLOCKWISE.blocks.model_copy(update={"above_pixels": 512 * 512})}))
    summary = segment_images_flow(job)
    assert summary["done"] == 2 and summary["failed"] == []
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            name=TaskRunFilterName(like_="predict-block"), start_time=TaskRunFilterStartTime(after_=began)))
    # One task run per block. Counted by id: the names' random suffixes can repeat.
    assert len({run.id for run in runs}) == 16
    progress = Artifact.get("segment-large-image-progress")
    assert float(progress.data) == 100.0 and progress.description == "big: 16 blocks predicted, 16 of 16 measured"
    # The flow's tasks and the library's thread pool give the same image.
    library = run_segmentation(job.model_copy(update={"store_url": str(tmp_path / "library.zarr")}))
    assert sorted(library.done) == ["big", "small"]
    flow_store, library_store = (ResultStore.open(str(tmp_path / name), mode="r") for name in ("flow.zarr", "library.zarr"))
    assert flow_store.record("big")["blocks"]["count"] == 16 and "blocks" not in flow_store.record("small")
    np.testing.assert_array_equal(flow_store.read_cells("big"), library_store.read_cells("big"))
    for store in (flow_store, library_store):  # the plane chosen and what the file says of its pixels
        assert store.record("big")["source"]["selection"]["format"] == "tiff"


@pytest.mark.parametrize(("garbled", "stitched"), [("labels", True), ("final", True), ("edges", False)])
def test_a_scratch_chunk_its_codec_cannot_read_makes_the_rerun_start_over_naming_it(blockwise_run, frozen_general,
                                                                                     tmp_path, caplog, garbled, stitched):
    # A run stopped after predicting (and stitching) every block; then one chunk its blocks wrote is
    # torn (an interrupted copy, a disk error): there, but its bytes do not decode. Every rerun failed
    # at that block; now one segments the image from the start.
    image, _, reference, _ = blockwise_run
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen_general)), BLOCKWISE)
    store = ResultStore.open(str(tmp_path / "r.zarr"))
    _, todo = prepare_image(store, "mosaic", "mosaic", image, predictor)
    for index in todo:
        predict_block(store, "mosaic", index, image, predictor)
    if stitched:
        stitch_image(store, "mosaic")
    chunk = sorted((tmp_path / "r.zarr/mosaic/blocks" / garbled).glob("c.*"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:4] + bytes(64))
    with caplog.at_level(logging.WARNING, logger="cellseg"):
        record = segment_blockwise(store, "mosaic", "mosaic", lambda: image, predictor, {"version": "x"}, workers=2)
    np.testing.assert_array_equal(store.read_cells("mosaic"), reference.read_cells("mosaic"))
    assert record["statistics"] == reference.record("mosaic")["statistics"] and record["blocks"]["resumed"] == 0
    assert f"its block-wise scratch is damaged (chunk 'mosaic/blocks/{garbled}/{chunk.name}' cannot be decoded" \
        in caplog.text


def test_segment_images_starts_a_large_image_over_when_its_scratch_cannot_be_decoded(frozen_general, prefect_harness,
                                                                                      tmp_path):
    from cellseg.flows.segment import segment_images_flow
    from cellseg.large_image import LargeImage

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "big.tif", mosaic((SIDE, SIDE), seed=6), tile=(256, 256))
    job = SegmentJob(source_url=str(tmp_path / "in"), store_url=str(tmp_path / "flow.zarr"),
                     checkpoint_url=str(frozen_general), predict=BLOCKWISE.model_copy(update={
                         "blocks": BLOCKWISE.blocks.model_copy(update={"above_pixels": 512 * 512})}))
    stopped = LargeImage(job, "big", str(tmp_path / "in" / "big.tif"))  # a run stopped after stitching its blocks
    for index in stopped.prepare()[1]:
        stopped.predict(index)
    stopped.stitch()
    chunk = sorted((tmp_path / "flow.zarr/big/blocks/labels").glob("c.*"))[-1]
    chunk.write_bytes(chunk.read_bytes()[:4] + bytes(64))
    heard = BufferingHandler(capacity=10_000)  # on the logger itself: a flow run's logging need not reach the root's
    logging.getLogger("cellseg.blocks").addHandler(heard)
    try:
        summary = segment_images_flow(job)
    finally:
        logging.getLogger("cellseg.blocks").removeHandler(heard)
    assert summary["done"] == 1 and summary["failed"] == [], summary
    assert any(f"its block-wise scratch is damaged (chunk 'big/blocks/labels/{chunk.name}' cannot be decoded"
               in record.getMessage() for record in heard.buffer)
    library = run_segmentation(job.model_copy(update={"store_url": str(tmp_path / "library.zarr")}))
    assert library.done == ["big"]
    flow_store, library_store = (ResultStore.open(str(tmp_path / name), mode="r") for name in ("flow.zarr", "library.zarr"))
    assert flow_store.record("big")["blocks"]["resumed"] == 0
    np.testing.assert_array_equal(flow_store.read_cells("big"), library_store.read_cells("big"))


def test_a_damaged_tile_of_a_large_image_fails_it_at_once_naming_the_region(frozen_general, prefect_harness,
                                                                             tmp_path):
    """A tile that cannot be decoded raised the codec's own error (DeflateError, a RuntimeError),
    which the block tasks retried three times (42 s) before the image failed without naming where."""
    from cellseg.flows.segment import segment_images_flow

    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "big.tif", mosaic((SIDE, SIDE), seed=6), tile=(256, 256), compression="zlib")
    Image.fromarray(mosaic((256, 256), seed=7)).save(tmp_path / "in" / "small.png")
    with tifffile.TiffFile(tmp_path / "in" / "big.tif") as tiff:
        offset, count = tiff.pages[0].dataoffsets[9], tiff.pages[0].databytecounts[9]
    with open(tmp_path / "in" / "big.tif", "r+b") as file:  # one tile damaged past decoding
        file.seek(offset + 2)
        file.write(bytes(count - 2))
    job = SegmentJob(source_url=str(tmp_path / "in"), store_url=str(tmp_path / "flow.zarr"),
                     checkpoint_url=str(frozen_general), predict=BLOCKWISE.model_copy(update={
                         "blocks": BLOCKWISE.blocks.model_copy(update={"above_pixels": 512 * 512})}))
    summary = segment_images_flow(job)
    assert summary["done"] == 1, summary  # the small image
    [failed] = summary["failed"]
    assert failed["image_id"] == "big" and "big.tif': its region rows" in failed["error"], failed
    assert "cannot be decoded (DeflateError" in failed["error"], failed
    assert not ResultStore.open(str(tmp_path / "flow.zarr"), mode="r").is_done("big")


def test_a_zarr_image_chunked_too_coarsely_to_read_block_by_block_fails_naming_its_chunk(frozen_general, tmp_path):
    """A chunk larger than a block read may decode was decoded whole for every block it touches
    (a 6000² float64 image in one chunk: 288 MB per block); a TIFF's tiles were bounded already."""
    (tmp_path / "in").mkdir()
    zarr.create_array(str(tmp_path / "in" / "coarse.zarr"), shape=(6000, 6000), dtype=np.float64, chunks=(6000, 6000))
    Image.fromarray(mosaic((256, 256), seed=7)).save(tmp_path / "in" / "small.png")
    job = SegmentJob(source_url=str(tmp_path / "in"), store_url=str(tmp_path / "r.zarr"),
                     checkpoint_url=str(frozen_general), predict=BLOCKWISE)
    report = run_segmentation(job)
    assert report.done == ["small"]
    [failed] = report.failed
    assert failed["image_id"] == "coarse", failed
    assert f"coarse.zarr': one chunk decodes to {6000 * 6000 * 8} bytes, over the 256 MiB" in failed["error"], failed
