"""`make bench`: every performance figure measured side by side in one run on this machine.

    python -m benchmarks.run [--images 240] [--out runs/benchmarks]

Writes <out>/results.json and prints a table. Sections: hardware limit (dense matmul rates and
the model's FLOPs), training (product loop vs the naive batch-1 fp32 loop at equal epochs), naive
inference loop, model-only forward, product (`segment-images` from a local folder and from s3://
on a loopback SeaweedFS server, one shard at a time and two in parallel), the product's stages
timed alone beside its forward pass (`benchmarks.product_stages`), storage (codecs and the
write of one result: `benchmarks.storage`), memory (2,000 images; one
8192x8192 image, tiled), agreement of the fast path with plain fp32 and the cost of estimating
each image's cell size with the shipped nuclei model (`benchmarks.cell_size`; resampling to it and
back, `benchmarks.resampling`) and each post-processing
stage beside the forward pass (`benchmarks.postprocess_stages`), the forward pass's variants
(`benchmarks.forward`), throughput and memory by image size (`benchmarks.scaling`) and a 4096x4096
mosaic block by block (`benchmarks.blockwise`: peak RSS, throughput against its tiles as separate
images, seams; `make bench-large` does the same at 30000x30000 and 8192x8192).
Each section is timed (`section_seconds`) and written to results.json as it ends; one running past
`--section-limit` stops the run with every thread's stack (`benchmarks.sections`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.baselines import notebook_epoch
from benchmarks.blockwise import bench_blockwise
from benchmarks.blockwise import ratios as blockwise_ratios
from benchmarks.blockwise import table_rows as blockwise_rows
from benchmarks.cell_size import bench_cell_size
from benchmarks.forward import BENCH_VARIANTS, bench_forward
from benchmarks.forward import ratios as forward_ratios
from benchmarks.forward import table_rows as forward_rows
from benchmarks.gpu import bench_gpu
from benchmarks.gpu import table_rows as gpu_rows
from benchmarks.output import first_paragraph, json_from_child
from benchmarks.postprocess_stages import bench_postprocess
from benchmarks.postprocess_stages import ratios as postprocess_ratios
from benchmarks.postprocess_stages import table_rows as postprocess_rows
from benchmarks.product_stages import bench_product_stages
from benchmarks.product_stages import ratios as product_stages_ratios
from benchmarks.product_stages import table_rows as product_stages_rows
from benchmarks.resampling import bench_resampling
from benchmarks.resampling import table_rows as resampling_rows
from benchmarks.scaling import bench_scaling
from benchmarks.scaling import ratios as scaling_ratios
from benchmarks.scaling import table_rows as scaling_rows
from benchmarks.sections import Sections
from benchmarks.servers import (
    S3_TEST_CREDENTIALS,
    running_prefect_server,
    running_seaweedfs_server,
    server_cpu_seconds,
)
from benchmarks.storage import bench_writing
from benchmarks.storage import table_rows as storage_rows
from cellseg.checkpoint import CheckpointError, load_checkpoint
from cellseg.config import ModelConfig, PredictConfig, TrainConfig
from cellseg.infer import Predictor, forward_probabilities
from cellseg.io import list_images, read_image
from cellseg.jobs import SegmentJob
from cellseg.loaded_pairs import load_pairs
from cellseg.metrics import (
    MetricAccumulator,
    confusion_counts,
    mask_agreement,
    segmentation_scores,
)
from cellseg.model import UNet
from cellseg.normalize import normalize_image
from cellseg.pairs import pair_images_and_masks, split_train_val
from cellseg.runtime import autocast_dtype
from cellseg.stats import image_statistics, label_cells
from cellseg.synth import encode_png, generate_sample, write_dataset
from cellseg.train import train

SIDE = 512  # inference images are SIDE x SIDE
PARALLEL_SHARDS = 2  # segment-images' default max_parallel_shards
PRODUCT_PAIRS = 3  # the product and the model alone, timed in turn this many times
NAIVE_BESIDE_IMAGES = 80  # images of the naive loop timed before each of those pairs
LONG_RUN_COPIES = 4  # the long product run segments the inference images this many times over, under other names
GPU_SECONDS = 30  # steady-state seconds of the GPU product pass, when a GPU is present
# A section taking longer than this has hung (the longest, product, takes about 6 minutes here).
SECTION_LIMIT_SECONDS = 1200.0


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - started


def machine_ticks() -> tuple[int, int] | None:
    """This machine's CPU time so far, in clock ticks over all cores: (idle, all), from
    /proc/stat (None where there is none)."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return fields[3] + fields[4], sum(fields[:8])  # idle and iowait; user .. steal


def accounted(function, *args, **kwargs) -> tuple[object, float, dict[str, float | None]]:
    """`timed`, and where the cores' time went meanwhile: this process's CPU seconds and the
    machine's idle share (None without /proc/stat)."""
    ticks_before, cpu_before = machine_ticks(), os.times()
    result, seconds = timed(function, *args, **kwargs)
    ticks_after, cpu_after = machine_ticks(), os.times()
    idle = None
    if ticks_before and ticks_after and ticks_after[1] > ticks_before[1]:
        idle = (ticks_after[0] - ticks_before[0]) / (ticks_after[1] - ticks_before[1])
    process = (cpu_after.user - cpu_before.user) + (cpu_after.system - cpu_before.system)
    return result, seconds, {"process_cpu_seconds": process, "idle_fraction": idle}


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    _, seconds = timed(lambda: [a @ b for _ in range(repeats)])
    return 2 * n**3 * repeats / seconds / 1e9


def model_gflop_per_megapixel(model: torch.nn.Module) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 1, SIDE, SIDE))
    return counter.get_total_flops() / 1e9 / (SIDE * SIDE / 1e6)


def bench_hardware(model: torch.nn.Module) -> dict:
    result = {"threads": torch.get_num_threads(), "matmul_fp32_gflops": matmul_gflops(torch.float32),
              "model_gflop_per_megapixel": model_gflop_per_megapixel(model)}
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        result["matmul_bf16_gflops"] = matmul_gflops(torch.bfloat16)
    return result


def naive_training(train_pairs, val_pairs, epochs: int) -> dict:
    """The notebook loop: whole images, batch 1, fp32, no augmentation, validation every epoch."""
    torch.manual_seed(0)
    model = UNet(ModelConfig())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = [(torch.from_numpy(p.image)[None, None], torch.from_numpy(p.mask.astype(np.float32))[None, None]) for p in train_pairs]
    val = [(torch.from_numpy(p.image)[None, None], torch.from_numpy(p.mask)[None, None]) for p in val_pairs]
    started = time.perf_counter()
    for _ in range(epochs):
        notebook_epoch(model, optimizer, data)
        model.eval()
        accumulator = MetricAccumulator()
        with torch.no_grad():
            for x, y in val:
                accumulator.add(confusion_counts(model(x) > 0, y))
    seconds = time.perf_counter() - started
    return {"images_per_second": epochs * len(data) / seconds, "seconds": seconds, "val_dice": accumulator.mean()["dice"]}


def bench_training(work: Path, epochs: int, rounds: int = 2) -> tuple[dict, Path]:
    """The product's training loop against the naive loop at equal epochs on the same data.
    The two alternate `rounds` times and each keeps its fastest round, so a noisy neighbour
    slowing one stretch of the run does not decide the ratio."""
    write_dataset(str(work / "train-data"), count=40, size=256, seed=21)
    pairs = pair_images_and_masks(str(work / "train-data/images"), str(work / "train-data/masks"))
    train_pairs, val_pairs = split_train_val(pairs, 0.2, 0)
    model_config = ModelConfig()
    loaded_train = load_pairs(train_pairs, model_config.normalization)
    loaded_val = load_pairs(val_pairs, model_config.normalization)
    config = TrainConfig(epochs=epochs, patch_size=256, patches_per_image=1, patience=epochs, max_minutes=None, device="cpu")
    products, naives = [], []
    for round_index in range(rounds):
        result, seconds = timed(train, loaded_train, loaded_val, work / f"model-{round_index}", model_config, config)
        products.append({"images_per_second": epochs * len(loaded_train) / seconds, "seconds": seconds,
                         "val_dice": result.history[-1]["val_dice"]})
        naives.append(naive_training(loaded_train, loaded_val, epochs))
    product = max(products, key=lambda run: run["images_per_second"])
    naive = max(naives, key=lambda run: run["images_per_second"])
    return {"epochs": epochs, "images": len(loaded_train), "side": 256, "rounds": rounds, "product": product,
            "naive": naive, "product_rounds": products, "naive_rounds": naives,
            "speedup": product["images_per_second"] / naive["images_per_second"]}, result.best_checkpoint


def bench_naive_inference(image_urls: list[str], checkpoint: Path, out: Path) -> dict:
    """PIL load, to tensor, batch of 1, fp32 model under no_grad, sigmoid, threshold, PNG, statistics."""
    loaded = load_checkpoint(str(checkpoint))
    model = loaded.build_model()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for url in image_urls:
        image = np.asarray(Image.open(url))
        x = torch.from_numpy(normalize_image(image, loaded.model_config.normalization))[None, None]
        with torch.no_grad():
            mask = (torch.sigmoid(model(x)) > 0.5)[0, 0].numpy()
        Image.fromarray(mask.astype(np.uint8) * 255).save(out / Path(url).name)
        image_statistics(image, label_cells(mask, 10)[0])
    seconds = time.perf_counter() - started
    return _rates(len(image_urls), seconds)


def bench_model_only(image_urls: list[str], predictor: Predictor, streams: int) -> dict:
    """The forward pass alone on pre-loaded, normalised images, run the way the product runs it:
    `streams` parallel shards, each with its share of the cores as torch threads."""
    from concurrent.futures import ThreadPoolExecutor

    images = [normalize_image(read_image(url), predictor.normalization) for url in image_urls]
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // streams))

    def forward_all(share: list[np.ndarray]) -> None:
        for start in range(0, len(share), predictor.batch_size):
            forward_probabilities(predictor.forward_model, np.stack(share[start : start + predictor.batch_size]),
                                  predictor.device, predictor.config.amp)

    try:
        _, warmup = timed(forward_all, images[:1])
        with ThreadPoolExecutor(streams) as pool:
            _, seconds, cores = accounted(lambda: list(pool.map(forward_all, [images[i::streams] for i in range(streams)])))
    finally:
        torch.set_num_threads(threads_before)
    return {**_rates(len(images), seconds), "streams": streams, "first_call_seconds": warmup,
            "cpu_ms_per_image_process": cores["process_cpu_seconds"] * 1e3 / len(images),
            "idle_fraction": cores["idle_fraction"]}


def copies_of(images: Path, into: Path, copies: int) -> Path:
    """`into`, holding each file of `images` `copies` times under other names (hard links where
    the disk allows, so the copies cost no space)."""
    into.mkdir(parents=True)
    for path in sorted(images.iterdir()):
        for copy in range(copies):
            target = into / f"{path.stem}_{copy}{path.suffix}"
            try:
                os.link(path, target)
            except OSError:
                shutil.copyfile(path, target)
    return into


def _rates(count: int, seconds: float, side: int = SIDE) -> dict:
    return {"images": count, "seconds": seconds, "images_per_second": count / seconds,
            "megapixels_per_second": count * side * side / 1e6 / seconds}


def bench_product(source: str, store: str, registry: str, shard_size: int, parallel: int, compile: bool | None = None,
                  split_touching: bool = True, measure_cells: bool = True, store_image: bool = True) -> dict:
    from cellseg.flows.segment import segment_images_flow

    predict = PredictConfig(compile=compile, split_touching=split_touching, measure_cells=measure_cells,
                            store_image=store_image)
    job = SegmentJob(source_url=source, store_url=store, registry_url=registry, shard_size=shard_size,
                     max_parallel_shards=parallel, predict=predict)
    servers_before = server_cpu_seconds()
    summary, seconds, cores = accounted(segment_images_flow, job)
    assert not summary["failed"], summary["failed"]
    # The servers run on the same cores as the product: what they took from it, per image.
    servers = {name: (spent - servers_before[name]) / max(summary["done"], 1) * 1e3
               for name, spent in server_cpu_seconds().items()}
    # The run's own loop over its shards, as its summary times it: without the flow run's start and
    # end (Prefect's run records, and its heartbeat thread, joined in one-second steps).
    return {**_rates(summary["done"], seconds), "cpu_ms_per_image": summary["cpu_ms_per_image"],
            "cpu_ms_per_image_process": cores["process_cpu_seconds"] * 1e3 / max(summary["done"], 1),
            "idle_fraction": cores["idle_fraction"],
            "loop_seconds": summary["seconds"], "loop_images_per_second": summary["images_per_second"],
            "server_cpu_ms_per_image": servers,
            "shards": summary["shards"], "parallel_shards": parallel,
            "compile": compile, "split_touching": split_touching, "measure_cells": measure_cells,
            "store_image": store_image}


def bench_product_beside_model(image_urls: list[str], predictor: Predictor, product: Callable[[str], dict],
                               stores: list[str], naive: Callable[[], dict] | None = None) -> dict:
    """The product against the model alone, timed in turn (model, product, model, product, ...),
    one pair per store: this VM's speed drifts by up to 30% within minutes, so a ratio of two
    rates taken minutes apart measures the drift as much as the product. Each pair's ratio is
    its product rate over the model-only rate timed just before it; the median pair is the one
    reported; `loop_ratio` is the median of the product runs' own loop rates (their flow runs'
    start and end left out) over the same model-only rates. With `naive`, the naive loop is timed
    before each pair too, and `naive_ratio` is the median of the product's rate over it."""
    pairs = []
    for store in stores:
        baseline = naive() if naive else None
        model_only = bench_model_only(image_urls, predictor, streams=PARALLEL_SHARDS)
        run = product(store)
        pairs.append({"model_only": model_only, "product": run,
                      "ratio": run["images_per_second"] / model_only["images_per_second"],
                      "loop_ratio": run["loop_images_per_second"] / model_only["images_per_second"]})
        if baseline:
            pairs[-1].update(naive=baseline, naive_ratio=run["images_per_second"] / baseline["images_per_second"])
    ranked = sorted(pairs, key=lambda pair: pair["ratio"])
    result = {"pairs": pairs, "median_pair": ranked[len(ranked) // 2],
              "loop_ratio": sorted(pair["loop_ratio"] for pair in pairs)[len(pairs) // 2]}
    if naive:
        result["naive_ratio"] = sorted(pair["naive_ratio"] for pair in pairs)[len(pairs) // 2]
    return result


def naive_in_a_process(image_urls: list[str], checkpoint: Path, out: Path) -> dict:
    """`bench_naive_inference` in a fresh process: a predictor made in this one has set its malloc
    to keep freed memory (`cellseg.allocator`), which a notebook's loop does not have."""
    code = ("import json, sys; from pathlib import Path; from benchmarks.run import bench_naive_inference; "
            "print(json.dumps(bench_naive_inference(sys.argv[1:-2], Path(sys.argv[-2]), Path(sys.argv[-1]))))")
    return json_from_child("-c", code, *image_urls, str(checkpoint), str(out))


def bench_measurements(image_urls: list[str], store: str, repeats: int = 3) -> dict:
    """Per-cell measurement table vs skimage's regionprops_table on the same cells and images."""
    from skimage.measure import regionprops_table

    from cellseg.io import read_image
    from cellseg.measure import REGIONPROPS_PROPERTIES, cell_measurements
    from cellseg.store import ResultStore

    results = ResultStore.open(store, mode="r")
    pairs = [(results.read_cells(Path(url).stem), read_image(url)) for url in image_urls[:20]]
    _, ours = timed(lambda: [cell_measurements(cells, image) for _ in range(repeats) for cells, image in pairs])
    _, reference = timed(lambda: [regionprops_table(cells, intensity_image=image.astype(np.float64),
                                                    properties=REGIONPROPS_PROPERTIES)
                                  for _ in range(repeats) for cells, image in pairs])
    runs = repeats * len(pairs)
    return {"images": len(pairs), "cells_per_image": float(np.mean([cells.max() for cells, _ in pairs])),
            "ms_per_image": ours / runs * 1000, "regionprops_ms_per_image": reference / runs * 1000}


def bench_memory(work: Path, checkpoint: Path, count: int) -> dict:
    originals = work / "memory-src"
    write_dataset(str(originals), count=50, size=256, seed=31)
    many = work / "memory-many"
    many.mkdir()
    sources = sorted((originals / "images").iterdir())
    for index in range(count):
        shutil.copyfile(sources[index % len(sources)], many / f"img_{index:05d}.png")

    def run(*args):
        return json_from_child("-m", "benchmarks.memory", *args, "--checkpoint", str(checkpoint))

    many_result = run("many", "--images", str(many), "--store", str(work / "memory-many.zarr"))
    samples, times = many_result["rss_mb_every_50"], many_result["seconds_every_50"]
    quarter = max(1, len(samples) // 4)
    first, last = max(samples[:quarter]), max(samples[-quarter:])
    # Images per second over the first and the last quarter of the run (50 images a sample), the
    # first without its first 50 images (the model's first passes, the compiled steps' loading).
    first_rate = 50 * (quarter - 1) / (times[quarter - 1] - times[0]) if quarter > 1 else 50 / times[0]
    last_rate = 50 * quarter / (times[-1] - times[-quarter - 1]) if len(times) > quarter else first_rate

    tile = generate_sample(np.random.default_rng(41), (2048, 2048)).image
    large = np.tile(tile, (4, 4))
    (work / "large.png").write_bytes(encode_png(large))
    large_result = run("large", "--image", str(work / "large.png"), "--store", str(work / "memory-large.zarr"))
    return {"images": many_result["images"], "rss_first_quarter_mb": first, "rss_last_quarter_mb": last,
            "rss_growth": last / first - 1, "many_peak_mb": many_result["peak_mb"],
            "rate_first_quarter": first_rate, "rate_last_quarter": last_rate, "rate_change": last_rate / first_rate - 1,
            "large_side": large.shape[0], "large_peak_mb": large_result["peak_mb"],
            "large_seconds": large_result["seconds"], "tile_agreement": tile_agreement(tile, checkpoint)}


def tile_agreement(image: np.ndarray, checkpoint: Path) -> dict:
    """Masks of a 2048x2048 image predicted whole and in 1024-pixel tiles (default settings)."""
    loaded = load_checkpoint(str(checkpoint))
    whole = Predictor(loaded, PredictConfig(tile_size=4096)).masks([image])[0]
    tiled = Predictor(loaded, PredictConfig()).masks([image])[0]
    inner = (slice(64, -64), slice(64, -64))
    return {"pixel_agreement": float((whole == tiled).mean()),
            "interior_pixel_agreement": float((whole[inner] == tiled[inner]).mean()),
            "dice": segmentation_scores(tiled, whole)["dice"]}


def fast_path_agreement(checkpoints: dict[str, tuple[Path, Path]]) -> dict:
    """Dice and pixel agreement between default (bf16) and plain fp32 masks, per dataset; none on
    a CPU without native bf16, whose default pass is plain fp32 (fp32 against itself says nothing)."""
    results: dict = {}
    if autocast_dtype(torch.device("cpu"), True) is None:
        return results
    for name, (checkpoint, images) in checkpoints.items():
        loaded = load_checkpoint(str(checkpoint))
        raw = [read_image(url) for url in list_images(str(images))]
        fast = Predictor(loaded, PredictConfig()).masks(raw)
        plain = Predictor(loaded, PredictConfig(amp=False)).masks(raw)
        results[name] = {"images": len(raw), **mask_agreement(fast, plain)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--images", type=int, default=240, help=f"{SIDE}x{SIDE} images for the inference runs")
    parser.add_argument("--training-epochs", type=int, default=6)
    parser.add_argument("--memory-images", type=int, default=2000)
    parser.add_argument("--section-limit", type=float, default=SECTION_LIMIT_SECONDS,
                        help="seconds a section may run before the run is stopped with every thread's stack")
    parser.add_argument("--out", default="runs/benchmarks")
    args = parser.parse_args()
    out = Path(args.out)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ.update(S3_TEST_CREDENTIALS)
    results: dict = {"machine": {"cpus": os.cpu_count(), "torch": torch.__version__,
                                 "cpu_capability": torch.backends.cpu.get_cpu_capability()}}
    section = Sections(results, out / "results.json", args.section_limit)

    (work / "seaweedfs").mkdir()
    with running_prefect_server(work) as prefect_env, running_seaweedfs_server(work / "seaweedfs") as endpoint:
        os.environ.update(prefect_env)
        import fsspec
        import s3fs

        fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
        with section("hardware"):
            results["hardware"] = bench_hardware(UNet(ModelConfig()).eval())
        with section("training"):
            results["training"], checkpoint = bench_training(work, args.training_epochs)

        write_dataset(str(work / "infer"), count=args.images, size=SIDE, seed=11)
        urls = list_images(str(work / "infer/images"))
        from cellseg.registry import Registry

        registry = str(work / "registry")
        Registry(registry).register(str(checkpoint), promote=True)
        # Before the first predictor: a CPU predictor sets the process's malloc to keep freed
        # memory (cellseg.allocator), which a notebook's loop does not have.
        with section("naive inference"):
            results["naive"] = bench_naive_inference(urls, checkpoint, work / "naive-masks")
        predictor = Predictor.from_checkpoint(str(checkpoint), PredictConfig())
        with section("model only"):
            results["model_only"] = bench_model_only(urls, predictor, streams=PARALLEL_SHARDS)
            results["model_only_one_stream"] = bench_model_only(urls, predictor, streams=1)
        with section("forward pass variants"):
            results["forward"] = bench_forward(names=BENCH_VARIANTS)
            compiled = Predictor.from_checkpoint(str(checkpoint), PredictConfig(compile=True))
            results["model_only_compiled"] = bench_model_only(urls, compiled, streams=1)
        flops = results["hardware"]["model_gflop_per_megapixel"] * results["model_only"]["megapixels_per_second"]
        results["model_only"]["gflops"] = flops
        peak = max(results["hardware"].get("matmul_bf16_gflops", 0), results["hardware"]["matmul_fp32_gflops"])
        results["model_only"]["fraction_of_fastest_matmul"] = flops / peak

        with section("product"):
            shard = max(1, args.images // 4)
            results["product_one_shard_at_a_time"] = bench_product(str(work / "infer/images"), str(work / "p1.zarr"), registry, shard, 1)
            results["product_pairs"] = bench_product_beside_model(
                urls, predictor, lambda store: bench_product(str(work / "infer/images"), store, registry, shard, PARALLEL_SHARDS),
                [str(work / f"p2-{index}.zarr") for index in range(PRODUCT_PAIRS)],
                naive=lambda: naive_in_a_process(urls[:NAIVE_BESIDE_IMAGES], checkpoint, work / "naive-masks"))
            results["product_local"] = results["product_pairs"]["median_pair"]["product"]
            # The same work four times over in one run: the run's start and end (Prefect's records, the
            # heartbeat's whole second, the first and last shards) weigh a quarter as much.
            long_source = copies_of(work / "infer/images", work / "infer-long/images", LONG_RUN_COPIES)
            results["product_long_pair"] = bench_product_beside_model(
                urls, predictor, lambda store: bench_product(str(long_source), store, registry, shard, PARALLEL_SHARDS),
                [str(work / "p8.zarr")])
            results["product_long"] = results["product_long_pair"]["median_pair"]["product"]
            # From a real S3 server (SeaweedFS) right after the local run: the source alone, then source and store.
            fs = s3fs.S3FileSystem(endpoint_url=endpoint)
            fs.mkdir("bench")
            fs.put(str(work / "infer/images") + "/", "bench/images/", recursive=True)
            results["product_s3_source"] = bench_product("s3://bench/images", str(work / "p6.zarr"), registry, shard,
                                                         PARALLEL_SHARDS)
            results["product_s3"] = bench_product("s3://bench/images", "s3://bench/results.zarr", registry, shard, PARALLEL_SHARDS)
            # The same with the results written through s3fs (cellseg.s3_direct off; the flow takes
            # its settings from the environment).
            os.environ["CELLSEG_DIRECT_S3_WRITES"] = "false"
            try:
                results["product_s3_through_s3fs"] = bench_product("s3://bench/images", "s3://bench/results-s3fs.zarr",
                                                                   registry, shard, PARALLEL_SHARDS)
            finally:
                del os.environ["CELLSEG_DIRECT_S3_WRITES"]
            for name, store, options in (("no_split", "p4.zarr", {"split_touching": False}),
                                         ("labels_only", "p5.zarr", {"measure_cells": False, "store_image": False})):
                results[f"product_{name}_pair"] = bench_product_beside_model(
                    urls, predictor, lambda store, options=options: bench_product(
                        str(work / "infer/images"), store, registry, shard, PARALLEL_SHARDS, **options), [str(work / store)])
                results[f"product_{name}"] = results[f"product_{name}_pair"]["median_pair"]["product"]
            results["measurements"] = bench_measurements(urls, str(work / f"p2-{PRODUCT_PAIRS - 1}.zarr"))
            results["product_compiled"] = bench_product(str(work / "infer/images"), str(work / "p3.zarr"), registry, shard,
                                                        PARALLEL_SHARDS, compile=True)
        with section("product stages"):
            results["product_stages"] = bench_product_stages(checkpoint, urls)
        with section("storage"):
            results["storage"] = bench_writing(work)

        # Still inside the servers' context: the subprocesses inherit PREFECT_API_URL.
        with section("memory"):
            results["memory"] = bench_memory(work, checkpoint, args.memory_images)
        with section("scaling with image size"):
            results["scaling"] = bench_scaling(work / "scaling")
        with section("block by block (images bigger than memory)"):
            results["blockwise"] = bench_blockwise(work / "blockwise")
        data = Path(__file__).resolve().parents[2] / "shared" / "data"
        with section("agreement"):
            reference = {name: (Path(f"runs/ref-{name}/best.pt"), data / name / "images") for name in ("isbi2012", "dsb2018")}
            available = {k: v for k, v in reference.items() if v[0].exists() and v[1].exists()}
            results["fast_path_agreement"] = fast_path_agreement(available or {"synthetic": (checkpoint, work / "infer/images")})
        with section("cell size"):
            try:
                results["cell_size"] = bench_cell_size("nuclei", data / "dsb2018")
            except (FileNotFoundError, CheckpointError) as error:  # no shipped nuclei model or no dsb2018 here
                print(f"cell size: skipped ({error})")
            try:
                results["resampling"] = bench_resampling(data / "dsb2018")
            except FileNotFoundError as error:  # no dsb2018 here
                print(f"resampling: skipped ({error})")
        with section("post-processing stages"):
            try:
                results["postprocess"] = bench_postprocess(dataset=data / "dsb2018")  # synthetic images without dsb2018
            except (FileNotFoundError, CheckpointError) as error:  # no shipped nuclei model here
                print(f"post-processing stages: skipped ({error})")
    if torch.cuda.is_available():
        with section("GPU"):
            results["gpu"] = bench_gpu("cuda", "nuclei", GPU_SECONDS, SIDE, 4000)
    results["ratios"] = {
        "product_vs_model_only": results["product_pairs"]["median_pair"]["ratio"],
        "product_loop_vs_model_only": results["product_pairs"]["loop_ratio"],
        "product_long_run_vs_model_only": results["product_long_pair"]["median_pair"]["ratio"],
        "product_long_run_loop_vs_model_only": results["product_long_pair"]["loop_ratio"],
        "product_vs_naive": results["product_pairs"]["naive_ratio"],
        "product_no_split_vs_model_only": results["product_no_split_pair"]["median_pair"]["ratio"],
        "product_labels_only_vs_model_only": results["product_labels_only_pair"]["median_pair"]["ratio"],
        "product_compiled_vs_naive": results["product_compiled"]["images_per_second"] / results["naive"]["images_per_second"],
        "two_shards_vs_one": results["product_local"]["images_per_second"] / results["product_one_shard_at_a_time"]["images_per_second"],
        "training_vs_naive": results["training"]["speedup"],
        "s3_vs_local_seaweedfs": results["product_s3"]["images_per_second"] / results["product_local"]["images_per_second"],
        "s3_source_vs_local_seaweedfs": results["product_s3_source"]["images_per_second"]
        / results["product_local"]["images_per_second"],
    }
    if "product_s3_through_s3fs" in results:
        results["ratios"]["s3_through_s3fs_vs_local_seaweedfs"] = (results["product_s3_through_s3fs"]["images_per_second"]
                                                                   / results["product_local"]["images_per_second"])
    if (rest := in_situ_rest_vs_model(results["product_local"])) is not None:
        results["ratios"]["product_in_situ_rest_vs_model"] = rest
    if "postprocess" in results:
        results["ratios"].update(postprocess_ratios(results["postprocess"]))
    if "resampling" in results:
        results["ratios"]["resampling_opencv_vs_scipy"] = results["resampling"]["speedup"]
    if "product_stages" in results:
        results["ratios"].update(product_stages_ratios(results["product_stages"]))
    results["ratios"]["many_images_rate_last_vs_first_quarter"] = results["memory"]["rate_last_quarter"] / results["memory"]["rate_first_quarter"]
    results["ratios"]["many_images_rss_last_vs_first_quarter"] = 1 + results["memory"]["rss_growth"]
    results["ratios"].update(forward_ratios(results["forward"]))
    results["ratios"].update(scaling_ratios(results["scaling"]))
    results["ratios"].update(blockwise_ratios(results["blockwise"]))
    if "gpu" in results:
        results["ratios"].update(results["gpu"]["ratios"])
    section.write(complete=True)
    print_table(results)
    print(f"\nresults: {out / 'results.json'}")


def in_situ_rest_vs_model(product: dict) -> float | None:
    """CPU of reading, labelling and writing over the model's, inside a product run (its threads'
    own CPU time, so cores shared with other threads do not count against a stage)."""
    spent = product.get("cpu_ms_per_image") or {}
    return (spent["read"] + spent["labels"] + spent["write"]) / spent["model"] if spent.get("model") else None


def _in_situ_rows(product: dict, model_only: dict | None = None) -> list[tuple[str, str, str]]:
    spent, rest = product.get("cpu_ms_per_image") or {}, in_situ_rest_vs_model(product)
    if rest is None:
        return []
    rows = [("product stages in the run, CPU ms per image", ", ".join(f"{stage} {ms:.1f}" for stage, ms in spent.items()),
             f"the rest {rest:.2f} of the model's CPU (target <= 0.15): product <= {1 / (1 + rest):.2f}x model only")]
    if model_only and product.get("cpu_ms_per_image_process") and model_only.get("cpu_ms_per_image_process"):
        # The ratio to the model alone is its CPU per image over the product's, times the cores
        # each kept busy: which of the two the product loses on.
        total, alone = product["cpu_ms_per_image_process"], model_only["cpu_ms_per_image_process"]
        idle = (f"; cores idle {product['idle_fraction']:.1%} (model only {model_only['idle_fraction']:.1%})"
                if product.get("idle_fraction") is not None and model_only.get("idle_fraction") is not None else "")
        rows.append(("  the process's CPU ms per image, product / model only", f"{total:.1f} / {alone:.1f}",
                     f"{alone / total:.2f}x: stages {sum(spent.values()):.1f} of the product's, the rest its threads' "
                     f"and the flow's{idle}"))
    return rows


def _server_rows(local: dict, s3: dict) -> list[tuple[str, str, str]]:
    """What the servers on this machine took from the product's cores, local and s3 runs."""
    if "server_cpu_ms_per_image" not in s3:
        return []
    local_servers, s3_servers = local["server_cpu_ms_per_image"], s3["server_cpu_ms_per_image"]
    return [("servers' CPU ms per image, local / s3", ", ".join(
        f"{name} {local_servers[name]:.1f} / {s3_servers[name]:.1f}" for name in ("prefect server", "seaweedfs")),
        "on the product's cores; an S3 server elsewhere would not take its share")]


def print_table(r: dict) -> None:
    hw, tr, mem = r["hardware"], r["training"], r["memory"]
    rows = [
        ("matmul fp32 / bf16 (2048^2)", f"{hw['matmul_fp32_gflops']:.0f} / {hw.get('matmul_bf16_gflops', float('nan')):.0f} GFLOP/s", ""),
        ("model FLOPs", f"{hw['model_gflop_per_megapixel']:.1f} GFLOP per megapixel", ""),
        ("naive loop", f"{r['naive']['images_per_second']:.2f} img/s  {r['naive']['megapixels_per_second']:.2f} MP/s", ""),
        (f"model only, {r['model_only']['streams']} streams", f"{r['model_only']['images_per_second']:.2f} img/s  {r['model_only']['gflops']:.0f} GFLOP/s",
         f"{r['model_only']['fraction_of_fastest_matmul']:.0%} of fastest matmul (target >= 50%)"),
        ("model only, 1 stream", f"{r['model_only_one_stream']['images_per_second']:.2f} img/s", "all cores as torch threads in one stream"),
        ("model only, torch.compile", f"{r['model_only_compiled']['images_per_second']:.2f} img/s",
         f"1 stream, after a {r['model_only_compiled']['first_call_seconds']:.0f} s first call (compilation)"),
        ("product, local", f"{r['product_local']['images_per_second']:.2f} img/s  {r['product_local']['megapixels_per_second']:.2f} MP/s",
         f"{r['ratios']['product_vs_model_only']:.2f}x model only (>= 0.85), {r['ratios']['product_vs_naive']:.2f}x naive (>= 3)"),
        ("product beside model only, in turn", ", ".join(
            f"{pair['product']['images_per_second']:.2f} / {pair['model_only']['images_per_second']:.2f}"
            for pair in r["product_pairs"]["pairs"]) + " img/s",
         "ratios " + ", ".join(f"{pair['ratio']:.2f}" for pair in r["product_pairs"]["pairs"]) + "; the median above"),
        ("product, its runs' loops alone", ", ".join(f"{pair['product']['loop_seconds']:.1f} of {pair['product']['seconds']:.1f} s"
                                                     for pair in r["product_pairs"]["pairs"]),
         f"{r['ratios']['product_loop_vs_model_only']:.2f}x model only: the rest is the flow run's start and end"),
        (f"product, {r['product_long']['images']} images in one run", f"{r['product_long']['images_per_second']:.2f} img/s; "
         f"its loop {r['product_long']['loop_seconds']:.1f} of {r['product_long']['seconds']:.1f} s",
         f"{r['ratios']['product_long_run_vs_model_only']:.2f}x model only beside it (>= 0.85), its loop "
         f"{r['ratios']['product_long_run_loop_vs_model_only']:.2f}x: the same images {LONG_RUN_COPIES} times over"),
        ("naive loop beside each pair", ", ".join(f"{pair['naive']['images_per_second']:.2f}"
                                                  for pair in r["product_pairs"]["pairs"]) + " img/s",
         "product / naive " + ", ".join(f"{pair['naive_ratio']:.2f}" for pair in r["product_pairs"]["pairs"])
         + f"; the median above (fresh processes, {NAIVE_BESIDE_IMAGES} images each)"),
        ("product, no cell splitting", f"{r['product_no_split']['images_per_second']:.2f} img/s",
         f"{r['ratios']['product_no_split_vs_model_only']:.2f}x model only beside it, "
         f"{r['product_no_split']['images_per_second'] / r['naive']['images_per_second']:.2f}x naive (split_touching=false)"),
        ("product, no measurements/image copy", f"{r['product_labels_only']['images_per_second']:.2f} img/s",
         f"{r['ratios']['product_labels_only_vs_model_only']:.2f}x model only beside it "
         "(measure_cells=false, store_image=false)"),
        *(product_stages_rows(r["product_stages"]) if "product_stages" in r else []),
        *_in_situ_rows(r["product_local"], r["product_pairs"]["median_pair"]["model_only"]),
        (f"per-cell table, {r['measurements']['cells_per_image']:.0f} cells/image",
         f"{r['measurements']['ms_per_image']:.1f} vs regionprops_table {r['measurements']['regionprops_ms_per_image']:.1f} ms",
         f"{r['measurements']['regionprops_ms_per_image'] / r['measurements']['ms_per_image']:.2f}x (one core per image)"),
        ("product, torch.compile", f"{r['product_compiled']['images_per_second']:.2f} img/s",
         f"{r['ratios']['product_compiled_vs_naive']:.2f}x naive (compile=true, opt-in)"),
        ("product, s3 (SeaweedFS)", f"{r['product_s3']['images_per_second']:.2f} img/s",
         f"{r['ratios']['s3_vs_local_seaweedfs']:.2f}x local (>= 0.8); source only on s3: "
         f"{r['product_s3_source']['images_per_second']:.2f} img/s, {r['ratios']['s3_source_vs_local_seaweedfs']:.2f}x"),
        *_server_rows(r["product_local"], r["product_s3"]),
        *([("  results written through s3fs", f"{r['product_s3_through_s3fs']['images_per_second']:.2f} img/s",
            f"{r['ratios']['s3_through_s3fs_vs_local_seaweedfs']:.2f}x local (direct_s3_writes=false); SeaweedFS "
            f"{r['product_s3_through_s3fs']['server_cpu_ms_per_image']['seaweedfs']:.1f} ms CPU per image")]
          if "product_s3_through_s3fs" in r else []),
        ("1 shard at a time vs 2", f"{r['product_one_shard_at_a_time']['images_per_second']:.2f} vs {r['product_local']['images_per_second']:.2f} img/s",
         f"{r['ratios']['two_shards_vs_one']:.2f}x (>= 1)"),
        ("training", f"{tr['product']['images_per_second']:.2f} vs naive {tr['naive']['images_per_second']:.2f} img/s",
         f"{tr['speedup']:.2f}x (>= 1.5); val Dice {tr['product']['val_dice']:.3f} vs {tr['naive']['val_dice']:.3f}"),
        (f"RSS, {mem['images']} images", f"first quarter {mem['rss_first_quarter_mb']:.0f} MB, last {mem['rss_last_quarter_mb']:.0f} MB",
         f"{mem['rss_growth']:+.1%} (within 10%)"),
        (f"throughput, {mem['images']} images", f"first quarter {mem['rate_first_quarter']:.2f} img/s, "
         f"last {mem['rate_last_quarter']:.2f} img/s", f"{mem['rate_change']:+.1%} (256^2 images, library run; the first 50 not counted)"),
        (f"{mem['large_side']}^2 image", f"peak {mem['large_peak_mb']:.0f} MB in {mem['large_seconds']:.0f} s", "(< 3000 MB)"),
        ("tiled vs whole 2048^2", f"interior pixels agree {mem['tile_agreement']['interior_pixel_agreement']:.4%}",
         f"Dice {mem['tile_agreement']['dice']:.4f}"),
    ]
    if "cell_size" in r:
        size = r["cell_size"]
        rows.append((f"cell size estimated, {size['dataset']} ({size['images']} images)",
                     f"{size['seconds']['estimated']:.1f} s vs stated {size['seconds']['stated']:.1f} s",
                     f"{size['estimated_vs_stated']:.2f}x stated size, {size['estimated_vs_native']:.2f}x one plain pass "
                     f"(<= 2); within 25%: estimate {size['within_25_percent']:.0%}, "
                     f"median cell found {size['found_within_25_percent']:.0%} (>= 90%)"))
    if "resampling" in r:
        rows += resampling_rows(r["resampling"])
    for name, agreement in r["fast_path_agreement"].items():
        rows.append((f"bf16 vs fp32 masks, {name}", f"pixels agree {agreement['pixel_agreement']:.4%}",
                     f"Dice {agreement['dice']:.4f} (>= 0.999)"))
    if not r["fast_path_agreement"]:
        rows.append(("bf16 vs fp32 masks", "not measured", "this CPU has no native bf16: its default pass is plain fp32"))
    if "postprocess" in r:
        rows += postprocess_rows(r["postprocess"])
    rows += forward_rows(r["forward"])
    rows += scaling_rows(r["scaling"])
    rows += blockwise_rows(r["blockwise"])
    rows += storage_rows(r["storage"])
    rows += gpu_rows(r["gpu"]) if "gpu" in r else [("GPU", "not measured", "no CUDA device here (docs/performance.md \"GPU\")")]
    width = max(len(row[0]) for row in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<44} {note}")


if __name__ == "__main__":
    main()
