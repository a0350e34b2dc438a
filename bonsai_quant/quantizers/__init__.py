"""Per-group binary and ternary quantizers.

`quantize` returns codes and 16-bit scales such that codes * scales is the quantized weight exactly; the scale
is rounded to the recipe's scale dtype here, once, so packing and decoding are lossless afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BonsaiError
from . import binary, ternary

SOLVERS = {"binary": binary.SOLVERS, "ternary": ternary.SOLVERS}
_MODULES = {"binary": binary, "ternary": ternary}
ROWS_PER_CHUNK = 1024  # bounds temporaries (sort indices are int64) to ~100 MB for klein's widest layers


@dataclass(frozen=True)
class QuantizedTensor:
    codes: torch.Tensor   # int8 [out, in]
    scales: torch.Tensor  # scale dtype [out, in // group_size]
    rel_error: float      # ||W - W_hat|| / ||W||


def quantize(weight: torch.Tensor, mode: str, group_size: int, scale_dtype: torch.dtype,
             solver: str, name: str = "weight") -> QuantizedTensor:
    if mode not in _MODULES:
        raise BonsaiError(f"{name}: unknown mode {mode!r}; valid: binary, ternary")
    if weight.ndim != 2 or weight.shape[1] % group_size:
        raise BonsaiError(f"{name}: shape {list(weight.shape)} cannot be quantized in groups of {group_size} "
                          f"(needs a 2-D weight whose in_features is a multiple of {group_size})")
    out_features, in_features = weight.shape
    codes = torch.empty(out_features, in_features, dtype=torch.int8)
    scales = torch.empty(out_features, in_features // group_size, dtype=scale_dtype)
    err2 = ref2 = 0.0
    for start in range(0, out_features, ROWS_PER_CHUNK):
        rows = weight[start:start + ROWS_PER_CHUNK].float()
        _check_finite(rows, name, start)
        groups = rows.reshape(-1, group_size)
        c, s = _MODULES[mode].quantize_groups(groups, solver)
        s16 = s.to(scale_dtype)
        if torch.isinf(s16).any():
            raise BonsaiError(f"{name}: a group scale overflows {scale_dtype} (max |w| too large); "
                              f"use scale_dtype: bfloat16 in the recipe")
        codes[start:start + len(rows)] = c.reshape(rows.shape)
        scales[start:start + len(rows)] = s16.reshape(len(rows), -1)
        diff = groups - c.float() * s16.float()[:, None]
        err2 += float(diff.square().sum())
        ref2 += float(groups.square().sum())
    rel = (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0
    return QuantizedTensor(codes, scales, rel)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes * scales as float32 [out, in]: the exact quantized weight."""
    out_features, in_features = codes.shape
    groups = codes.float().reshape(out_features, -1, group_size) * scales.float()[:, :, None]
    return groups.reshape(out_features, in_features)


def _check_finite(rows: torch.Tensor, name: str, row_offset: int) -> None:
    bad = ~torch.isfinite(rows)
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise BonsaiError(f"{name}: non-finite weight {rows[r, c].item()} at [{row_offset + r}, {c}]; "
                          "a checkpoint must hold finite weights")
