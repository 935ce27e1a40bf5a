"""Weights averaged over epochs (stochastic weight averaging): is the mean of several checkpoints
of the `nuclei` model better than any one of them? docs/quality.md has the 2026-12-03 run.

    python -m benchmarks.nuclei_continue --out runs/nuclei-average --epochs 6 --lr 2.5e-4 --keep-epochs
    python -m benchmarks.weight_average --out runs/nuclei-average/average.pt runs/nuclei-average/epochs/epoch-*.pt
    python -m benchmarks.quality --dataset ../shared/data/dsb2018-train --model runs/nuclei-average/average.pt --recipe-val
    python -m benchmarks.quality --dataset ../shared/data/dsb2018 --model runs/nuclei-average/average.pt

The average takes everything but the weights from `--base` (the shipped model unless given): its
architecture and post-processing. Its size model, which reads the network's features, is fitted
again on the recipe's training images as the end of training fits one (`finish_checkpoint`);
averaged weights move those features enough that the old one misjudges sizes. To score one of
the averaged checkpoints alone on equal terms, average it alone: its size model is refitted too.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.output import first_paragraph
from cellseg.build_bundled import recipe_job, recipe_split
from cellseg.bundled import NucleiRecipe, shipped_checkpoint
from cellseg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellseg.config import PredictConfig
from cellseg.jobs_checkpoint import finish_checkpoint
from cellseg.loaded_pairs import load_pairs

logger = logging.getLogger(__name__)


def average_weights(checkpoints: Sequence[Checkpoint]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the checkpoints' floating-point weights (summed in float64, kept
    in each weight's dtype); other tensors must agree and are kept."""
    if not checkpoints:
        raise ValueError("no checkpoints to average")
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.model_config != first.model_config or other.state_dict.keys() != first.state_dict.keys():
            raise ValueError("checkpoints of different networks cannot be averaged")
    averaged = {}
    for name, value in first.state_dict.items():
        if value.is_floating_point():
            total = sum(checkpoint.state_dict[name].double() for checkpoint in checkpoints)
            averaged[name] = (total / len(checkpoints)).to(value.dtype)
        elif all(torch.equal(checkpoint.state_dict[name], value) for checkpoint in checkpoints):
            averaged[name] = value
        else:
            raise ValueError(f"'{name}' is not a floating-point weight and differs between the checkpoints")
    return averaged


def averaged_checkpoint(base: Checkpoint, checkpoints: Sequence[Checkpoint]) -> Checkpoint:
    """`base` with the mean weights of `checkpoints` and no resume state."""
    if any(checkpoint.model_config != base.model_config for checkpoint in checkpoints):
        raise ValueError("the checkpoints are not of the base's network")
    return dataclasses.replace(base, state_dict=average_weights(checkpoints), resume_state=None)


def refit_size_model(checkpoint_url: str, recipe: NucleiRecipe) -> Checkpoint:
    """Fit the size model of the checkpoint at `checkpoint_url` again on `recipe`'s training
    images, as training's end does, keeping the checkpoint's post-processing; saved in place."""
    checkpoint = load_checkpoint(checkpoint_url)
    data = Path(recipe.data_dir)
    train_pairs, val_pairs = recipe_split(recipe, data)
    kept = PredictConfig(split_touching=checkpoint.split_touching, threshold=checkpoint.threshold,
                         centre_prominence=checkpoint.centre_prominence)
    job = recipe_job(recipe, data).model_copy(update={"predict": kept})
    normalization = checkpoint.model_config.normalization
    return finish_checkpoint(checkpoint_url, job, load_pairs(train_pairs, normalization),
                             load_pairs(val_pairs, normalization))


def main() -> None:
    parser = argparse.ArgumentParser(description=first_paragraph(__doc__))
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files to average")
    parser.add_argument("--out", required=True, help="the averaged checkpoint to write")
    parser.add_argument("--base", help="checkpoint whose other entries the average takes (default: the shipped nuclei)")
    parser.add_argument("--data", help="training set for the size model (default: the recipe's dsb2018-train)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if Path(args.out).exists():
        raise SystemExit(f"'{args.out}' exists; choose another --out")
    base = load_checkpoint(args.base or shipped_checkpoint("nuclei"))
    save_checkpoint(averaged_checkpoint(base, [load_checkpoint(path) for path in args.checkpoints]), args.out)
    logger.info("averaged %d checkpoints into %s; fitting its size model", len(args.checkpoints), args.out)
    refit_size_model(args.out, NucleiRecipe(**({"data_dir": args.data} if args.data else {})))


if __name__ == "__main__":
    main()
