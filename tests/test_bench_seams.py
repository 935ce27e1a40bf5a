"""How `make bench-large` counts cells cut at a seam (benchmarks/large.py: compare)."""

from __future__ import annotations

import numpy as np

from benchmarks.large import compare, mosaic_truth
from cellseg.stitch import BlockGrid

GRID = BlockGrid((8, 16), 8, 2)  # two blocks side by side, the seam between columns 7 and 8


def labelled(*boxes: tuple[int, int, int, int]) -> np.ndarray:
    labels = np.zeros(GRID.shape, dtype=np.int32)
    for number, (top, bottom, left, right) in enumerate(boxes, start=1):
        labels[top:bottom, left:right] = number
    return labels


def test_one_true_cell_divided_at_the_seam_is_cut_and_two_true_cells_merged_by_the_reference_are_not():
    reference = labelled((0, 3, 4, 12), (5, 8, 4, 12))  # two cells, each across the seam
    blocks = labelled((0, 3, 4, 8), (0, 3, 8, 12), (5, 8, 4, 8), (5, 8, 8, 12))  # each divided at the seam
    truth = labelled((0, 3, 4, 12), (5, 8, 4, 8), (5, 8, 8, 12))  # the second is two cells abutting there

    found = compare(reference, blocks, GRID, truth)
    assert found["cut"] == found["cut_at_a_seam"] == 1
    assert found["reference_merges_cut"] == 1
    assert compare(reference, blocks, GRID)["cut_at_a_seam"] == 2  # without the truth, both count
    assert compare(truth, blocks, GRID)["cut_at_a_seam"] == 1


def test_the_mosaic_truth_numbers_every_tile_s_cells_apart():
    truth = mosaic_truth(1024, seed=3)
    tiles = [truth[top:top + 512, left:left + 512] for top in (0, 512) for left in (0, 512)]
    numbers = [set(np.unique(tile[tile > 0]).tolist()) for tile in tiles]
    assert all(numbers) and sum(map(len, numbers)) == len(set().union(*numbers))
