"""How well a model at a cell size batches across images, at two batch sizes side by side:

    python -m benchmarks.batching [--model nuclei] [--dataset ../shared/data/dsb2018] [--device cuda]

Each image of a model at a cell size is resampled to the model's cell size, by its own
estimate, before its pass, so the images of one batch rarely keep one shape. `cellseg.infer`
stacks the images the model pads to one shape (`UNet.size_multiple`) into one pass. This counts
the model's forward passes and the images in each, and times `Predictor.cell_maps` over the same
images at `--batch-sizes` (default 1 and 8), in turns, each fed in the calls `segment_images`
makes (one batch on CPU's batch size 1, several batches' worth above it: `Predictor.images_per_call`),
with the milliseconds per image spent
outside the network's passes (resampling, normalising, size reading, copies: on a GPU, the host
work the device waits for), on two sets: the dataset's images (mixed
sizes and magnifications: the hard case) and synthetic 512x512 images of one nominal cell size
(one microscope's nightly run). The maps of every batch size are checked against the first's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.output import first_paragraph
from cellseg.bundled import shipped_checkpoint, shipped_name
from cellseg.checkpoint import load_checkpoint
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.io import list_images, read_image
from cellseg.read_ahead import ReadAhead
from cellseg.runtime import synchronize
from cellseg.segment import take_call
from cellseg.synth import generate_sample

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def synthetic_images(count: int, side: int = 512, seed: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [generate_sample(rng, (side, side)).image for _ in range(count)]


def calls_of(predictor: Predictor, images: list[np.ndarray]) -> list[list[np.ndarray]]:
    """`images` in the `cell_maps` calls that `segment_images` makes of them (`take_call`)."""
    items = [(str(index), str(index)) for index in range(len(images))]
    calls = []
    with ReadAhead(items, lambda key: (images[int(key)], [], {}), lambda result: result[0].nbytes) as reads:
        while call := take_call(reads, predictor)[0]:
            calls.append([image for _, _, image, _, _ in call])
    return calls


def passes_and_seconds(predictor: Predictor, calls: list[list[np.ndarray]]) -> dict[str, Any]:
    """The forward passes (images in each) and seconds of `predictor.cell_maps` over `calls`
    (lists of images, one a call); the seconds inside the network's passes (its forward and its
    size features, the device synchronised around each); the maps' scales for the check."""
    batches: list[int] = []
    model = predictor.model
    network = [0.0]

    def synchronised_clock() -> float:
        synchronize(predictor.device)
        return time.perf_counter()

    def timed_features(x: torch.Tensor) -> torch.Tensor:
        started = synchronised_clock()
        summaries = features(x)
        network[0] += synchronised_clock() - started
        return summaries

    def before(_module: Any, args: tuple) -> None:
        batches.append(int(args[0].shape[0]))
        network[0] -= synchronised_clock()

    def after(_module: Any, _args: tuple, _output: Any) -> None:
        network[0] += synchronised_clock()

    features = model.features
    hooks = [model.register_forward_pre_hook(before), model.register_forward_hook(after)]
    model.features = timed_features  # type: ignore[method-assign]
    scales: list[Any] = []
    started = time.perf_counter()
    try:
        for call in calls:
            scales += [maps.scale for maps in predictor.cell_maps(call)]
    finally:
        for hook in hooks:
            hook.remove()
        del model.features  # the class's method again
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "passes": len(batches), "images_passed": sum(batches), "scales": scales,
            "network_seconds": network[0], "host_ms_per_image": (seconds - network[0]) / len(scales) * 1e3}


def bench_batching(model: str, images: list[np.ndarray], device: str, batch_sizes: list[int], rounds: int) -> dict:
    """Passes, images per pass and the best of `rounds` seconds at each batch size, and whether
    every batch size chose the first one's scales."""
    checkpoint = load_checkpoint(shipped_checkpoint(model) if shipped_name(model) else model)
    predictors = {size: Predictor(checkpoint, PredictConfig(device=device, batch_size=size, compile=False))
                  for size in batch_sizes}
    for predictor in predictors.values():
        predictor.cell_maps(images[:1])  # first-call allocations are not part of the cost
    calls = {size: calls_of(predictor, images) for size, predictor in predictors.items()}
    runs: dict[int, list[dict[str, Any]]] = {size: [] for size in batch_sizes}
    for _ in range(rounds):
        for size, predictor in predictors.items():
            runs[size].append(passes_and_seconds(predictor, calls[size]))
    first = runs[batch_sizes[0]][0]["scales"]
    rows = []
    for size in batch_sizes:
        best = min(runs[size], key=lambda run: run["seconds"])
        same = all(_same_scale(a, b) for a, b in zip(best["scales"], first, strict=True))
        rows.append({"batch_size": size, "seconds": best["seconds"], "images_per_second": len(images) / best["seconds"],
                     "passes": best["passes"], "images_per_pass": best["images_passed"] / max(1, best["passes"]),
                     "images_per_call": len(images) / len(calls[size]),
                     "host_ms_per_image": min(run["host_ms_per_image"] for run in runs[size]),
                     "same_scales_as_first": same})
    return {"model": model, "device": device, "images": len(images), "rows": rows}


def _same_scale(a: dict | None, b: dict | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.keys() == b.keys() and all(
        np.isclose(a[key], b[key], rtol=1e-3) if isinstance(a[key], float) else a[key] == b[key] for key in a)


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--model", default="nuclei", help="a shipped model's name or a checkpoint file")
    parser.add_argument("--dataset", type=Path, default=DATA / "dsb2018", help="a folder with images/; left out when absent")
    parser.add_argument("--synthetic", type=int, default=32, help="synthetic 512x512 images of one cell size (0: none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = parser.parse_args()
    sets = {}
    if (args.dataset / "images").is_dir():
        sets[args.dataset.name] = [read_image(url) for url in list_images(str(args.dataset / "images"))]
    if args.synthetic:
        sets["synthetic 512x512"] = synthetic_images(args.synthetic)
    results = {}
    for name, images in sets.items():
        results[name] = result = bench_batching(args.model, images, args.device, args.batch_sizes, args.rounds)
        for row in result["rows"]:
            print(f"{name}, {result['images']} images, batch {row['batch_size']} ({row['images_per_call']:.1f} "
                  f"images per call): {row['passes']} passes, "
                  f"{row['images_per_pass']:.2f} images per pass, {row['images_per_second']:.2f} img/s on "
                  f"{args.device}, {row['host_ms_per_image']:.1f} ms per image outside the network's passes "
                  f"(best of {args.rounds}); scales as batch {args.batch_sizes[0]}: {row['same_scales_as_first']}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
