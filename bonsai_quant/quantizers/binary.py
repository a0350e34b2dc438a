"""Binary weights: w ~ s * sign(w) per group, with s = mean|w| (the least-squares optimum for fixed signs)."""

from __future__ import annotations

import torch

SOLVERS = ("absmean",)


def quantize_groups(groups: torch.Tensor, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """groups: float32 [n, group_size] -> (codes int8 in {-1,+1}, scale float32 [n]); 0 counts as +1."""
    if solver != "absmean":
        raise ValueError(f"binary solver {solver!r}; valid: {', '.join(SOLVERS)}")
    codes = (groups >= 0).to(torch.int8).mul_(2).sub_(1)
    return codes, groups.abs().mean(dim=-1)
