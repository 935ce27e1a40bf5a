"""What writing results costs, and segmenting from object storage against a local folder:

    python -m benchmarks.storage [--images 12] [--rounds 5] [--out runs/benchmarks]

Three parts, side by side in one run (2 to 6 minutes on 2 busy cores), on synthetic images and
the shipped `general` model, with a real S3 server (SeaweedFS, `benchmarks.servers`) on loopback;
the figures go to <out>/storage.json (`make bench` runs parts 1 and 2 and its own s3 rows):

1. codecs: bytes and encode/decode milliseconds of each array of one result (the image copy, the
   mask, the cell labels, the probabilities, the per-cell table) per 512x512 and per 2048x2048
   image, for zstd levels, blosc (lz4, zstd; byte and bit shuffle; one thread) and gzip; and the
   chunk shape of a 2048x2048 result (milliseconds and objects per image, written to a folder).
2. writes: one image's result written by `ResultStore.write_result`, and by zarr's own calls one
   after another (how cellseg wrote before `cellseg.zarr_writes`), to a local folder and to
   SeaweedFS (there also through s3fs, without `cellseg.s3_direct`): milliseconds, CPU
   milliseconds and s3fs's requests per image.
3. the product: `run_segmentation` (what `cellseg predict` runs: two shards side by side, one
   torch thread each) from a local folder into a local store, from s3:// into a local store, and
   from s3:// into a store on s3://, in alternating rounds (each keeps its fastest), the ratios to
   the local run, and the CPU each image takes in cellseg and in the S3 server.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from numcodecs import GZip, Zstd, blosc
from numcodecs.abc import Codec

from benchmarks.output import first_paragraph
from benchmarks.servers import S3_TEST_CREDENTIALS, running_seaweedfs_server
from cellseg.bundled import shipped_checkpoint
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.measure import CELL_COLUMNS, cell_measurements
from cellseg.postprocess import cell_labels
from cellseg.stats import image_statistics
from cellseg.store import ResultStore
from cellseg.store_layout import WRITE_CONFIG
from cellseg.synth import generate_sample, write_dataset
from cellseg.zarr_writes import ARRAY_CODECS, NewArray, put_new_nodes

MODEL = "general"  # shipped, so the benchmark needs no training; the product's default model is larger
CHOSEN = "zstd1"  # cellseg.zarr_writes.ARRAY_CODECS
BUCKET = "storage-bench"


def candidates() -> dict[str, Codec]:
    """The codecs measured, by name (each is a zarr v3 codec too: zstd, blosc, gzip)."""
    return {
        "zstd0 (zarr default)": Zstd(0), "zstd1": Zstd(1), "zstd-1": Zstd(-1), "zstd5": Zstd(5),
        "blosc-lz4-shuffle": blosc.Blosc("lz4", 5, blosc.Blosc.SHUFFLE),
        "blosc-lz4-bitshuffle": blosc.Blosc("lz4", 5, blosc.Blosc.BITSHUFFLE),
        "blosc-zstd1-shuffle": blosc.Blosc("zstd", 1, blosc.Blosc.SHUFFLE),
        "blosc-zstd1-bitshuffle": blosc.Blosc("zstd", 1, blosc.Blosc.BITSHUFFLE),
        "blosc-zstd5-bitshuffle": blosc.Blosc("zstd", 5, blosc.Blosc.BITSHUFFLE),
        "gzip1": GZip(1), "gzip6": GZip(6),
    }


def results_of(predictor: Predictor, side: int, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """The arrays cellseg stores for `count` synthetic side x side images, as `predict` makes them."""
    rng = np.random.default_rng(seed)
    images = [generate_sample(rng, (side, side)).image for _ in range(count)]
    arrays = []
    for image, maps in zip(images, predictor.cell_maps(images), strict=True):
        labels = cell_labels(maps, predictor.config)
        arrays.append({"image": image, "mask": (labels > 0).astype(np.uint8), "cells": labels.astype(np.int32),
                       "probabilities": maps.probability.astype(np.float16),
                       "table": cell_measurements(labels, image).astype(np.float64)})
    return arrays


def fastest(function: Callable[[], Any], repeats: int = 3) -> float:
    """The fastest of `repeats` calls, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def bench_codecs(results: list[dict[str, np.ndarray]]) -> dict[str, dict[str, dict[str, float]]]:
    """Per array kind and codec: KiB, encode and decode ms per image (one chunk per array)."""
    blosc.set_nthreads(1)  # as on the writer thread: blosc's own threads would compete with the model
    table: dict[str, dict[str, dict[str, float]]] = {}
    for kind in results[0]:
        arrays = [result[kind] for result in results]
        table[kind] = {"raw_kib": sum(array.nbytes for array in arrays) / len(arrays) / 1024}
        for name, codec in candidates().items():
            encoded = [codec.encode(array) for array in arrays]
            table[kind][name] = {
                "kib": sum(len(chunk) for chunk in encoded) / len(arrays) / 1024,
                "encode_ms": fastest(lambda c=codec, a=arrays: [c.encode(array) for array in a]) / len(arrays) * 1000,
                "decode_ms": fastest(lambda c=codec, e=encoded: [c.decode(chunk) for chunk in e]) / len(arrays) * 1000,
            }
    return table


def per_image(table: dict[str, Any], codec: str, kinds: tuple[str, ...] = ("image", "mask", "cells", "table")) -> dict:
    """A codec's figures summed over the arrays of one default result (no probabilities)."""
    return {key: sum(table[kind][codec][key] for kind in kinds) for key in ("kib", "encode_ms", "decode_ms")}


def bench_chunks(result: dict[str, np.ndarray], root: Path, sides: tuple[int, ...] = (512, 1024, 2048)) -> dict:
    """A 2048x2048 result's image-shaped arrays written to a folder in square chunks of each side."""
    figures = {}
    for side in sides:
        arrays = [NewArray(f"{kind}/0", result[kind], (side, side), ("y", "x")) for kind in ("image", "mask", "cells")]

        def write(arrays: list[NewArray] = arrays, side: int = side) -> None:
            store = zarr.storage.LocalStore(tempfile.mkdtemp(dir=root, prefix=f"chunks-{side}-"))
            put_new_nodes(store, {}, arrays)

        objects = sum(int(np.prod([-(-n // side) for n in array.data.shape])) for array in arrays)
        figures[str(side)] = {"ms": fastest(write) * 1000, "objects": objects}
    return figures


class _RequestCounter(logging.Handler):
    """Counts the S3 requests s3fs makes (its debug log has one `CALL:` line per request)."""

    def __init__(self) -> None:
        super().__init__()
        self.requests = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("CALL:"):
            self.requests += 1


@contextmanager
def counting_requests() -> Iterator[_RequestCounter]:
    logger = logging.getLogger("s3fs")
    counter, level, propagate = _RequestCounter(), logger.level, logger.propagate
    logger.addHandler(counter)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield counter
    finally:
        logger.removeHandler(counter)
        logger.setLevel(level)
        logger.propagate = propagate


def write_with_zarr_calls(store: ResultStore, image_id: str, result: dict[str, np.ndarray], statistics: dict) -> None:
    """One result written with zarr's own calls one after another, each checking what is there
    first: how cellseg wrote a new image before `cellseg.zarr_writes` (same nodes, same codec)."""
    root = store.root
    for path, data in ((f"{image_id}/0", result["image"]), (f"{image_id}/labels/mask/0", result["mask"]),
                       (f"{image_id}/labels/cells/0", result["cells"])):
        root.create_array(path, data=data, chunks=data.shape, compressors=ARRAY_CODECS, dimension_names=("y", "x"),
                          config=WRITE_CONFIG)
    root.create_array(f"{image_id}/tables/cells", data=result["table"], chunks=result["table"].shape,
                      compressors=ARRAY_CODECS, dimension_names=("cell", "column"),
                      attributes={"columns": list(CELL_COLUMNS)}, config=WRITE_CONFIG)
    for name in ("cells", "mask"):
        root.require_group(f"{image_id}/labels/{name}").attrs["ome"] = {"name": name}
    root.require_group(f"{image_id}/labels").attrs["ome"] = {"labels": ["cells", "mask"]}
    root.require_group(image_id).attrs.put({"cellseg": {"status": "done", "statistics": statistics}})


def bench_writes(results: list[dict[str, np.ndarray]], stores: dict[str, str]) -> dict:
    """ms, CPU ms (this process, all its threads) and s3fs's requests per image: `write_result` vs
    zarr's own calls, into each store URL; on s3:// also `write_result` through s3fs
    (`direct_s3_writes` off), alternated with the direct writes in three rounds, each way's
    fastest kept."""
    from cellseg import s3_direct

    statistics = [image_statistics(result["image"], result["cells"]) for result in results]
    figures: dict[str, dict] = {}
    for where, url in stores.items():
        store = ResultStore.open(url)
        ways = ["zarr calls", "write_result"] + (["write_result through s3fs"] if url.startswith("s3://") else [])
        for round_index in range(3 if len(ways) > 2 else 1):
            for way in ways:
                s3_direct.enable(way != "write_result through s3fs")
                with counting_requests() as counter:
                    started, cpu_started = time.perf_counter(), time.process_time()
                    for index, (result, stats) in enumerate(zip(results, statistics, strict=True)):
                        image_id = f"{way.replace(' ', '-')}-{round_index}-{index}"
                        if way.startswith("write_result"):
                            store.write_result(image_id, result["mask"] > 0, stats, f"/images/{image_id}.png", {},
                                               cells=result["cells"], cell_table=(CELL_COLUMNS, result["table"]),
                                               image=result["image"], replace=False)
                        else:
                            write_with_zarr_calls(store, image_id, result, stats)
                    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
                measured = {"ms_per_image": seconds / len(results) * 1000, "cpu_ms_per_image": cpu / len(results) * 1000,
                            "s3fs_requests_per_image": counter.requests / len(results)}
                kept = figures.setdefault(where, {}).get(way)
                if kept is None or measured["ms_per_image"] < kept["ms_per_image"]:
                    figures[where][way] = measured
        s3_direct.enable(True)
    return figures


def cpu_seconds_of(marker: str) -> Callable[[], float]:
    """CPU seconds used so far by the processes whose command line holds `marker` (Linux /proc)."""
    def seconds() -> float:
        total = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if marker in (stat.parent / "cmdline").read_bytes().decode(errors="replace"):
                    total += sum(int(field) for field in stat.read_text().rsplit(")", 1)[1].split()[11:13])
            except OSError:  # a process that ended meanwhile
                continue
        return total / os.sysconf("SC_CLK_TCK")
    return seconds


def bench_product(work: Path, images: int, rounds: int, server_cpu: Callable[[], float]) -> dict:
    """img/s of `run_segmentation` from a local folder and from s3:// (store local, and on s3://),
    and CPU milliseconds per image of this process and of the S3 server (`server_cpu`: its CPU
    seconds so far). One torch thread: waiting OpenMP threads would spin and count as CPU time."""
    import s3fs

    from cellseg.jobs import SegmentJob, run_segmentation

    write_dataset(str(work / "data"), count=images, size=512, seed=11)
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(work / "data/images") + "/", f"{BUCKET}/images/", recursive=True)
    sources = {"local": (str(work / "data/images"), str(work / "local-{}.zarr")),
               "s3 source": (f"s3://{BUCKET}/images", str(work / "from-s3-{}.zarr")),
               "s3 source and store": (f"s3://{BUCKET}/images", f"s3://{BUCKET}/results-{{}}.zarr")}
    predict = PredictConfig(threads=1)
    run_segmentation(SegmentJob(source_url=sources["local"][0], store_url=str(work / "warm.zarr"), model_version=MODEL,
                                predict=predict))
    rates: dict[str, list[float]] = {name: [] for name in sources}
    cpu: dict[str, dict[str, list[float]]] = {"client": {name: [] for name in sources},
                                              "server": {name: [] for name in sources}}
    for round_index in range(rounds):
        for name, (source, store) in sources.items():
            job = SegmentJob(source_url=source, store_url=store.format(round_index), model_version=MODEL, predict=predict)
            started, client_started, server_started = time.perf_counter(), time.process_time(), server_cpu()
            report = run_segmentation(job)
            seconds = time.perf_counter() - started
            assert len(report.done) == images and not report.failed, report.summary()
            rates[name].append(images / seconds)
            cpu["client"][name].append((time.process_time() - client_started) / images * 1000)
            cpu["server"][name].append((server_cpu() - server_started) / images * 1000)
    return {"images": images, "side": 512, "model": MODEL, "torch_threads": 1, "rounds": rates, "cpu_ms_rounds": cpu,
            "images_per_second": {name: max(values) for name, values in rates.items()},
            "cpu_ms_per_image": {side: {name: min(values) for name, values in by_name.items()}
                                 for side, by_name in cpu.items()}}


def ratios(results: dict) -> dict[str, float]:
    """The stable ratio keys of `make bench` (results.json `ratios.*`)."""
    rate, cpu = results["product"]["images_per_second"], results["product"]["cpu_ms_per_image"]
    total = {name: cpu["client"][name] + cpu["server"][name] for name in rate}
    return {"s3_vs_local_seaweedfs": rate["s3 source and store"] / rate["local"],
            "s3_source_vs_local_seaweedfs": rate["s3 source"] / rate["local"],
            # CPU-bound (as on this machine), throughput goes as the CPU each image takes, client and server
            "s3_vs_local_seaweedfs_by_cpu": total["local"] / total["s3 source and store"]}


def codec_rows(results: dict) -> list[tuple[str, str, str]]:
    """(measurement, value, note) rows of the codec and write-path tables."""
    rows = []
    for side_name, table in (("512^2", results["codecs"]["512"]), ("2048^2", results["codecs"]["2048"])):
        for codec in candidates():
            figures = per_image(table, codec)
            rows.append((f"codec {codec}, {side_name} result", f"{figures['kib']:.0f} KiB, encode {figures['encode_ms']:.2f} ms",
                         f"decode {figures['decode_ms']:.2f} ms" + ("  (chosen)" if codec == CHOSEN else "")))
    for side, figures in results["chunks"].items():
        rows.append((f"2048^2 result in {side}^2 chunks", f"{figures['ms']:.1f} ms", f"{figures['objects']} objects"))
    return rows + write_rows(results["writes"])


def write_rows(writes: dict) -> list[tuple[str, str, str]]:
    """(measurement, value, note) rows of `bench_writes`."""
    rows = []
    for where, ways in writes.items():
        old, new = ways["zarr calls"], ways["write_result"]

        def shown(figures: dict) -> str:
            requests = figures.get("s3fs_requests_per_image", figures.get("requests_per_image", 0))
            cpu = f" ({figures['cpu_ms_per_image']:.1f} CPU)" if "cpu_ms_per_image" in figures else ""
            return f"{figures['ms_per_image']:.1f} ms{cpu}" + (f", {requests:.0f} s3fs requests" if requests else "")

        rows.append((f"write one 512^2 result, {where}", shown(new), f"zarr's calls one by one: {shown(old)}"))
        if "write_result through s3fs" in ways:
            rows.append((f"  the same through s3fs (direct_s3_writes=false), {where}", shown(ways["write_result through s3fs"]),
                         "the direct writes: cellseg.s3_direct"))
    return rows


def table_rows(results: dict) -> list[tuple[str, str, str]]:
    """The rows `make bench` prints of `bench_writing`: the chosen codec and the write of one result."""
    chosen = per_image(results["codecs"]["512"], CHOSEN)
    default = per_image(results["codecs"]["512"], "zstd0 (zarr default)")
    rows = [(f"codec {CHOSEN}, one 512^2 result", f"{chosen['kib']:.0f} KiB, encode {chosen['encode_ms']:.2f} ms",
             f"zarr's default zstd: {default['kib']:.0f} KiB, {default['encode_ms']:.2f} ms")]
    return rows + write_rows(results["writes"])


def product_rows(results: dict) -> list[tuple[str, str, str]]:
    """The rows of `bench_product`: segmenting from s3:// against a local folder."""
    rate, ratio, cpu = results["product"]["images_per_second"], ratios(results), results["product"]["cpu_ms_per_image"]
    client, server = cpu["client"], cpu["server"]
    return [(f"predict from s3:// (SeaweedFS), {MODEL} model",
             f"{rate['s3 source and store']:.2f} vs local {rate['local']:.2f} img/s",
             f"{ratio['s3_vs_local_seaweedfs']:.2f}x (>= 0.8); source only on s3: {ratio['s3_source_vs_local_seaweedfs']:.2f}x"),
            ("  CPU per image, cellseg + S3 server", f"{client['s3 source and store']:.0f} + {server['s3 source and store']:.0f} ms "
             f"vs local {client['local']:.0f} + {server['local']:.0f} ms",
             f"{ratio['s3_vs_local_seaweedfs_by_cpu']:.2f}x; source only on s3: {client['s3 source']:.0f} + "
             f"{server['s3 source']:.0f} ms")]


def bench_writing(work: Path) -> dict:
    """Parts 1 and 2: codecs, chunks and the write of one result, with S3 configured for fsspec
    (`fsspec.config.conf["s3"]` and the AWS_* credentials) to reach a running server."""
    import s3fs

    predictor = Predictor.from_checkpoint(shipped_checkpoint(MODEL), PredictConfig())
    small = results_of(predictor, 512, 4, seed=5)
    large = results_of(predictor, 2048, 1, seed=6)
    results: dict[str, Any] = {"codecs": {"512": bench_codecs(small), "2048": bench_codecs(large)}}
    results["chunks"] = bench_chunks(large[0], work)
    s3fs.S3FileSystem(skip_instance_cache=True).makedirs(BUCKET, exist_ok=True)
    results["writes"] = bench_writes(small * 3, {"local folder": str(work / "writes.zarr"),
                                                 "SeaweedFS": f"s3://{BUCKET}/writes.zarr"})
    return results


def bench_storage(work: Path, images: int = 12, rounds: int = 5) -> dict:
    """All three parts, against a SeaweedFS server started for them."""
    import fsspec

    (work / "seaweedfs").mkdir(parents=True, exist_ok=True)
    with running_seaweedfs_server(work / "seaweedfs") as endpoint:
        os.environ.update(S3_TEST_CREDENTIALS)
        fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
        results = bench_writing(work)
        results["product"] = bench_product(work, images, rounds, cpu_seconds_of(str(work / "seaweedfs" / "data")))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--images", type=int, default=12, help="512x512 images for each product run")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the product runs")
    parser.add_argument("--out", default="runs/benchmarks")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix="storage-") as work:
        results = bench_storage(Path(work), args.images, args.rounds)
    results["ratios"] = ratios(results)
    (out / "storage.json").write_text(json.dumps(results, indent=1))
    rows = codec_rows(results) + product_rows(results)
    width = max(len(row[0]) for row in rows)
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<40} {note}")
    print(f"\nresults: {out / 'storage.json'}")


if __name__ == "__main__":
    main()
