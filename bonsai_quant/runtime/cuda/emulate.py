"""The fp8 path's arithmetic in plain torch: the oracle of the CPU tests and the error model of the docs.

Activations: per (token, 128 channels) the scale is the smallest power of two p with amax / p <= 448 (so
x / p is exact and the only rounding is torch's round-to-nearest-even cast to e4m3). Product: per 128-wide
K block, an fp32 sum of e4m3 x code products, times activation scale x weight scale, added in K order.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
GROUP = 128


def e4m3_scales(x: torch.Tensor) -> torch.Tensor:
    """fp32 power-of-two scales [M, K/128] of x [M, K]."""
    amax = x.float().view(x.shape[0], -1, GROUP).abs().amax(-1)
    mant, exp = torch.frexp(amax)  # amax = mant * 2**exp, mant in [0.5, 1)
    # amax in [2**(exp-1), 2**exp): with m = 2 mant in [1, 2), p = 2**(exp-1-8) if m <= 1.75 else twice that.
    e = exp - 9 + (mant > 0.875).to(exp.dtype)
    e = torch.where(amax > 0, e.clamp(min=-126), torch.zeros_like(e)).clamp(max=126)
    return torch.ldexp(torch.ones_like(amax), e)


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = e4m3_scales(x)
    q = (x.float().view(x.shape[0], -1, GROUP) / s[:, :, None]).to(torch.float8_e4m3fn)
    return q.view(x.shape), s


def fp8_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 y [M, N] of x [M, K] against int8 codes [N, K] and scales [N, K/128], in the kernel's order."""
    q, sx = quantize_e4m3(x)
    qf = q.float()
    cf = codes.float()
    sw = scales.float()
    y = torch.zeros(x.shape[0], codes.shape[0], device=x.device)
    for g in range(x.shape[1] // GROUP):
        k = slice(g * GROUP, (g + 1) * GROUP)
        y += (qf[:, k] @ cf[:, k].t()) * sx[:, g, None] * sw[None, :, g]
    return y
