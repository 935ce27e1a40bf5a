"""The writer stage of a segmentation run (label, measure and write one image) with 1, 2 and 4
writer threads doing it all, and with as many threads writing for `cellseg.label_workers`
processes that label and measure (`PredictConfig.postprocess_workers`), side by side:

    python -m benchmarks.writers [--model general] [--images 24] [--profile]

Prints wall milliseconds per 512x512 image for each (and the calling process's CPU time for the
threads), and with `--profile` where one thread's time goes. Threads that hold the GIL share one
core's worth of Python: wall time that stops falling with more threads says so
(docs/performance.md "GPU"). The processes are started before the timing.
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
from cellseg.label_workers import LabelWorkers
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

    def write(store: ResultStore, labelling: LabelWorkers | None, index: int) -> None:
        error = _write_result(store, predictor, model, f"im{index}", f"/bench/im{index}.png", images[index], maps[index],
                              labelling=labelling)
        assert error is None, error

    for workers in (1, 2, 4):
        for processes in (0, workers):
            with tempfile.TemporaryDirectory() as folder, LabelWorkers(processes) as labelling:
                if processes:
                    list(map(labelling.run, maps[:processes], images[:processes], [predictor.config] * processes,
                             [{}] * processes))  # started and imported before the clock
                store = ResultStore.open(f"{folder}/results.zarr")
                cpu, wall = time.process_time(), time.perf_counter()
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(write, [store] * len(images), [labelling] * len(images), range(len(images))))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            where = f"{workers} processes labelling" if processes else f"{workers} writer threads"
            print(f"{args.model}, {where}: {1000 * wall / len(images):.1f} ms/image wall, "
                  f"{1000 * cpu / len(images):.1f} ms CPU/image in the calling process")
    if args.profile:
        with tempfile.TemporaryDirectory() as folder:
            store = ResultStore.open(f"{folder}/results.zarr")
            with cProfile.Profile() as profile:
                for index in range(len(images)):
                    write(store, None, index)
            pstats.Stats(profile).sort_stats("cumulative").print_stats("cellseg", 15)


if __name__ == "__main__":
    main()
