"""Throughput and memory as the work grows: more images of one size, and bigger images.

    python -m benchmarks.scaling [--count 2000] [--sides 512 1024 2048 4096 8192] [--out FILE]

Each run segments a folder with the product's defaults (`run_segmentation`, one process of its
own so that its peak RSS is its own) with the shipped general model on synthetic images:
- by count: `count` 512x512 images in one run, throughput and RSS taken every 10% of the images
  (flat throughput and flat RSS: nothing accumulates per image);
- by size: two images per side or more (as many pixels as two 2048x2048 images below that),
  megapixels per second and peak RSS per side (flat throughput per pixel; memory that grows with the image, not beyond).
`make bench` runs the sizes up to 4096x4096 (`bench_scaling(work)`; its memory rows already hold
2,000 images); `make bench-large` the rest (`bench_scaling(work, count=2000, sides=(512, 8192))`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from benchmarks.memory import memory_mb
from benchmarks.output import first_paragraph, json_from_child, show_and_save
from cellseg.bundled import shipped_checkpoint
from cellseg.synth import encode_png, generate_sample, write_dataset

TILE = 1024  # bigger images are this synthetic sample repeated, which leaves their cell density as at 1024


def _child(images: str, store: str, every: int) -> dict:
    """Segment `images` into `store` in this process: (images, seconds, RSS MB) every `every` images, peak."""
    from cellseg.jobs import SegmentJob, run_segmentation

    samples: list[tuple[int, float, float]] = []
    done = 0
    started = time.perf_counter()

    def sample(_: str) -> None:
        nonlocal done
        done += 1
        if done % every == 0:
            samples.append((done, time.perf_counter() - started, memory_mb("VmRSS")))

    job = SegmentJob(source_url=images, store_url=store, checkpoint_url=shipped_checkpoint("general"))
    report = run_segmentation(job, on_image=sample)
    assert not report.failed, report.failed
    # The report's seconds leave out the start (planning, model load), which a bigger run would amortise.
    return {"images": len(report.done), "seconds": report.seconds, "pixels": report.pixels,
            "samples": samples, "peak_mb": memory_mb("VmHWM")}


def _run_child(images: Path, store: Path, every: int) -> dict:
    shutil.rmtree(store, ignore_errors=True)
    return json_from_child("-m", "benchmarks.scaling", "child", "--images", str(images), "--store", str(store),
                           "--every", str(every))


def scaling_by_count(work: Path, count: int) -> dict:
    """`count` 512x512 images in one run: images per second and RSS in each tenth of the run."""
    folder = work / f"scaling-count-{count}"
    write_dataset(str(folder), count=count, size=512, seed=61)
    every = max(1, count // 10)
    run = _run_child(folder / "images", work / f"scaling-count-{count}.zarr", every)
    rows, previous = [], (0, 0.0)
    for done, seconds, rss in run["samples"]:
        rows.append({"images": done, "images_per_second": (done - previous[0]) / (seconds - previous[1]), "rss_mb": rss})
        previous = (done, seconds)
    rates, rss = [row["images_per_second"] for row in rows[1:]], [row["rss_mb"] for row in rows[1:]]
    return {"count": count, "side": 512, "every": every, "rows": rows, "peak_mb": run["peak_mb"],
            "images_per_second": run["images"] / run["seconds"],
            # The first tenth holds the model load and first calls; after it both should stay flat.
            "rate_last_vs_second_tenth": rates[-1] / rates[0] if rates else float("nan"),
            "rss_growth_after_first_tenth": rss[-1] / rss[0] - 1 if rss else float("nan")}


def scaling_by_size(work: Path, sides: tuple[int, ...]) -> dict:
    """At least two images per side (as many pixels as two 2048x2048 images below that): megapixels per
    second of the run (its images overlap each other's reading, forward pass and writing; the model
    load is left out) and peak RSS, each side in a fresh process."""
    tile = generate_sample(np.random.default_rng(63), (TILE, TILE)).image
    rows = []
    for side in sides:
        folder = work / f"scaling-side-{side}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        copies = max(2, (2048 // side) ** 2 * 2)
        repeats = -(-side // TILE)
        image = np.tile(tile, (repeats, repeats))[:side, :side]
        for index in range(copies):
            (folder / f"side_{side}_{index}.png").write_bytes(encode_png(np.roll(image, index * 37, axis=1)))
        run = _run_child(folder, work / f"scaling-side-{side}.zarr", 1)
        rows.append({"side": side, "images": run["images"], "seconds": run["seconds"],
                     "megapixels_per_second": run["pixels"] / 1e6 / run["seconds"], "peak_mb": run["peak_mb"]})
    return {"rows": rows}


def bench_scaling(work: Path, count: int | None = None, sides: tuple[int, ...] = (512, 1024, 2048, 4096)) -> dict:
    """By size, and by count when `count` is given (`make bench`: sizes to 4096; `make bench-large`:
    count 2,000 and sides 512 and 8192)."""
    work.mkdir(parents=True, exist_ok=True)
    result = {"by_size": scaling_by_size(work, sides)}
    if count is not None:
        result["by_count"] = scaling_by_count(work, count)
    return result


def ratios(result: dict) -> dict[str, float]:
    """`ratios.scaling_*`: throughput at the end of the run over early on, RSS growth, and megapixels per
    second of the biggest image over the smallest."""
    sizes = result["by_size"]["rows"]
    found = {"scaling_size_mp_per_s_largest_vs_smallest": sizes[-1]["megapixels_per_second"]
             / sizes[0]["megapixels_per_second"]}
    if "by_count" in result:
        found["scaling_count_rate_last_vs_early"] = result["by_count"]["rate_last_vs_second_tenth"]
        found["scaling_count_rss_growth"] = result["by_count"]["rss_growth_after_first_tenth"]
    return found


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    rows = []
    if "by_count" in result:
        count = result["by_count"]
        rows.append((f"scaling: {count['count']} images of {count['side']}^2",
                     f"{count['images_per_second']:.2f} img/s, peak {count['peak_mb']:.0f} MB",
                     f"last tenth {count['rate_last_vs_second_tenth']:.2f}x the second's rate; RSS "
                     f"{count['rss_growth_after_first_tenth']:+.1%} after the first tenth (within 10%)"))
    for row in result["by_size"]["rows"]:
        rows.append((f"scaling: {row['side']}^2 x {row['images']}", f"{row['megapixels_per_second']:.2f} MP/s",
                     f"peak {row['peak_mb']:.0f} MB" + (" (< 3000 MB)" if row["side"] >= 8192 else "")))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    sub = parser.add_subparsers(dest="mode")
    child = sub.add_parser("child")
    child.add_argument("--images", required=True)
    child.add_argument("--store", required=True)
    child.add_argument("--every", type=int, default=10)
    parser.add_argument("--count", type=int, help="also this many 512x512 images in one run (bench-large: 2000)")
    parser.add_argument("--sides", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--work", type=Path, default=Path("runs/benchmarks/scaling"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.mode == "child":
        print(json.dumps(_child(args.images, args.store, args.every)))
        return
    result = bench_scaling(args.work, args.count, tuple(args.sides))
    result["ratios"] = ratios(result)
    show_and_save(table_rows(result), result, args.out)


if __name__ == "__main__":
    main()
