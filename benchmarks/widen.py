"""A trained U-Net made wider without changing what it computes (Net2WiderNet, Chen et al. 2016),
so that training can go on from the narrower network's solution with more capacity.

Every channel space of the network (the output of each convolution) grows from the old width to
the new one: its first channels are the old ones, each new channel a copy of an old one drawn at
random. A layer that reads a space divides the weights it gives each copy by the number of
copies of that channel, so its sums are unchanged; instance norms and biases are copied with
their channels. With `noise` 0 the widened network's outputs equal the old one's up to float
rounding (`tests/test_bench_widen.py`); a little noise lets the copies learn different things.

Only instance- or un-normalised networks are widened: batch and group norms mix copies into their
statistics differently from the originals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cellseg.config import ModelConfig


@dataclass(frozen=True)
class _Space:
    """A widened channel space: the old channel behind each new one, and how many copies each old one has."""

    source: torch.Tensor  # (new,) old channel of each new channel
    copies: torch.Tensor  # (old,) how many new channels copy each old one

    @classmethod
    def unchanged(cls, channels: int) -> _Space:
        return cls(torch.arange(channels), torch.ones(channels, dtype=torch.long))

    @classmethod
    def widened(cls, old: int, new: int, generator: torch.Generator) -> _Space:
        if new < old:
            raise ValueError(f"a network of width {old} cannot be widened to {new}")
        extra = torch.randint(0, old, (new - old,), generator=generator)
        source = torch.cat([torch.arange(old), extra])
        return cls(source, torch.bincount(source, minlength=old))

    def then(self, other: _Space) -> _Space:
        """The space of `self`'s channels followed by `other`'s (a concatenation)."""
        return _Space(torch.cat([self.source, other.source + len(self.copies)]), torch.cat([self.copies, other.copies]))

    def shares(self) -> torch.Tensor:
        """(new,) the share of its old channel's weight each new channel of this space carries to the next layer."""
        return 1.0 / self.copies[self.source].double()


def widened_state_dict(
    state_dict: dict[str, torch.Tensor], config: ModelConfig, width: int, seed: int = 0, noise: float = 0.0
) -> dict[str, torch.Tensor]:
    """The weights of `UNet(config)` made those of the same network at `base_width=width`.

    `noise` adds Gaussian noise of that fraction of each convolution weight's standard deviation.
    """
    if config.norm not in ("instance", "none"):
        raise ValueError(f"only networks with instance norms or none are widened, not '{config.norm}'")
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}

    def grown(key: str, dim: int = 0) -> _Space:
        """The space a layer writes, from the width its weight has there (every width scales with the base)."""
        old = state_dict[f"{key}.weight"].shape[dim]
        return _Space.widened(old, old * width // config.base_width, generator)

    def convolution(key: str, reads: _Space, writes: _Space, transposed: bool = False) -> None:
        weight = state_dict[f"{key}.weight"].double()
        if transposed:  # (in, out, kh, kw)
            weight = weight[reads.source][:, writes.source] * reads.shares().view(-1, 1, 1, 1)
        else:  # (out, in, kh, kw)
            weight = weight[writes.source][:, reads.source] * reads.shares().view(1, -1, 1, 1)
        if noise:
            weight = weight + noise * weight.std() * torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
        out[f"{key}.weight"] = weight.to(state_dict[f"{key}.weight"].dtype)
        if f"{key}.bias" in state_dict:
            out[f"{key}.bias"] = state_dict[f"{key}.bias"][writes.source].clone()

    def per_channel(key: str, space: _Space) -> None:
        for name in ("weight", "bias"):
            if f"{key}.{name}" in state_dict:
                out[f"{key}.{name}"] = state_dict[f"{key}.{name}"][space.source].clone()

    def double_conv(key: str, reads: _Space) -> _Space:
        middle = grown(f"{key}.0")
        convolution(f"{key}.0", reads, middle)
        per_channel(f"{key}.1", middle)
        result = grown(f"{key}.4")
        convolution(f"{key}.4", middle, result)
        per_channel(f"{key}.5", result)
        return result

    skips = [double_conv("stem", _Space.unchanged(config.in_channels))]
    for index in range(config.depth - 1):
        skips.append(double_conv(f"encoder.{index}.1", skips[-1]))
    x = double_conv("bottleneck.1", skips[-1])
    for index, skip in enumerate(reversed(skips)):
        upsampled = grown(f"decoder.{index}.upsample", dim=1)  # a transposed convolution's weight: (in, out, kh, kw)
        convolution(f"decoder.{index}.upsample", x, upsampled, transposed=True)
        x = double_conv(f"decoder.{index}.conv", upsampled.then(skip))
    convolution("head", x, _Space.unchanged(state_dict["head.weight"].shape[0]))
    missing = set(state_dict) - set(out)
    if missing:
        raise ValueError(f"weights not widened (an unknown layout): {sorted(missing)[:3]}")
    return out
