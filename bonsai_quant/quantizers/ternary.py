"""Ternary weights: w ~ s * t with t in {-1, 0, +1} per group.

`optimal` is the exact least-squares solution: for a fixed support of k nonzeros the best scale is the mean of
their |w|, and the best support of size k is the k largest |w|, so the error is sum(w^2) - S_k^2 / k with S_k
the sum of the k largest |w|; we pick the k maximising S_k^2 / k. `threshold` is the TWN rule of thumb
(support |w| > 0.7 * mean|w|), kept for comparison. `grid` reads weights already on a ternary grid (a distilled
checkpoint): s = max|w|, support = the nonzeros; `quantize` refuses the tensor unless that is exact.
"""

from __future__ import annotations

import numpy as np
import torch

SOLVERS = ("optimal", "threshold", "grid")


def quantize_groups(groups: torch.Tensor, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """groups: float32 [n, group_size] -> (codes int8 in {-1,0,+1}, scale float32 [n])."""
    mag = groups.abs()
    if solver == "optimal":
        support, scale = _optimal(mag)
    elif solver == "threshold":
        support = mag > 0.7 * mag.mean(dim=-1, keepdim=True)
        count = support.sum(dim=-1)
        scale = torch.where(count > 0, (mag * support).sum(dim=-1) / count.clamp(min=1), 0.0)
    elif solver == "grid":
        support = mag > 0
        scale = mag.amax(dim=-1)
    else:
        raise ValueError(f"ternary solver {solver!r}; valid: {', '.join(SOLVERS)}")
    codes = torch.sign(groups).to(torch.int8).mul_(support)
    return codes, scale


def _optimal(mag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # numpy's row sort is ~7x faster than torch.sort here, and values suffice: S_k^2/k is convex along a run
    # of equal magnitudes, so the first maximiser never splits a tie and "|w| >= k-th largest" is exactly the
    # best support of size k. Sorting -|w| ascending gives the descending order without a reversed copy.
    # float32 sums: k's whose objectives differ by less than float32 resolution differ in error by far less
    # than the 16-bit rounding of the scale that follows.
    ordered = np.negative(mag.numpy())
    ordered.sort(axis=-1)  # in place: -|w|, largest magnitude first
    ordered = torch.from_numpy(ordered)
    sums = ordered.cumsum(dim=-1)  # -S_k
    k = torch.arange(1, mag.shape[-1] + 1, dtype=torch.float32)
    objective = sums.square().div_(k)
    # numpy's argmax over a short last axis is ~5x torch's; both return the first maximum, so the smallest
    # support wins ties.
    best = torch.from_numpy(np.argmax(objective.numpy(), axis=-1)[:, None])
    threshold = -ordered.gather(-1, best)
    scale = (-sums.gather(-1, best) / (best + 1)).squeeze(-1)
    # An all-zero group keeps no support: its threshold becomes +inf, which no finite |w| reaches (one
    # comparison instead of a second one and a boolean and).
    support = mag >= threshold.masked_fill_(threshold <= 0, float("inf"))
    return support, scale
