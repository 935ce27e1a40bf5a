"""glibc's malloc set to keep freed memory for the next forward pass (CPU inference).

A forward pass on CPU allocates and frees tens of MB of activations. By default glibc returns
such blocks to the kernel: it maps large ones separately and unmaps them when freed, trims the
top of its heaps, and gives threads arenas of their own whose 64 MB heaps it makes and unmakes
as the activations come and go. The next pass then faults every page back in. Measured on a
512² image, width-16 U-Net, one thread: 3,000-12,000 page faults and 14-26 ms of system time
per pass of 90-120 ms, none with these settings (docs/performance.md, "Forward pass on CPU").

`keep_freed_memory` makes every thread allocate from the main heap, keeps up to TRIM_BYTES
freed at its top, and maps separately only blocks of MMAP_BYTES or more (an 8192² image's maps,
which still go back to the kernel when freed). The price is memory: a process holds on to what
its largest pass freed. It is process-wide and cannot be undone; `PredictConfig.keep_freed_memory`
= False leaves malloc alone for a predictor (another one in the process may already have set it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

TRIM_BYTES = 256 << 20
MMAP_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit systems


@functools.cache
def keep_freed_memory() -> bool:
    """Set malloc as the module docstring says, once per process (the settings are idempotent);
    whether it is set (False where the C library is not glibc, e.g. macOS or musl, where nothing
    is changed)."""
    return _set_mallopt()


def _set_mallopt() -> bool:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # noqa: B018 - glibc only: musl has mallopt as a stub that does nothing
    except (OSError, AttributeError, TypeError):
        logger.debug("malloc left as it is: the C library (%s) is not glibc", name)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, MMAP_BYTES), (_M_TRIM_THRESHOLD, TRIM_BYTES))
    applied = all(mallopt(parameter, value) == 1 for parameter, value in settings)
    logger.debug("malloc set to keep freed memory for the next forward pass: %s", applied)
    return applied
