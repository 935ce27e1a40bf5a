"""U-Net for binary segmentation, built from three named blocks."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellseg import fused_norm
from cellseg.config import ModelConfig

# More than any ModelConfig allows (base_width * 2**depth <= MAX_WIDTH gives at most ~125 million):
# a checkpoint's weights are counted against it before a network is built for them.
MAX_PARAMETERS = 150_000_000


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return InstanceNorm(channels, affine=True)
    return nn.Identity()


class InstanceNorm(nn.InstanceNorm2d):
    """`nn.InstanceNorm2d` that keeps a channels-last input channels-last when no gradient is taken.

    `instance_norm` returns a channels-first tensor whatever its input, so in a channels-last
    network every following convolution would reorder its data again (docs/performance.md,
    "Forward pass on CPU"). `group_norm` keeps the layout, but its channels-last CPU kernel splits
    an image's pixels between threads, so its bits change with the thread count and the batch;
    `channels_last_instance_norm` sums in a fixed order instead. With gradients (training) this is
    `instance_norm`, whose backward is the fast one.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            return channels_last_instance_norm(x, self.weight, self.bias, self.eps)
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


class InstanceNormReLU(InstanceNorm):
    """`InstanceNorm` then ReLU as one module: what `UNet.use_channels_last` puts in a `DoubleConv`
    in place of the pair (same parameters, same state_dict keys). Channels-last bf16 or float32
    activations without gradient are normalised and rectified in two passes by
    `cellseg.fused_norm`; anything else as the two modules would."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and fused_norm.fuses(x):
            return fused_norm.instance_norm_relu(x, self.weight, self.bias, self.eps)
        return F.relu(super().forward(x))


# Elements of one slice of pixels that `channel_sums` sums at a time: its temporaries stay a few
# MB however large the image, and the slices depend on the shape only, never on the threads.
_SUM_SLICE_ELEMENTS = 1 << 20
# Elements per row of the (pixels / k, k * C) views of `_pixel_rows`: CPU kernels reducing or
# broadcasting along rows of 8 or 16 channels ran 2-5x slower than along rows of 64.
_ROW_ELEMENTS = 64


def _pixel_rows(x: torch.Tensor, row_elements: int = _ROW_ELEMENTS) -> tuple[torch.Tensor, int]:
    """A channels-last (B, C, H, W) `x` viewed as (B, H·W / k, k·C) rows of k pixels' channels, and k."""
    batch, channels, height, width = x.shape
    count = height * width
    per_row = max(1, row_elements // channels)
    while count % per_row:
        per_row = per_row // 2
    return x.permute(0, 2, 3, 1).reshape(batch, count // per_row, per_row * channels), per_row


def _along_rows(values: torch.Tensor, per_row: int) -> torch.Tensor:
    """(B, C) per-channel `values` repeated for the k pixels of a `_pixel_rows` row: (B, 1, k·C)."""
    return values.repeat(1, per_row).view(values.shape[0], 1, per_row * values.shape[1])


def channel_sums(x: torch.Tensor, slice_elements: int = _SUM_SLICE_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C) float32 mean and sum of squared deviations from it of each channel of a channels-last
    (B, C, H, W) `x` over H and W, the same bits whatever the threads and the batch.

    Each reduction runs down the rows of a (rows, k·C) view with k·C outputs per image, which
    torch splits between threads by output, never within one; the slices' partial sums add up
    in a fixed order. Partial sums of bf16 data are rounded to bf16 once, as `sum` gives them.
    """
    batch, channels, height, width = x.shape
    rows, per_row = _pixel_rows(x)
    count, slice_rows = height * width, max(1, slice_elements // rows.shape[-1])
    total = torch.zeros(batch, per_row, channels, dtype=torch.float32, device=x.device)
    for start in range(0, rows.shape[1], slice_rows):
        total += rows[:, start : start + slice_rows].sum(dim=1).view(batch, per_row, channels)
    mean = (total.sum(dim=1) / count).to(x.dtype)
    centre = _along_rows(mean, per_row)
    squares = torch.zeros(batch, per_row, channels, dtype=torch.float32, device=x.device)
    deviations = torch.empty(batch, min(slice_rows, rows.shape[1]), rows.shape[-1], dtype=x.dtype, device=x.device)
    for start in range(0, rows.shape[1], slice_rows):
        part = rows[:, start : start + slice_rows]
        deviation = torch.sub(part, centre, out=deviations[:, : part.shape[1]]).square_()
        squares += deviation.sum(dim=1).view(batch, per_row, channels)
    return mean.float(), squares.sum(dim=1)


def channels_last_instance_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """`instance_norm` of a channels-last `x`, returned channels-last, in `x`'s dtype: one
    multiply-add per element with each image's per-channel scale and shift."""
    batch, channels, height, width = x.shape
    mean, squares = channel_sums(x)
    scale = torch.rsqrt(squares / (height * width) + eps)
    if weight is not None:
        scale = scale * weight.float()
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float()
    rows, per_row = _pixel_rows(x)
    normalised = torch.addcmul(_along_rows(shift.to(x.dtype), per_row), rows, _along_rows(scale.to(x.dtype), per_row))
    return normalised.view(batch, height, width, channels).permute(0, 3, 1, 2)


class DoubleConv(nn.Sequential):
    """(conv 3x3 -> norm -> ReLU) x 2; keeps H and W."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float = 0.0):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias),
            _norm(norm, out_channels),
            nn.ReLU(inplace=True),
        )

    def fuse_norm_relu(self) -> None:
        """Each `InstanceNorm` followed by a ReLU becomes one `InstanceNormReLU` sharing its
        parameters, the ReLU an `nn.Identity` (the state_dict keeps its keys)."""
        for index in range(len(self) - 1):
            norm = self[index]
            if type(norm) is InstanceNorm and isinstance(self[index + 1], nn.ReLU):
                fused = InstanceNormReLU(norm.num_features, eps=norm.eps, affine=norm.affine)
                fused.weight, fused.bias = norm.weight, norm.bias
                self[index], self[index + 1] = fused, nn.Identity()


class MaxPool2x2(nn.Module):
    """2x2 max-pooling with stride 2: (B, C, H, W) -> (B, C, H/2, W/2).

    Without gradients (inference) it takes the maximum of the four strided views, which gives
    exactly `max_pool2d`'s values about 7x faster on CPUs; with gradients it is `max_pool2d`, whose
    backward sends each gradient to one input as training always has.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.shape[-2] % 2 or x.shape[-1] % 2:
            return F.max_pool2d(x, 2)
        top = torch.maximum(x[..., 0::2, 0::2], x[..., 0::2, 1::2])
        return torch.maximum(top, torch.maximum(x[..., 1::2, 0::2], x[..., 1::2, 1::2]))


class Down(nn.Sequential):
    """2x2 max-pool then DoubleConv: (B, C, H, W) -> (B, C', H/2, W/2)."""

    def __init__(self, in_channels: int, out_channels: int, norm: str, dropout: float = 0.0):
        super().__init__(MaxPool2x2(), DoubleConv(in_channels, out_channels, norm, dropout))


class Up(nn.Module):
    """2x transposed-conv up-sampling, concatenation with the skip, DoubleConv."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, norm: str):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = DoubleConv(out_channels + skip_channels, out_channels, norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.upsample(x), skip], dim=1))


class UNet(nn.Module):
    """U-Net mapping (B, in_channels, H, W) images to (B, output_channels, H, W) raw logits.

    Any H and W are accepted: the input is reflect-padded to a multiple of 2**depth and the
    output cropped back. Dropout sits in the bottleneck, at the end of the contracting path, as
    in the original U-Net; dropout in the decoder slowed training without improving validation.
    """

    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config.without_auto()
        widths = level_widths(config)
        self.stem = DoubleConv(config.in_channels, widths[0], config.norm)
        self.encoder = nn.ModuleList(
            Down(widths[level], widths[level + 1], config.norm) for level in range(config.depth - 1)
        )
        self.bottleneck = Down(widths[-2], widths[-1], config.norm, config.dropout)
        self.decoder = nn.ModuleList(
            Up(widths[level + 1], widths[level], widths[level], config.norm) for level in reversed(range(config.depth))
        )
        self.head = nn.Conv2d(widths[0], self.output_channels, kernel_size=1)
        self.channels_last = False

    def use_channels_last(self) -> UNet:
        """Lay the weights, and from now on the activations, out channels-last (NHWC).

        For inference on CPU, where oneDNN's convolutions run on NHWC data without reordering
        it each time (docs/performance.md, "Forward pass on CPU"); the outputs are the same
        computation up to float rounding. Each instance norm and the ReLU after it become one
        `InstanceNormReLU`, which runs both in two passes over the activation.
        """
        self.channels_last = True
        for block in [module for module in self.modules() if isinstance(module, DoubleConv)]:
            block.fuse_norm_relu()
        return self.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # (not in the stubs)

    def _laid_out(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def output_channels(self) -> int:
        """`out_channels` of cell logits, then one of distance-map logits when the config has it."""
        return self.config.out_channels + int(self.config.distance_map)

    @property
    def size_multiple(self) -> int:
        return 2**self.config.depth

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) summary of what the contracting path sees in each image: the spatial mean and
        standard deviation of every channel of every encoder level and the bottleneck (the
        input to `cellseg.size_model`, as Cellpose's style vector is to its size model)."""
        x = self._laid_out(pad_to_multiple(x, self.size_multiple))
        levels = [self.stem(x)]
        for down in self.encoder:
            levels.append(down(levels[-1]))
        levels.append(self.bottleneck(levels[-1]))
        return torch.cat([channel_moments(level) for level in levels], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = self._laid_out(pad_to_multiple(x, self.size_multiple))
        skips = [self.stem(x)]
        for down in self.encoder:
            skips.append(down(skips[-1]))
        x = self.bottleneck(skips[-1])
        for up, skip in zip(self.decoder, reversed(skips), strict=True):
            x = up(x, skip)
        logits = self.head(x)[..., :height, :width]
        return logits.contiguous() if self.channels_last else logits


def level_widths(config: ModelConfig) -> list[int]:
    """Channels of a network of `config` at each level: its stem, its encoder levels, its bottleneck."""
    return [config.base_width * 2**level for level in range(config.depth + 1)]


def feature_count(config: ModelConfig) -> int:
    """The length of `UNet.features` for a network of `config`: a mean and a deviation of every
    channel of its stem, its encoder levels and its bottleneck."""
    return 2 * sum(level_widths(config))


def channel_moments(x: torch.Tensor) -> torch.Tensor:
    """(B, 2C): the mean, then the standard deviation (n - 1), of each channel of (B, C, H, W) over
    H and W, in `x`'s dtype; of channels-last data by `channel_sums` (`mean` and `std` over its
    strided H and W are several times slower on CPUs)."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.cat([x.mean(dim=(-2, -1)), x.std(dim=(-2, -1))], dim=1)
    mean, squares = channel_sums(x)
    count = x.shape[-2] * x.shape[-1]
    return torch.cat([mean, (squares / max(count - 1, 1)).sqrt()], dim=1).to(x.dtype)


def expected_state(config: ModelConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every entry of the state_dict of `UNet(config)`, found on the meta device,
    so that no weight is allocated however large the config says the network is."""
    with torch.device("meta"):
        model = UNet(config)
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in model.state_dict().items()}


def padded_shape(shape: tuple[int, ...], multiple: int) -> tuple[int, int]:
    """(H, W) that `pad_to_multiple` pads an image of `shape` (..., H, W) to."""
    height, width = shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if height + pad_h == multiple and width + pad_w == multiple:
        # A 1x1 bottleneck leaves instance and group norm one value per channel, which they refuse.
        pad_h += multiple
    return height + pad_h, width + pad_w


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """`x` (..., H, W) padded at the bottom and right to `padded_shape`, as the U-Net pads its
    input: an image padded so beforehand is not padded again, and predicts exactly as unpadded."""
    height, width = x.shape[-2:]
    padded_height, padded_width = padded_shape(x.shape, multiple)
    pad_h, pad_w = padded_height - height, padded_width - width
    if not (pad_h or pad_w):
        return x
    # Reflect padding needs the pad to be smaller than the side; fall back to replicate.
    mode = "reflect" if pad_h < height and pad_w < width else "replicate"
    return F.pad(x, (0, pad_w, 0, pad_h), mode=mode)


def padded_batches(images: Sequence[np.ndarray], multiple: int, batch_size: int) -> Iterator[tuple[list[int], np.ndarray]]:
    """(positions in `images`, (B, H, W) stack) for (H, W) images that `pad_to_multiple` pads to
    one shape, up to `batch_size` at a time: stacked as they are when they share a shape (the
    network pads them itself), else each padded beforehand as the network pads it alone, so that
    every image of a mixed batch gives what it gives by itself."""
    by_shape: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, image in enumerate(images):
        by_shape[padded_shape(image.shape, multiple)].append(index)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            members = [images[i] for i in chunk]
            if all(member.shape == members[0].shape for member in members):
                yield chunk, np.stack(members)
            else:
                yield chunk, np.stack([pad_to_multiple(torch.from_numpy(np.ascontiguousarray(member))[None], multiple)[0]
                                       .numpy() for member in members])
