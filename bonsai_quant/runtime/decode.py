"""Decoding packed weights to dense values, a slice of output features at a time.

Both layouts store the unsigned slot q of each weight LSB-first along the input dimension; they differ in
word size and orientation (MLX: rows are output features; gemlite: W_q is [K*bits/8, N], transposed) and in
the side tensors. Every formula here yields exactly -s, 0 or +s in float32 or wider.
"""

from __future__ import annotations

import torch

from ..packing.bits import unpack_bytes


def mlx_rows(weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int, group_size: int,
             start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense [stop-start, in] rows of an MLX-layout linear: w = scales * q + biases."""
    q = unpack_bytes(weight[start:stop].contiguous().view(torch.uint8), bits)
    rows = q.shape[0]
    w = q.view(rows, -1, group_size).to(dtype)
    w.mul_(scales[start:stop].to(dtype).unsqueeze(-1)).add_(biases[start:stop].to(dtype).unsqueeze(-1))
    return w.view(rows, -1)


def gemlite_rows(w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, group_size: int,
                 start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense [stop-start, in] rows (output features) of a gemlite-layout linear.

    binary (fma mode): w = q * scales + zeros; ternary (integer zero point z): w = (q - z) * scales.
    """
    q = unpack_bytes(w_q[:, start:stop].t().contiguous(), bits)
    rows = q.shape[0]
    w = q.view(rows, -1, group_size).to(dtype)
    s = scales[:, start:stop].t().to(dtype).unsqueeze(-1)
    if zeros.dim() == 0:
        w.sub_(zeros.to(dtype)).mul_(s)
    else:
        w.mul_(s).add_(zeros[:, start:stop].t().to(dtype).unsqueeze(-1))
    return w.view(rows, -1)


def bonsai_rows(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, start: int, stop: int,
                dtype: torch.dtype) -> torch.Tensor:
    """Dense rows of the compact layout (1-bit signs, or 5 trits per byte), through its own exact unpack."""
    from ..packing import bonsai

    mode = "binary" if bits == 1 else "ternary"
    c, s = bonsai.unpack({"codes": codes[start:stop], "scales": scales[start:stop]}, mode, group_size)
    rows = c.shape[0]
    return (c.view(rows, -1, group_size).to(dtype) * s.to(dtype).unsqueeze(-1)).view(rows, -1)
