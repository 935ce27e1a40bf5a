"""`python -m benchmarks.training_step`: the library's training step timed eager and compiled, with
the mode to train with chosen from the figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.training_step import MIN_SPEEDUP, bench_training_step, crop_batches
from cellseg.bundled import NucleiRecipe

REPO_ROOT = Path(__file__).resolve().parents[1]


def small_recipe() -> NucleiRecipe:
    recipe = NucleiRecipe()
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"base_width": 4, "depth": 2}),
                                     "training": recipe.training.model_copy(update={"patch_size": 32, "batch_size": 2})})


def test_the_batches_are_the_recipes_crops_with_their_targets():
    recipe = small_recipe()
    batches, crops = crop_batches(recipe, torch.device("cpu"), count=3)
    assert len(batches) == 3
    for images, targets in batches:
        assert images.shape == (2, 1, 32, 32)
        masks, weights, distance = crops.layout.unpack(targets)
        assert weights is None and distance is not None  # the recipe's distance map, no border weights
        assert set(masks.unique().tolist()) <= {0.0, 1.0}
        assert float(distance.min()) >= 0.0 and float(distance.max()) <= 1.0
    assert any(float(crops.layout.unpack(targets)[0].sum()) > 0 for _, targets in batches)  # cells in the crops


def test_each_mode_is_timed_and_the_faster_one_chosen():
    result = bench_training_step(small_recipe(), "cpu", ["off", "default"], seconds=0.5)
    eager, compiled = result["rows"]
    assert (eager["mode"], compiled["mode"]) == ("off", "default")
    assert not eager["compiled"] and compiled["compiled"]
    for row in result["rows"]:
        assert row["steps"] >= 3 and row["crops_per_second"] > 0 and row["losses_finite"]
        assert row["first_steps_seconds"] > 0
    assert eager["speedup"] == 1.0
    assert compiled["speedup"] == pytest.approx(compiled["crops_per_second"] / eager["crops_per_second"])
    assert result["best_mode"] == ("default" if compiled["speedup"] >= MIN_SPEEDUP else "off")
    assert (result["width"], result["crop"], result["batch_size"]) == (4, 32, 2)


@pytest.mark.integration
def test_the_command_writes_its_figures(tmp_path):
    out = tmp_path / "step.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.training_step", "--device", "cpu", "--modes", "off",
                          "--width", "4", "--crop", "32", "--batch-size", "2", "--seconds", "0.3", "--out", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [row["mode"] for row in result["rows"]] == ["off"] and result["best_mode"] == "off"
    assert "width 4, 2 crops of 32^2 per step" in run.stdout and "best mode: off" in run.stdout
