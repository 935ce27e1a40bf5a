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


@pytest.mark.parametrize("norm", NORMS)
def test_a_channels_last_network_keeps_its_layout_and_computes_the_same(norm):
    """`use_channels_last` (inference on CPU): every convolution gets NHWC data, which is what makes
    it fast (an InstanceNorm that handed back channels-first data would make each one reorder
    it), and the logits, features and gradients are the channels-first network's."""
    import copy

    model = small_unet(seed=3, depth=3, norm=norm, distance_map=True, dropout=0.0).eval()
    laid_out = copy.deepcopy(model).use_channels_last()
    x = torch.rand(2, 1, 37, 50)
    conv_inputs: list[torch.Tensor] = []
    for module in laid_out.modules():
        if isinstance(module, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            module.register_forward_hook(lambda _module, inputs, _output: conv_inputs.append(inputs[0]))
    with torch.no_grad():
        expected, logits = model(x), laid_out(x)
        expected_features, features = model.features(x), laid_out.features(x)
    wide = [tensor for tensor in conv_inputs if tensor.shape[1] > 1 and tensor.shape[-1] > 1]
    assert len(wide) > 10 and all(
        tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous() for tensor in wide)
    assert logits.is_contiguous() and logits.shape == (2, 2, 37, 50)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(features, expected_features, atol=1e-4, rtol=1e-4)
    # With gradients the norms take the channels-first path (its backward is the fast one); the same values.
    laid_out.train(), model.train()
    torch.testing.assert_close(laid_out(x), model(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("amp", [False, True])
def test_a_channels_last_network_gives_the_same_bits_whatever_the_threads_and_the_batch(amp):
    """The product promises the same masks from `predict`, a flow's shards and a resumed run, which
    run the model with different thread counts and batches: the channels-last InstanceNorm's sums
    must not be split between threads (`group_norm`'s channels-last kernel is, and fails this)."""
    from cellseg.runtime import autocast_context, cpu_has_native_bf16

    bf16 = amp and cpu_has_native_bf16()  # elsewhere amp runs fp32
    model = small_unet(seed=5, depth=3, base_width=8, norm="instance").eval().use_channels_last()
    x = torch.rand(3, 1, 96, 80)
    threads_before = torch.get_num_threads()
    found: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    try:
        with torch.no_grad(), autocast_context(torch.device("cpu"), amp):
            for threads in (1, 2, 3, 4):
                torch.set_num_threads(threads)
                found[threads] = model(x), model.features(x)
            one_by_one = torch.cat([model(x[i : i + 1]) for i in range(3)])
    finally:
        torch.set_num_threads(threads_before)
    for threads, (logits, features) in found.items():
        assert torch.equal(features, found[1][1]), threads
        # In fp32 oneDNN's 1x1 head convolution itself rounds differently with the threads (1 ulp), in
        # either layout; the product's default pass is bf16 where the CPU has it (fp32 elsewhere).
        assert torch.equal(logits, found[1][0]) or not bf16, threads
    assert torch.equal(one_by_one, found[1][0]) or not bf16


@pytest.mark.parametrize("channels", [1, 3, 8, 64])
def test_channel_sums_of_a_large_channels_last_image_match_float64_moments(channels):
    """Over several slices of pixels (the temporaries' bound) and rows of several pixels."""
    from cellseg.model import _SUM_SLICE_ELEMENTS, channel_sums, channels_last_instance_norm

    torch.manual_seed(channels)
    side = 2 * int(math.sqrt(_SUM_SLICE_ELEMENTS / channels)) + 3
    x = (torch.randn(2, channels, side, side - 1) * 3 + 5).contiguous(memory_format=torch.channels_last)
    mean, squares = channel_sums(x)
    exact = x.double()
    torch.testing.assert_close(mean.double(), exact.mean(dim=(-2, -1)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(squares.double() / (side * (side - 1)), exact.var(dim=(-2, -1), correction=0),
                               rtol=1e-5, atol=1e-5)
    weight, bias = torch.rand(channels) + 0.5, torch.randn(channels)
    normalised = channels_last_instance_norm(x, weight, bias, 1e-5)
    assert normalised.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(normalised, torch.nn.functional.instance_norm(x, weight=weight, bias=bias, eps=1e-5),
                               rtol=1e-4, atol=1e-4)
