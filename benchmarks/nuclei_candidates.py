"""Candidate recipes of the `nuclei` model trained side by side, each in its own process, at
library level (no Prefect): the instance-representation comparison of docs/quality.md and the
shipped model's GPU run.

    python -m benchmarks.nuclei_candidates --out runs/candidates [--minutes 4.5] [--only NAME ...]
    python -m benchmarks.nuclei_candidates --out runs/candidates --install   # the best on validation

Each candidate is `cellseg.bundled.NucleiRecipe` with the fields in CANDIDATES changed, trained
on `dsb2018-train` into `<out>/<name>/training` (resumable: a second call continues it), with
`<out>/<name>/outcome.json` holding how it ended and its validation cell scores. `--install`
installs the candidate with the best validation cell F1 (the dsb2018 test images play no part in
the choice) as the shipped `nuclei` model with its card, as `make nuclei-model` does.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from cellseg.build_bundled import build_nuclei, can_resume, install_model, nuclei_training_data
from cellseg.bundled import NucleiRecipe
from cellseg.config import COMPILE_MODES
from cellseg.jobs_training import TrainOutcome
from cellseg.train import TrainResult

# Past the recipe's epochs, to the time budget; loader processes for the cropping and augmentation
# (the recipe trains eight crops per step: at one a GPU waits on kernel launches).
GPU_TRAINING = {"epochs": 200, "patience": 12, "loader_workers": 3}
# Each names its width and its balance over the kinds of image, so that it stays the run it was
# when the recipe changes (width 32 without balance until 2026-12-04, width 48 balanced since).
UNBALANCED = {"balance_appearance": 0.0}
CANDIDATES: dict[str, dict[str, dict[str, Any]]] = {
    "w32_distance": {"model": {"base_width": 32}, "training": UNBALANCED},
    "w32_border": {"model": {"base_width": 32, "distance_map": False}, "training": UNBALANCED | {"border_weight": 10.0}},
    "w32_distance_border": {"model": {"base_width": 32}, "training": UNBALANCED | {"border_weight": 10.0}},
    "w16_distance": {"model": {"base_width": 16}, "training": UNBALANCED},
    # The levers docs/quality.md names for the test set's weak modalities: more crops of the rare
    # stained images, and more capacity. w48_balanced is the recipe shipped since 2026-12-04.
    "w32_balanced": {"model": {"base_width": 32}, "training": {"balance_appearance": 0.15}},
    "w48_balanced": {"model": {"base_width": 48}, "training": {"balance_appearance": 0.15}},
    "w48_distance": {"model": {"base_width": 48}, "training": UNBALANCED},  # capacity alone, from scratch
}


def candidate_recipe(name: str, minutes: float | None, data: str | None = None,
                     loader_workers: int | None = None, compile_mode: str | None = None) -> NucleiRecipe:
    """The shipped recipe with candidate `name`'s changes, the GPU settings and a time budget
    (and another training set, for trying this script out; and how its steps are compiled,
    `TrainConfig.compile`, which changes their speed, not what they compute)."""
    base = NucleiRecipe(**({"data_dir": data} if data else {}))
    change = CANDIDATES[name]
    training = GPU_TRAINING | {"max_minutes": minutes} | change.get("training", {})
    if loader_workers is not None:
        training["loader_workers"] = loader_workers
    if compile_mode is not None:
        training["compile"] = compile_mode
    return base.model_copy(update={
        "model": base.model.model_copy(update=change.get("model", {})),
        "training": base.training.model_copy(update=training),
    })


def train_candidate(name: str, out: Path, minutes: float | None, data: str | None = None,
                    loader_workers: int | None = None, compile_mode: str | None = None) -> None:
    """Train one candidate (continuing an earlier run of it) and write its outcome.json."""
    recipe = candidate_recipe(name, minutes, data, loader_workers, compile_mode)
    folder = out / name
    outcome = build_nuclei(folder, recipe, resume=can_resume(folder))
    result = outcome.result
    record = {
        "name": name, "recipe": recipe.model_dump(mode="json"), "out_dir": str(result.out_dir),
        "history": result.history, "best_epoch": result.best_epoch, "best_metrics": result.best_metrics,
        "stop_reason": result.stop_reason, "dataset_hash": outcome.dataset_hash,
        "train_images": outcome.train_images, "val_images": outcome.val_images, "cells": outcome.cells,
        "pictures": outcome.pictures,
    }
    (folder / "outcome.json").write_text(json.dumps(record, indent=1) + "\n")


def load_outcome(folder: Path) -> tuple[dict[str, Any], TrainOutcome]:
    record = json.loads((folder / "outcome.json").read_text())
    result = TrainResult(folder / "training", record["history"], record["best_epoch"], record["best_metrics"],
                         record["stop_reason"])
    return record, TrainOutcome(result, record["dataset_hash"], record["train_images"], record["val_images"],
                                record["cells"], record["pictures"])


def install_best(out: Path) -> str:
    """Install the candidate with the best validation cell F1 as the shipped `nuclei` model."""
    finished = {folder.name: load_outcome(folder) for folder in sorted(out.iterdir()) if (folder / "outcome.json").is_file()}
    if not finished:
        raise SystemExit(f"no finished candidate in '{out}'")
    scores = {name: outcome.cells["f1_mean"] for name, (_, outcome) in finished.items()}
    best = max(scores, key=lambda name: scores[name])
    record, outcome = finished[best]
    recipe = NucleiRecipe.model_validate(record["recipe"])
    install_model("nuclei", outcome, record["recipe"], nuclei_training_data(Path(recipe.data_dir), outcome))
    print(f"installed {best}: validation cell F1 {scores[best]:.4f} ("
          + ", ".join(f"{name} {score:.4f}" for name, score in scores.items()) + ")")
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=None, help="training budget of each candidate (default none)")
    parser.add_argument("--only", nargs="+", choices=sorted(CANDIDATES), help="these candidates (default all)")
    parser.add_argument("--install", action="store_true", help="install the best finished candidate")
    parser.add_argument("--data", help="another training set with images/ and labels/ (default the recipe's)")
    parser.add_argument("--loader-workers", type=int, help=f"loader processes per candidate (default {GPU_TRAINING['loader_workers']})")
    parser.add_argument("--compile", choices=COMPILE_MODES,
                        help="torch.compile the training steps (default the recipe's: off); "
                             "benchmarks.training_step measures each mode")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.install:
        install_best(args.out)
        return
    names = args.only or list(CANDIDATES)
    if len(names) == 1:
        train_candidate(names[0], args.out, args.minutes, args.data, args.loader_workers, args.compile)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    passed = ([] if args.minutes is None else ["--minutes", str(args.minutes)]) + ([] if args.data is None else ["--data", args.data]) \
        + ([] if args.loader_workers is None else ["--loader-workers", str(args.loader_workers)]) \
        + ([] if args.compile is None else ["--compile", args.compile])
    environment = os.environ | {"OMP_NUM_THREADS": "1"}  # the processes share the cores with their loaders
    running = {}
    for name in names:
        log = (args.out / f"{name}.log").open("w")
        running[name] = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.nuclei_candidates", "--out", str(args.out), "--only", name, *passed],
            stdout=log, stderr=subprocess.STDOUT, env=environment)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a time limit's TERM ends the candidates too
    try:
        failed = [name for name, process in running.items() if process.wait() != 0]
    finally:
        for process in running.values():
            if process.poll() is None:
                process.terminate()
    if failed:
        raise SystemExit(f"candidates failed: {', '.join(failed)} (see their logs in '{args.out}')")


if __name__ == "__main__":
    main()
