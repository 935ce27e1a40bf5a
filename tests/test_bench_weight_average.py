"""benchmarks.weight_average: the nuclei recipe's weights kept epoch by epoch while it trains on
(benchmarks.nuclei_continue --keep-epochs), averaged, and given a size model of their own."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks.nuclei_continue import continued_recipe, epoch_keeper
from benchmarks.weight_average import average_weights, averaged_checkpoint, refit_size_model
from cellseg.build_bundled import build_nuclei
from cellseg.bundled import shipped_checkpoint
from cellseg.checkpoint import load_checkpoint, save_checkpoint
from cellseg.config import ModelConfig
from cellseg.synth import write_dataset
from tests.conftest import narrow_nuclei_checkpoint

NARROW = 4


def test_epochs_kept_while_training_are_averaged_and_get_a_size_model_of_their_own(tmp_path):
    data = tmp_path / "data"
    write_dataset(str(data), count=8, size=64, seed=4)
    start_path = narrow_nuclei_checkpoint(tmp_path / "narrow.pt", NARROW)
    start = dataclasses.replace(load_checkpoint(str(start_path)), size_model=None)
    recipe = continued_recipe(str(start_path), 2, str(data), width=NARROW)
    recipe = recipe.model_copy(update={"training": recipe.training.model_copy(
        update={"patch_size": 48, "device": "cpu", "val_fraction": 0.5})})
    out = tmp_path / "run"
    build_nuclei(out, recipe, on_epoch=epoch_keeper(out))

    kept = [load_checkpoint(str(out / "epochs" / f"epoch-{epoch}.pt")) for epoch in (1, 2)]
    assert [checkpoint.epoch for checkpoint in kept] == [1, 2]
    assert kept[1].state_dict.keys() == kept[0].state_dict.keys()
    assert any(not torch.equal(value, kept[1].state_dict[name]) for name, value in kept[0].state_dict.items())

    base = dataclasses.replace(start, threshold=0.45, centre_prominence=0.12)  # post-processing of its own
    average = averaged_checkpoint(base, kept)
    for name, value in average.state_dict.items():
        expected = ((kept[0].state_dict[name].double() + kept[1].state_dict[name].double()) / 2).to(value.dtype)
        assert torch.equal(value, expected), name
    assert average.resume_state is None and average.epoch == base.epoch

    url = str(tmp_path / "average.pt")
    save_checkpoint(average, url)
    refitted = refit_size_model(url, recipe)
    assert load_checkpoint(url).size_model == refitted.size_model is not None
    assert base.size_model is None  # so the average's size model was fitted on these images' features
    assert (refitted.threshold, refitted.centre_prominence) == (0.45, 0.12)  # the base's, not decided again
    assert all(torch.equal(value, average.state_dict[name]) for name, value in refitted.state_dict.items())


def test_checkpoints_of_different_networks_are_not_averaged():
    shipped = load_checkpoint(shipped_checkpoint("nuclei"))
    other = dataclasses.replace(shipped, model_config=ModelConfig(base_width=8, depth=2),
                                state_dict={"weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="different networks"):
        average_weights([shipped, other])
    with pytest.raises(ValueError, match="base's network"):
        averaged_checkpoint(other, [shipped])
    with pytest.raises(ValueError, match="no checkpoints"):
        average_weights([])
