"""How torch's OpenMP threads wait, set before torch is first imported (libgomp reads it once, when it loads).

The small-model commands (sensitivity, eval, calibrate on the built-in models) run thousands of forwards made
of small operations, each an OpenMP parallel region. By default idle OpenMP threads spin between regions; when
the cores are shared with other processes, a spinning thread holds a core the thread it waits for needs, and
every region waits out a scheduler slice: on 2 loaded cores a forward of the digits model took 3 times the CPU
time and 3-10 times the wall time it takes with passive waiting (threads sleep until woken). The arithmetic,
and so every result, is the same under either policy.
"""

from __future__ import annotations

import os


def passive_omp_wait() -> None:
    """Make OpenMP threads sleep while they wait, unless the user chose a policy (OMP_WAIT_POLICY) or torch is
    already loaded (then it is too late to change, and nothing is done)."""
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
