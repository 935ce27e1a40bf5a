"""Fixtures shared by the reliability tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellseg.registry import Registry


@pytest.fixture(scope="module")
def registry(tiny_checkpoint, tmp_path_factory) -> str:
    """A registry whose current version is the tiny test checkpoint."""
    url = str(tmp_path_factory.mktemp("registry"))
    Registry(url).register(str(tiny_checkpoint), promote=True)
    return url


@pytest.fixture(scope="session")
def quick_checkpoint(tmp_path_factory) -> Path:
    """An untrained small U-Net with seeded weights, saved as a checkpoint in no time: for tests of
    storage and outputs, where what the masks look like does not matter, only that runs repeat them."""
    import torch

    from cellseg.checkpoint import Checkpoint, save_checkpoint
    from cellseg.config import ModelConfig, TrainConfig
    from cellseg.model import UNet

    config = ModelConfig(depth=2, base_width=4)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("quick_model") / "best.pt"
    save_checkpoint(Checkpoint(config, UNet(config).state_dict(), TrainConfig(), {}, 0), str(path))
    return path
