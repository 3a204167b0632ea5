"""Process-wide CPU memory setting for inference: freed activation memory is reused, not unmapped.

glibc's malloc serves every allocation above its mmap threshold (128 KiB at start, rising with
use to at most 32 MiB) with fresh pages from the kernel and hands them back on free. PyTorch's
CPU allocator caches nothing, so each large activation of each forward is page-faulted in and
zeroed by the kernel again: one 2,048-token prefill chunk on the default model took ~300,000
minor faults (1.2 GB of fresh pages) and ran ~25 % slower for it (one thread). With the highest
threshold glibc accepts and no trimming of the heap's top, those buffers come back from the
heap: 0 faults after the first chunk. What is still mmap'd is what is bigger than 32 MiB and
allocated once (weights, the KV cache). The price: memory a burst freed stays with the process,
up to the peak of its activations. (vLLM's and IPEX's CPU guides swap in tcmalloc for the same
reason; this needs no preload.)
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3       # glibc's mallopt parameters
MMAP_THRESHOLD_MAX = 32 << 20                     # the most glibc accepts on 64-bit
TRIM_THRESHOLD = 2**31 - 1                        # mallopt takes an int: 2 GiB, "never" here


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed large buffers for the rest of the process; False where the
    C library has no mallopt (not glibc) or refuses the values."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
