"""Ternary weights: w ~ s * t with t in {-1, 0, +1} per group.

`optimal` is the exact least-squares solution: for a fixed support of k nonzeros the best scale is the mean of
their |w|, and the best support of size k is the k largest |w|, so the error is sum(w^2) - S_k^2 / k with S_k
the sum of the k largest |w|; we pick the k maximising S_k^2 / k. `threshold` is the TWN rule of thumb
(support |w| > 0.7 * mean|w|), kept for comparison.
"""

from __future__ import annotations

import torch

SOLVERS = ("optimal", "threshold")


def quantize_groups(groups: torch.Tensor, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """groups: float32 [n, group_size] -> (codes int8 in {-1,0,+1}, scale float32 [n])."""
    mag = groups.abs()
    if solver == "optimal":
        support = _optimal_support(mag)
    elif solver == "threshold":
        support = mag > 0.7 * mag.mean(dim=-1, keepdim=True)
    else:
        raise ValueError(f"ternary solver {solver!r}; valid: {', '.join(SOLVERS)}")
    count = support.sum(dim=-1)
    scale = torch.where(count > 0, (mag * support).sum(dim=-1) / count.clamp(min=1), 0.0)
    codes = torch.sign(groups).to(torch.int8) * support
    return codes.to(torch.int8), scale


def _optimal_support(mag: torch.Tensor) -> torch.Tensor:
    # Stable sort: among equal magnitudes the earlier weight joins the support first, so output is deterministic.
    ordered, order = torch.sort(mag, dim=-1, descending=True, stable=True)
    sums = ordered.cumsum(dim=-1, dtype=torch.float64)
    k = torch.arange(1, mag.shape[-1] + 1, dtype=torch.float64)
    best = (sums * sums / k).argmax(dim=-1, keepdim=True)  # first maximum: the smallest support wins ties
    in_support = torch.arange(mag.shape[-1]) <= best
    in_support &= ordered > 0  # an all-zero group keeps no support
    support = torch.empty_like(in_support)
    support.scatter_(-1, order, in_support)
    return support
