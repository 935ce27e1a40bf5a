"""Instance norm and ReLU in one step, for channels-last bf16 or float32 activations on CPU (inference).

`torch`'s ops take six passes over an activation for the two (`cellseg.model.channel_sums`'
sums, deviations and their sum, the multiply-add, the ReLU); these compiled loops take two: one
that sums each channel and its squares (float64, so the variance `E[x²] - mean²` loses nothing
to the inputs' precision), and one that scales, shifts, rectifies and, for bf16, rounds back to
bf16 (to nearest, ties to even, as torch rounds); float32 activations, on CPUs without native
bf16, stay float32. On a 2-core VM that took the U-Net's norms from about a third of a forward
pass to a sixth (docs/performance.md, "Forward pass on CPU").

Each image is summed in chunks fixed by its shape, added in order: the same bits whatever the
torch thread count and the batch. With more than one torch thread in the calling thread (one
stream on many cores, as `cellseg predict` runs) the chunks are spread over that many threads,
so the norm scales with the cores as the convolutions do. bf16 values travel as their 16 bits
(numba has no bf16); an element's float32 is those bits shifted up by 16.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch
from numba import njit

# Elements handled per loop step: a constant length lets LLVM vectorise the inner loops. Channel
# counts that do not divide it repeat their scale every lcm(channels, _ROW) elements.
_ROW = 64
# Elements of one chunk (rounded to whole periods): a 16-channel 512² activation is 4 of them.
_CHUNK_ELEMENTS = 1 << 20

_Result = TypeVar("_Result")
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pool_threads = 0


def fuses(x: torch.Tensor) -> bool:
    """Whether `instance_norm_relu` takes `x`: a 4-d channels-last bf16 or float32 CPU tensor
    without gradient (float32: on CPUs without native bf16, or with `amp=false`)."""
    return (x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float32) and x.dim() == 4
            and not x.requires_grad and x.permute(0, 2, 3, 1).is_contiguous())


def instance_norm_relu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float) -> torch.Tensor:
    """`relu(instance_norm(x, weight=weight, bias=bias, eps=eps))` of a tensor that `fuses`, written
    over `x` (as `ReLU(inplace=True)` does) and returned: a new 8 MB activation per call cost
    the allocator a page fault per 4 KB page, 14 ms of a 110 ms forward pass."""
    batch, channels, height, width = x.shape
    pixels = height * width
    period = math.lcm(channels, _ROW)
    repeats = period // channels
    flat = x.permute(0, 2, 3, 1).view(batch, pixels * channels)
    bf16 = x.dtype == torch.bfloat16
    values = _bits(flat) if bf16 else flat.numpy()
    channel_sums = _channel_sums if bf16 else _float_channel_sums
    scale_shift_relu = _scale_shift_relu if bf16 else _float_scale_shift_relu
    gain = np.ones(channels) if weight is None else weight.detach().double().cpu().numpy()
    offset = np.zeros(channels) if bias is None else bias.detach().double().cpu().numpy()
    threads = torch.get_num_threads()
    for image in range(batch):
        chunks = _chunks(values[image], period)
        sums, squares = np.zeros(period), np.zeros(period)
        for chunk_sums, chunk_squares in _each(lambda chunk: channel_sums(chunk, period), chunks, threads):
            sums += chunk_sums
            squares += chunk_squares
        mean = sums.reshape(repeats, channels).sum(axis=0) / pixels
        variance = np.maximum(squares.reshape(repeats, channels).sum(axis=0) / pixels - mean * mean, 0.0)
        scale = gain / np.sqrt(variance + eps)
        _each(_normalising(scale_shift_relu, _rows(scale, repeats), _rows(offset - mean * scale, repeats)), chunks,
              threads)
    return x


def _normalising(kernel: Callable[..., None], scale_rows: np.ndarray,
                 shift_rows: np.ndarray) -> Callable[[np.ndarray], None]:
    """The second pass over a chunk, in place."""
    return lambda chunk: kernel(chunk, scale_rows, shift_rows, chunk)


def _chunks(values: np.ndarray, period: int) -> list[np.ndarray]:
    """`values` in views of whole periods of about _CHUNK_ELEMENTS (the last takes the rest): fixed
    by the length and the period alone, and each starting at position 0 of a period."""
    size = max(1, _CHUNK_ELEMENTS // period) * period
    return [values[start : start + size] for start in range(0, max(len(values), 1), size)]


def _each(work: Callable[[np.ndarray], _Result], chunks: Sequence[np.ndarray], threads: int) -> list[_Result]:
    """`work` of each chunk, in order; on up to `threads` threads (the loops release the GIL)."""
    if threads <= 1 or len(chunks) == 1:
        return [work(chunk) for chunk in chunks]
    return list(_threads(threads).map(work, chunks))


def _threads(count: int) -> ThreadPoolExecutor:
    """The module's pool, with at least `count` threads."""
    global _pool, _pool_threads
    with _pool_lock:
        if _pool is None or _pool_threads < count:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_threads = ThreadPoolExecutor(count, thread_name_prefix="cellseg-norm"), count
        return _pool


def warm_up() -> None:
    """Compile the two loops now, or load them from numba's cache (about 1 s on first use on a
    machine): an image build runs this (infra/Dockerfile), so that no worker compiles them."""
    for dtype in (torch.bfloat16, torch.float32):
        instance_norm_relu(torch.ones(1, 3, 5, 7, dtype=dtype).contiguous(memory_format=torch.channels_last),
                           None, None, 1e-5)


def _bits(x: torch.Tensor) -> np.ndarray:
    """A contiguous bf16 tensor's 16-bit patterns as a numpy view (no copy)."""
    return x.view(torch.int16).numpy().view(np.uint16)


def _rows(per_channel: np.ndarray, repeats: int) -> np.ndarray:
    """Per-channel float64 values as float32 rows of _ROW elements, one period of them."""
    return np.tile(per_channel.astype(np.float32), repeats).reshape(-1, _ROW)


@njit(inline="always")
def _add_row(values: np.ndarray, sums: np.ndarray, squares: np.ndarray, at: int) -> None:  # pragma: no cover - compiled
    """Add _ROW values and their squares to the sums at positions at .. at + _ROW - 1 of a period."""
    for j in range(_ROW):
        value = np.float64(values[j])
        sums[at + j] += value
        squares[at + j] += value * value


@njit(cache=True, nogil=True)
def _channel_sums(x: np.ndarray, period: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """Sums of the values and of their squares at each position modulo `period` of the bf16 bits `x`
    (a tail shorter than _ROW is summed zero-padded: the zeros add nothing)."""
    count = x.shape[0]
    sums = np.zeros(period, np.float64)
    squares = np.zeros(period, np.float64)
    values = np.empty(_ROW, np.float32)
    bits = values.view(np.uint32)
    whole = count - count % _ROW
    for start in range(0, whole, _ROW):
        for j in range(_ROW):
            bits[j] = np.uint32(x[start + j]) << 16
        _add_row(values, sums, squares, start % period)
    if whole < count:
        bits[:] = 0
        for j in range(count - whole):
            bits[j] = np.uint32(x[whole + j]) << 16
        _add_row(values, sums, squares, whole % period)
    return sums, squares


@njit(cache=True, nogil=True)
def _scale_shift_relu(x: np.ndarray, scale: np.ndarray, shift: np.ndarray,
                      out: np.ndarray) -> None:  # pragma: no cover - compiled
    """out = bf16(max(x * scale + shift, 0)) for the bf16 bits `x`; `scale` and `shift` are
    (period / _ROW, _ROW) rows repeating along `x`."""
    count = x.shape[0]
    period_rows = scale.shape[0]
    period = period_rows * _ROW
    inputs = np.empty(_ROW, np.float32)
    input_bits = inputs.view(np.uint32)
    outputs = np.empty(_ROW, np.float32)
    output_bits = outputs.view(np.uint32)
    whole = count - count % _ROW
    row = 0
    for start in range(0, whole, _ROW):
        for j in range(_ROW):
            input_bits[j] = np.uint32(x[start + j]) << 16
        for j in range(_ROW):
            outputs[j] = max(inputs[j] * scale[row, j] + shift[row, j], np.float32(0.0))
        for j in range(_ROW):
            word = output_bits[j]
            out[start + j] = np.uint16((word + ((word >> 16) & 1) + 0x7FFF) >> 16)
        row += 1
        if row == period_rows:
            row = 0
    for index in range(whole, count):
        at = index % period
        input_bits[0] = np.uint32(x[index]) << 16
        outputs[0] = max(inputs[0] * scale[at // _ROW, at % _ROW] + shift[at // _ROW, at % _ROW], np.float32(0.0))
        word = output_bits[0]
        out[index] = np.uint16((word + ((word >> 16) & 1) + 0x7FFF) >> 16)


@njit(cache=True, nogil=True)
def _float_channel_sums(x: np.ndarray, period: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - compiled
    """`_channel_sums` of float32 values."""
    count = x.shape[0]
    sums = np.zeros(period, np.float64)
    squares = np.zeros(period, np.float64)
    whole = count - count % _ROW
    for start in range(0, whole, _ROW):
        _add_row(x[start : start + _ROW], sums, squares, start % period)
    if whole < count:
        tail = np.zeros(_ROW, np.float32)
        tail[: count - whole] = x[whole:]
        _add_row(tail, sums, squares, whole % period)
    return sums, squares


@njit(cache=True, nogil=True)
def _float_scale_shift_relu(x: np.ndarray, scale: np.ndarray, shift: np.ndarray,
                            out: np.ndarray) -> None:  # pragma: no cover - compiled
    """`_scale_shift_relu` of float32 values."""
    count = x.shape[0]
    period_rows = scale.shape[0]
    period = period_rows * _ROW
    whole = count - count % _ROW
    row = 0
    for start in range(0, whole, _ROW):
        for j in range(_ROW):
            out[start + j] = max(x[start + j] * scale[row, j] + shift[row, j], np.float32(0.0))
        row += 1
        if row == period_rows:
            row = 0
    for index in range(whole, count):
        at = index % period
        out[index] = max(x[index] * scale[at // _ROW, at % _ROW] + shift[at // _ROW, at % _ROW], np.float32(0.0))
