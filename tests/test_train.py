"""Training loop: learning, early stopping, history, checkpoints, determinism and resume."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from cellseg.checkpoint import load_checkpoint, save_checkpoint
from cellseg.config import ModelConfig, TrainConfig
from cellseg.loaded_pairs import load_pairs, manifest_hash
from cellseg.pairs import pair_images_and_masks, split_train_val
from cellseg.runtime import resolve_device
from cellseg.train import MAX_LOADER_WORKERS, loader_workers, train

SMALL_MODEL = ModelConfig(depth=3, base_width=8)
HISTORY_KEYS = {
    "epoch", "train_loss", "train_iou", "train_dice", "train_precision", "train_recall",
    "val_loss", "val_iou", "val_dice", "val_precision", "val_recall", "val_dice_pooled", "seconds",
}


def small_config(**overrides) -> TrainConfig:
    settings = {"epochs": 3, "patch_size": 64, "patches_per_image": 1, "device": "cpu", "seed": 0, "max_minutes": None}
    settings.update(overrides)
    return TrainConfig(**settings)


def test_short_training_reaches_high_validation_dice(split, tmp_path):
    train_pairs, val_pairs = split
    config = small_config(epochs=10, patch_size=96, patches_per_image=2, patience=10)
    result = train(train_pairs, val_pairs, tmp_path, SMALL_MODEL, config)
    best = max(record["val_dice"] for record in result.history)
    assert best > 0.85
    assert result.history[0]["val_dice"] < best
    assert result.best_metrics["val_dice"] == best


def test_history_file_records_every_epoch(split, tmp_path):
    result = train(*split, tmp_path, SMALL_MODEL, small_config(epochs=2))
    history = json.loads((tmp_path / "history.json").read_text())
    assert [record["epoch"] for record in history] == [1, 2]
    assert history[0].keys() >= HISTORY_KEYS
    assert history == json.loads(json.dumps(result.history))
    for record in history:
        for key in HISTORY_KEYS - {"epoch", "seconds", "train_loss", "val_loss"}:
            assert 0.0 <= record[key] <= 1.0

    assert "train_bce" not in history[0]  # the objective is plain BCE, as val_loss is


def test_a_run_whose_objective_adds_terms_records_the_bce_that_compares_with_val_loss(split, tmp_path):
    """val_loss is the cell channel's plain BCE; the training loss adds the soft Dice here, so the
    two curves did not compare. train_bce is the crops' plain BCE, the objective less the Dice."""
    result = train(*split, tmp_path, SMALL_MODEL, small_config(epochs=2, loss="bce_dice"))
    for record in result.history:
        dice_term = record["train_loss"] - record["train_bce"]
        assert 0.0 < dice_term < 1.0, record  # a soft Dice loss, averaged as the objective is
        assert record["train_bce"] < 1.0 and record["val_loss"] < 1.0
    assert "train_bce" in result.best_metrics


def test_early_stopping_stops_after_patience_epochs_without_improvement(split, tmp_path):
    """No epoch can beat the first by a Dice of 1.0, so training stops after 1 + patience epochs.
    best.pt is still the best of them: a gain under min_delta counts for it (it kept epoch 1)."""
    config = small_config(epochs=10, patience=2, min_delta=1.0)
    result = train(*split, tmp_path, SMALL_MODEL, config)
    assert len(result.history) == 3
    scores = [record["val_dice"] for record in result.history]
    assert result.best_epoch == 1 + scores.index(max(scores)) > 1, scores
    assert load_checkpoint(str(result.best_checkpoint)).epoch == result.best_epoch
    assert "early stop" in result.stop_reason


def test_best_checkpoint_holds_the_best_epoch(split, tmp_path):
    train_pairs, val_pairs = split
    digest = manifest_hash(train_pairs + val_pairs)
    result = train(train_pairs, val_pairs, tmp_path, SMALL_MODEL, small_config(epochs=3), dataset_manifest_hash=digest)
    best = load_checkpoint(str(result.best_checkpoint))
    record = result.history[result.best_epoch - 1]
    assert best.epoch == result.best_epoch
    assert best.metrics["val_dice"] == record["val_dice"]
    # The metrics it carries (and the registry and an export copy) are scores, not this machine's speed.
    assert set(best.metrics) == {f"{split}_{name}" for split in ("train", "val")
                                 for name in ("loss", "iou", "dice", "precision", "recall")} | {"val_dice_pooled"}
    assert result.best_metrics == best.metrics
    assert best.dataset_manifest_hash == digest
    assert best.model_config == SMALL_MODEL
    assert best.train_config.epochs == 3
    assert best.resume_state is None
    assert load_checkpoint(str(result.last_checkpoint)).epoch == len(result.history)


def test_same_seed_gives_identical_runs(split, tmp_path):
    first = train(*split, tmp_path / "a", SMALL_MODEL, small_config())
    second = train(*split, tmp_path / "b", SMALL_MODEL, small_config())

    def strip(history):
        return [{k: v for k, v in r.items() if k not in ("seconds", "train_crops_per_second")} for r in history]

    assert strip(first.history) == strip(second.history)


def test_training_on_one_image_warns_that_best_pt_is_chosen_on_it(split, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cellseg.train"):
        result = train(split[0][:1], [], tmp_path / "one", SMALL_MODEL, small_config(epochs=1))
    assert result.best_checkpoint.is_file()
    assert ("no validation images (one image cannot be split): best.pt is the epoch that fits the training images "
            "best") in caplog.text


def test_loader_processes_give_the_same_run_as_the_training_process(split, tmp_path, caplog):
    caplog.set_level("INFO", logger="cellseg.train")
    inline = train(*split, tmp_path / "inline", SMALL_MODEL, small_config(epochs=2, batch_size=2, augment=True))
    forked = train(*split, tmp_path / "forked", SMALL_MODEL,
                   small_config(epochs=2, batch_size=2, augment=True, loader_workers=2))

    assert "with 2 loader processes" in caplog.text
    inline_weights = load_checkpoint(str(inline.last_checkpoint)).state_dict
    forked_weights = load_checkpoint(str(forked.last_checkpoint)).state_dict
    for name, tensor in inline_weights.items():
        assert torch.equal(tensor, forked_weights[name]), name


def test_loader_processes_by_default_only_on_cuda():
    assert loader_workers(small_config(), torch.device("cpu")) == 0
    assert 0 <= loader_workers(small_config(), torch.device("cuda")) <= MAX_LOADER_WORKERS
    assert loader_workers(small_config(loader_workers=3), torch.device("cpu")) == 3


def test_resume_continues_exactly_like_an_uninterrupted_run(split, tmp_path):
    uninterrupted = train(*split, tmp_path / "full", SMALL_MODEL, small_config(epochs=4))
    train(*split, tmp_path / "cut", SMALL_MODEL, small_config(epochs=2))
    resumed = train(*split, tmp_path / "cut", SMALL_MODEL, small_config(epochs=4), resume=True)

    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert [r["val_loss"] for r in resumed.history] == [r["val_loss"] for r in uninterrupted.history]
    full_weights = load_checkpoint(str(uninterrupted.last_checkpoint)).state_dict
    resumed_weights = load_checkpoint(str(resumed.last_checkpoint)).state_dict
    for name, tensor in full_weights.items():
        assert torch.equal(tensor, resumed_weights[name]), name


@pytest.mark.parametrize("damage", [
    lambda state: state.update(optimizer={"state": "garbage"}),
    lambda state: state.pop("stale_epochs"),
    lambda state: state.update(best_score="high"),
], ids=["optimizer state", "missing entry", "not a number"])
def test_a_training_state_that_does_not_fit_is_one_error_naming_the_file(split, tmp_path, damage):
    """Such a last.pt used to end `--resume` in a traceback about keys and parameter groups."""
    train(*split, tmp_path / "run", SMALL_MODEL, small_config(epochs=1))
    last = load_checkpoint(str(tmp_path / "run" / "last.pt"))
    damage(last.resume_state)
    save_checkpoint(last, str(tmp_path / "run" / "last.pt"))
    with pytest.raises(ValueError, match=r"last\.pt' cannot be resumed: its saved training state does not fit this run"):
        train(*split, tmp_path / "run", SMALL_MODEL, small_config(epochs=2), resume=True)


def test_a_stop_file_ends_training_after_the_epoch_and_resume_goes_on(split, tmp_path, caplog):
    stop = tmp_path / "run" / "STOP"

    def after_epoch(record):
        if record["epoch"] == 2:
            stop.touch()

    stopped = train(*split, tmp_path / "run", SMALL_MODEL, small_config(epochs=4), on_epoch=after_epoch)
    assert [r["epoch"] for r in stopped.history] == [1, 2]
    assert "STOP exists" in stopped.stop_reason
    assert train(*split, tmp_path / "run", SMALL_MODEL, small_config(epochs=4), resume=True).history == stopped.history
    stop.unlink()
    with caplog.at_level(logging.WARNING, logger="cellseg.train"):
        resumed = train(*split, tmp_path / "run", SMALL_MODEL, small_config(epochs=4, learning_rate=3e-5), resume=True)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    assert resumed.history[0]["train_crops_per_second"] > 0
    # The saved optimizer goes on at its own rate, said so: a new learning rate takes a new run.
    assert "learning_rate 3e-05 and weight_decay 0 apply to a new run" in caplog.text


def test_crops_by_area_balance_large_and_small_images():
    import numpy as np

    from cellseg.dataset import TrainingDataset, crops_by_area
    from cellseg.loaded_pairs import LoadedPair

    assert crops_by_area((128, 128), 128, 2) == 2
    assert crops_by_area((512, 512), 128, 2) == 8  # 16 patches of area: 2 * sqrt(16)
    assert crops_by_area((2048, 2048), 128, 2) == 8  # capped at 4x
    assert crops_by_area((64, 64), 128, 2) == 1
    pairs = [LoadedPair(source=None, image=np.zeros(shape, np.float32), mask=np.zeros(shape, bool),
                        image_sha256=str(index), mask_sha256=str(index), dtype="uint8")
             for index, shape in enumerate([(512, 512), (64, 64)])]
    dataset = TrainingDataset(pairs, patch_size=128, patches_per_image=2, patch_sampling="by_area")
    assert len(dataset) == 9
    assert all(dataset[index][0].shape == (1, 128, 128) for index in (0, 8))
    assert len(TrainingDataset(pairs, patch_size=128, patches_per_image=2)) == 4  # per_image: the default


def test_validation_loss_can_be_monitored(split, tmp_path):
    result = train(*split, tmp_path, SMALL_MODEL, small_config(monitor="val_loss"))
    losses = [record["val_loss"] for record in result.history]
    assert result.best_epoch == losses.index(min(losses)) + 1


def test_without_validation_images_the_training_metric_is_monitored(split, tmp_path):
    train_pairs, _ = split
    result = train(train_pairs, [], tmp_path, SMALL_MODEL, small_config(epochs=2))
    assert "val_dice" not in result.history[0]
    assert result.best_metrics["train_dice"] == max(r["train_dice"] for r in result.history)


def test_resolve_device_refuses_cuda_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_on_cuda_with_mixed_precision(split, tmp_path):
    result = train(*split, tmp_path, SMALL_MODEL, small_config(device="cuda", amp=True, epochs=2))
    assert load_checkpoint(str(result.best_checkpoint)).state_dict["head.weight"].device.type == "cpu"
    assert result.history[-1]["val_dice"] > 0


def test_soft_dice_loss_by_hand():
    from cellseg.losses import segmentation_loss, soft_dice_loss

    logits = torch.tensor([[[[10.0, -10.0], [10.0, -10.0]]]])  # probabilities ~1, 0, 1, 0
    targets = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    # overlap 2, totals 2 + 3: 1 - (4 + 1) / (5 + 1)
    assert soft_dice_loss(logits, targets).item() == pytest.approx(1 - 5 / 6, abs=1e-4)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert segmentation_loss(logits, targets, "bce").item() == pytest.approx(bce.item())
    assert segmentation_loss(logits, targets, "bce_dice").item() == pytest.approx(bce.item() + 1 - 5 / 6, abs=1e-4)
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss(logits, targets, "focal")


def test_training_with_bce_dice_and_full_augmentation_learns(split, tmp_path):
    from cellseg.config import AugmentationConfig

    config = small_config(epochs=3).model_copy(update={"loss": "bce_dice", "augmentation": AugmentationConfig.strong()})
    result = train(*split, tmp_path, SMALL_MODEL, config)
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_fine_tuning_starts_from_the_checkpoint_and_can_freeze_the_encoder(split, tmp_path):
    first = train(*split, tmp_path / "first", SMALL_MODEL, small_config(epochs=3))
    start = load_checkpoint(str(first.best_checkpoint)).state_dict
    config = small_config(epochs=1, init_from=str(first.best_checkpoint), freeze_encoder_epochs=1)
    tuned = train(*split, tmp_path / "tuned", SMALL_MODEL, config)
    weights = load_checkpoint(str(tuned.last_checkpoint)).state_dict
    frozen = [name for name in start if name.startswith(("stem.", "encoder."))]
    assert frozen and all(torch.equal(weights[name], start[name]) for name in frozen)
    assert any(not torch.equal(weights[name], start[name]) for name in start if name.startswith("decoder."))
    # Starting from trained weights, the first epoch is already as good as the run it came from.
    scratch = train(*split, tmp_path / "scratch", SMALL_MODEL, small_config(epochs=1))
    assert tuned.history[0]["val_dice"] > scratch.history[0]["val_dice"]


def test_fine_tuning_keeps_the_starting_weights_as_best_until_an_epoch_beats_them(split, tmp_path, caplog):
    """Epochs at a learning rate of 0.5 throw the weights off: best.pt keeps the starting weights
    (epoch 0), and the run says so, where before the first epoch always became best. A resumed run
    keeps that baseline."""
    first = train(*split, tmp_path / "first", SMALL_MODEL, small_config(epochs=2))
    start = load_checkpoint(str(first.best_checkpoint))
    config = small_config(epochs=1, init_from=str(first.best_checkpoint), learning_rate=0.5)
    with caplog.at_level("INFO", logger="cellseg.train"):
        tuned = train(*split, tmp_path / "tuned", SMALL_MODEL, config)

    assert tuned.start_metrics is not None and tuned.start_metrics.keys() == {
        key for key in HISTORY_KEYS if key.startswith("val_")}
    assert tuned.best_epoch == 0 and tuned.best_metrics == tuned.start_metrics
    assert "best epoch 0 of 1 (the starting weights" in tuned.best_described
    best = load_checkpoint(str(tuned.best_checkpoint))
    assert best.epoch == 0 and best.metrics == tuned.start_metrics
    assert all(torch.equal(best.state_dict[name], tensor) for name, tensor in start.state_dict.items())
    last = load_checkpoint(str(tuned.last_checkpoint))
    assert last.epoch == 1 and any(not torch.equal(last.state_dict[name], tensor)
                                   for name, tensor in start.state_dict.items())
    assert [record["epoch"] for record in json.loads((tmp_path / "tuned" / "history.json").read_text())] == [1]
    assert "epoch 0/1 val_loss" in caplog.text and "the starting weights, which best.pt keeps" in caplog.text

    resumed = train(*split, tmp_path / "tuned", SMALL_MODEL, config.model_copy(update={"epochs": 2}), resume=True)
    assert resumed.start_metrics == tuned.start_metrics
    assert len(resumed.history) == 2
    # The resumed epoch is measured against the start's score: whether it beats it depends on the
    # CPU's arithmetic (it did on an AMD EPYC with AVX2, not on an Intel Xeon with AMX); either way
    # best.pt holds whichever scored best.
    monitor, higher = config.monitor, config.monitor != "val_loss"
    second = resumed.history[1][monitor]
    beat = second > tuned.start_metrics[monitor] if higher else second < tuned.start_metrics[monitor]
    assert resumed.best_epoch == (2 if beat else 0)
    assert resumed.best_metrics[monitor] == second if beat else resumed.best_metrics == tuned.start_metrics
    assert load_checkpoint(str(resumed.best_checkpoint)).epoch == resumed.best_epoch


def test_an_epoch_that_beats_the_starting_weights_becomes_best(split, tmp_path):
    """Fine-tuning weights of one short epoch: training improves on them, and the start stays on record."""
    first = train(*split, tmp_path / "first", SMALL_MODEL, small_config(epochs=1))
    config = small_config(epochs=4, patch_size=96, patches_per_image=2, init_from=str(first.best_checkpoint))
    tuned = train(*split, tmp_path / "tuned", SMALL_MODEL, config)
    assert tuned.start_metrics is not None and tuned.best_epoch >= 1
    assert tuned.best_metrics["val_dice"] > tuned.start_metrics["val_dice"]
    assert load_checkpoint(str(tuned.best_checkpoint)).epoch == tuned.best_epoch
    # From scratch there is no start to score.
    assert first.start_metrics is None


def test_fine_tuning_refuses_a_checkpoint_of_another_architecture(split, tmp_path):
    first = train(*split, tmp_path / "first", SMALL_MODEL, small_config(epochs=1))
    other = SMALL_MODEL.model_copy(update={"base_width": SMALL_MODEL.base_width * 2})
    width = SMALL_MODEL.base_width
    with pytest.raises(ValueError, match=rf"holds a model built with base_width {width} \(this run: {2 * width}\); "
                                         "fine-tune with the checkpoint's model config$"):
        train(*split, tmp_path / "other", other, small_config(epochs=1, init_from=str(first.best_checkpoint)))
    with pytest.raises(ValueError, match=rf"holds a model built with base_width {width} \(this run: {2 * width}\); "
                                         "resume with the run's model settings$"):
        train(*split, tmp_path / "first", other, small_config(epochs=2), resume=True)


def test_a_distance_map_output_learns_each_cells_distance_to_its_outline(synthetic_dataset, tmp_path):
    import numpy as np

    from cellseg.config import PredictConfig
    from cellseg.infer import Predictor
    from cellseg.targets import normalised_distance

    pairs = pair_images_and_masks(str(synthetic_dataset / "images"), str(synthetic_dataset / "labels"))
    train_pairs, val_pairs = (load_pairs(p, SMALL_MODEL.normalization) for p in split_train_val(pairs, 0.25, seed=0))
    model = SMALL_MODEL.model_copy(update={"distance_map": True})
    result = train(train_pairs, val_pairs, tmp_path, model, small_config(epochs=8, patch_size=96, patches_per_image=2))
    checkpoint = load_checkpoint(str(result.best_checkpoint))
    assert checkpoint.model_config.distance_map and checkpoint.state_dict["head.weight"].shape[0] == 2
    assert result.best_metrics["val_dice"] > 0.8  # the cell output learns as without the second one

    predictor = Predictor(checkpoint, PredictConfig(device="cpu", amp=False))
    for pair, maps in zip(val_pairs, predictor.normalised_cell_maps([pair.image for pair in val_pairs]), strict=True):
        assert maps.distance.shape == maps.probability.shape == pair.image.shape
        assert maps.distance.min() >= 0.0 and maps.distance.max() <= 1.0
        # Inside the cells, where the image and the cell probability say little about where a
        # cell's centre is (correlations 0.2-0.55 here), the map follows the true distance.
        inside = pair.instances > 0
        truth = normalised_distance(pair.instances)[inside]
        learnt = np.corrcoef(maps.distance[inside], truth)[0, 1]
        assert learnt > 0.6, (pair.id, learnt)
        for other in (pair.image, maps.probability):
            assert learnt > np.corrcoef(other[inside], truth)[0, 1] + 0.15, pair.id
    # A model without the output has no map, and its cells are split at necks of the mask as before.
    cut = dataclasses.replace(checkpoint, model_config=SMALL_MODEL, state_dict=_without_distance(checkpoint.state_dict))
    plain = Predictor(cut, PredictConfig(device="cpu", amp=False))
    (maps,) = plain.normalised_cell_maps([val_pairs[0].image])
    assert maps.distance is None
    # Equal up to float rounding: a head of one output channel may take another convolution kernel
    # than a head of two (seen at one torch thread).
    np.testing.assert_allclose(maps.probability, predictor.normalised_probabilities([val_pairs[0].image])[0],
                               rtol=0, atol=1e-6)


def _without_distance(state_dict):
    """The weights of a distance-map model with its second output channel cut off."""
    return {name: value[:1] if name.startswith("head.") else value for name, value in state_dict.items()}


def test_automatic_fields_are_decided_from_the_training_masks(synthetic_dataset, split, caplog):
    import logging

    from cellseg.train import decide_automatic_fields

    binary_pairs, _ = split
    label_pairs = load_pairs(pair_images_and_masks(str(synthetic_dataset / "images"), str(synthetic_dataset / "labels")),
                             SMALL_MODEL.normalization)
    automatic = SMALL_MODEL.model_copy(update={"cell_diameter": "auto"})
    assert decide_automatic_fields(SMALL_MODEL, label_pairs) == SMALL_MODEL  # nothing to decide by default
    with caplog.at_level(logging.INFO, logger="cellseg"):
        decided = decide_automatic_fields(automatic, label_pairs)
    assert decided.cell_diameter is None
    assert "cell size: images at their own scale (their cell sizes agree)" in caplog.text
    # Half the images enlarged 3x: their sizes now differ, so the model works at one size.
    from cellseg.scale import resize, scaled_shape

    mixed = [pair if index % 2 else dataclasses.replace(
        pair, image=resize(pair.image, scaled_shape(pair.image.shape, 3.0), order=1),
        mask=resize(pair.mask, scaled_shape(pair.image.shape, 3.0), order=0),
        instances=resize(pair.instances, scaled_shape(pair.image.shape, 3.0), order=0))
        for index, pair in enumerate(label_pairs)]
    with caplog.at_level(logging.INFO, logger="cellseg"):
        sized = decide_automatic_fields(automatic, mixed).cell_diameter
    assert sized is not None and sized * 2 % 1 == 0
    assert f"cell size: {sized:g} px, the median cell of the training images, whose sizes differ" in caplog.text
    # Fine-tuning takes it from the checkpoint it starts from.
    initial = SMALL_MODEL.model_copy(update={"cell_diameter": 30.0})
    assert decide_automatic_fields(automatic, binary_pairs, initial) == initial
    # A config never built by training (a checkpoint, a bare network) has 'auto' off.
    assert automatic.without_auto() == SMALL_MODEL
