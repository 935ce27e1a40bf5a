"""`make bench`'s rows for images bigger than memory: `make bench-large`'s measurements, smaller.

    python -m benchmarks.blockwise [--side 4096] [--block 1024] [--rounds 3] [--work DIR] [--out FILE]

The functions of benchmarks/large.py on side x side synthetic mosaics in `block`-pixel blocks
(4096² in 1024² blocks: 16 blocks, three seams across and three down), a minute or two on 2 cores:
- memory and throughput: one mosaic segmented block by block by `cellseg predict`'s recipe in a
  process of its own, its peak RSS (target at most 3000 MB) and megapixels per second against the
  same recipe on every one of the mosaic's 512x512 tiles as separate PNG files (target at least 0.8x;
  three alternated pairs, the median ratio);
- seams: another mosaic segmented whole in memory (tiled) and block by block: the cell counts
  (target within 0.5%), the reference cells cut at a seam (target 0; judged against the mosaic's
  truth, as `make bench-large` does) and the median IoU of the reference cells.
`make bench-large` measures the same on a 30000² mosaic (memory, throughput) and an 8192² one (seams).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from benchmarks.large import TILE, bench_memory_and_throughput, bench_seams, remove_results
from benchmarks.output import first_paragraph, show_and_save


def bench_blockwise(work: Path, side: int = 4096, block: int = 1024, model: str = "general", rounds: int = 3
                    ) -> dict[str, Any]:
    """Memory and throughput of one side x side mosaic (`rounds` alternated pairs), and the seams of
    another, in `block`-pixel blocks."""
    work.mkdir(parents=True, exist_ok=True)
    remove_results(work)
    separate = (side // TILE) ** 2  # every tile of the mosaic: as many pixels as the mosaic
    memory = bench_memory_and_throughput(work, side, separate, model, block, rounds)
    load = os.getloadavg()[0]
    return {"side": side, "block": block, "model": model, "memory": memory, "load_average_1min": load,
            "seams": bench_seams(work, side, model, block)}


def ratios(result: dict[str, Any]) -> dict[str, float]:
    """`ratios.blockwise_*`: block by block against separate tiles (megapixels per second), and the
    block path's cell count against the in-memory path's (a fraction, + more cells)."""
    return {"blockwise_vs_separate_tiles": result["memory"]["throughput_ratio"],
            "blockwise_count_difference": result["seams"]["blocks"]["count_difference"]}


def table_rows(result: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Rows for `make bench`'s table: peak RSS, throughput against separate tiles, seams."""
    memory, seams = result["memory"], result["seams"]["blocks"]
    name = f"block-wise {result['side']}^2"
    return [(f"{name}: peak RSS", f"{memory['peak_mb']:.0f} MB, {memory['cells']} cells",
             f"(<= 3000 MB); {memory['blocks']['count']} blocks of {result['block']}^2, {memory['large_seconds']:.0f} s"),
            (f"{name}: throughput", f"{memory['large_megapixels_per_second']:.2f} vs "
             f"{memory['separate_megapixels_per_second']:.2f} MP/s",
             f"{memory['throughput_ratio']:.2f}x {memory['separate_images']} separate {TILE}^2 tiles (>= 0.8; median of "
             f"{', '.join(f'{ratio:.2f}' for ratio in memory['throughput_ratios'])}); "
             f"load average {result['load_average_1min']:.1f}"),
            (f"{name}: seams", f"{seams['cells']} vs {seams['reference_cells']} cells in memory, "
             f"{seams['count_difference']:+.2%}",
             f"within 0.5%; {seams['cut_at_a_seam']} cut at a seam (0); median IoU {seams['median_iou']:.3f} "
             f"(in memory with 1536^2 tiles: {result['seams']['noise_floor_1536_tiles']['median_iou']:.3f})")]


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--side", type=int, default=4096, help="side of the mosaics")
    parser.add_argument("--block", type=int, default=1024, help="side of the blocks")
    parser.add_argument("--model", default="general")
    parser.add_argument("--rounds", type=int, default=3, help="alternated pairs of the throughput runs (the median ratio)")
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks/blockwise"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = bench_blockwise(args.work, args.side, args.block, args.model, args.rounds)
    result["ratios"] = ratios(result)
    show_and_save(table_rows(result), result, args.out)


if __name__ == "__main__":
    main()
