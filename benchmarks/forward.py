"""The forward pass on CPU, variant by variant, side by side in one process:

    python -m benchmarks.forward [--model nuclei] [--variants ...] [--images 4] [--rounds 6] [--threads 1] [--out FILE]

A shipped model (`nuclei`, the default model, or `general`) on synthetic 512x512 images, one image
per forward pass and one torch thread (as each of the product's shards runs it). Variants: plain
fp32, channels-first (the reference); the product's pass on CPU, bf16 autocast on a channels-last
network (`UNet.use_channels_last`), and the same in fp32; bf16 on the channels-first network (the
default before); `torch.compile` (inductor, one compilation per image size, its cost stated
apart) of the channels-first network, as the product compiles it, and of the channels-last one;
`torch.jit.freeze` (oneDNN conv fusion and weight prepacking). The variants take turns image by
image for `rounds` rounds and each keeps its fastest time per image, so a busy neighbour slowing
one stretch does not decide the comparison. Each variant's masks are
compared with plain fp32's (pixel agreement, Dice). `make bench` runs `BENCH_VARIANTS`, the
product's passes beside the references.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch._inductor.config

from benchmarks.output import first_paragraph, show_and_save
from cellseg.bundled import shipped_checkpoint
from cellseg.checkpoint import load_checkpoint
from cellseg.metrics import mask_agreement
from cellseg.model import UNet
from cellseg.normalize import normalize_image
from cellseg.runtime import autocast_context
from cellseg.synth import generate_sample

SIDE = 512
Forward = Callable[[torch.Tensor], torch.Tensor]


def _autocast(function: Forward, amp: bool) -> Forward:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast_context(torch.device("cpu"), amp):
            return torch.sigmoid(function(x).float())
    return run


VARIANTS = ("fp32", "fp32_channels_last", "bf16", "bf16_channels_first", "bf16_compile", "bf16_compile_channels_last",
            "fp32_jit_freeze", "bf16_jit_freeze")
# make bench's: the product's passes (eager bf16 channels-last, compiled channels-first) beside the
# references; the others are measured alternatives that were not kept (docs/performance.md).
BENCH_VARIANTS = ("fp32", "bf16", "bf16_channels_first", "bf16_compile")


def variants(model: UNet, example: torch.Tensor, names: Sequence[str] = VARIANTS
             ) -> tuple[dict[str, Forward], dict[str, float]]:
    """The forward passes `names` (in that order, always with fp32 and bf16, the references), and the
    one-off cost (s) of building the ones that have one."""
    cost: dict[str, float] = {}
    plain = copy.deepcopy(model)
    laid_out = copy.deepcopy(model).use_channels_last()
    builders: dict[str, Callable[[], Forward]] = {
        "fp32": lambda: _autocast(plain, False),
        "fp32_channels_last": lambda: _autocast(laid_out, False),
        "bf16": lambda: _autocast(laid_out, True),
        "bf16_channels_first": lambda: _autocast(plain, True),
        "bf16_compile": lambda: _autocast(torch.compile(plain, dynamic=False), True),
        "bf16_compile_channels_last": lambda: _autocast(torch.compile(laid_out, dynamic=False), True),
        "fp32_jit_freeze": lambda: _frozen(plain, example, False, cost),
        "bf16_jit_freeze": lambda: _frozen(plain, example, True, cost),
    }
    wanted = ["fp32", "bf16", *(name for name in names if name not in ("fp32", "bf16"))]
    unknown = sorted(set(wanted) - set(builders))
    if unknown:
        raise ValueError(f"unknown forward variants {unknown}: choose from {', '.join(VARIANTS)}")
    return {name: builders[name]() for name in wanted}, cost


def _frozen(model: UNet, example: torch.Tensor, amp: bool, cost: dict[str, float]) -> Forward:
    """`torch.jit.freeze` of a trace: fp32 with `optimize_for_inference` (oneDNN fusion), or traced
    under bf16 autocast; its build time goes to `cost`."""
    # The trace fixes the padding branch for this shape, which is what its warnings say.
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    started = time.perf_counter()
    if amp:
        # Tracing records autocast's casts only with its weight cache off.
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            frozen = torch.jit.freeze(torch.jit.trace(model, example, check_trace=False))
    else:
        with torch.no_grad():
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, example)))
    cost["bf16_jit_freeze" if amp else "fp32_jit_freeze"] = time.perf_counter() - started
    return _autocast(frozen, amp)


def bench_forward(images: int = 4, rounds: int = 6, threads: int = 1, model: str = "nuclei",
                  names: Sequence[str] = VARIANTS) -> dict:
    """Fastest ms per 512x512 image of each variant, first-call cost, agreement of masks with fp32."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _bench_forward(images, rounds, threads, model, names)
    finally:
        torch.set_num_threads(threads_before)


def _bench_forward(images: int, rounds: int, threads: int, model_name: str, names: Sequence[str]) -> dict:
    checkpoint = load_checkpoint(shipped_checkpoint(model_name))
    rng = np.random.default_rng(5)
    batches = [torch.from_numpy(normalize_image(generate_sample(rng, (SIDE, SIDE)).image,
                                                checkpoint.model_config.normalization))[None, None]
               for _ in range(images)]
    model = checkpoint.build_model().eval()
    forwards, cost = variants(model, batches[0], names)
    outputs: dict[str, list[np.ndarray]] = {}
    # First calls: compilation (cold: inductor's on-disk cache, which makes a later run's compilation
    # take seconds, is left out), oneDNN's first-run setup.
    with torch._inductor.config.patch(force_disable_caches=True):
        for name, forward in forwards.items():
            started = time.perf_counter()
            outputs[name] = [forward(batches[0])[0, 0].numpy()]
            cost[name] = cost.get(name, 0.0) + time.perf_counter() - started
    best = {name: [float("inf")] * images for name in forwards}
    for _ in range(rounds):
        for index, batch in enumerate(batches):
            for name, forward in forwards.items():
                started = time.perf_counter()
                probability = forward(batch)[0, 0].numpy()
                best[name][index] = min(best[name][index], time.perf_counter() - started)
                if len(outputs[name]) <= index:
                    outputs[name].append(probability)
    masks = {name: [p > checkpoint.threshold for p in maps] for name, maps in outputs.items()}
    results = {}
    for name in forwards:
        results[name] = {
            "ms_per_image": 1000 * float(np.mean(best[name])),
            "first_call_seconds": cost[name],
            "vs_bf16": float(np.mean(best["bf16"]) / np.mean(best[name])),
            "max_probability_difference": float(max(np.abs(a - b).max() for a, b in zip(outputs[name], outputs["fp32"],
                                                                                         strict=True))),
            **mask_agreement(masks[name], masks["fp32"]),
        }
    return {"model": model_name, "side": SIDE, "images": images, "rounds": rounds, "threads": threads,
            "load_average_1min": os.getloadavg()[0], "cpus": os.cpu_count(), "variants": results}


def ratios(result: dict) -> dict[str, float]:
    """`ratios.forward_*`: each variant's speed against the default eager bf16 pass (> 1: faster)."""
    return {f"forward_{name}_vs_bf16": row["vs_bf16"] for name, row in result["variants"].items() if name != "bf16"}


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    """Rows for `make bench`'s table: ms per image, against eager bf16, first call and agreement with fp32."""
    return [(f"forward {name}, {result.get('model', 'general')} {result['side']}^2, {result['threads']} thread",
             f"{row['ms_per_image']:.0f} ms  {row['vs_bf16']:.2f}x eager bf16",
             f"first call {row['first_call_seconds']:.1f} s; vs fp32 masks: pixels {row['pixel_agreement']:.4%}, "
             f"Dice {row['dice']:.4f}") for name, row in result["variants"].items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--model", default="nuclei", help="a shipped model: nuclei (the default model) or general")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help=f"the passes to compare (default: all; make bench runs {' '.join(BENCH_VARIANTS)})")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = bench_forward(args.images, args.rounds, args.threads, args.model, args.variants)
    show_and_save(table_rows(result), result, args.out)
    print(f"load average {result['load_average_1min']:.1f} on {result['cpus']} cpus")


if __name__ == "__main__":
    main()
