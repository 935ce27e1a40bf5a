"""Forward-pass options on CPU (`PredictConfig.compile`, `cellseg.runtime.CompiledByShape`): each
agrees with the plain fp32 path."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from cellseg.checkpoint import load_checkpoint
from cellseg.config import PredictConfig
from cellseg.infer import Predictor
from cellseg.io import list_images, read_image
from cellseg.metrics import mask_agreement
from cellseg.model import UNet
from cellseg.normalize import normalize_image
from cellseg.runtime import (
    MODEL_PASSES,
    CompiledByShape,
    PassGate,
    autocast_context,
    cpu_has_native_bf16,
    pass_precision,
)


def test_each_shape_is_compiled_on_its_first_pass_and_gives_the_eager_output(synthetic_dataset, tiny_checkpoint):
    # The shape and precision the Predictor runs below, so that inductor compiles this graph once.
    checkpoint = load_checkpoint(str(tiny_checkpoint))
    model = checkpoint.build_model().eval()
    wrapped = CompiledByShape(model)
    image = normalize_image(read_image(list_images(str(synthetic_dataset / "images"))[0]),
                            checkpoint.model_config.normalization)
    x, other = torch.from_numpy(image)[None, None], torch.rand(1, 1, 16, 48)
    with torch.inference_mode(), autocast_context(torch.device("cpu"), True):
        eager = model(x).float()
        compiled = wrapped(x).float()
        assert wrapped.compiled is not None and not wrapped.failed
        assert wrapped.ready == {(1, 1, 96, 96)}
        wrapped(other)  # another shape: another graph
    assert wrapped.ready == {(1, 1, 96, 96), (1, 1, 16, 48)}
    # Fused kernels round bf16 at other places than eager kernels do.
    difference = (torch.sigmoid(compiled) - torch.sigmoid(eager)).abs()
    assert difference.max() < 0.05 and difference.mean() < 0.005, (difference.max(), difference.mean())


@pytest.mark.integration
def test_a_compilation_that_fails_leaves_the_model_eager_with_a_warning(tmp_path):
    # No C++ compiler, as on a machine without one: inductor cannot build its CPU code. In a process
    # of its own, since inductor remembers the compiler it found.
    script = """
import logging, torch
from cellseg.config import ModelConfig
from cellseg.model import UNet
from cellseg.runtime import CompiledByShape
logging.basicConfig(level=logging.WARNING)
model = UNet(ModelConfig(depth=2, base_width=4, dropout=0.0)).eval()
wrapped = CompiledByShape(model)
x = torch.rand(1, 1, 24, 24)
with torch.inference_mode():
    assert torch.equal(wrapped(x), model(x)) and torch.equal(wrapped(x), model(x))
assert wrapped.failed
print("eager after failure")
"""
    env = {**os.environ, "CXX": "/nonexistent/c++", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "eager after failure" in run.stdout
    assert run.stderr.count("torch.compile failed, the model runs eagerly") == 1, run.stderr[-2000:]


def test_compile_is_opt_in_on_cpu(tiny_checkpoint):
    """Eager by default: with its fused norms the channels-last eager pass beat the compiled one
    (docs/performance.md, "Forward pass on CPU")."""
    checkpoint = load_checkpoint(str(tiny_checkpoint))
    for default in (PredictConfig(device="cpu"), PredictConfig(device="cpu", compile=False)):
        assert isinstance(Predictor(checkpoint, default).forward_model, UNet)
    forced = Predictor(checkpoint, PredictConfig(device="cpu", compile=True)).forward_model
    assert isinstance(forced, CompiledByShape)
    # A compilation that fails falls back to the channels-last network; inductor gets a channels-first
    # copy (it compiled the channels-last one into a pass 2x slower).
    assert forced.model.channels_last and not forced.to_compile().channels_last


def test_compiled_masks_agree_with_plain_fp32(synthetic_dataset, tiny_checkpoint):
    # compile=True with the default bf16 autocast against the plain eager fp32 path.
    checkpoint = load_checkpoint(str(tiny_checkpoint))
    images = [read_image(url) for url in list_images(str(synthetic_dataset / "images"))][:8]
    compiled_predictor = Predictor(checkpoint, PredictConfig(device="cpu", compile=True))
    fast = compiled_predictor.masks(images)
    plain = Predictor(checkpoint, PredictConfig(device="cpu", amp=False, compile=False)).masks(images)
    assert compiled_predictor.forward_model.compiled is not None and not compiled_predictor.forward_model.failed
    agreement = mask_agreement(fast, plain)
    assert agreement["pixel_agreement"] >= 0.999 and agreement["dice"] >= 0.999, agreement
    assert not np.array_equal(np.stack(fast), np.zeros_like(np.stack(fast)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_is_not_the_default_on_cuda(tiny_checkpoint):
    checkpoint = load_checkpoint(str(tiny_checkpoint))
    assert isinstance(Predictor(checkpoint, PredictConfig(device="cuda")).forward_model, UNet)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_of_equal_sizes_agree_with_the_cpu_fp32_path(tiny_checkpoint):
    # Pinned, non-blocking copies and bf16 on the GPU, mixed sizes grouped into batches.
    from cellseg.infer import predict_probabilities

    checkpoint = load_checkpoint(str(tiny_checkpoint))
    rng = np.random.default_rng(0)
    images = [rng.random(shape, dtype=np.float32) for shape in [(96, 96), (64, 80), (96, 96), (64, 80), (96, 96)]]
    model = checkpoint.build_model().eval()
    cpu = predict_probabilities(model, images, batch_size=1, device="cpu", amp=False)
    gpu = predict_probabilities(model.to("cuda"), images, batch_size=8, device="cuda", amp=True)
    for on_cpu, on_gpu in zip(cpu, gpu, strict=True):
        assert on_gpu.shape == on_cpu.shape
        assert mask_agreement([on_gpu > 0.5], [on_cpu > 0.5])["pixel_agreement"] >= 0.99


def test_a_pass_that_compiles_runs_alone_and_others_wait_for_it():
    # torch.compile tracing beside another thread's autocast pass deadlocked a two-shard run.
    gate = PassGate()
    events: list[str] = []
    in_shared, release_shared, in_alone, release_alone = (threading.Event() for _ in range(4))

    def shared_pass(name: str, inside: threading.Event, release: threading.Event) -> None:
        with gate.shared():
            events.append(f"{name} in")
            inside.set()
            release.wait(10)
        events.append(f"{name} out")

    def alone_pass() -> None:
        with gate.alone():
            events.append("alone in")
            in_alone.set()
            release_alone.wait(10)
        events.append("alone out")

    first = threading.Thread(target=shared_pass, args=("first", in_shared, release_shared))
    first.start()
    assert in_shared.wait(10)
    compiling = threading.Thread(target=alone_pass)
    compiling.start()
    assert not in_alone.wait(0.3)  # waits for the pass in flight
    release_shared.set()
    assert in_alone.wait(10)
    later_inside = threading.Event()
    later = threading.Thread(target=shared_pass, args=("later", later_inside, threading.Event()))
    later.start()
    assert not later_inside.wait(0.3)  # held back while the compiling pass runs
    release_alone.set()
    assert later_inside.wait(10)
    for thread in (first, compiling):
        thread.join(10)
    assert events[:4] == ["first in", "first out", "alone in", "alone out"] and events[4] == "later in"
    later.join(0)


def test_only_a_shape_s_first_compiled_pass_holds_the_gate_alone(tiny_checkpoint):
    model = load_checkpoint(str(tiny_checkpoint)).build_model().eval()
    wrapped = CompiledByShape(model)
    shape = (1, 1, 32, 32)
    with wrapped.one_pass(shape) as forward:
        assert forward is not model and MODEL_PASSES.held_alone  # compiles on this pass: nothing beside it
    wrapped.ready.add(shape)
    with wrapped.one_pass(shape):
        assert not MODEL_PASSES.held_alone
    wrapped.failed = True  # a compilation failed: eager passes, side by side
    with wrapped.one_pass(shape) as forward:
        assert forward is model and not MODEL_PASSES.held_alone


def test_the_logged_precision_is_what_autocast_runs():
    cpu = torch.device("cpu")
    with autocast_context(cpu, True):
        dtype = torch.mm(torch.rand(4, 4), torch.rand(4, 4)).dtype
    assert pass_precision(cpu, True) == ("bf16" if dtype == torch.bfloat16 else "fp32: this CPU has no native bf16")
    assert (dtype == torch.bfloat16) == cpu_has_native_bf16()
    assert pass_precision(cpu, False) == "fp32"
