"""Training loop: Adam + BCEWithLogitsLoss, per-epoch validation, learning-rate
decay on plateau, early stopping, checkpoints.

Reads top to bottom: build data, build model and optimizer, loop over epochs (train, validate,
record, checkpoint, maybe stop). Randomness is derived from (seed, epoch) so that a run resumed
from `last.pt` continues exactly as the uninterrupted run would have on the same device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from cellseg.checkpoint import Checkpoint, load_checkpoint, non_finite_weight, save_checkpoint
from cellseg.config import ModelConfig, TrainConfig
from cellseg.dataset import TrainingDataset, TrainingTarget
from cellseg.io import write_file_atomic
from cellseg.loaded_pairs import LoadedPair
from cellseg.losses import distance_map_loss, segmentation_loss
from cellseg.metrics import ConfusionCounts, MetricAccumulator, confusion_counts
from cellseg.model import UNet, expected_state
from cellseg.redact import redact_url
from cellseg.runtime import TrainingForward, autocast_context, available_cores, resolve_device
from cellseg.scale import collection_cell_diameter, rescale_pairs

logger = logging.getLogger(__name__)

BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
HISTORY_FILE = "history.json"
STOP_FILE = "STOP"  # created in a run's folder, it ends training after the current epoch (resumable)


class TrainingDivergedError(ValueError):
    """Training stopped at a loss or weight that is not finite; nothing of that epoch was saved."""


@dataclass
class TrainResult:
    """Where training wrote its outputs and how it ended."""

    out_dir: Path
    history: list[dict[str, float]]
    best_epoch: int  # 0: the starting weights of a fine-tuning run, which no epoch beat
    best_metrics: dict[str, float]
    stop_reason: str
    # A fine-tuning run's validation metrics of its starting weights, scored as the epochs are
    start_metrics: dict[str, float] | None = None

    @property
    def best_described(self) -> str:
        """'best epoch B of N', saying so when the starting weights stayed the best."""
        kept = " (the starting weights: no epoch of fine-tuning improved on them)" if self.best_epoch == 0 else ""
        return f"best epoch {self.best_epoch} of {len(self.history)}{kept}"

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / BEST_CHECKPOINT

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / LAST_CHECKPOINT

    @property
    def history_path(self) -> Path:
        return self.out_dir / HISTORY_FILE


def logit_threshold(probability: float) -> float:
    """The logit above which sigmoid(logit) exceeds `probability`."""
    return math.log(probability / (1.0 - probability))


def _score_name(monitor: str) -> tuple[str, bool]:
    """History key to watch and whether higher is better."""
    return monitor, monitor != "val_loss"


def whole_image_logits(
    model: UNet, pairs: Sequence[LoadedPair], device: torch.device, amp: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 cell logits, mask), each (1, 1, H, W) on `device`, for every pair's whole image, in
    eval mode; a distance-map output is left out."""
    model.eval()
    with torch.inference_mode():
        dataset = TrainingDataset(pairs)
        for index in range(len(dataset)):
            image, mask = dataset[index]
            with autocast_context(device, amp):
                logits = model(image[None].to(device))
            yield logits[:, :1].float(), mask[None].to(device)


def evaluate_model(
    model: UNet, pairs: Sequence[LoadedPair], device: torch.device, threshold: float = 0.5, amp: bool = True
) -> dict[str, float]:
    """Mean BCE loss and metrics (mean over images, and pooled Dice) on whole images."""
    accumulator, losses = MetricAccumulator(), []
    cut = logit_threshold(threshold)
    for logits, y in whole_image_logits(model, pairs, device, amp):
        losses.append(F.binary_cross_entropy_with_logits(logits, y).item())
        accumulator.add(confusion_counts(logits > cut, y > 0.5))
    result = {"loss": sum(losses) / len(losses), **accumulator.mean()}
    result["dice_pooled"] = accumulator.pooled()["dice"]
    return result


def decide_automatic_fields(
    model_config: ModelConfig, train_pairs: Sequence[LoadedPair], initial: ModelConfig | None = None
) -> ModelConfig:
    """`model_config` with its 'auto' fields decided: taken from the `initial` checkpoint's config
    when fine-tuning, else from the training pairs (the cell size of `collection_cell_diameter`).
    Each decision is logged."""
    automatic = model_config.automatic_fields()
    if not automatic:
        return model_config
    if initial is not None:
        return model_config.model_copy(update={name: getattr(initial, name) for name in automatic})
    decided: dict[str, object] = {}
    if "cell_diameter" in automatic:
        decided["cell_diameter"] = collection_cell_diameter(train_pairs)
        logger.info("cell size: %s", "images at their own scale (their cell sizes agree)"
                    if decided["cell_diameter"] is None else
                    f"{decided['cell_diameter']:g} px, the median cell of the training images, whose sizes differ")
    return model_config.model_copy(update=decided)


def model_difference(saved: ModelConfig, given: ModelConfig) -> str:
    """The fields in which two model configs differ, as `base_width 16 (this run: 8), ...`."""
    before, now = saved.model_dump(mode="json"), given.model_dump(mode="json")
    differing = [f"{name} {before.get(name)!r} (this run: {now.get(name)!r})" for name in before.keys() | now.keys()
                 if before.get(name) != now.get(name)]
    return ", ".join(sorted(differing)) or "the same settings"


def train(
    train_pairs: Sequence[LoadedPair],
    val_pairs: Sequence[LoadedPair],
    out_dir: str | os.PathLike,
    model_config: ModelConfig = ModelConfig(),
    config: TrainConfig = TrainConfig(),
    dataset_manifest_hash: str | None = None,
    resume: bool = False,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> TrainResult:
    """Train a U-Net; writes best.pt, last.pt and history.json under `out_dir`.

    With `resume`, continues from `out_dir/last.pt` (same configs expected). A file named STOP in
    `out_dir` ends training before the next epoch, to be resumed later. Validation metrics
    are averaged over whole validation images; without validation images the training metrics
    of the epoch are monitored instead. The 'auto' fields of `model_config` are decided first
    (`decide_automatic_fields`); a model with a `cell_diameter` then trains and validates on the
    pairs resampled to that cell size (`cellseg.scale.rescale_pairs`). Fine-tuning (`init_from`)
    scores the starting weights on the validation images first, as epoch 0 of `best.pt`, which
    keeps them until an epoch beats them. `on_epoch` gets each epoch's record once the epoch's
    checkpoints are written; `on_start` once, just before the run's first checkpoint is written (a
    run refused by its checks, stopped or diverging before that writes nothing).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)

    # 'auto' is decided by `cellseg.jobs.run_training`, which knows the job; here it means none.
    init_from = None if config.init_from == "auto" else config.init_from
    initial = load_checkpoint(init_from) if init_from and not resume else None
    model_config = decide_automatic_fields(model_config, train_pairs, initial.model_config if initial else None)
    if model_config.cell_diameter is not None:
        train_pairs, val_pairs = rescale_pairs(train_pairs, model_config), rescale_pairs(val_pairs, model_config)
        logger.info("images resampled so that their median cell is %g pixels across", model_config.cell_diameter)
    if model_config.distance_map and not any(pair.instances is not None for pair in train_pairs):
        logger.warning("the distance map is learnt from binary masks: touching cells count as one; "
                       "give instance label masks to teach the model where they part")
    train_set = TrainingDataset(train_pairs, config.patch_size, config.patches_per_image, config.augment, config.seed,
                           config.augmentation, config.border_weight, config.border_sigma, model_config.distance_map,
                           config.patch_sampling, config.balance_appearance)
    if config.balance_appearance:
        logger.info("training crops per epoch, balanced over the kinds of image: %s", ", ".join(
            f"{kind} {count}" for kind, count in train_set.crops_by_appearance().items()))
    workers = loader_workers(config, device)
    if workers:
        train_set.prepare_targets()  # once here, so that the worker processes share them rather than each compute them
    model = UNet(model_config).to(device)
    optimizer = adam_optimizer(model, config, device)
    monitor_key, higher_is_better = _score_name(config.monitor if val_pairs else config.monitor.replace("val_", "train_"))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max" if higher_is_better else "min", factor=0.5,
        patience=config.lr_patience or 0, threshold=config.min_delta, threshold_mode="abs",
    )
    scaler = gradient_scaler(config, device)
    history: list[dict[str, float]] = []
    best_score, best_epoch, best_metrics, stale_epochs, spent_seconds = None, 0, {}, 0, 0.0
    # Early stopping counts epochs since the score last rose by more than min_delta above this
    # one, while best.pt is simply the best epoch: a gain smaller than min_delta still wins.
    stop_reference: float | None = None
    start_metrics: dict[str, float] | None = None

    if initial is not None:
        if initial.model_config != model_config:
            raise ValueError(f"'{init_from}' holds a model built with {model_difference(initial.model_config, model_config)}; "
                             "fine-tune with the checkpoint's model config")
        model.load_state_dict(initial.state_dict)
        logger.info("fine-tuning from %s", redact_url(init_from or ""))

    if resume:
        state = load_checkpoint(str(out / LAST_CHECKPOINT))
        if state.resume_state is None:
            raise ValueError(f"'{out / LAST_CHECKPOINT}' has no resume state")
        if expected_state(state.model_config) != expected_state(model_config):
            raise ValueError(f"'{out / LAST_CHECKPOINT}' holds a model built with "
                             f"{model_difference(state.model_config, model_config)}; resume with the run's model settings")
        model.load_state_dict(state.state_dict)
        try:
            optimizer.load_state_dict(state.resume_state["optimizer"])
            scheduler.load_state_dict(state.resume_state["scheduler"])
            history = list(state.resume_state["history"])
            best_score = float(state.resume_state["best_score"])
            best_epoch = int(state.resume_state["best_epoch"])
            best_metrics = dict(state.resume_state["best_metrics"])
            stale_epochs = int(state.resume_state["stale_epochs"])
            stop_reference = float(state.resume_state.get("stop_reference", best_score))  # older runs: one score
            spent_seconds = float(state.resume_state["spent_seconds"])
            saved_start = state.resume_state.get("start_metrics")  # absent in runs of older versions
            start_metrics = None if saved_start is None else {str(k): float(v) for k, v in saved_start.items()}
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as error:
            # torch's load_state_dict and a missing entry speak of keys and groups, not of the file.
            reason = f"{type(error).__name__}: {error}"[:200]
            raise ValueError(f"'{out / LAST_CHECKPOINT}' cannot be resumed: its saved training state does not fit "
                             f"this run ({reason}); resume with the settings the run was started with, or "
                             f"start afresh in another --out") from error
        logger.info("resuming from %s after epoch %d", out / LAST_CHECKPOINT, state.epoch)
        saved = state.train_config
        if (saved.learning_rate, saved.weight_decay) != (config.learning_rate, config.weight_decay):
            logger.warning("the run goes on with its saved optimizer (learning rate %g now, weight decay %g): "
                           "learning_rate %g and weight_decay %g apply to a new run (--overwrite, or another --out)",
                           optimizer.param_groups[0]["lr"], saved.weight_decay, config.learning_rate, config.weight_decay)

    def snapshot(epoch: int, metrics: dict[str, float]) -> Checkpoint:
        """The model as it is now, as the checkpoint of `epoch` (0: the starting weights)."""
        return Checkpoint(model_config=model_config,
                          state_dict={key: value.detach().cpu() for key, value in model.state_dict().items()},
                          train_config=config, metrics=metrics, epoch=epoch, dataset_manifest_hash=dataset_manifest_hash)

    forward = TrainingForward(model, config.compile)
    cut = logit_threshold(config.threshold)
    # Reading a value off the GPU makes the CPU wait for it; on CUDA the loss and pixel counts are
    # summed on the device and read once an epoch, on the CPU each step's loss is checked at once.
    check_each_step = device.type != "cuda"
    # val_loss is the cell channel's plain BCE; where the training objective adds terms, the
    # training crops' plain BCE is recorded too (train_bce), so that the two curves compare.
    objective_is_bce = config.loss == "bce" and config.border_weight == 0 and not model_config.distance_map
    budget = config.time_budget(fine_tuning=bool(init_from))
    started = time.monotonic() - spent_seconds
    stop_reason = "max epochs reached"

    def begin_writing() -> None:  # before the run's first checkpoint: on_start, once
        nonlocal on_start
        if on_start is not None:
            call, on_start = on_start, None
            call()

    logger.info(
        "training on %s%s%s: %d training and %d validation images, up to %d epoch%s",
        device, f" with {workers} loader processes" if workers else "",
        "" if config.compile == "off" else f", compiled ({config.compile})", len(train_pairs), len(val_pairs),
        config.epochs, "" if config.epochs == 1 else "s",
    )
    if not val_pairs:
        why = ("val_fraction is 0" if config.val_fraction <= 0 else
               "one image cannot be split" if len(train_pairs) == 1 else "none given")
        logger.warning("no validation images (%s): best.pt is the epoch that fits the training images best, which "
                       "says little of other images", why)
    if initial is not None and val_pairs and monitor_key.startswith("val_"):
        # On a small dataset fine-tuning can leave a good model worse: its starting weights are
        # scored as an epoch would be, and best.pt keeps them until an epoch beats them.
        scored = time.monotonic()
        start = {f"val_{name}": value for name, value in
                 evaluate_model(model, val_pairs, device, config.threshold, config.amp).items()}
        logger.info(_format_record({"epoch": 0, **start, "seconds": time.monotonic() - scored}, config.epochs)
                    + ": the starting weights, scored as every epoch is")
        if math.isfinite(start[monitor_key]):
            start_metrics = best_metrics = start
            best_score = stop_reference = start[monitor_key]
            begin_writing()
            save_checkpoint(snapshot(0, start), str(out / BEST_CHECKPOINT))
    for epoch in range(len(history) + 1, config.epochs + 1):
        if (out / STOP_FILE).exists():
            stop_reason = f"stopped before epoch {epoch}: {out / STOP_FILE} exists (remove it and resume to go on)"
            break
        epoch_started = time.monotonic()
        torch.manual_seed(config.seed * 1_000_003 + epoch)  # dropout masks and batch order
        train_set.set_epoch(epoch)
        loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, num_workers=workers,
                            pin_memory=device.type == "cuda")
        if init_from and config.freeze_encoder_epochs:
            for parameter in (*model.stem.parameters(), *model.encoder.parameters()):
                parameter.requires_grad_(epoch > config.freeze_encoder_epochs)
        model.train()
        train_counts, loss_sum, samples = EpochCounts(device), torch.zeros((), dtype=torch.float64, device=device), 0
        bce_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch_images, batch_targets in loader:
            images, targets = batch_images.to(device, non_blocking=True), batch_targets.to(device, non_blocking=True)
            loss, logits, masks = batch_loss(forward, images, targets, train_set.layout, config, device)
            if check_each_step and not math.isfinite(loss_value := loss.item()):
                # one more step would only spread NaN through the weights
                raise TrainingDivergedError(_divergence(out, epoch, f"the training loss is {loss_value}", optimizer,
                                                        best_epoch))
            optimizer_step(loss, optimizer, scaler)
            loss_sum += loss.detach().double() * len(images)
            if not objective_is_bce:
                bce_sum += F.binary_cross_entropy_with_logits(logits.detach(), masks).double() * len(images)
            samples += len(images)
            train_counts.add(logits.detach() > cut, masks > 0.5)

        train_seconds = time.monotonic() - epoch_started
        train_scores = train_counts.counts().scores()
        record: dict[str, float] = {"epoch": epoch, "train_loss": float(loss_sum) / samples}
        if not math.isfinite(record["train_loss"]):  # on CUDA the loss is read once an epoch, here
            raise TrainingDivergedError(_divergence(out, epoch, f"the training loss is {record['train_loss']}",
                                                    optimizer, best_epoch))
        if not objective_is_bce:
            record["train_bce"] = float(bce_sum) / samples
        record.update({f"train_{name}": value for name, value in train_scores.items()})
        bad_weight = non_finite_weight(model.state_dict())
        if bad_weight is not None:
            raise TrainingDivergedError(_divergence(out, epoch, f"weight '{bad_weight}' is not finite", optimizer,
                                                    best_epoch))
        if val_pairs:
            val = evaluate_model(model, val_pairs, device, config.threshold, config.amp)
            if not math.isfinite(val["loss"]):
                raise TrainingDivergedError(_divergence(out, epoch, f"the validation loss is {val['loss']}", optimizer,
                                                        best_epoch))
            record.update({f"val_{name}": value for name, value in val.items()})
        record["learning_rate"] = optimizer.param_groups[0]["lr"]
        record["seconds"] = time.monotonic() - epoch_started
        record["train_crops_per_second"] = samples / max(train_seconds, 1e-9)
        history.append(record)
        logger.info(_format_record(record, config.epochs))

        score = record[monitor_key]
        improved = best_score is None or (score > best_score if higher_is_better else score < best_score)
        if improved:
            best_score, best_epoch, best_metrics = score, epoch, _metrics_of(record)
        if stop_reference is None or (score > stop_reference + config.min_delta if higher_is_better
                                      else score < stop_reference - config.min_delta):
            stop_reference, stale_epochs = score, 0
        else:
            stale_epochs += 1
        if config.lr_patience is not None:
            scheduler.step(score)

        checkpoint = snapshot(epoch, _metrics_of(record))
        begin_writing()
        if improved:
            save_checkpoint(checkpoint, str(out / BEST_CHECKPOINT))
        checkpoint.resume_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "history": history,
            "best_score": best_score,
            "best_epoch": best_epoch,
            "best_metrics": best_metrics,
            "stale_epochs": stale_epochs,
            "stop_reference": stop_reference,
            "spent_seconds": time.monotonic() - started,
            "start_metrics": start_metrics,
        }
        save_checkpoint(checkpoint, str(out / LAST_CHECKPOINT))
        write_file_atomic(out / HISTORY_FILE, json.dumps(history, indent=1).encode())
        if on_epoch is not None:  # once the epoch is saved: a run stopped from here resumes after it
            on_epoch(record)

        if stale_epochs >= config.patience:
            stop_reason = (f"early stop: no {monitor_key} improvement over {config.min_delta:g} for "
                               f"{config.patience} epochs")
            break
        elapsed = time.monotonic() - started
        if budget is not None and elapsed + record["seconds"] > budget * 60:
            stop_reason = f"time budget of {budget:g} minute{'' if budget == 1 else 's'} reached"
            break

    if not history:
        raise ValueError(f"no epoch was trained in '{out}' ({stop_reason})")
    result = TrainResult(out, history, best_epoch, best_metrics, stop_reason, start_metrics)
    logger.info("%s; best %s %.4f at epoch %d%s", stop_reason, monitor_key, best_score, best_epoch,
                ": the starting weights, which best.pt keeps" if best_epoch == 0 else "")
    return result


def adam_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Adam:
    """Adam over `model`'s parameters at the config's learning rate and weight decay."""
    return torch.optim.Adam(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                            fused=device.type in ("cuda", "cpu"))  # one kernel per step, not one per tensor


def gradient_scaler(config: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 autocast (CUDA without bf16); a pass-through otherwise."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and config.amp and not torch.cuda.is_bf16_supported())


def batch_loss(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, targets: torch.Tensor,
               layout: TrainingTarget, config: TrainConfig, device: torch.device,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, cell logits, cell masks) of one training batch: the segmentation loss of the cell
    channel, plus the distance map's where `layout` has one."""
    masks, weights, distance = layout.unpack(targets)
    with autocast_context(device, config.amp):
        logits = forward(images).float()
    loss = segmentation_loss(logits[:, :1], masks, config.loss, weights)
    if distance is not None:
        loss = loss + distance_map_loss(logits[:, -1:], distance)
    return loss, logits[:, :1], masks


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
    """Back-propagate `loss` and take one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


class EpochCounts:
    """Pixel counts (true positives, predicted, actual) of an epoch's training batches, summed
    where the batches are and read once (`counts`)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(3, dtype=torch.int64, device=device)
        self.pixels = 0

    def add(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        self.sums += torch.stack(((prediction & truth).sum(), prediction.sum(), truth.sum()))
        self.pixels += prediction.numel()

    def counts(self) -> ConfusionCounts:
        tp, predicted, actual = self.sums.tolist()
        return ConfusionCounts.from_totals(int(tp), int(predicted), int(actual), self.pixels)


MAX_LOADER_WORKERS = 8


def loader_workers(config: TrainConfig, device: torch.device) -> int:
    """Processes that prepare training crops: `config.loader_workers` when set; unset, none on CPU
    (its cores are busy training the model) and on CUDA one per spare core, at most
    MAX_LOADER_WORKERS (cropping and augmenting in the training process leaves a GPU mostly idle)."""
    if config.loader_workers is not None:
        return config.loader_workers
    if device.type != "cuda":
        return 0
    return max(0, min(MAX_LOADER_WORKERS, available_cores() - 1))


def _divergence(out: Path, epoch: int, what: str, optimizer: torch.optim.Optimizer, best_epoch: int) -> str:
    """One line: where training diverged, the likely cause, and what is kept."""
    kept = (f"'{out / BEST_CHECKPOINT}' of epoch {best_epoch} is kept" if best_epoch
            else f"the '{BEST_CHECKPOINT}' in '{out}' is kept" if (out / BEST_CHECKPOINT).exists()
            else "no checkpoint was written")
    return (f"training diverged in epoch {epoch}: {what}; the learning rate "
            f"({optimizer.param_groups[0]['lr']:g}) is probably too high, try a lower one (--lr, "
            f"training.learning_rate). Nothing of epoch {epoch} was saved; {kept}")


def _metrics_of(record: dict[str, float]) -> dict[str, float]:
    """An epoch's scores: its train_ and val_ figures, less the training speed."""
    return {key: value for key, value in record.items()
            if key.startswith(("val_", "train_")) and key != "train_crops_per_second"}


def _format_record(record: dict[str, float], epochs: int) -> str:
    shown = " ".join(
        f"{key} {record[key]:.4f}"
        for key in ("train_loss", "train_bce", "train_dice", "val_loss", "val_iou", "val_dice", "val_precision", "val_recall")
        if key in record
    )
    speed = f", {record['train_crops_per_second']:.1f} crops/s" if "train_crops_per_second" in record else ""
    return f"epoch {int(record['epoch'])}/{epochs} {shown} ({record['seconds']:.1f}s{speed})"
