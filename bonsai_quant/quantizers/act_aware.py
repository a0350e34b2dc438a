"""Activation-aware scales: the per-group optimum of the activation-weighted squared error.

A linear's output error for an input x is (W - W_hat) x. Averaged over calibration inputs and keeping only the
diagonal of E[x x^T], the error of one group of a row is sum_j d_j (w_j - s b_j)^2 with d_j = E[x_j^2]: input
channels that carry large activations count more. Both solvers here are exact minimisers of that objective.

- binary: for any s > 0 the best code is b = sign(w), whatever d is, so s = sum(d |w|) / sum(d).
- ternary: for a fixed s the best support is {j : |w_j| > s/2} (including j trades d_j w_j^2 for
  d_j (|w_j| - s)^2, and d_j >= 0 scales both sides alike), so an optimal support is a |w|-threshold set: a
  prefix of the |w|-descending order. For a prefix P the best scale is A/D with A = sum_P d |w|, D = sum_P d,
  and the error is sum(d w^2) - A^2/D; the prefix maximising A^2/D wins. Note the order is by |w|, not by
  d |w|: with weights, a prefix of the d|w| order is not a threshold set, and the exact answer needs |w|.

A group whose inputs never fire (sum d = 0) has no preference at all; it falls back to the data-free optimum,
so a dead channel does not turn into a zero scale that a later, differently-distributed input would punish.
"""

from __future__ import annotations

import numpy as np
import torch

from . import binary, ternary


def quantize_groups(groups: torch.Tensor, weights: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """groups: float32 [n, g]; weights: non-negative [n, g] (d of each weight's input channel).

    Returns (codes int8 [n, g], scale float32 [n]) minimising sum_j d_j (w_j - s c_j)^2 per group."""
    weights = weights.to(torch.float64)
    if mode == "binary":
        codes, scale = _binary(groups, weights)
        fallback = binary.quantize_groups
        default = "absmean"
    elif mode == "ternary":
        codes, scale = _ternary(groups, weights)
        fallback = ternary.quantize_groups
        default = "optimal"
    else:
        raise ValueError(f"act-aware: unknown mode {mode!r}; valid: binary, ternary")
    dead = weights.sum(dim=-1) <= 0
    if dead.any():
        c, s = fallback(groups[dead].cpu(), default)
        codes[dead], scale[dead] = c.to(codes.device), s.to(scale.device)
    return codes, scale


def _binary(groups: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    codes = (groups >= 0).to(torch.int8).mul_(2).sub_(1)  # 0 counts as +1, as the data-free binary solver
    total = d.sum(dim=-1)
    scale = (d * groups.abs().double()).sum(dim=-1) / total.clamp(min=torch.finfo(torch.float64).tiny)
    return codes, scale.float()


def _ternary(groups: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mag = groups.abs()
    # A stable argsort fixes the order among equal |w| so the chosen support is deterministic. numpy's is the
    # fastest on a CPU; on a GPU (gptq there) sorting in place beats a round trip through host memory.
    if mag.device.type == "cpu":
        order = torch.from_numpy(np.argsort(np.negative(mag.numpy()), axis=-1, kind="stable"))
    else:
        order = torch.sort(mag, dim=-1, descending=True, stable=True).indices
    mag_sorted = mag.gather(-1, order).double()
    d_sorted = d.gather(-1, order)
    a = (d_sorted * mag_sorted).cumsum(dim=-1)
    w = d_sorted.cumsum(dim=-1)
    gain = torch.where(w > 0, a * a / w.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    # First maximum: among prefixes with equal error the smallest support wins (a zero-weight or zero-d
    # channel never enters the support for nothing).
    best = gain.argmax(dim=-1, keepdim=True)
    scale = (a.gather(-1, best) / w.gather(-1, best).clamp(min=torch.finfo(torch.float64).tiny)).squeeze(-1)
    in_prefix = torch.arange(groups.shape[-1], device=groups.device).expand_as(order) <= best
    support = torch.zeros_like(in_prefix).scatter_(-1, order, in_prefix)
    support &= mag > 0  # a zero weight gains nothing from a nonzero code
    codes = torch.sign(groups).to(torch.int8) * support
    return codes.to(torch.int8), scale.float()
