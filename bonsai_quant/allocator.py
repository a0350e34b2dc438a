"""Keep freed memory in the process between tensors (glibc only; elsewhere nothing changes).

glibc gives a freed block back to the kernel when it was mapped on its own (above a threshold that it moves
at run time) or when the free top of a heap passes the trim threshold; the next tensor of that size is then
faulted in page by page and zeroed by the kernel. convert and verify make the same few-MB temporaries for
every chunk of every layer, so on klein 4B a third of quantization's CPU time went to zeroing pages
(`clear_page` in a profile). A fixed threshold and a higher trim threshold keep those blocks for reuse; tensors
above 32 MB (whole layers) are still mapped on their own and returned when freed, so the peak stays that of the
live tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

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
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # musl or no libc found: its allocator keeps its own policy
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
