"""Process-wide CPU settings the CLI and the benchmark tools make before work starts; neither changes a result.

OpenMP waiting, set before torch is first imported (libgomp reads it once, when it loads): the small-model
commands (sensitivity, eval, calibrate on the built-in models) run thousands of forwards made of small
operations, each an OpenMP parallel region. By default idle OpenMP threads spin between regions; when the cores
are shared with other processes, a spinning thread holds a core the thread it waits for needs, and every region
waits out a scheduler slice: on 2 loaded cores a forward of the digits model took 3 times the CPU time and 3-10
times the wall time it takes with passive waiting (threads sleep until woken).

Freed memory (glibc only): glibc gives a freed block back to the kernel when it was mapped on its own (above a
threshold it moves at run time) or when the free top of a heap passes the trim threshold; the next tensor of
that size is then faulted in page by page and zeroed by the kernel. convert and verify make the same few-MB
temporaries for every chunk of every layer, so on klein 4B a third of quantization's CPU time went to zeroing
pages (`clear_page` in a profile). A fixed threshold and a higher trim threshold keep those blocks for reuse;
tensors above 32 MB (whole layers) are still mapped on their own and returned when freed, so the peak stays that
of the live tensors.
"""

from __future__ import annotations

import ctypes
import os
import sys


def prepare() -> None:
    """Both settings; call before torch is imported."""
    passive_omp_wait()
    keep_freed_memory()


def passive_omp_wait() -> None:
    """Make OpenMP threads sleep while they wait, unless the user chose a policy (OMP_WAIT_POLICY) or torch is
    already loaded (then it is too late to change, and nothing is done)."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest; a fixed value also stops it from rising with each freed map
TRIM_THRESHOLD = 256 << 20

_done = False


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; True where they were set (Linux with glibc)."""
    global _done
    if _done or not sys.platform.startswith("linux"):
        return _done
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter itself links
    except (OSError, AttributeError):  # no mallopt: that allocator keeps its own policy
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
