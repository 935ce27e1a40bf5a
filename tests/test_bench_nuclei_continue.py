"""benchmarks.nuclei_continue: the shipped nuclei model trained on for more epochs of its own
recipe, starting from its weights at the learning rate its run ended with."""

from __future__ import annotations

import torch

from benchmarks.nuclei_continue import ENDING_LEARNING_RATE, continued_recipe
from cellseg.build_bundled import build_nuclei
from cellseg.bundled import NucleiRecipe, shipped_checkpoint
from cellseg.checkpoint import load_checkpoint
from cellseg.synth import write_dataset


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
