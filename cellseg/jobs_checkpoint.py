"""The end of training: what prediction needs beyond the weights, recorded in the trained
checkpoint (`finish_checkpoint`): its size model, and its default post-processing (split touching
cells, threshold, centre prominence)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cellseg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellseg.config import PredictConfig
from cellseg.evaluate import choose_postprocessing
from cellseg.infer import Predictor
from cellseg.job_config import TrainJob
from cellseg.loaded_pairs import LoadedPair
from cellseg.runtime import resolve_device
from cellseg.size_model import (
    MAGNIFICATIONS,
    MIN_EXAMPLES,
    SizeModel,
    batched_network_features,
    fit_size_model,
    magnified_examples,
    network_features,
    size_estimates,
    size_examples,
)

logger = logging.getLogger("cellseg.jobs")  # the jobs' one logger, whichever of their modules speaks


def finish_checkpoint(
    checkpoint_url: str, job: TrainJob, train_pairs: Sequence[LoadedPair], val_pairs: Sequence[LoadedPair],
    start_checkpoint: str | None = None,
) -> Checkpoint:
    """Record in the trained checkpoint what prediction needs beyond the weights, and return it:

    - for a model at a cell size, its size model (`cellseg.size_model`): fitted on the training
      images shown at random magnifications or, for a model fine-tuned from `start_checkpoint`,
      that model's own size model where it reads the validation images' cell sizes better, or
      where there are no validation images to tell (a few images fit a poor one: `choose_size_model`);
    - whether `predict` separates touching cells by default, its probability threshold and, for a
      model with a distance map, how prominent a centre must be (`choose_postprocessing` on the
      validation images, unless `job.predict` says them; without validation images, the starting
      model's choice).
    """
    checkpoint = load_checkpoint(checkpoint_url)
    start = load_checkpoint(start_checkpoint) if start_checkpoint else None
    device = resolve_device(job.training.device)
    if checkpoint.model_config.cell_diameter is not None:
        model = checkpoint.inference_model(device)
        candidates: dict[str, dict[str, Any]] = {}
        examples = size_examples(train_pairs, network_features(model, device, job.training.amp), job.training.seed)
        images = len(examples[1]) // MAGNIFICATIONS
        # The starting model's comes first: chosen on ties and when no validation images can tell.
        if start is not None and start.size_model is not None and start.model_config == checkpoint.model_config:
            candidates["the starting model's"] = start.size_model
        if len(examples[1]) >= MIN_EXAMPLES:
            candidates[f"the one fitted on {images} training images"] = fit_size_model(*examples, seed=job.training.seed).to_dict()
        if not candidates:
            logger.warning("%d training images with cells are too few for a size model: the cell size of each "
                           "image will be measured by first passes", images)
        else:
            checkpoint.size_model = choose_size_model(
                candidates, batched_network_features(model, device, job.training.amp),
                float(checkpoint.model_config.cell_diameter), val_pairs, job.training.seed)
    decide_postprocessing(checkpoint, job.predict, val_pairs, job.training.device, start)
    save_checkpoint(checkpoint, checkpoint_url)
    return checkpoint


def choose_size_model(
    candidates: dict[str, dict[str, Any]], features: Callable[[Sequence[np.ndarray]], np.ndarray],
    model_diameter: float, val_pairs: Sequence[LoadedPair], seed: int,
) -> dict[str, Any]:
    """Of the named size models, the one that reads the validation images' median cell size
    best from the network's `features` (each image at one random magnification drawn from
    `seed`; most within 25%, then the lowest median error, the first on ties), logged with how
    each did; the first without validation images."""
    held_out = list(magnified_examples(val_pairs, seed + 1, magnifications=1))
    if not held_out:
        name = next(iter(candidates))
        logger.info("size model: %s (no validation images to compare %s on)", name,
                    "it" if len(candidates) == 1 else "the candidates")
        return candidates[name]
    scores = {}
    for name, size_model in candidates.items():
        estimate = size_estimates(SizeModel.from_dict(size_model), features, model_diameter)
        errors = np.abs([estimate([image])[0] / np.exp(target) - 1 for image, target in held_out])
        scores[name] = (float(np.mean(errors <= 0.25)), -float(np.median(errors)))
    chosen = max(scores, key=lambda name: scores[name])

    def scored(name: str) -> str:
        within, error = scores[name]
        return f"{name}: validation images' cell size within 25% on {100 * within:.0f}%, median error {-100 * error:.0f}%"

    logger.info("size model, %s", "; not ".join(scored(name) for name in sorted(scores, key=lambda name: name != chosen)))
    return candidates[chosen]


def decide_postprocessing(
    checkpoint: Checkpoint, given: PredictConfig, val_pairs: Sequence[LoadedPair], device: str,
    start: Checkpoint | None = None,
) -> None:
    """Set `checkpoint`'s default split, threshold and centre prominence: as `given` states them,
    the ones it leaves undecided chosen on the validation images (`choose_postprocessing`), or
    without validation images kept from the `start` model it was fine-tuned from."""
    if not val_pairs:
        given = _undecided_kept_from(given, start)
    if given.split_touching is not None and given.threshold is not None and given.centre_prominence is not None:
        checkpoint.split_touching, checkpoint.threshold = given.split_touching, given.threshold
        checkpoint.centre_prominence = given.centre_prominence
        return
    predictor = Predictor(checkpoint, given.model_copy(update={"device": device}))
    choice, scores = choose_postprocessing(predictor, val_pairs, given)
    checkpoint.split_touching, checkpoint.threshold, checkpoint.centre_prominence = choice
    if scores:
        split, threshold, prominence = choice
        # the measure `choose_postprocessing` chose by: cell F1 with instance labels, else the adapted Rand error
        measure = "f1_mean" if any(pair.instances is not None for pair in val_pairs) else "adapted_rand_error_mean"
        logger.info("post-processing: touching cells %s, threshold %g, centre prominence %g (validation %s %.4f)",
                    "split" if split else "kept whole", threshold, prominence, measure, scores[choice][measure])


def _undecided_kept_from(given: PredictConfig, start: Checkpoint | None) -> PredictConfig:
    """`given` with the post-processing it leaves undecided taken from the `start` model, logged;
    without one, unchanged (`choose_postprocessing` then keeps the defaults)."""
    undecided = [name for name in ("split_touching", "threshold", "centre_prominence") if getattr(given, name) is None]
    if not undecided:
        return given
    if start is None:
        logger.info("post-processing: no validation images to choose it on, so the defaults are kept")
        return given
    kept = {name: getattr(start, name) for name in undecided}
    logger.info("post-processing: no validation images to choose it on, so the starting model's is kept (%s)",
                ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in kept.items()))
    return given.model_copy(update=kept)
