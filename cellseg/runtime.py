"""Where and how models run: the device (CUDA when present), CPU threads, mixed precision and
compilation. Training and inference both start here; neither imports the other."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import cv2
import torch

logger = logging.getLogger(__name__)

def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present, else CPU; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{name}' was requested but CUDA is not available on this machine")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (CUDA runs it asynchronously; the CPU has none queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """What a model pass computes in under `autocast_context(device, enabled)`; None for fp32."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def pass_precision(device: torch.device, amp: bool) -> str:
    """`autocast_dtype` in words, for logs."""
    dtype = autocast_dtype(device, amp)
    if dtype is not None:
        return "bf16" if dtype == torch.bfloat16 else "fp16"
    return "fp32: this CPU has no native bf16" if amp and device.type == "cpu" else "fp32"


def autocast_context(device: torch.device, enabled: bool) -> AbstractContextManager:
    """Mixed precision when enabled: bf16 on CUDA (fp16 where bf16 is unsupported) and on CPUs with
    native bf16; nothing elsewhere. Weights, losses and optimiser state stay fp32."""
    dtype = autocast_dtype(device, enabled)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def set_threads(threads: int | None) -> None:
    """Torch CPU threads for this process (process-wide: one model per worker process), and as many
    for OpenCV's post-processing calls; None keeps their choice. The threads that call OpenCV are
    the parallelism on a CPU's cores (shards, writers): OpenCV's own pool beside them cost 2 ms more
    CPU per 512² image in the split of touching cells than the same calls on one thread, for no
    gain in time (docs/performance.md), and its workers' CPU escaped the run's count of it."""
    if threads is not None:
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)


class CoreShare:
    """This process's cores split between the shard loops running in it now. Before each batch a
    loop takes `cores // loops running` threads (torch's, for its own passes, and OpenCV's), so
    the cores a finished shard frees go to the shards still running: the last shard of a run,
    or the short one at its end, no longer runs on its share alone while the others' cores idle."""

    def __init__(self, cores: int) -> None:
        self.cores = max(1, cores)
        self._running = 0
        self._lock = threading.Lock()
        self._opencv_threads_before = 0

    # OpenCV's thread count is process-wide: the loops' shares are set over the caller's choice (a
    # notebook's), which the last loop to leave puts back. torch's count is the calling thread's,
    # put back as each loop leaves: a share larger than the cores left to that thread (a loop run
    # on a caller's own thread) slowed its later torch work tenfold, its threads spinning for cores.

    @contextmanager
    def taking_part(self) -> Iterator[Callable[[], int]]:
        """Count the calling loop as running while inside; yields the function that sets the calling
        thread's threads to its share of the moment (and returns it)."""
        with self._lock:
            if not self._running:
                self._opencv_threads_before = cv2.getNumThreads()
            self._running += 1
        torch_threads_before = torch.get_num_threads()
        taken = 0

        def take() -> int:
            nonlocal taken
            threads = max(1, self.cores // max(1, self._running))
            # torch's count too, not only `taken`: a loop nested on this thread puts its own back
            if threads != taken or threads != torch.get_num_threads():
                set_threads(threads)
            taken = threads
            return threads

        try:
            yield take
        finally:
            if taken and torch.get_num_threads() != torch_threads_before:
                torch.set_num_threads(torch_threads_before)
            with self._lock:
                self._running -= 1
                if not self._running:
                    cv2.setNumThreads(self._opencv_threads_before)


SHARD_CORES = CoreShare(available_cores())
"""The cores of the shards that one run's thread pool runs in this process (`segment-images`)."""


class PassGate:
    """Forward passes of this process's threads run side by side; a pass that compiles runs alone.

    torch.compile tracing a model in one thread while another thread leaves an autocast region
    deadlocks both (torch 2.13 on CPU: the tracer waits in a fake-tensor pass, the other thread in
    `autocast.__exit__`; a `make bench` product run of two shards hung so for good). So a pass that
    may compile waits until no other pass is in flight and holds new ones back until it is done.
    """

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._passes = 0
        self._alone = False

    @property
    def held_alone(self) -> bool:
        """Whether a pass holds the gate alone now."""
        return self._alone

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._alone)
            self._passes += 1
        try:
            yield
        finally:
            with self._changed:
                self._passes -= 1
                self._changed.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._changed:
            self._changed.wait_for(lambda: not self._alone and self._passes == 0)
            self._alone = True
        try:
            yield
        finally:
            with self._changed:
                self._alone = False
                self._changed.notify_all()


MODEL_PASSES = PassGate()
"""The one gate of every model pass (with its autocast region) in this process."""


def model_pass(model: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...]
               ) -> AbstractContextManager[Callable[[torch.Tensor], torch.Tensor]]:
    """A hold on MODEL_PASSES for one pass of `model` on an input of `shape`, giving the function
    to call inside it (enter autocast inside the hold): alone when the pass may compile."""
    if isinstance(model, CompiledByShape):
        return model.one_pass(shape)
    return _shared_pass(model)


@contextmanager
def _shared_pass(model: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    with MODEL_PASSES.shared():
        yield model


class CompiledByShape:
    """`model` through `torch.compile`, one graph per input shape; a compilation that fails (no C++
    compiler, say) leaves the model eager, with a warning. Shared by threads like the model it
    wraps; a shape's first pass, which compiles it, runs alone (`PassGate`)."""

    def __init__(self, model: torch.nn.Module, to_compile: Callable[[], torch.nn.Module] | None = None):
        self.model = model
        # What torch.compile compiles, built when first needed: by default `model` itself. A
        # channels-last UNet compiles a channels-first copy: inductor ran the channels-last
        # network 2x slower than eager (docs/performance.md, "Forward pass on CPU").
        self.to_compile = to_compile or (lambda: model)
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.ready: set[tuple[int, ...]] = set()  # shapes compiled already
        self.failed = False
        self._lock = threading.Lock()

    def eval(self) -> CompiledByShape:
        self.model.eval()
        return self

    @property
    def size_multiple(self) -> int:
        """The wrapped model's (`UNet.size_multiple`), else 1."""
        return int(getattr(self.model, "size_multiple", 1))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.one_pass(tuple(x.shape)) as forward:
            return forward(x)

    @contextmanager
    def one_pass(self, shape: tuple[int, ...]) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
        """See `model_pass`: the compiled model for `shape` (alone on its first pass), or the eager
        one once a compilation failed."""
        with self._lock:
            eager = self.failed
            if not eager and self.compiled is None:
                self.compiled = torch.compile(self.to_compile().eval(), dynamic=False)
            compiling = not eager and shape not in self.ready
        if eager:
            with _shared_pass(self.model) as model:
                yield model
            return
        with MODEL_PASSES.alone() if compiling else MODEL_PASSES.shared():
            yield lambda x: self._compiled(x, shape)

    def _compiled(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        compiled = self.compiled
        if self.failed or compiled is None:
            return self.model(x)
        try:
            result = compiled(x)
        except Exception as error:  # noqa: BLE001 - an eager pass is always possible; a real fault recurs there
            logger.warning("torch.compile failed, the model runs eagerly: %s", f"{type(error).__name__}: {error}"[:300])
            self.failed = True
            return self.model(x)
        with self._lock:
            self.ready.add(shape)
        return result


class TrainingForward:
    """`model`'s training passes, through `torch.compile(model, mode=mode)` unless `mode` is 'off':
    the crops of a run share one shape, so one graph (and one for a smaller last batch) serves
    every step, its backward compiled with it. A compilation that fails leaves the passes eager,
    with a warning. 'reduce-overhead' also replays the compiled kernels as CUDA graphs, which
    need each step marked (`__call__` does)."""

    def __init__(self, model: torch.nn.Module, mode: str = "off"):
        self.model = model
        self.mode = mode
        self.compiled: Callable[[torch.Tensor], torch.Tensor] | None = (
            None if mode == "off" else torch.compile(model, mode=mode, dynamic=False))
        self.failed = False

    @property
    def is_compiled(self) -> bool:
        """Whether the passes run compiled (not 'off', and no compilation has failed)."""
        return self.compiled is not None and not self.failed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_compiled:
            return self.model(x)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are read; replay over them
        try:
            return self.compiled(x)  # type: ignore[misc]
        except Exception as error:  # noqa: BLE001 - an eager pass is always possible; a real fault recurs there
            logger.warning("torch.compile failed, training runs eagerly: %s", f"{type(error).__name__}: {error}"[:300])
            self.failed = True
            return self.model(x)
