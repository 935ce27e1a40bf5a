"""benchmarks.checkpoint_bf16: a checkpoint halved for a transfer comes back as a checked cellseg
checkpoint with the bf16-rounded weights and every other field as it was."""

from __future__ import annotations

import pytest
import torch

from benchmarks.checkpoint_bf16 import halve, restore
from cellseg.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from cellseg.config import ModelConfig, TrainConfig
from cellseg.model import UNet, feature_count


@pytest.fixture()
def original(tmp_path) -> str:
    torch.manual_seed(3)
    config = ModelConfig(depth=2, base_width=16, distance_map=True)  # weights outweigh the file's other bytes
    path = str(tmp_path / "full.pt")
    features = feature_count(config)
    size_model = {"coefficients": [0.5] * features, "intercept": 2.0, "feature_mean": [0.1] * features,
                  "feature_scale": [1.5] * features, "penalty": 10.0}
    save_checkpoint(Checkpoint(model_config=config, state_dict=UNet(config).state_dict(),
                               train_config=TrainConfig(device="cpu", max_minutes=None), metrics={"val_loss": 0.25},
                               epoch=9, threshold=0.4, centre_prominence=0.2,
                               size_model=size_model), path)
    return path


@pytest.mark.parametrize("keep_bf16", [False, True])
def test_a_halved_checkpoint_restores_with_rounded_weights_and_the_same_fields(original, tmp_path, keep_bf16):
    halve(original, tmp_path / "half.pt")
    assert (tmp_path / "half.pt").stat().st_size < 0.6 * (tmp_path / "full.pt").stat().st_size
    restore(tmp_path / "half.pt", tmp_path / "back.pt", torch.bfloat16 if keep_bf16 else torch.float32)
    full, back = load_checkpoint(original), load_checkpoint(str(tmp_path / "back.pt"))  # digest checked
    for name, weight in full.state_dict.items():
        assert back.state_dict[name].dtype == (torch.bfloat16 if keep_bf16 else torch.float32)
        assert torch.equal(back.state_dict[name].float(), weight.bfloat16().float()), name
    assert (back.model_config, back.epoch, back.threshold, back.centre_prominence, back.size_model, back.metrics) == \
        (full.model_config, full.epoch, full.threshold, full.centre_prominence, full.size_model, full.metrics)
    assert next(back.build_model().parameters()).dtype == torch.float32  # loading widens stored bf16
    with pytest.raises(SystemExit, match="exists"):
        restore(tmp_path / "half.pt", tmp_path / "back.pt")
