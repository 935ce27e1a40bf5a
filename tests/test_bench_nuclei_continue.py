"""benchmarks.nuclei_continue: the shipped nuclei model trained on for more epochs of its own
recipe, starting from its weights at the learning rate its run ended with."""

from __future__ import annotations

import torch

from benchmarks.nuclei_continue import ENDING_LEARNING_RATE, continued_recipe, widened_start
from cellseg.build_bundled import build_nuclei
from cellseg.bundled import NucleiRecipe, shipped_checkpoint
from cellseg.checkpoint import load_checkpoint
from cellseg.synth import write_dataset
from tests.conftest import narrow_nuclei_checkpoint


def test_the_continued_recipe_is_the_shipped_one_started_from_the_shipped_weights(tmp_path):
    recipe = continued_recipe(shipped_checkpoint("nuclei"), 1, str(tmp_path / "data"))
    shipped = NucleiRecipe()
    assert recipe.model == shipped.model and recipe.data_dir == str(tmp_path / "data")
    changed = {key for key, value in recipe.training if getattr(shipped.training, key) != value}
    assert changed == {"init_from", "learning_rate", "epochs"}
    assert recipe.training.learning_rate == ENDING_LEARNING_RATE < shipped.training.learning_rate

    write_dataset(str(tmp_path / "data"), count=4, size=64, seed=4)
    small = recipe.model_copy(update={"training": recipe.training.model_copy(
        update={"patch_size": 48, "device": "cpu", "val_fraction": 0.5})})
    outcome = build_nuclei(tmp_path / "out", small)
    start, trained = load_checkpoint(shipped_checkpoint("nuclei")), load_checkpoint(str(outcome.best_checkpoint))
    assert trained.model_config == start.model_config  # the shipped architecture and cell size
    assert trained.train_config.learning_rate == ENDING_LEARNING_RATE and len(outcome.result.history) == 1
    moved = [key for key, value in trained.state_dict.items() if not torch.equal(value, start.state_dict[key])]
    distance = sum(float((value.float() - start.state_dict[key].float()).abs().sum()) for key, value in
                   trained.state_dict.items()) / sum(float(value.float().abs().sum()) for value in start.state_dict.values())
    assert moved and distance < 0.05  # fine-tuned: near the shipped weights, not trained afresh


def test_a_widened_start_is_the_network_wider_and_trains_on_from_there(tmp_path):
    narrow = str(narrow_nuclei_checkpoint(tmp_path / "narrow.pt"))  # the shipped recipe's network, width 4
    base = load_checkpoint(narrow)
    wider = base.model_config.base_width + 8
    start = widened_start(narrow, wider, tmp_path / "out")
    written = (tmp_path / "out" / f"widened-w{wider}.pt").stat().st_mtime_ns
    assert widened_start(narrow, wider, tmp_path / "out") == start  # once: a resume starts the same
    assert (tmp_path / "out" / f"widened-w{wider}.pt").stat().st_mtime_ns == written
    widened = load_checkpoint(start)
    assert widened.model_config == base.model_config.model_copy(update={"base_width": wider})
    assert widened.size_model is None and base.size_model is not None  # it read the narrower features
    assert widened.state_dict["stem.0.weight"].shape[0] == wider

    recipe = continued_recipe(start, 1, str(tmp_path / "data"), width=wider, max_minutes=30.0)
    assert recipe.model.base_width == wider and recipe.training.max_minutes == 30.0
    write_dataset(str(tmp_path / "data"), count=8, size=64, seed=4)  # 4 to train on: a size model's 12 examples
    small = recipe.model_copy(update={"training": recipe.training.model_copy(
        update={"patch_size": 48, "device": "cpu", "val_fraction": 0.5})})
    outcome = build_nuclei(tmp_path / "run", small)
    trained = load_checkpoint(str(outcome.best_checkpoint))
    assert trained.model_config.base_width == wider and trained.size_model is not None  # fitted at training's end
