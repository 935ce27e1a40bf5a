"""glibc's malloc kept from handing a forward pass's freed activations back to the kernel."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

import pytest

# Forward passes of the CPU inference network (channels-last, fused norms, bf16 where the CPU has
# it) on a 512² image in a new thread, as a shard runs them: page faults of each pass after the first two.
# In fp32 (a CPU without native bf16) a 512² pass's largest activations reach 32 MB, glibc's largest
# mmap threshold, so they are mapped anew in some passes whatever the settings: there the image is 384².
PASSES = """
import json, resource, sys, threading
import torch
from cellseg.allocator import keep_freed_memory
from cellseg.config import ModelConfig
from cellseg.model import UNet
from cellseg.runtime import autocast_context, cpu_has_native_bf16

kept = keep_freed_memory() if sys.argv[1] == "keep" else None
if sys.argv[1] == "return":
    # glibc's starting thresholds, pinned: set, they no longer rise after the first large free (its
    # dynamic threshold), which some runs reach and others not, so every pass gives its blocks back.
    import ctypes, ctypes.util
    from cellseg.allocator import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD
    mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    assert mallopt(_M_MMAP_THRESHOLD, 128 * 1024) == 1 and mallopt(_M_TRIM_THRESHOLD, 128 * 1024) == 1
model = UNet(ModelConfig()).eval().use_channels_last()
side = 512 if cpu_has_native_bf16() else 384
x = torch.rand(1, 1, side, side)
faults = []

def passes():
    torch.set_num_threads(1)
    with torch.inference_mode(), autocast_context(torch.device("cpu"), True):
        for index in range(10):
            before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            model(x)
            faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)

thread = threading.Thread(target=passes)
thread.start()
thread.join()
print(json.dumps({"kept": kept, "faults": faults[2:]}))
"""


def _faults_per_pass(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PASSES, mode], capture_output=True, text=True, check=True, timeout=300)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_forward_passes_fault_no_pages_back_in_once_freed_memory_is_kept():
    kept, returning = _faults_per_pass("keep"), _faults_per_pass("return")
    assert kept["kept"] is True
    # Most passes fault no page in (one in about fifty grows the heap by a block, 2,048 pages).
    # With glibc's defaults nearly every pass faulted 2,000-18,000 (8-72 MB) back in, but not in
    # every process (a CI run's default passes faulted 6,670 pages in all: glibc had raised its
    # threshold on its own), so the passes that show the count catching faults run with glibc's
    # starting thresholds pinned.
    assert statistics.median(kept["faults"]) < 64, kept
    assert statistics.median(returning["faults"]) > 1000, returning
    assert 4 * sum(kept["faults"]) < sum(returning["faults"]), (kept, returning)


def test_keeping_freed_memory_is_set_once_per_process():
    from cellseg.allocator import keep_freed_memory

    assert keep_freed_memory() is keep_freed_memory()
