"""`make bench-large`: images bigger than memory, segmented block by block (docs/performance.md).

    python -m benchmarks.large [--side 30000] [--seam-side 8192] [--exact-side 4096] [--out runs/bench-large]

Side by side in one run, with the shipped `general` model (`--model`) and the product's defaults:

- memory and throughput: a side x side synthetic mosaic full of cells (512-pixel tiles of
  cellseg.synth in an on-disk zarr array) segmented by `cellseg predict`'s recipe in a process of
  its own: its peak RSS (target at most 3000 MB) and megapixels per second against the same
  recipe on `--separate` of the mosaic's own 512x512 tiles as PNG files (target at least 0.8x);
- seams: a seam-side mosaic segmented whole in memory (tiled) and block by block (2048-pixel
  blocks): the cell counts (target within 0.5%), the reference cells cut at a seam (target 0:
  one whose larger parts are two or more block cells in different blocks; counted only where
  the reference cell is one cell of the mosaic's truth, not two true cells it merged), and the
  cells below IoU 0.95; beside them the in-memory path against itself with 1536-pixel tiles
  instead of 1024, which is how far InstanceNorm and bf16 alone move cells between two tilings;
- exact: an exact-side mosaic in 1024-pixel blocks with the model's InstanceNorm frozen to fixed
  statistics and fp32 (`frozen_checkpoint`), where tiles change a prediction only within the
  model's reach of a tile edge: the block path must give the cells of the whole image predicted
  at once, untiled, by the in-memory path (equal count, each IoU at least 0.95, none cut).

Writes <out>/results.json and prints the figures. The full run takes tens of minutes on 2 cores.
`make bench` runs the first two on 4096x4096 mosaics in 1024-pixel blocks (benchmarks/blockwise.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from torch import nn

from benchmarks.memory import memory_mb
from benchmarks.output import first_paragraph, json_from_child
from cellseg.blocks import segment_blockwise
from cellseg.bundled import shipped_checkpoint
from cellseg.checkpoint import load_checkpoint, save_checkpoint
from cellseg.config import BlockConfig, PredictConfig
from cellseg.jobs import SegmentJob, run_segmentation
from cellseg.model_source import ModelSource, load_predictor
from cellseg.normalize import normalize_image
from cellseg.postprocess import cell_labels
from cellseg.stitch import BlockGrid
from cellseg.store import ResultStore
from cellseg.synth import encode_png, generate_sample, mosaic_tiles

TILE = 512  # the mosaic's tiles, and the separate images it is compared with


def _band(args: tuple[int, int, int, int]) -> np.ndarray:
    """Rows [top, top + rows) of the mosaic of width `width` (a process of the pool)."""
    top, rows, width, seed = args
    band = np.zeros((rows, width), dtype=np.uint8)
    for tile_top, left, sample in mosaic_tiles((rows, width), TILE, seed + top):
        band[tile_top: tile_top + sample.image.shape[0], left: left + sample.image.shape[1]] = sample.image
    return band


def mosaic_truth(side: int, seed: int) -> np.ndarray:
    """The true cells of `write_mosaic(side, seed)`: each tile's labels, numbered on across tiles.
    Cells of neighbouring tiles can abut along a tile edge (each cut straight there by its tile)."""
    truth = np.zeros((side, side), dtype=np.int32)
    numbered = 0
    for top in range(0, side, 1024):
        for tile_top, left, sample in mosaic_tiles((min(1024, side - top), side), TILE, seed + top):
            labels = sample.labels.astype(np.int32)
            rows, cols = top + tile_top, left
            truth[rows: rows + labels.shape[0], cols: cols + labels.shape[1]] = np.where(labels > 0, labels + numbered, 0)
            numbered += int(labels.max(initial=0))
    return truth


def write_mosaic(path: Path, side: int, seed: int = 0) -> zarr.Array:
    """A side x side mosaic of synthetic tiles as a zarr array at `path`, written band by band of
    1024 rows in two processes (kept when one of that side and seed is there already)."""
    if path.exists():
        existing = zarr.open_array(str(path), mode="r")
        if existing.attrs.get("mosaic") == {"side": side, "seed": seed}:
            return existing
        shutil.rmtree(path)
    array = zarr.create_array(str(path), shape=(side, side), dtype=np.uint8, chunks=(1024, 1024),
                              dimension_names=("y", "x"))
    bands = [(top, min(1024, side - top), side, seed) for top in range(0, side, 1024)]
    with ProcessPoolExecutor(max_workers=2) as pool:
        for (top, rows, _, _), band in zip(bands, pool.map(_band, bands), strict=True):
            array[top: top + rows] = band
    array.attrs["mosaic"] = {"side": side, "seed": seed}
    return array


def frozen_checkpoint(out: Path, name: str = "general") -> Path:
    """A shipped model with each InstanceNorm replaced by a BatchNorm holding the statistics it saw
    on one synthetic image: translation-invariant, so tiles and blocks do not change its output."""
    checkpoint = load_checkpoint(shipped_checkpoint(name))
    model = checkpoint.build_model()
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def recorder(layer: str) -> Any:
        def record(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            seen[layer] = (inputs[0].mean(dim=(0, 2, 3)), inputs[0].var(dim=(0, 2, 3), unbiased=False))
        return record

    for layer, module in model.named_modules():
        if isinstance(module, nn.InstanceNorm2d):
            module.register_forward_hook(recorder(layer))
    image = normalize_image(generate_sample(np.random.default_rng(5), (512, 512)).image)
    with torch.inference_mode():
        model(torch.from_numpy(image)[None, None])
    weights = dict(checkpoint.state_dict)
    for layer, (mean, variance) in seen.items():
        weights |= {f"{layer}.running_mean": mean.clone(), f"{layer}.running_var": variance.clone(),
                    f"{layer}.num_batches_tracked": torch.tensor(1)}
    frozen = dataclasses.replace(checkpoint, state_dict=weights,
                                 model_config=checkpoint.model_config.model_copy(update={"norm": "batch"}))
    save_checkpoint(frozen, str(out))
    return out


def compare(reference: np.ndarray, labels: np.ndarray, grid: BlockGrid | None = None,
            truth: np.ndarray | None = None) -> dict[str, Any]:
    """Cell counts, each reference cell's best IoU in `labels`, and the reference cells cut: holding
    the larger part of two or more cells of `labels` (at a seam: cells whose centroids are in
    different blocks of `grid`). With `truth`, a reference cell that holds the larger part of two
    or more true cells is a merge of the reference's, not a cell: it is counted apart
    (`reference_merges_cut`), not as cut."""
    pairs, overlap = _overlaps(reference, labels)
    reference_sizes, sizes = np.bincount(reference.ravel()), np.bincount(labels.ravel())
    iou = overlap / (reference_sizes[pairs[0]] + sizes[pairs[1]] - overlap)
    best = np.zeros(len(reference_sizes))
    np.maximum.at(best, pairs[0], iou)
    cells = np.flatnonzero(reference_sizes[1:]) + 1
    major = overlap > 0.5 * sizes[pairs[1]]
    cut = np.bincount(pairs[0][major], minlength=len(reference_sizes)) >= 2
    merges = np.zeros(len(reference_sizes), dtype=bool)
    if truth is not None:
        true_pairs, true_overlap = _overlaps(reference, truth)
        holds = true_overlap > 0.5 * np.bincount(truth.ravel())[true_pairs[1]]
        merges = np.bincount(true_pairs[0][holds], minlength=len(reference_sizes)) >= 2
    merged_and_cut = cut & merges
    cut &= ~merges
    result = {"reference_cells": len(cells), "cells": int(np.count_nonzero(sizes[1:])),
              "count_difference": (int(np.count_nonzero(sizes[1:])) - len(cells)) / max(len(cells), 1),
              "below_iou_0.95": int(np.count_nonzero(best[cells] < 0.95)), "median_iou": float(np.median(best[cells])),
              "cut": int(np.count_nonzero(cut))}
    if truth is not None:
        result["reference_merges_cut"] = int(np.count_nonzero(merged_and_cut))
    if grid is not None:
        rows, cols = np.nonzero(labels)
        owner = labels[rows, cols]
        count = np.maximum(sizes, 1)
        centre_y = np.bincount(owner, rows, len(sizes)) / count
        centre_x = np.bincount(owner, cols, len(sizes)) / count
        block = (centre_y // grid.block).astype(np.int64) * grid.cols + (centre_x // grid.block).astype(np.int64)
        parts = pairs[:, major]
        seams = 0
        for cell in np.flatnonzero(cut):
            seams += len(np.unique(block[parts[1][parts[0] == cell]])) >= 2
        result["cut_at_a_seam"] = int(seams)
    return result


def _overlaps(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """((2, K) label pairs (first, second) sharing pixels, (K,) pixels each pair shares)."""
    both = (first > 0) & (second > 0)
    return np.unique(np.stack([first[both], second[both]]).astype(np.int64), axis=1, return_counts=True)


# Memory and throughput ------------------------------------------------------------------------------


def run_child(images: Path, store: Path, model: str, block: int = BlockConfig().block_size) -> dict[str, Any]:
    """`cellseg predict`'s recipe on the images of a folder, in a process of its own (`block`-pixel blocks)."""
    return json_from_child("-m", "benchmarks.large", "child", "--images", str(images), "--store", str(store),
                           "--model", model, "--block", str(block))


def child(images: str, store: str, model: str, block: int) -> None:
    started = time.monotonic()
    # Anything larger than a tile goes block by block, so that smaller mosaics than the default do too.
    blocks = BlockConfig(above_pixels=TILE * TILE, block_size=block)
    report = run_segmentation(SegmentJob(source_url=images, store_url=store, model_version=model,
                                         predict=PredictConfig(blocks=blocks)))
    seconds = time.monotonic() - started
    assert not report.failed, report.failed
    print(json.dumps({"images": len(report.done), "seconds": seconds, "megapixels": report.pixels / 1e6,
                      "megapixels_per_second": report.pixels / 1e6 / seconds, "peak_mb": memory_mb("VmHWM")}))


def bench_memory_and_throughput(work: Path, side: int, separate: int, model: str,
                                block: int = BlockConfig().block_size, rounds: int = 1) -> dict[str, Any]:
    """Peak RSS and megapixels per second of one side x side mosaic block by block, against its
    first `separate` 512² tiles as separate images; with `rounds` > 1 the two alternate (which
    goes first alternating too) and the ratio is the median of the rounds' ratios, since a
    shared machine's load moves any one pair."""
    mosaic = write_mosaic(work / "large" / "mosaic.zarr", side)
    tiles = work / "tiles"
    shutil.rmtree(tiles, ignore_errors=True)
    tiles.mkdir()
    per_row = side // TILE
    for index in range(min(separate, per_row * per_row)):
        top, left = index // per_row * TILE, index % per_row * TILE
        (tiles / f"tile_{index:05d}.png").write_bytes(encode_png(np.asarray(mosaic[top: top + TILE, left: left + TILE])))
    paths = {"separate": (f"{separate} separate {TILE}x{TILE} images", tiles, "tiles"),
             "large": (f"one {side}x{side} image, block by block", work / "large", "large")}

    def store(name: str, round_index: int) -> Path:
        return work / (f"{name}-{round_index}.zarr" if rounds > 1 else f"{name}.zarr")

    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    for round_index in range(rounds):
        measured: dict[str, dict[str, Any]] = {}
        for what in ("separate", "large") if round_index % 2 == 0 else ("large", "separate"):
            described, images_folder, name = paths[what]
            print(f"  {described} ...", flush=True)
            measured[what] = run_child(images_folder, store(name, round_index), model, block)
        pairs.append((measured["separate"], measured["large"]))
    ratios = [large["megapixels_per_second"] / images["megapixels_per_second"] for images, large in pairs]
    images, large = pairs[int(np.argsort(ratios)[len(ratios) // 2])]  # the median round
    record = ResultStore.open(str(store("large", 0)), mode="r").record("mosaic")
    return {"side": side, "blocks": record["blocks"], "cells": record["statistics"]["cell_count"],
            "peak_mb": max(large["peak_mb"] for _, large in pairs), "large_megapixels_per_second": large["megapixels_per_second"],
            "large_seconds": large["seconds"], "separate_images": images["images"],
            "separate_megapixels_per_second": images["megapixels_per_second"],
            "throughput_ratio": float(np.median(ratios)), "throughput_ratios": ratios}


# Seams ------------------------------------------------------------------------------------------------


def blockwise_labels(work: Path, name: str, source: zarr.Array, predictor: Any) -> np.ndarray:
    store = ResultStore.open(str(work / f"results-{name}.zarr"))
    segment_blockwise(store, name, name, lambda: source, predictor, {"version": predictor.model_version}, workers=2)
    return store.read_cells(name)


def bench_seams(work: Path, side: int, model: str, block: int = BlockConfig().block_size) -> dict[str, Any]:
    seed = 1
    source = write_mosaic(work / f"seams-{side}.zarr", side, seed=seed)
    image = np.asarray(source[...])
    config = PredictConfig(threads=1, blocks=BlockConfig(block_size=block))
    predictor = load_predictor(ModelSource("", model), config)
    started = time.monotonic()
    reference = cell_labels(predictor.cell_maps([image])[0], predictor.config)
    whole_seconds = time.monotonic() - started
    started = time.monotonic()
    blocks = blockwise_labels(work, f"seams-{side}", source, predictor)
    block_seconds = time.monotonic() - started
    grid = BlockGrid(image.shape, block, config.blocks.overlap)
    other = load_predictor(ModelSource("", model), config.model_copy(update={"tile_size": 1536}))
    tiled_otherwise = cell_labels(other.cell_maps([image])[0], other.config)
    truth = mosaic_truth(side, seed)
    return {"side": side, "block": block, "blocks": compare(reference, blocks, grid, truth), "in_memory_seconds": whole_seconds,
            "blockwise_seconds": block_seconds, "noise_floor_1536_tiles": compare(reference, tiled_otherwise, grid, truth),
            "blocks_against_truth": compare(truth, blocks, grid), "in_memory_against_truth": compare(truth, reference, grid)}


def bench_exact(work: Path, side: int, block: int) -> dict[str, Any]:
    source = write_mosaic(work / f"exact-{side}.zarr", side, seed=2)
    image = np.asarray(source[...])
    frozen = frozen_checkpoint(work / "frozen.pt")
    config = PredictConfig(amp=False, threads=1, blocks=BlockConfig(block_size=block))
    predictor = load_predictor(ModelSource("", checkpoint_url=str(frozen)), config)
    # One tile for the whole image: in-memory tiles would blend a few borderline cells apart too
    # (1024² tiles on this mosaic: one touching pair of 8,054 cells split otherwise).
    whole = load_predictor(ModelSource("", checkpoint_url=str(frozen)), config.model_copy(update={"tile_size": side}))
    reference = cell_labels(whole.cell_maps([image])[0], whole.config)
    blocks = blockwise_labels(work, f"exact-{side}", source, predictor)
    return {"side": side, "block": block, **compare(reference, blocks, BlockGrid(image.shape, block, config.blocks.overlap))}


def remove_results(work: Path) -> None:
    """Delete the result stores of an earlier run in `work` (a rerun would skip their done images); keep the mosaics."""
    for store in work.glob("*.zarr"):
        if (store / "zarr.json").is_file() and "cellseg" in json.loads((store / "zarr.json").read_text()).get("attributes", {}):
            shutil.rmtree(store)


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("mode", nargs="?", default="all", choices=("all", "child"))
    parser.add_argument("--side", type=int, default=30_000, help="side of the large mosaic")
    parser.add_argument("--separate", type=int, default=240, help=f"{TILE}x{TILE} tiles segmented as separate images")
    parser.add_argument("--seam-side", type=int, default=8192)
    parser.add_argument("--exact-side", type=int, default=4096)
    parser.add_argument("--model", default="general")
    parser.add_argument("--sections", default="large,seams,exact", help="which of large, seams, exact to run")
    parser.add_argument("--out", default="runs/bench-large")
    parser.add_argument("--images")
    parser.add_argument("--store")
    parser.add_argument("--block", type=int, default=BlockConfig().block_size, help="the child's block side")
    args = parser.parse_args()
    if args.mode == "child":
        child(args.images, args.store, args.model, args.block)
        return
    out = Path(args.out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    remove_results(work)
    results: dict[str, Any] = {"model": args.model, "cpus": torch.get_num_threads()}
    sections = {"large": lambda: bench_memory_and_throughput(work, args.side, args.separate, args.model),
                "seams": lambda: bench_seams(work, args.seam_side, args.model),
                "exact": lambda: bench_exact(work, args.exact_side, 1024)}
    for name in args.sections.split(","):
        print(f"{name} ...", flush=True)
        results[name] = sections[name]()
        (out / "results.json").write_text(json.dumps(results, indent=1))  # after each section: a long run keeps what it has
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
