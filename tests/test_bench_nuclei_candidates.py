"""benchmarks.nuclei_candidates: each candidate is the shipped recipe with only its own changes."""

from __future__ import annotations

import pytest

from benchmarks.nuclei_candidates import CANDIDATES, GPU_TRAINING, candidate_recipe
from cellseg.bundled import NucleiRecipe


@pytest.mark.parametrize("name", sorted(CANDIDATES))
def test_a_candidate_changes_the_recipe_only_where_it_says(name):
    shipped, change = NucleiRecipe(), CANDIDATES[name]
    recipe = candidate_recipe(name, 3.5)
    NucleiRecipe.model_validate(recipe.model_dump())  # a valid recipe, nested configs included
    assert recipe.model == shipped.model.model_copy(update=change.get("model", {}))
    expected = GPU_TRAINING | {"max_minutes": 3.5} | change.get("training", {})
    changed = {key for key, value in recipe.training if getattr(shipped.training, key) != value}
    assert changed == {key for key, value in expected.items() if getattr(shipped.training, key) != value}


def test_the_compile_mode_changes_only_how_the_steps_run():
    plain, compiled = candidate_recipe("w48_balanced", 3.5), candidate_recipe("w48_balanced", 3.5, compile_mode="default")
    assert plain.training.compile == "off" and compiled.training.compile == "default"
    assert compiled.model_copy(update={"training": compiled.training.model_copy(update={"compile": "off"})}) == plain
