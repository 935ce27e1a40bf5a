"""Where and how models run: the device (CUDA when present), CPU threads and mixed precision.
Training and inference both start here; neither imports the other."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' was requested but CUDA is not available on this machine")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_context(device: torch.device, enabled: bool) -> AbstractContextManager:
    """Mixed precision when enabled: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with
    native bf16; nothing elsewhere. Weights, losses and optimiser state stay fp32."""
    if not enabled:
        return nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


def set_threads(threads: int | None) -> None:
    """Torch CPU threads for this process (process-wide: one model per worker process); None keeps torch's choice."""
    if threads is not None:
        torch.set_num_threads(threads)
