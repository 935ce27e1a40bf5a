"""The compiled instance norm + ReLU of CPU inference: torch's values, in place, in the network."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from cellseg.config import ModelConfig
from cellseg.fused_norm import fuses, instance_norm_relu
from cellseg.model import InstanceNorm, InstanceNormReLU, UNet
from cellseg.runtime import autocast_context


def reference(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """relu(instance_norm) in float64, rounded to bf16 once."""
    normalised = F.instance_norm(x.double(), weight=None if weight is None else weight.double(),
                                 bias=None if bias is None else bias.double(), eps=1e-5)
    return F.relu(normalised).to(torch.bfloat16)


@pytest.mark.parametrize(("batch", "channels", "height", "width"), [
    (1, 16, 64, 64),   # the default network's first level: rows of 4 pixels' channels
    (2, 3, 17, 29),    # a batch; channels that do not divide a row, and an element count that leaves a tail
    (1, 48, 9, 7),     # a width-48 network's first level
    (1, 256, 4, 4),    # more channels than a row holds
    (1, 1, 5, 3),      # one channel: channels-first and channels-last at once
])
@pytest.mark.parametrize("affine", [True, False])
def test_it_gives_torchs_relu_of_the_instance_norm_rounded_to_bf16(batch, channels, height, width, affine):
    torch.manual_seed(channels + height)
    x = (torch.randn(batch, channels, height, width) * 4 + 3).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last)
    weight, bias = (torch.rand(channels) + 0.5, torch.randn(channels)) if affine else (None, None)
    expected = reference(x, weight, bias)
    assert fuses(x)
    result = instance_norm_relu(x.clone(memory_format=torch.channels_last), weight, bias, 1e-5)
    assert result.dtype == torch.bfloat16 and result.shape == x.shape
    assert result.is_contiguous(memory_format=torch.channels_last)
    # The float64 moments and one rounding: at most one bf16 step from the float64 result, most exact.
    step = torch.maximum(expected.float().abs(), result.float().abs()) * 2.0**-7 + 1e-6
    assert ((result.float() - expected.float()).abs() <= step).all()
    assert (result == expected).float().mean() > 0.97
    assert (result >= 0).all()


@pytest.mark.parametrize(("batch", "channels", "height", "width"), [(2, 16, 33, 20), (1, 48, 9, 7), (1, 256, 4, 4)])
def test_in_float32_it_gives_torchs_relu_of_the_instance_norm(batch, channels, height, width):
    """CPUs without native bf16 (or `amp=false`) run the network in float32: the same two passes."""
    torch.manual_seed(channels)
    x = (torch.randn(batch, channels, height, width) * 4 + 3).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    expected = F.relu(F.instance_norm(x, weight=weight, bias=bias, eps=1e-5))
    assert fuses(x)
    result = instance_norm_relu(x.clone(memory_format=torch.channels_last), weight, bias, 1e-5)
    assert result.dtype == torch.float32 and result.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_it_writes_over_its_input_as_an_inplace_relu_does():
    x = torch.randn(1, 8, 16, 16).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    result = instance_norm_relu(x, None, None, 1e-5)
    assert result.data_ptr() == x.data_ptr() and torch.equal(result, x)


@pytest.mark.parametrize("make", [
    lambda: torch.randn(1, 8, 16, 16).to(torch.bfloat16),                                            # channels-first
    lambda: torch.randn(1, 8, 16, 16, dtype=torch.float64).contiguous(memory_format=torch.channels_last),  # float64
    lambda: torch.randn(1, 8, 16, 16).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)[..., :8],  # a view
    lambda: torch.randn(1, 8, 16, 16, dtype=torch.bfloat16, requires_grad=True).contiguous(memory_format=torch.channels_last),
])
def test_other_tensors_are_left_to_torch(make):
    assert not fuses(make())


def test_a_channels_last_network_fuses_each_norm_with_its_relu_and_keeps_its_weights():
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_width=8, depth=3, distance_map=True, dropout=0.0)).eval()
    laid_out = copy.deepcopy(model).use_channels_last()
    fused = [module for module in laid_out.modules() if isinstance(module, InstanceNormReLU)]
    assert len(fused) == 2 * (1 + 3 + 3)  # two per DoubleConv: stem, encoder and bottleneck, decoder
    assert not [module for module in laid_out.modules() if type(module) is InstanceNorm or isinstance(module, torch.nn.ReLU)]
    assert laid_out.state_dict().keys() == model.state_dict().keys()
    laid_out.load_state_dict(model.state_dict())  # a checkpoint loads into the fused network as into the plain one

    calls: list[bool] = []
    for module in fused:
        module.register_forward_pre_hook(lambda _module, inputs: calls.append(fuses(inputs[0])))
    x = torch.rand(2, 1, 64, 48)
    with torch.no_grad(), autocast_context(torch.device("cpu"), True):
        expected, logits = model(x), laid_out(x)
    assert len(calls) == len(fused) and all(calls)
    # bf16 in both: the plain network rounds its norm and its ReLU separately, the fused one once.
    assert ((logits > 0) == (expected > 0)).float().mean() > 0.995
    torch.testing.assert_close(logits.float(), expected.float(), atol=0.15, rtol=0.05)
    # Training: the fused modules are the norm and the ReLU, gradients included.
    laid_out.train(), model.train()
    torch.testing.assert_close(laid_out(x), model(x), atol=1e-4, rtol=1e-4)


def test_chunks_spread_over_the_callers_threads_give_the_same_bits_as_one_thread():
    """An activation of several chunks (16 x 300 x 300: two), normalised with 1, 2 and 4 torch threads:
    the chunks are fixed by the shape and added in order, so the threads change nothing."""
    torch.manual_seed(7)
    x = (torch.randn(2, 16, 300, 300) * 2 + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(16) + 0.5, torch.randn(16)
    threads_before = torch.get_num_threads()
    results = {}
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            results[threads] = instance_norm_relu(x.clone(memory_format=torch.channels_last), weight, bias, 1e-5)
    finally:
        torch.set_num_threads(threads_before)
    assert torch.equal(results[1], results[2]) and torch.equal(results[1], results[4])
    expected = reference(x, weight, bias)
    step = torch.maximum(expected.float().abs(), results[1].float().abs()) * 2.0**-7 + 1e-6
    assert ((results[1].float() - expected.float()).abs() <= step).all()
