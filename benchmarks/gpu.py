"""The GPU figures of issue 22, at library level (no Prefect), in one process:

    python -m benchmarks.gpu [--seconds 30] [--model nuclei] [--out FILE.json] [--device cuda]

1. The device: its name, the measured bf16 matmul rate (8192^3) and device-to-device copy
   bandwidth (bytes read + written by `copy_` of a 2 GiB tensor).
2. Model only: the shipped model on 512x512 inputs already on the device, batches of 1, 8 and 32,
   bf16 autocast under inference mode: images/s, TFLOP/s (FlopCounterMode), the fraction of the
   matmul rate, and the fraction of the model's memory-bound roofline (the bf16 bytes of every
   conv and norm layer's input and output, over the measured copy bandwidth). Then the same
   through `Predictor` at its own batch size (host batches: copy in, sigmoid, copy out included),
   the figure the product is divided by.
3. Product: `cellseg.jobs.run_segmentation` (every image in this process, as one shard runs them)
   on synthetic 512x512 PNGs into a local zarr store, after a warm-up pass (model load, first
   calls), over enough images for `--seconds` of steady-state work (at most 4,000). Then 2 and 4
   shards at a time on threads sharing the model, as the segment-images flow's thread pool runs
   them (`max_parallel_shards`; without Prefect), for half as long each: their host work overlaps.
4. Last, the model alone through `torch.compile` (`cellseg.runtime.CompiledByShape`, what
   `PredictConfig.compile` runs; inductor fuses each norm with its ReLU), at batches of 8 and 32,
   each shape's compilation timed apart: whether compiling should be the default on a GPU.

`--out` is written after each part, so a run stopped by a time limit keeps what it measured.

Without CUDA (and without `--device cpu`, a small local check) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.output import first_paragraph
from cellseg.bundled import shipped_checkpoint
from cellseg.checkpoint import load_checkpoint
from cellseg.config import PredictConfig
from cellseg.infer import Predictor, forward_probabilities
from cellseg.jobs import SegmentJob, run_segmentation
from cellseg.runtime import CompiledByShape, autocast_context, cpu_has_native_bf16, synchronize
from cellseg.synth import encode_png, generate_sample

CUDA_BATCHES, CPU_BATCHES = (1, 8, 32), (1, 2)
COMPILED_CUDA_BATCHES, COMPILED_CPU_BATCHES = (8, 32), (1,)
WARMUP_IMAGES = 16
PARALLEL_SHARDS = (2, 4)  # the flow's default max_parallel_shards, and twice it
POOL_IMAGES = 32  # distinct synthetic images; the product's folders link to them in turn
NORM_LAYERS = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm, torch.nn.LayerNorm)


def _calls_per_second(step: Callable[[], object], device: torch.device, seconds: float) -> tuple[float, int]:
    """(calls/s, calls timed) of `step` over about `seconds`, after three warm-up calls."""
    for _ in range(3):
        step()
    synchronize(device)
    started = time.perf_counter()
    step()
    synchronize(device)
    calls = max(3, min(100_000, int(seconds / max(time.perf_counter() - started, 1e-6))))
    started = time.perf_counter()
    for _ in range(calls):
        step()
    synchronize(device)
    return calls / (time.perf_counter() - started), calls


def device_facts(device: torch.device) -> dict:
    """Name, bf16 matmul TFLOP/s (mean of 10 after 3 warm-ups) and copy bandwidth (read + written)."""
    cuda = device.type == "cuda"
    # Without native bf16 the CPU model runs fp32 (cellseg.runtime.autocast_context), so that rate is its peak.
    dtype = torch.bfloat16 if cuda or cpu_has_native_bf16() else torch.float32
    n, copy_bytes = (8192, 2 << 30) if cuda else (1024, 64 << 20)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        a @ b
    synchronize(device)
    matmul = 2 * n**3 * 10 / (time.perf_counter() - started) / 1e12
    del a, b
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copies, _ = _calls_per_second(lambda: target.copy_(source), device, 0.5)
    return {"name": torch.cuda.get_device_name(device) if cuda else f"CPU ({os.cpu_count()} cores)",
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpus": os.cpu_count(),
            "matmul_n": n, "matmul_dtype": str(dtype).removeprefix("torch."), "matmul_tflops": matmul,
            "copy_bytes": copy_bytes, "copy_gb_per_s": 2 * copy_bytes * copies / 1e9}


def model_costs(model: torch.nn.Module, side: int) -> dict:
    """FLOPs of one side x side image, and the bf16 bytes of the activations its conv and norm
    layers read and write (every leaf module's beside them): what a memory-bound pass must move."""
    counted = {"conv_norm": 0, "all_leaves": 0}

    def count(module: torch.nn.Module, inputs: tuple, output: object) -> None:
        tensors = [t for t in (*inputs, output) if isinstance(t, torch.Tensor)]
        moved = 2 * sum(t.numel() for t in tensors)
        counted["all_leaves"] += moved
        if isinstance(module, (torch.nn.modules.conv._ConvNd, *NORM_LAYERS)):
            counted["conv_norm"] += moved

    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            model(torch.zeros(1, 1, side, side, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return {"side": side, "gflop_per_image": counter.get_total_flops() / 1e9,
            "roofline_bytes_per_image": counted["conv_norm"], "all_leaf_bytes_per_image": counted["all_leaves"]}


def bench_model(model: torch.nn.Module, device: torch.device, side: int, batch: int, seconds: float) -> dict:
    """Images/s of the model alone on a batch already on the device, bf16 autocast, inference mode."""
    x = torch.randn(batch, 1, side, side, device=device)

    def step() -> None:
        with torch.inference_mode(), autocast_context(device, True):
            model(x)

    calls, timed = _calls_per_second(step, device, seconds)
    return {"batch_size": batch, "images_per_second": calls * batch, "images": timed * batch}


def _model_row(row: dict, facts: dict, costs: dict) -> dict:
    """`bench_model`'s row with its TFLOP/s, and its fractions of the matmul rate and of the roofline."""
    bound = facts["copy_gb_per_s"] * 1e9 / costs["roofline_bytes_per_image"]
    tflops = row["images_per_second"] * costs["gflop_per_image"] / 1e3
    return {**row, "tflops": tflops, "fraction_of_matmul": tflops / facts["matmul_tflops"],
            "roofline_images_per_second": bound, "fraction_of_roofline": row["images_per_second"] / bound}


def bench_compiled_model(model: torch.nn.Module, device: torch.device, side: int, seconds: float, facts: dict,
                         costs: dict) -> list[dict]:
    """`_model_row`s of `model` through `CompiledByShape`, one per batch size, each with the
    seconds of its shape's first pass (the compilation) and whether it ran compiled."""
    compiled = CompiledByShape(model)
    rows = []
    for batch in COMPILED_CUDA_BATCHES if device.type == "cuda" else COMPILED_CPU_BATCHES:
        x = torch.randn(batch, 1, side, side, device=device)
        started = time.perf_counter()
        with torch.inference_mode(), autocast_context(device, True):
            compiled(x)
        synchronize(device)
        first = time.perf_counter() - started
        row = _model_row(bench_model(compiled, device, side, batch, seconds), facts, costs)
        rows.append({**row, "compile_seconds": first, "compiled": not compiled.failed})
    return rows


def bench_predictor(predictor: Predictor, side: int, seconds: float) -> dict:
    """Images/s of `forward_probabilities` at the predictor's batch size on host batches, as the product calls it."""
    rng = np.random.default_rng(3)
    batch = rng.standard_normal((predictor.batch_size, side, side)).astype(np.float32)
    calls, timed = _calls_per_second(
        lambda: forward_probabilities(predictor.forward_model, batch, predictor.device, predictor.config.amp),
        predictor.device, seconds)
    return {"batch_size": predictor.batch_size, "images_per_second": calls * predictor.batch_size,
            "images": timed * predictor.batch_size,
            "postprocess_workers": getattr(predictor, "postprocess_workers", 1)}  # the product's, on this device


def _image_folder(folder: Path, pool: list[Path], count: int) -> str:
    folder.mkdir(parents=True)
    for index in range(count):
        target = folder / f"img_{index:05d}.png"
        try:
            os.link(pool[index % len(pool)], target)
        except OSError:
            shutil.copyfile(pool[index % len(pool)], target)
    return str(folder)


def _segment(work: Path, name: str, pool: list[Path], count: int, model: str, predict: PredictConfig,
             parallel_shards: int = 1) -> dict:
    """One pass of the library's segmentation recipe over `count` images; wall and CPU time, finish
    times. With `parallel_shards` > 1 the images are cut into that many shards, run side by side on
    threads (`cellseg.jobs.run_segmentation`, as `cellseg predict` and the segment-images flow's
    thread pool run them); with 1, in one loop."""
    source = _image_folder(work / f"{name}-images", pool, count)
    job = SegmentJob(source_url=source, store_url=str(work / f"{name}.zarr"), registry_url=str(work / "registry"),
                     model_version=model, predict=predict, max_parallel_shards=parallel_shards,
                     shard_size=max(1, math.ceil(count / parallel_shards)))
    finished: list[float] = []
    cpu, started = time.process_time(), time.perf_counter()
    report = run_segmentation(job, on_image=lambda _: finished.append(time.perf_counter()))
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    done, failed = len(report.done), report.failed
    if failed:
        raise RuntimeError(f"{len(failed)} images failed, first: {failed[0]}")
    return {"images": done, "seconds": wall, "images_per_second": done / wall,
            "cpu_share": cpu / wall / (os.cpu_count() or 1), "finished": sorted(finished),
            "parallel_shards": parallel_shards}


def bench_product(work: Path, model: str, device: str, side: int, seconds: float, max_images: int,
                  parallel_shards: int = 1) -> dict:
    """Steady-state images/s of the product (`parallel_shards` at a time, see `_segment`): a
    warm-up pass, then passes of enough images for `seconds`."""
    rng = np.random.default_rng(7)
    pool = []
    for index in range(min(POOL_IMAGES, max_images)):
        pool.append(work / "pool" / f"{index}.png")
        pool[-1].parent.mkdir(exist_ok=True)
        pool[-1].write_bytes(encode_png(generate_sample(rng, (side, side)).image))
    predict = PredictConfig(device=device)
    warmup_images = max(2, min(WARMUP_IMAGES, max_images // 4))
    warmup = _segment(work, f"warmup{parallel_shards}", pool, warmup_images, model, predict, parallel_shards)
    # Its middle half: the first images carry the model's first calls, the last ones finish together.
    middle = warmup["finished"][warmup_images // 4 : -(warmup_images // 4) or None]
    rate = (len(middle) - 1) / (middle[-1] - middle[0]) if len(middle) > 2 else warmup["images_per_second"]
    passes = 0
    while True:
        passes += 1
        count = max(warmup_images, min(max_images, math.ceil(1.25 * rate * seconds)))
        timed = _segment(work, f"pass{passes}-{parallel_shards}", pool, count, model, predict, parallel_shards)
        rate = timed["images_per_second"]
        if timed["seconds"] >= seconds or count >= max_images or passes == 2:
            break
    del timed["finished"]
    return {**timed, "side": side, "model": model, "passes": passes,
            "warmup_seconds": warmup["seconds"], "steady_seconds_met": timed["seconds"] >= seconds}


def bench_gpu(device_name: str, model_name: str, seconds: float, side: int, max_images: int,
              save: Callable[[dict], None] = lambda _: None) -> dict:
    """Every figure of the module docstring, and the ratios of issue 22's GPU targets. `save` gets
    the figures so far after each part (a run stopped by its time limit keeps them); the compiled
    passes, whose compilations take longest, come last."""
    device = torch.device(device_name)
    facts = device_facts(device)
    checkpoint = load_checkpoint(shipped_checkpoint(model_name))
    model = checkpoint.build_model().to(device).eval()
    costs = model_costs(model, side)
    if device.type == "cuda":  # the peak of the model's batches, not of the matmul and copy above
        torch.cuda.reset_peak_memory_stats(device)
    rows = []
    for batch in CUDA_BATCHES if device.type == "cuda" else CPU_BATCHES:
        rows.append(_model_row(bench_model(model, device, side, batch, seconds / 6), facts, costs))
    best = max(rows, key=lambda row: row["images_per_second"])
    result: dict = {"device": facts["name"], "hardware": facts, "model": {"name": model_name, **costs},
                    "model_only": rows,
                    "model_only_peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                    "ratios": {"gpu_model_vs_matmul": best["fraction_of_matmul"],
                               "gpu_model_vs_roofline": best["fraction_of_roofline"]}}
    predictor = Predictor(checkpoint, PredictConfig(device=device_name))
    result["model_only_predictor"] = through_predictor = bench_predictor(predictor, side, seconds / 6)
    save(result)
    del predictor
    with tempfile.TemporaryDirectory(prefix="cellseg-gpu-bench-") as work:
        result["product"] = product = bench_product(Path(work), model_name, device_name, side, seconds, max_images)
        result["ratios"]["gpu_product_vs_model_only"] = product["images_per_second"] / through_predictor["images_per_second"]
        save(result)
        # As the segment-images flow runs them: shards side by side on threads, sharing the model.
        result["product_parallel_shards"] = in_parallel = [
            bench_product(Path(work), model_name, device_name, side, seconds / 2, max_images, shards)
            for shards in PARALLEL_SHARDS]
    result["ratios"].update({f"gpu_product_{run['parallel_shards']}_shards_vs_model_only":
                             run["images_per_second"] / through_predictor["images_per_second"] for run in in_parallel})
    save(result)
    result["model_only_compiled"] = compiled_rows = bench_compiled_model(model, device, side, seconds / 6, facts, costs)
    result["ratios"]["gpu_model_compiled_vs_matmul"] = max(row["fraction_of_matmul"] for row in compiled_rows)
    save(result)
    return result


def table_rows(result: dict) -> list[tuple[str, str, str]]:
    """Rows for a bench table: device, model alone by batch size, through the Predictor, product."""
    hw, costs, product = result["hardware"], result["model"], result["product"]
    side = f"{costs['side']}^2"
    rows = [(f"device {result['device']}", f"{hw['matmul_tflops']:.3g} TFLOP/s {hw['matmul_dtype']} matmul "
             f"({hw['matmul_n']}^3)", f"copy {hw['copy_gb_per_s']:.0f} GB/s (read + written); torch {hw['torch']}"),
            (f"model {costs['name']}, {side}", f"{costs['gflop_per_image']:.1f} GFLOP/image",
             f"{costs['roofline_bytes_per_image'] / 1e6:.0f} MB conv+norm activations/image (bf16; all layers "
             f"{costs['all_leaf_bytes_per_image'] / 1e6:.0f} MB)")]
    rows += [(f"model only, batch {row['batch_size']}, on device",
              f"{row['images_per_second']:.3g} img/s  {row['tflops']:.3g} TFLOP/s",
              f"{row['fraction_of_matmul']:.0%} of matmul (>= 40%), {row['fraction_of_roofline']:.0%} of roofline "
              f"{row['roofline_images_per_second']:.0f} img/s (>= 80%)") for row in result["model_only"]]
    rows += [(f"model only, compiled, batch {row['batch_size']}",
              f"{row['images_per_second']:.3g} img/s  {row['tflops']:.3g} TFLOP/s",
              f"{row['fraction_of_matmul']:.0%} of matmul, {row['fraction_of_roofline']:.0%} of roofline; compiled in "
              f"{row['compile_seconds']:.0f} s" + ("" if row["compiled"] else " (failed: eager)"))
             for row in result.get("model_only_compiled", [])]
    predictor = result["model_only_predictor"]
    rows += [(f"model only, Predictor batch {predictor['batch_size']}", f"{predictor['images_per_second']:.3g} img/s",
              "host batches: copy in, sigmoid, copy out"),
             (f"product, {side}, {product['images']} images", f"{product['images_per_second']:.3g} img/s",
              f"{result['ratios']['gpu_product_vs_model_only']:.2f}x model only (>= 0.5); {product['seconds']:.0f} s "
              f"steady; CPU {product['cpu_share']:.0%} of {hw['cpus']} cores")]
    model_only = predictor["images_per_second"]
    rows += [(f"product, {run['parallel_shards']} shards at a time", f"{run['images_per_second']:.3g} img/s",
              f"{run['images_per_second'] / model_only:.2f}x model only; CPU {run['cpu_share']:.0%} of {hw['cpus']} cores")
             for run in result.get("product_parallel_shards", [])]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--seconds", type=float, default=30.0, help="steady-state seconds of the product pass")
    parser.add_argument("--model", default="nuclei", help="shipped model: nuclei or general")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (a small local check)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--side", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--max-images", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cpu = torch.device(args.device).type == "cpu"
    if not cpu and not torch.cuda.is_available():
        print("no CUDA device: GPU benchmark skipped")
        return
    max_images = args.max_images or (16 if cpu else 4000)
    def save(result: dict) -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))

    result = bench_gpu(args.device, args.model, args.seconds, args.side, max_images, save)
    for name, value, note in table_rows(result):
        print(f"{name:<34}  {value:<34} {note}")


if __name__ == "__main__":
    main()
