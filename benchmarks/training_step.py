"""Crops per second of the nuclei recipe's training step, eager and through torch.compile, on a device:

    python -m benchmarks.training_step [--device cuda] [--seconds 10] [--modes off default reduce-overhead]
                                       [--out FILE.json]

The step is the library's (`cellseg.train.batch_loss` and `optimizer_step`, the model through
`cellseg.runtime.TrainingForward`), at the recipe's width, crop size and batch
(`cellseg.bundled.NucleiRecipe`: width 48, 8 crops of 192², distance map, bf16 autocast where the
device has it). Its batches are real training crops with their targets (synthetic nuclei through
`TrainingDataset`, the recipe's augmentation), moved to the device before the clock starts, so the
figure is the device's alone, not the loader's. Each mode gets a fresh model and optimizer: its
first steps (where a compiled mode compiles) are timed apart, then steps for `--seconds`.

`best_mode` is the fastest mode at least `MIN_SPEEDUP` times the eager step's crops/s, else 'off':
`benchmarks/gpu_session.sh` trains with it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.output import first_paragraph
from cellseg.bundled import NucleiRecipe
from cellseg.config import COMPILE_MODES
from cellseg.dataset import TrainingDataset
from cellseg.loaded_pairs import load_pairs
from cellseg.model import UNet
from cellseg.pairs import pair_images_and_masks
from cellseg.runtime import TrainingForward, resolve_device, synchronize
from cellseg.synth import write_dataset
from cellseg.train import adam_optimizer, batch_loss, gradient_scaler, optimizer_step

MIN_SPEEDUP = 1.1  # a compiled mode must beat eager by this much to be worth its compilation and its risks
FIRST_STEPS = 3  # steps timed apart: compilation, then the first replays (CUDA graphs record on their second)
BATCHES = 4  # distinct batches on the device, taken in turn


def crop_batches(recipe: NucleiRecipe, device: torch.device, count: int = BATCHES) -> tuple[list, TrainingDataset]:
    """`count` batches of (images, targets) on `device`, cropped and augmented as the recipe trains."""
    training = recipe.training
    with tempfile.TemporaryDirectory(prefix="cellseg-training-step-") as folder:
        write_dataset(folder, count=8, size=2 * training.patch_size, seed=5)
        pairs = load_pairs(pair_images_and_masks(f"{folder}/images", f"{folder}/labels"),
                           recipe.model.normalization)
    crops = TrainingDataset(pairs, training.patch_size, count * training.batch_size, True, training.seed,
                            training.augmentation, training.border_weight, training.border_sigma,
                            recipe.model.distance_map)
    batches = []
    for start in range(0, count * training.batch_size, training.batch_size):
        items = [crops[index] for index in range(start, start + training.batch_size)]
        batches.append((torch.stack([image for image, _ in items]).to(device),
                        torch.stack([target for _, target in items]).to(device)))
    return batches, crops


def bench_mode(recipe: NucleiRecipe, mode: str, device: torch.device, batches: list, crops: TrainingDataset,
               seconds: float) -> dict:
    """Crops/s of `mode`'s steps over about `seconds`, after `FIRST_STEPS` timed apart."""
    torch.manual_seed(recipe.training.seed)
    model = UNet(recipe.model).to(device).train()
    optimizer, scaler = adam_optimizer(model, recipe.training, device), gradient_scaler(recipe.training, device)
    forward = TrainingForward(model, mode)

    def step(index: int) -> torch.Tensor:
        images, targets = batches[index % len(batches)]
        loss, _, _ = batch_loss(forward, images, targets, crops.layout, recipe.training, device)
        optimizer_step(loss, optimizer, scaler)
        return loss.detach()

    started = time.perf_counter()
    for index in range(FIRST_STEPS):
        step(index)
    synchronize(device)
    first = time.perf_counter() - started
    steps, losses, started = 0, [], time.perf_counter()
    while steps < 3 or time.perf_counter() - started < seconds:
        losses.append(step(steps))
        steps += 1
        if steps % 10 == 0:
            synchronize(device)
    synchronize(device)
    elapsed = time.perf_counter() - started
    batch = recipe.training.batch_size
    return {"mode": mode, "compiled": forward.is_compiled, "first_steps": FIRST_STEPS, "first_steps_seconds": first,
            "steps": steps, "seconds": elapsed, "crops_per_second": steps * batch / elapsed,
            "losses_finite": bool(torch.isfinite(torch.stack(losses)).all()),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None}


def bench_training_step(recipe: NucleiRecipe, device_name: str, modes: list[str], seconds: float) -> dict:
    """Every mode's row, each one's speed-up over eager, and the mode to train with."""
    device = resolve_device(device_name)
    batches, crops = crop_batches(recipe, device)
    rows = []
    for mode in modes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rows.append(bench_mode(recipe, mode, device, batches, crops, seconds))
    eager = next((row["crops_per_second"] for row in rows if row["mode"] == "off"), None)
    for row in rows:
        row["speedup"] = row["crops_per_second"] / eager if eager else None
    usable = [row for row in rows if row["mode"] == "off" or (
        row["compiled"] and row["losses_finite"] and (row["speedup"] or 0) >= MIN_SPEEDUP)]
    best = max(usable, key=lambda row: row["crops_per_second"])["mode"] if eager else "off"
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "width": recipe.model.base_width, "crop": recipe.training.patch_size,
            "batch_size": recipe.training.batch_size, "rows": rows, "best_mode": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seconds", type=float, default=10.0, help="steady seconds of each mode")
    parser.add_argument("--modes", nargs="+", default=None, choices=COMPILE_MODES,
                        help="default: off and default, and reduce-overhead on CUDA")
    parser.add_argument("--width", type=int, help="U-Net width (default the recipe's)")
    parser.add_argument("--crop", type=int, help="crop side (default the recipe's)")
    parser.add_argument("--batch-size", type=int, help="crops per step (default the recipe's)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    recipe = NucleiRecipe()
    recipe = recipe.model_copy(update={
        "model": recipe.model.model_copy(update={"base_width": args.width or recipe.model.base_width}),
        "training": recipe.training.model_copy(update={"patch_size": args.crop or recipe.training.patch_size,
                                                        "batch_size": args.batch_size or recipe.training.batch_size}),
    })
    cuda = resolve_device(args.device).type == "cuda"
    modes = args.modes or [mode for mode in COMPILE_MODES if cuda or mode != "reduce-overhead"]
    result = bench_training_step(recipe, args.device, modes, args.seconds)
    print(f"training step on {result['device']}: width {result['width']}, {result['batch_size']} crops of "
          f"{result['crop']}^2 per step")
    for row in result["rows"]:
        speedup = f"{row['speedup']:.2f}x eager" if row["speedup"] else ""
        state = "" if row["compiled"] or row["mode"] == "off" else " (compilation failed: eager)"
        print(f"  {row['mode']:<16} {row['crops_per_second']:8.1f} crops/s  {speedup:<12} first {row['first_steps']} "
              f"steps {row['first_steps_seconds']:.1f} s{state}")
    print(f"best mode: {result['best_mode']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
