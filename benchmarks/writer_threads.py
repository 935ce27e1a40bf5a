"""The writer stage of a segmentation run (label, measure and write one image: what each of
`PredictConfig.postprocess_workers` threads runs) with 1, 2 and 4 threads, side by side:

    python -m benchmarks.writer_threads [--model general] [--images 24]

Prints wall and CPU milliseconds per 512x512 image for each thread count, and with `--profile`
where one thread's time goes. Threads that hold the GIL share one core's worth of Python: wall
time that stops falling with more threads says so (docs/performance.md "GPU").
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cellseg.bundled import shipped_checkpoint
from cellseg.checkpoint import load_checkpoint
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.segment import _write_result, model_record
from cellseg.store import ResultStore
from cellseg.synth import generate_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="general")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    predictor = Predictor(load_checkpoint(str(shipped_checkpoint(args.model))), PredictConfig(device="cpu"))
    rng = np.random.default_rng(0)
    images = [generate_sample(rng, (512, 512)).image for _ in range(args.images)]
    maps = predictor.cell_maps(images)
    model = model_record(predictor, args.model)

    def write(store: ResultStore, index: int) -> None:
        error = _write_result(store, predictor, model, f"im{index}", f"/bench/im{index}.png", images[index], maps[index])
        assert error is None, error

    for threads in (1, 2, 4):
        with tempfile.TemporaryDirectory() as folder:
            store = ResultStore.open(f"{folder}/results.zarr")
            cpu, wall = time.process_time(), time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(write, [store] * len(images), range(len(images))))
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(f"{args.model}, {threads} writer threads: {1000 * wall / len(images):.1f} ms/image wall, "
              f"{1000 * cpu / len(images):.1f} ms CPU/image")
    if args.profile:
        with tempfile.TemporaryDirectory() as folder:
            store = ResultStore.open(f"{folder}/results.zarr")
            with cProfile.Profile() as profile:
                for index in range(len(images)):
                    write(store, index)
            pstats.Stats(profile).sort_stats("cumulative").print_stats("cellseg", 15)


if __name__ == "__main__":
    main()
