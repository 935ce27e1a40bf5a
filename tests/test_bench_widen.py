"""Widening a trained U-Net (benchmarks/widen.py) keeps what it computes."""

from __future__ import annotations

import pytest
import torch

from benchmarks.widen import widened_state_dict
from cellseg.config import ModelConfig
from cellseg.model import UNet


def _trained_looking(config: ModelConfig, seed: int) -> UNet:
    """A network whose norms' scales and shifts are not the identity they start as."""
    torch.manual_seed(seed)
    model = UNet(config)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if value.ndim == 1:
                value.copy_(torch.randn_like(value) * 0.5 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


@pytest.mark.parametrize("norm", ["instance", "none"])
def test_a_widened_network_computes_what_the_narrow_one_did(norm):
    config = ModelConfig(base_width=4, depth=3, norm=norm, distance_map=True, dropout=0.1)
    narrow = _trained_looking(config, seed=3)
    wide = UNet(config.model_copy(update={"base_width": 7})).eval()
    wide.load_state_dict(widened_state_dict(narrow.state_dict(), config, width=7, seed=1))
    image = torch.rand(2, 1, 40, 56)

    with torch.no_grad():
        expected, got = narrow(image), wide(image)

    assert got.shape == expected.shape == (2, 2, 40, 56)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert wide.stem[0].weight.shape[0] == 7 and wide.bottleneck[1][0].weight.shape[0] == 56


def test_noise_makes_the_copies_differ_and_moves_the_output_a_little():
    config = ModelConfig(base_width=4, depth=2)
    narrow = _trained_looking(config, seed=5)
    widened = widened_state_dict(narrow.state_dict(), config, width=8, seed=2, noise=0.01)
    wide = UNet(config.model_copy(update={"base_width": 8})).eval()
    wide.load_state_dict(widened)
    image = torch.rand(1, 1, 32, 32)

    with torch.no_grad():
        expected, got = narrow(image), wide(image)

    stem = widened["stem.0.weight"]
    assert not any(torch.equal(stem[i], stem[j]) for i in range(8) for j in range(i))
    assert 0 < (got - expected).abs().max() < 0.1 * expected.abs().max()


def test_only_instance_normalised_networks_are_widened_and_never_narrowed():
    batch = ModelConfig(base_width=4, depth=2, norm="batch")
    with pytest.raises(ValueError, match="instance norms"):
        widened_state_dict(UNet(batch).state_dict(), batch, width=8)
    config = ModelConfig(base_width=4, depth=2)
    with pytest.raises(ValueError, match="cannot be widened to 3"):
        widened_state_dict(UNet(config).state_dict(), config, width=3)
