"""Reported figures that do not depend on the thread count.

Reductions on several threads add in another order and move a float32 sum by ~1e-7 relative, which would make
report.json and verify.json (and so a release's manifest) differ between runs. Figures are accumulated in
float64 (or with a fixed thread count, for whole forwards) and rounded to a few significant digits, far above
that noise.
"""

from __future__ import annotations

import contextlib
import math

SIGNIFICANT = 6


def figure(x: float, digits: int = SIGNIFICANT) -> float:
    """`x` rounded to `digits` significant digits; NaN and infinities stay as they are (they fail gates)."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else x


def mean(values: list[float], weights: list[float] | None = None) -> float:
    """An order-independent (exactly rounded) weighted mean."""
    if not values:
        return 0.0
    if weights is None:
        return math.fsum(values) / len(values)
    return math.fsum(v * w for v, w in zip(values, weights)) / math.fsum(weights)


@contextlib.contextmanager
def fixed_threads(threads: int = 1):
    """Run torch on a fixed number of threads, so a forward's summation order is the same on every machine
    setting (OMP_NUM_THREADS, core count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def size_text(nbytes: int | float) -> str:
    """A byte count in the decimal unit that keeps 3-4 significant digits: 812 bytes, 45.3 kB, 6.71 MB, 1.430 GB
    (a tiny model's pack is not "0.001 GB")."""
    if nbytes < 1e3:
        return f"{int(nbytes)} bytes"
    for unit, scale, digits in (("kB", 1e3, 1), ("MB", 1e6, 2)):
        if round(nbytes / scale, digits) < 1000:  # 999,999,999 bytes is "1.000 GB", not "1000.00 MB"
            return f"{nbytes / scale:.{digits}f} {unit}"
    return f"{nbytes / 1e9:.3f} GB"
