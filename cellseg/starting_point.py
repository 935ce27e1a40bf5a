"""Where a training run starts: the shipped model's weights (fine-tuning) or random ones.

`training.init_from: auto` fine-tunes the default shipped model when the dataset is small
(under FINE_TUNE_MAX_IMAGES pairs), asks for no architecture of its own, and looks like what
that model was trained on: scored as `cellseg predict` would segment them, the shipped model
must reach a pixel Dice of FINE_TUNE_MIN_DICE on the run's validation images (at most
FINE_TUNE_CHECK_IMAGES of them). Otherwise, as on EM slices, training starts from scratch.
docs/quality.md ("Fine-tuning against training from scratch") has the measurements behind the
rule. A shipped model's name, a checkpoint URL or a version of the job's registry ('current' or
a version name) always fine-tunes that; None never fine-tunes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cellseg.bundled import DEFAULT_SHIPPED_MODEL, SHIPPED_MODELS, shipped_checkpoint, shipped_name, shipped_paths
from cellseg.config import ModelConfig
from cellseg.infer import Predictor
from cellseg.io import filesystem
from cellseg.job_config import TrainJob
from cellseg.loaded_pairs import LoadedPair, load_pairs
from cellseg.metrics import MetricAccumulator, confusion_counts
from cellseg.pairs import ImagePair
from cellseg.postprocess import threshold_probabilities
from cellseg.redact import redact_url
from cellseg.registry import CURRENT, VERSION_NAME, Registry, RegistryError

logger = logging.getLogger(__name__)

# Below this many image/mask pairs, 'auto' may fine-tune the shipped model.
FINE_TUNE_MAX_IMAGES = 300
# The shipped nuclei model's Dice before any training, on the validation images of the runs
# measured: 0.87 on dsb2018 nuclei and 0.98 on synthetic cells, where fine-tuning won; 0.21 on
# isbi2012 EM slices, where training from scratch won. 0.5 parts them with room on both sides.
FINE_TUNE_MIN_DICE = 0.5
FINE_TUNE_CHECK_IMAGES = 16  # validation images scored for the decision: its cost stays bounded


@dataclass(frozen=True)
class Start:
    """The checkpoint a run starts from (None: random weights), why, and for 'auto' with a shipped
    model in view the Dice that model reached on the validation images before training."""

    checkpoint: str | None
    reason: str
    shipped_dice: float | None = None

    def described(self) -> str:
        """One line for people: where the run started and why."""
        if self.checkpoint is None:
            return f"from scratch ({self.reason})"
        name = next((name for name in SHIPPED_MODELS if _is_shipped(self.checkpoint, name)), None)
        origin = f"the shipped '{name}' model" if name else redact_url(self.checkpoint)
        return f"fine-tuned from {origin} ({self.reason})"

    def summary(self) -> dict[str, str | float | None]:
        return {"init_from": redact_url(self.checkpoint) if self.checkpoint else None, "reason": self.reason,
                "shipped_val_dice": self.shipped_dice, "described": self.described()}


def choose_start(job: TrainJob, images: int, val_pairs: Sequence[ImagePair]) -> Start:
    """Where `job`'s new run on `images` pairs starts, as `training.init_from` says (see the module);
    a resumed run keeps the start its last checkpoint records (`cellseg.jobs_training.run_training`)."""
    init_from = job.training.init_from
    if init_from != "auto":
        name = shipped_name(init_from) if init_from else None
        checkpoint = shipped_checkpoint(name) if name else init_from and registered_checkpoint(init_from, job.registry_url)
        return Start(checkpoint, "asked for" if checkpoint else "asked for: from scratch")
    if images >= FINE_TUNE_MAX_IMAGES:
        return Start(None, f"{images} images: enough to train from scratch")
    if job.model != ModelConfig():
        return Start(None, "an architecture of its own is asked for")
    name = DEFAULT_SHIPPED_MODEL
    checkpoint = shipped_checkpoint(name)
    if not val_pairs:
        logger.info("%d images: fine-tuning the shipped '%s' model (no validation images to check it on; "
                    "--from-scratch to start from random weights)", images, name)
        return Start(checkpoint, f"{images} images, no validation images to check the shipped model on")
    predictor = Predictor.from_checkpoint(checkpoint, job.predict.model_copy(update={"device": job.training.device}))
    checked = list(val_pairs[:FINE_TUNE_CHECK_IMAGES])
    logger.info("scoring the shipped '%s' model on %d validation images to decide whether to fine-tune it",
                name, len(checked))
    loaded = load_pairs(checked, predictor.normalization)
    if not any(pair.mask.any() for pair in loaded):  # Dice 0 for any mask with a cell: nothing to judge by
        logger.info("%d images: fine-tuning the shipped '%s' model (the validation masks hold no cell to check it "
                    "on; --from-scratch to start from random weights)", images, name)
        return Start(checkpoint, f"{images} images, no cell in the validation masks to check the shipped model on")
    dice = shipped_dice(predictor, loaded)
    if dice < FINE_TUNE_MIN_DICE:
        logger.info("training from scratch: the shipped '%s' model's masks (as predict makes them) reach Dice %.3f "
                    "on these validation images, below %g, so they are unlike its own (--init-from %s fine-tunes it "
                    "anyway)", name, dice, FINE_TUNE_MIN_DICE, name)
        return Start(None, f"the shipped '{name}' model's masks (as predict makes them) reach Dice {dice:.3f} on the "
                     f"validation images: below {FINE_TUNE_MIN_DICE:g}", dice)
    logger.info("fine-tuning the shipped '%s' model: %d images, and its masks (as predict makes them) reach Dice %.3f "
                "on the validation images (--from-scratch to start from random weights)", name, images, dice)
    return Start(checkpoint, f"{images} images; the shipped '{name}' model's masks (as predict makes them) reach Dice "
                 f"{dice:.3f} on the validation images", dice)


def registered_checkpoint(init_from: str, registry_url: str) -> str:
    """`init_from` itself, or where no file has that name and it names a version of the registry
    ('current' or a version name), that version's checkpoint URL."""
    if not (init_from == CURRENT or VERSION_NAME.fullmatch(init_from)):
        return init_from
    fs, path = filesystem(init_from)
    if fs.exists(path):
        return init_from
    registry = Registry(registry_url)
    try:
        version = registry.resolve(init_from)
    except RegistryError:
        if init_from == CURRENT:
            raise
        return init_from  # neither a file nor a version: the missing file is the error
    logger.info("--init-from %s: version %s of registry '%s'", init_from, version, redact_url(registry_url))
    return registry.checkpoint_url(version)


def shipped_dice(predictor: Predictor, pairs: Sequence[LoadedPair]) -> float:
    """Pixel Dice of `predictor`'s masks over all `pairs` together (normalised images, as loaded
    for its model), each image segmented as `cellseg predict` would see it."""
    total = MetricAccumulator()
    for pair in pairs:
        (probability,) = predictor.normalised_probabilities([pair.image])
        total.add(confusion_counts(threshold_probabilities(probability, predictor.threshold), pair.mask))
    return total.pooled()["dice"]


def _is_shipped(checkpoint: str, name: str) -> bool:
    return Path(checkpoint) == shipped_paths(name)[0]
