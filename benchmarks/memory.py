"""Peak memory while segmenting, measured in a process of its own (run by benchmarks.run).

    python -m benchmarks.memory many  --images DIR --store PATH --checkpoint best.pt
    python -m benchmarks.memory large --image PATH --store PATH --checkpoint best.pt

`many` prints the resident set size and the seconds since its start, sampled every 50 images; `large` prints the peak (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import time

from benchmarks.output import first_paragraph
from cellseg.config import PredictConfig
from cellseg.jobs import SegmentJob, run_segmentation
from cellseg.model_source import ModelSource, load_predictor
from cellseg.segment import model_record, segment_images
from cellseg.store import ResultStore


def memory_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS: now, VmHWM: peak), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("mode", choices=("many", "large"))
    parser.add_argument("--images")
    parser.add_argument("--image")
    parser.add_argument("--store", required=True)
    parser.add_argument("--checkpoint", required=True)
    args = parser.parse_args()
    if args.mode == "many":
        samples: list[float] = []
        times: list[float] = []
        seen = 0
        started = time.perf_counter()

        def sample(_: str) -> None:
            nonlocal seen
            seen += 1
            if seen % 50 == 0:
                samples.append(memory_mb("VmRSS"))
                times.append(time.perf_counter() - started)

        job = SegmentJob(source_url=args.images, store_url=args.store, checkpoint_url=args.checkpoint)
        report = run_segmentation(job, on_image=sample)
        print(json.dumps({"images": len(report.done), "rss_mb_every_50": samples, "seconds_every_50": times,
                          "peak_mb": memory_mb("VmHWM"), "seconds": report.seconds}))
    else:
        predictor = load_predictor(ModelSource("", checkpoint_url=args.checkpoint), PredictConfig())
        store = ResultStore.open(args.store)
        report = segment_images([("large", args.image)], store, predictor, model_record(predictor, args.checkpoint))
        print(json.dumps({"images": len(report.done), "failed": report.failed, "peak_mb": memory_mb("VmHWM"),
                          "seconds": report.seconds}))


if __name__ == "__main__":
    main()
