"""Hyper-parameter search: plan trials over a search space and pick the best by validation Dice.
Each trial is trained by `cellseg.jobs_tune.run_trial`; the tune-unet flow runs them in parallel."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from cellseg.config import AugmentationConfig, ModelConfig, SearchSpace, TrainConfig

SCORE = "val_dice"
# The fields each point sets, with the flag that searches each.
SEARCHED_TRAINING = {"learning_rate": "--lr", "loss": "--loss", "augmentation": "--augmentation",
                     "border_weight": "--border-weight"}
SEARCHED_MODEL = {"base_width": "--base-width", "depth": "--depth", "dropout": "--dropout"}
MIN_TUNING_PAIRS = 2  # one to train on, one to score the trial by


class Trial(BaseModel):
    """One point of the search space: its number, the values tried and the configs they make."""

    number: int
    params: dict[str, Any]
    model: ModelConfig
    training: TrainConfig


class TrialResult(BaseModel):
    """How a trial ended: its best validation metrics and checkpoint, or the error that stopped it."""

    number: int
    params: dict[str, Any]
    status: Literal["done", "failed"]
    val_dice: float | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    best_epoch: int | None = None
    epochs_run: int | None = None
    stop_reason: str | None = None
    seconds: float | None = None
    checkpoint: str | None = None
    error: str | None = None


def plan_trials(
    space: SearchSpace, count: int, seed: int = 0, model: ModelConfig = ModelConfig(), training: TrainConfig = TrainConfig()
) -> list[Trial]:
    """`count` distinct points of the grid `space` spans, drawn at random (seeded); the whole grid,
    in order, when it has no more than `count` points. Unsearched settings come from `model`
    and `training`."""
    names = list(SearchSpace.model_fields)
    grid = list(itertools.product(*(getattr(space, name) for name in names)))
    if count < len(grid):
        chosen = np.random.default_rng(seed).choice(len(grid), size=count, replace=False)
        grid = [grid[index] for index in sorted(chosen)]
    trials = []
    for number, values in enumerate(grid, start=1):
        params = dict(zip(names, values, strict=True))
        trials.append(
            Trial(
                number=number,
                params=params,
                model=model.model_copy(
                    update={"base_width": params["base_width"], "depth": params["depth"], "dropout": params["dropout"]}
                ),
                training=training.model_copy(
                    update={
                        "learning_rate": params["learning_rate"],
                        "loss": params["loss"],
                        "augmentation": augmentation_preset(params["augmentation"]),
                        "augment": True,  # the point names how to augment: augment=False would make its presets one
                        "border_weight": params["border_weight"],
                        # A search compares architectures trained alike: none fine-tunes the shipped
                        # model unless the search says so.
                        "init_from": None if training.init_from == "auto" else training.init_from,
                    }
                ),
            )
        )
    return trials


def unused_settings(model: ModelConfig, training: TrainConfig) -> dict[str, str]:
    """The settings given (a settings file, CELLSEG_*, a job's model and training) that every trial
    replaces with its point's values, each with the flag that searches it: said, never silently
    dropped."""
    unused = {f"model.{name}": flag for name, flag in SEARCHED_MODEL.items() if name in model.model_fields_set}
    unused |= {f"training.{name}": flag for name, flag in SEARCHED_TRAINING.items() if name in training.model_fields_set}
    return unused | ({"training.augment false": "--augmentation"} if not training.augment else {})


def check_tuning_dataset(pairs: int) -> None:
    """Refuse a dataset too small to score a trial: before any trains, not after all of them."""
    if pairs < MIN_TUNING_PAIRS:
        raise ValueError(f"tuning needs at least {MIN_TUNING_PAIRS} image/mask pairs, one to train on and one to "
                         f"score the trials by (validation Dice); the dataset has {pairs}")


def augmentation_preset(name: str) -> AugmentationConfig:
    """The augmentation strength a search space names: 'flips' (the default) or 'strong'."""
    return AugmentationConfig.strong() if name == "strong" else AugmentationConfig.flips_only()


class NoTrialFinished(ValueError):
    """Every trial of a search failed: the message lists each trial's error, and `results` holds
    the trials, for their table."""

    def __init__(self, results: Sequence[TrialResult]):
        self.results = list(results)
        by_error: dict[str, list[int]] = {}
        for result in sorted(self.results, key=lambda r: r.number):
            by_error.setdefault(result.error or "no validation Dice", []).append(result.number)
        # Trials failing alike (a setting every trial shares) say their error once.
        errors = "; ".join(f"trial{'s' if len(numbers) > 1 else ''} {', '.join(map(str, numbers))}: {error}"
                           for error, numbers in by_error.items())
        super().__init__(f"no trial finished, so there is no model to register ({errors or 'no trials ran'})")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.results,)


def best_trial(results: Sequence[TrialResult]) -> TrialResult:
    """The finished trial with the highest validation Dice (the lower number on a tie); raises
    `NoTrialFinished` when none finished."""
    finished = [result for result in results if result.status == "done" and result.val_dice is not None]
    if not finished:
        raise NoTrialFinished(results)
    return max(finished, key=lambda result: (result.val_dice, -result.number))


def trial_rows(results: Sequence[TrialResult]) -> list[dict[str, Any]]:
    """One flat row per trial, best validation Dice first, for tables and artifacts."""
    rows = []
    for result in sorted(results, key=lambda r: (r.val_dice is None, -(r.val_dice or 0.0), r.number)):
        rows.append({
            "trial": result.number,
            **result.params,
            "val_dice": result.val_dice,
            "val_iou": result.metrics.get("val_iou"),
            "best_epoch": result.best_epoch,
            "epochs": result.epochs_run,
            "seconds": result.seconds,
            "status": result.status if result.status == "done" else f"failed: {result.error}",
        })
    return rows


TABLE_COLUMNS = ("trial", *SearchSpace.model_fields, "val_dice", "val_iou", "best_epoch", "epochs", "seconds", "status")
