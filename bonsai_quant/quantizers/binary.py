"""Binary weights: w ~ s * sign(w) per group, with s = mean|w| (the least-squares optimum for fixed signs).

`grid` reads weights that already lie on a binary grid (a distilled or quantization-aware-trained checkpoint):
s = max|w|; `quantize` refuses the tensor unless codes * s reproduce it exactly.
"""

from __future__ import annotations

import torch

SOLVERS = ("absmean", "grid")


def quantize_groups(groups: torch.Tensor, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    """groups: float32 [n, group_size] -> (codes int8 in {-1,+1}, scale float32 [n]); 0 counts as +1."""
    if solver not in SOLVERS:
        raise ValueError(f"binary solver {solver!r}; valid: {', '.join(SOLVERS)}")
    codes = (groups >= 0).to(torch.int8).mul_(2).sub_(1)
    mag = groups.abs()
    return codes, mag.amax(dim=-1) if solver == "grid" else mag.mean(dim=-1)
