"""Does the shipped `nuclei` model gain from more epochs of its own recipe? Continues it on the
recipe's data, split, crops and augmentation, at the learning rate its run ended with, at library
level (no Prefect), resumable (a second call goes on from the last epoch):

    python -m benchmarks.nuclei_continue --out runs/nuclei-continue [--epochs 16] [--keep-epochs]
    python -m benchmarks.quality --dataset ../shared/data/dsb2018 --model runs/nuclei-continue/training/best.pt

`--keep-epochs` keeps each epoch's weights as `<out>/epochs/epoch-N.pt`, for averaging them
(`benchmarks.weight_average`). `--widen 48` starts instead from the shipped weights made those of
a wider network that computes the same (`benchmarks.widen`), written to `<out>/widened-w48.pt`.

The end of training fits the size model and decides the post-processing as for any model, and
prints the validation cell scores to set beside the shipped card's. Nothing is installed: the
shipped model changes only through `make nuclei-model`. docs/quality.md has the 2026-12-01 run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from benchmarks.widen import widened_state_dict
from cellseg.build_bundled import build_nuclei, can_resume
from cellseg.bundled import NucleiRecipe, model_card, shipped_checkpoint
from cellseg.checkpoint import load_checkpoint, save_checkpoint
from cellseg.train import LAST_CHECKPOINT

ENDING_LEARNING_RATE = 5e-4  # the shipped run halved 1e-3 once (docs/quality.md, the learning curve)
WIDEN_NOISE = 0.01  # of each weight's standard deviation: enough for the copies of a channel to part


def continued_recipe(start: str, epochs: int, data: str | None = None, learning_rate: float = ENDING_LEARNING_RATE,
                     balance_appearance: float | None = None, dim_cells: float = 0.0, width: int | None = None,
                     max_minutes: float | None = None) -> NucleiRecipe:
    """The shipped recipe, started from checkpoint `start`, for `epochs` more epochs at
    `learning_rate`, its crops balanced over the kinds of image as `balance_appearance` says (the
    recipe's when None) and with dim cells beside bright ones in a share `dim_cells` of them; a
    network of base `width` when given (`start` must be one: `widened_start`), within `max_minutes`
    when given."""
    base = NucleiRecipe(**({"data_dir": data} if data else {}))
    augmentation = base.training.augmentation.model_copy(update={"dim_cells_probability": dim_cells})
    model = base.model.model_copy(update={"base_width": width}) if width else base.model
    return base.model_copy(update={"model": model, "training": base.training.model_copy(update={
        "init_from": start, "learning_rate": learning_rate, "epochs": epochs, "max_minutes": max_minutes,
        "balance_appearance": base.training.balance_appearance if balance_appearance is None else balance_appearance,
        "augmentation": augmentation})})


def widened_start(start: str, width: int, out: Path, noise: float = WIDEN_NOISE) -> str:
    """Checkpoint `start` made a network of base `width` computing the same (`benchmarks.widen`),
    written once to `<out>/widened-w<width>.pt` (a resumed run starts from the same weights). Its
    size model read the narrower network's features, so it has none: training's end fits one."""
    path = out / f"widened-w{width}.pt"
    if not path.exists():
        checkpoint = load_checkpoint(start)
        state = widened_state_dict(checkpoint.state_dict, checkpoint.model_config, width, noise=noise)
        out.mkdir(parents=True, exist_ok=True)
        save_checkpoint(dataclasses.replace(checkpoint, model_config=checkpoint.model_config.model_copy(
            update={"base_width": width}), state_dict=state, size_model=None), str(path))
    return str(path)


def epoch_keeper(out: Path) -> Callable[[dict[str, float]], None]:
    """An `on_epoch` for `build_nuclei` that copies each epoch's `last.pt` to `out/epochs/epoch-N.pt`."""
    kept = out / "epochs"
    kept.mkdir(parents=True, exist_ok=True)

    def keep(record: dict[str, float]) -> None:
        shutil.copyfile(out / "training" / LAST_CHECKPOINT, kept / f"epoch-{int(record['epoch'])}.pt")

    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="working folder (resumable)")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--data", help="another training set (default: the recipe's dsb2018-train)")
    parser.add_argument("--lr", type=float, default=ENDING_LEARNING_RATE, help="learning rate to start from")
    parser.add_argument("--balance-appearance", type=float, default=None,
                        help="least share of crops per kind of image (TrainConfig.balance_appearance; default the recipe's)")
    parser.add_argument("--dim-cells", type=float, default=0.0,
                        help="share of crops with some cells dimmed (AugmentationConfig.dim_cells_probability)")
    parser.add_argument("--keep-epochs", action="store_true", help="keep each epoch's weights in <out>/epochs/")
    parser.add_argument("--widen", type=int, metavar="WIDTH", help="start from the shipped weights widened to this base width")
    parser.add_argument("--max-minutes", type=float, help="wall-clock budget of the training (resumed runs included)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = Path(args.out)
    start = shipped_checkpoint("nuclei")
    if args.widen:
        start = widened_start(start, args.widen, out)
    recipe = continued_recipe(start, args.epochs, args.data, args.lr, args.balance_appearance, args.dim_cells,
                              args.widen, args.max_minutes)
    outcome = build_nuclei(out, recipe, resume=can_resume(out), on_epoch=epoch_keeper(out) if args.keep_epochs else None)
    shipped = model_card("nuclei")["validation"]
    print(json.dumps({
        "best_epoch": outcome.result.best_epoch, "best_val_loss": outcome.result.best_metrics.get("val_loss"),
        "val_cell_f1": outcome.cells.get("f1_mean"), "shipped_val_loss": shipped.get("loss"),
        "shipped_val_cell_f1": shipped.get("cells_f1_mean"),
    }, indent=1))


if __name__ == "__main__":
    main()
