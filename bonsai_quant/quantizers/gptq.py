"""GPTQ for binary and ternary codes: sequential quantization with Hessian error feedback (Frantar et al., 2022).

The objective is the calibration output error of the layer, tr((W - W_hat) H (W - W_hat)^T) with H = E[x x^T]
over the calibration inputs. Rows are independent; within a row, input columns are quantized one at a time
and each column's rounding error is pushed onto the columns not yet quantized, weighted by the Cholesky factor
of H^-1, so correlated inputs absorb each other's error. As in the reference implementation:

- damping: H + lambda I with lambda = 0.01 * mean(diag H), so a rank-deficient H (few calibration tokens,
  dead channels) still has a Cholesky factor; dead channels (H_jj = 0) get H_jj = 1 and a zero weight;
- lazy block updates: columns are processed in blocks of `block_size`; inside a block the update is applied
  column by column, to the rest of the matrix once per block (one matmul), which is what makes it fast.

Adaptations to 1-bit and ternary codes with one 16-bit scale per group of `group_size` columns:

- the scale of a group is chosen when its first column comes up, from the group's *current* weights (already
  carrying the error pushed from earlier groups), by the activation-aware solver with d = diag(H): the exact
  diagonal-weighted optimum of that group (`act_aware.py`). It is rounded to the 16-bit scale dtype before any
  column uses it, so the error fed forward is the error of what is stored.
- each column is then rounded to the nearest level of that grid: s * sign(w) (binary), or s * sign(w) if
  |w| > s/2 else 0 (ternary).
- after the pass the codes are fixed and every row's scales are refitted jointly: the objective is quadratic in
  a row's group scales, so (C^T H C) s = C^T H w gives the exact H-weighted optimum for those codes. That step
  can only lower the objective (before the 16-bit rounding) and matters at 1-2 bits, where the scale chosen
  up-front is a poor fit once the error feedback has moved the group. A negative solution is stored as a
  positive scale with the group's codes flipped (s c = (-s)(-c)).

Everything runs on the device of the tensors given (CPU or CUDA), in float32, with float64 for the Cholesky.
"""

from __future__ import annotations

import torch

from ..errors import BonsaiError
from . import act_aware

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128


def prepare(hessian: torch.Tensor, damp: float = DEFAULT_DAMP,
            name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + lambda I)^-1 as float32, mask of dead input channels)."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) <= 0
    h[dead, dead] = 1.0
    diag = torch.diagonal(h)
    diag += damp * float(diag.mean())
    try:
        lower = torch.linalg.cholesky(h)
        inverse = torch.cholesky_inverse(lower)
        upper = torch.linalg.cholesky(inverse, upper=True)
    except torch._C._LinAlgError as e:  # not positive definite even after damping
        raise BonsaiError(f"{name}: the calibration Hessian is not positive definite with damping {damp} "
                          f"({e}); use a larger damping or more calibration data") from None
    return upper.to(torch.float32), dead


def quantize_rows(weight: torch.Tensor, hinv_upper: torch.Tensor, dead: torch.Tensor, hessian: torch.Tensor,
                  mode: str, group_size: int, scale_dtype: torch.dtype,
                  block_size: int = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [rows, in] -> (codes int8 [rows, in], scales scale_dtype [rows, in // group_size]).

    `hinv_upper`, `dead` come from `prepare(hessian)`; `hessian` (undamped) is used for the group scales'
    diagonal weights and the final scale refit."""
    if mode not in ("binary", "ternary"):
        raise ValueError(f"gptq: unknown mode {mode!r}; valid: binary, ternary")
    if block_size % group_size:
        raise ValueError(f"gptq: block_size {block_size} must be a multiple of group_size {group_size}")
    w = weight.to(torch.float32).clone()
    rows, columns = w.shape
    w[:, dead] = 0.0
    diag = torch.diagonal(hessian).to(torch.float32).clamp(min=0)
    codes = torch.zeros(rows, columns, dtype=torch.int8, device=w.device)
    scales = torch.zeros(rows, columns // group_size, dtype=torch.float32, device=w.device)
    for b0 in range(0, columns, block_size):
        b1 = min(b0 + block_size, columns)
        block = w[:, b0:b1].clone()
        errors = torch.zeros_like(block)
        hinv = hinv_upper[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                g = col // group_size
                group = block[:, i:i + group_size]
                _, s = act_aware.quantize_groups(group, diag[col:col + group_size].expand_as(group), mode)
                scales[:, g] = s.to(scale_dtype).to(torch.float32).to(w.device)
            s = scales[:, col // group_size]
            c = _round(block[:, i], s, mode)
            codes[:, col] = c
            err = (block[:, i] - c.float() * s) / hinv[i, i]
            block[:, i:] -= err[:, None] * hinv[i, i:][None, :]
            errors[:, i] = err
        w[:, b1:] -= errors @ hinv_upper[b0:b1, b1:]
    codes, refit = refit_scales(weight.to(torch.float32), codes, hessian, group_size)
    return codes, refit.to(scale_dtype)


def _round(column: torch.Tensor, scale: torch.Tensor, mode: str) -> torch.Tensor:
    """The nearest level of {-s, +s} (binary; 0 counts as +1) or {-s, 0, +s} (ternary) as int8 codes."""
    if mode == "binary":
        return (column >= 0).to(torch.int8).mul_(2).sub_(1)
    return (torch.sign(column) * (column.abs() > scale / 2)).to(torch.int8)


def refit_scales(weight: torch.Tensor, codes: torch.Tensor, hessian: torch.Tensor,
                 group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact H-weighted least-squares group scales of each row for fixed codes.

    Returns (codes with a group negated where its scale came out negative, scales >= 0 float32)."""
    rows, columns = codes.shape
    groups = columns // group_size
    h = hessian.to(device=weight.device, dtype=torch.float32)
    c = codes.to(torch.float32)
    # m[r, g, k] = sum_{i in g, j in k} c_ri H_ij c_rj ; rhs[r, g] = sum_{i in g} c_ri (H w_r)_i
    m = torch.empty(rows, groups, groups, dtype=torch.float64, device=weight.device)
    for g in range(groups):
        sl = slice(g * group_size, (g + 1) * group_size)
        z = c[:, sl] @ h[sl, :]  # [rows, in]: sum over i in g of c_ri H_ij
        m[:, g, :] = (z * c).reshape(rows, groups, group_size).sum(-1).double()
    rhs = ((weight @ h) * c).reshape(rows, groups, group_size).sum(-1).double()
    # Groups with no nonzero code (or no calibrated input) make m singular; their scale is irrelevant to the
    # objective, so pin it with a unit diagonal and a zero right-hand side.
    empty = torch.diagonal(m, dim1=1, dim2=2) <= 0
    m = m + torch.diag_embed(empty.double())
    rhs = rhs.masked_fill(empty, 0.0)
    # A ridge of 1e-9 of the mean diagonal keeps the solve well-posed without moving the optimum measurably.
    ridge = 1e-9 * torch.diagonal(m, dim1=1, dim2=2).mean(-1, keepdim=True).clamp(min=1e-30)
    m = m + torch.diag_embed(ridge.expand(-1, groups))
    s = torch.linalg.solve(m, rhs).float()
    flip = s < 0
    sign = torch.where(flip, -1, 1).to(torch.int8).repeat_interleave(group_size, dim=1)
    return codes * sign, s.abs()
