"""U-Net shapes for odd sizes, raw logits, dropout in train vs eval, batch independence."""

from __future__ import annotations

import math

import pytest
import torch

from cellseg.config import MAX_WIDTH, ModelConfig
from cellseg.model import MAX_PARAMETERS, UNet, expected_state

NORMS = ("group", "batch", "instance", "none")
# Odd sides, a side that is already a multiple, sides at or below 2**depth (a 1x1 bottleneck
# before padding) and a single pixel.
SIZES = ((1, 1), (2, 3), (16, 16), (17, 33), (37, 101), (64, 64))


def small_unet(seed: int = 0, **fields) -> UNet:
    torch.manual_seed(seed)
    return UNet(ModelConfig(**{"base_width": 4, "depth": 2, **fields}))


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("depth", [1, 2, 3, 4])
def test_output_height_and_width_equal_the_input(norm, depth):
    model = small_unet(depth=depth, norm=norm).eval()
    assert model.size_multiple == 2**depth
    with torch.no_grad():
        for height, width in SIZES:
            out = model(torch.rand(1, 1, height, width))
            assert out.shape == (1, 1, height, width), (height, width)


@pytest.mark.parametrize("norm", NORMS)
def test_train_mode_keeps_shape_for_an_odd_batch(norm):
    model = small_unet(depth=3, norm=norm).train()
    assert model(torch.rand(2, 1, 17, 33)).shape == (2, 1, 17, 33)


def test_channels_follow_the_config():
    model = small_unet(in_channels=3, out_channels=2).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 19, 21)).shape == (2, 2, 19, 21)


def test_output_is_raw_logits_not_probabilities():
    model = small_unet().eval()
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(-3.0)
        low = model(torch.rand(1, 1, 12, 20))
        model.head.bias.fill_(2.5)
        high = model(torch.rand(1, 1, 12, 20))
    # no sigmoid after the head: the head's bias comes out unchanged, outside [0, 1]
    assert torch.equal(low, torch.full_like(low, -3.0))
    assert torch.equal(high, torch.full_like(high, 2.5))


def test_gradient_reaches_every_parameter():
    model = small_unet(depth=3, dropout=0.0).train()
    model(torch.rand(2, 1, 24, 24)).square().mean().backward()
    missing = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert missing == []
    assert model.stem[0].weight.grad.abs().sum() > 0  # first conv, through the whole network


def test_eval_is_deterministic_with_dropout():
    model = small_unet(dropout=0.5).eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), model(x))


def test_train_mode_applies_dropout():
    model = small_unet(dropout=0.5).train()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert not torch.allclose(first, second)


def test_train_mode_without_dropout_is_deterministic():
    # The contrast for the test above: the randomness in train mode comes from dropout alone.
    model = small_unet(dropout=0.0).train()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), model(x))


@pytest.mark.parametrize("norm", ["group", "instance", "batch"])
def test_batch_of_two_equals_each_item_alone_in_eval(norm):
    model = small_unet(depth=3, dropout=0.3, norm=norm).eval()
    x = torch.rand(2, 1, 24, 40)
    with torch.no_grad():
        together = model(x)
        apart = torch.cat([model(x[:1]), model(x[1:])])
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-5)


def test_groupnorm_items_do_not_influence_each_other_in_train_mode():
    model = small_unet(depth=3, dropout=0.0, norm="group").train()
    x = torch.rand(2, 1, 24, 24)
    other = x.clone()
    other[1] = torch.rand(1, 24, 24)  # change only the second item
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], model(other)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", [ModelConfig(), ModelConfig(depth=2, base_width=4, norm="batch", distance_map=True)])
def test_expected_state_is_the_state_dict_of_the_network(config):
    expected = {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in UNet(config).state_dict().items()}
    assert expected_state(config) == expected


def test_the_widest_network_a_config_allows_stays_under_the_parameter_bound():
    for depth in range(1, 8):
        config = ModelConfig(depth=depth, base_width=MAX_WIDTH // 2**depth, in_channels=16, out_channels=16,
                             distance_map=True)
        assert sum(math.prod(shape) for shape, _ in expected_state(config).values()) <= MAX_PARAMETERS
    with pytest.raises(ValueError, match="4096 channels in the bottleneck; at most 2048"):
        ModelConfig(depth=5, base_width=128)
