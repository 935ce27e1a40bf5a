"""Compiled training steps (`TrainConfig.compile`, `cellseg.runtime.TrainingForward`): they learn as
the eager ones do, a compilation that fails leaves training eager, and the CLI takes the mode."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from torch._dynamo.utils import counters

from cellseg.config import ModelConfig, TrainConfig
from cellseg.train import train

SMALL_MODEL = ModelConfig(depth=2, base_width=8)


def test_compiled_training_steps_learn_as_eager_ones_do(split, tmp_path, caplog):
    caplog.set_level("INFO", logger="cellseg")
    settings = {"epochs": 6, "patch_size": 64, "patches_per_image": 2, "batch_size": 2, "device": "cpu", "seed": 0,
                "max_minutes": None, "patience": 10}
    eager = train(*split, tmp_path / "eager", SMALL_MODEL, TrainConfig(**settings))
    counters.clear()
    compiled = train(*split, tmp_path / "compiled", SMALL_MODEL, TrainConfig(**settings, compile="default"))

    # The steps ran through dynamo's graphs (one for the full batches, one for the smaller last one),
    # and no compilation fell back to eager.
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    assert "compiled (default)" in caplog.text
    assert "training runs eagerly" not in caplog.text
    # Fused kernels round differently, so the runs may part a little; both learn, step for step alike.
    for run in (eager, compiled):
        assert run.history[-1]["train_loss"] < 0.8 * run.history[0]["train_loss"], run.history
    for alone, fused in zip(eager.history, compiled.history, strict=True):
        assert abs(fused["train_loss"] - alone["train_loss"]) < 0.02 * alone["train_loss"], (alone, fused)
        assert abs(fused["val_loss"] - alone["val_loss"]) < 0.02 * alone["val_loss"], (alone, fused)
        # The Dice of a small model's thresholded masks moves by more than its loss (0.024 for a loss
        # 0.007% apart, once).
        assert abs(fused["val_dice"] - alone["val_dice"]) < 0.05, (alone, fused)


@pytest.mark.integration
def test_a_training_compilation_that_fails_runs_eagerly_with_a_warning(tmp_path):
    # No C++ compiler: inductor cannot build its CPU code. In a process of its own, since inductor
    # remembers the compiler it found.
    script = """
import logging, torch
from cellseg.config import ModelConfig
from cellseg.model import UNet
from cellseg.runtime import TrainingForward
logging.basicConfig(level=logging.WARNING)
torch.manual_seed(0)
model = UNet(ModelConfig(depth=2, base_width=4, dropout=0.0)).train()
forward = TrainingForward(model, "default")
x = torch.rand(2, 1, 32, 32)
for _ in range(2):
    out = forward(x)
    out.sum().backward()
    assert torch.equal(out, model(x))
assert forward.failed and not forward.is_compiled
assert model.head.weight.grad is not None
print("eager after failure")
"""
    env = {**os.environ, "CXX": "/nonexistent/c++", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "eager after failure" in run.stdout
    assert run.stderr.count("torch.compile failed, training runs eagerly") == 1, run.stderr[-2000:]


def test_training_is_eager_unless_asked_and_the_cli_takes_the_mode():
    from cellseg.cli_parser import build_parser
    from cellseg.cli_settings import command_settings

    assert TrainConfig().compile == "off"
    pairs = ["--images", "a", "--masks", "b", "--out", "c"]
    for flags, mode in (([], "off"), (["--compile", "default"], "default"),
                        (["--compile", "reduce-overhead"], "reduce-overhead")):
        args = build_parser().parse_args(["train", *pairs, *flags])
        assert command_settings(args).training.compile == mode
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", *pairs, "--compile", "max"])
