"""`make bench`'s block-wise rows (benchmarks/blockwise.py), on a 1024² mosaic in 256² blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.blockwise import bench_blockwise, ratios, table_rows

pytestmark = pytest.mark.integration  # `cellseg predict`'s recipe runs in subprocesses

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_the_block_wise_section_measures_memory_throughput_and_seams(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the children run `python -m benchmarks.large`
    result = bench_blockwise(tmp_path, side=1024, block=256, rounds=2)

    memory, seams = result["memory"], result["seams"]["blocks"]
    assert memory["blocks"]["count"] == 16 and memory["blocks"]["block_size"] == 256
    assert memory["separate_images"] == 4  # every 512² tile of the mosaic
    assert memory["cells"] > 0 and 0 < memory["peak_mb"] < 3000
    assert memory["large_megapixels_per_second"] > 0 and memory["separate_megapixels_per_second"] > 0
    assert len(memory["throughput_ratios"]) == 2 and memory["throughput_ratio"] == pytest.approx(np.median(memory["throughput_ratios"]))
    assert {path.name for path in tmp_path.glob("*.zarr")} >= {"tiles-0.zarr", "tiles-1.zarr", "large-0.zarr", "large-1.zarr"}
    assert result["seams"]["block"] == 256
    assert seams["reference_cells"] > 0 and seams["cells"] > 0
    assert abs(seams["cells"] / seams["reference_cells"] - 1) < 0.1
    assert seams["median_iou"] > 0.9 and seams["cut_at_a_seam"] >= 0

    found = ratios(result)
    assert set(found) == {"blockwise_vs_separate_tiles", "blockwise_count_difference"}
    assert found["blockwise_vs_separate_tiles"] == memory["throughput_ratio"] > 0
    assert found["blockwise_count_difference"] == seams["count_difference"]
    rows = table_rows(result)
    assert [name for name, _, _ in rows] == [f"block-wise 1024^2: {what}"
                                             for what in ("peak RSS", "throughput", "seams")]
    assert f"{memory['peak_mb']:.0f} MB" in rows[0][1] and "16 blocks of 256^2" in rows[0][2]
    assert f"{seams['cells']} vs {seams['reference_cells']}" in rows[2][1]
