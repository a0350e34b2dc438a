"""Per-group binary and ternary quantizers.

`quantize` returns codes and 16-bit scales such that codes * scales is the quantized weight exactly; the scale
is rounded to the recipe's scale dtype here, once, so packing and decoding are lossless afterwards.

Data-free solvers see the weights only. Calibrated solvers also take the layer's calibration statistics
(`stats`: anything with `diag`, E[x_j^2] per input channel, and `hessian`, E[x x^T] or None; see
`bonsai_quant.stats.LayerStats`): `act-aware` needs `diag`, `gptq` needs `hessian`.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ..errors import BonsaiError
from . import act_aware, binary, gptq, ternary
from .solvers import CALIBRATED_SOLVERS, MODE_SOLVERS

SOLVERS = MODE_SOLVERS
_MODULES = {"binary": binary, "ternary": ternary}
ROWS_PER_CHUNK = 1024  # calibrated solvers: a chunk is a sweep over every column, so fewer chunks are cheaper
# Data-free solvers make several full-size float32 temporaries per chunk; ~3 MB each stays in cache, where
# 1024 klein rows (12 MB) went to memory on every pass: half the CPU time per weight on 2 cores.
CHUNK_ELEMENTS = 3 << 18


def statistics_needed(decisions) -> dict[str, str]:
    """{tensor name: "diag" | "hessian"} for each quantize decision whose solver needs calibration statistics."""
    return {d.name: CALIBRATED_SOLVERS[d.solver] for d in decisions
            if d.action == "quantize" and d.solver in CALIBRATED_SOLVERS}


@dataclass(frozen=True)
class QuantizedTensor:
    codes: torch.Tensor   # int8 [out, in]
    scales: torch.Tensor  # scale dtype [out, in // group_size]
    rel_error: float      # ||W - W_hat|| / ||W||


def quantize(weight: torch.Tensor, mode: str, group_size: int, scale_dtype: torch.dtype,
             solver: str, name: str = "weight", stats=None) -> QuantizedTensor:
    if mode not in _MODULES:
        raise BonsaiError(f"{name}: unknown mode {mode!r}; valid: binary, ternary")
    if weight.ndim != 2 or weight.shape[1] % group_size:
        raise BonsaiError(f"{name}: shape {list(weight.shape)} cannot be quantized in groups of {group_size} "
                          f"(needs a 2-D weight whose in_features is a multiple of {group_size})")
    out_features, in_features = weight.shape
    group_solver = _group_solver(mode, solver, stats, name, in_features, group_size, scale_dtype)
    codes = torch.empty(out_features, in_features, dtype=torch.int8)
    scales = torch.empty(out_features, in_features // group_size, dtype=scale_dtype)
    chunk = ROWS_PER_CHUNK if solver in CALIBRATED_SOLVERS else max(1, CHUNK_ELEMENTS // in_features)
    hessian = getattr(stats, "hessian", None) if solver == "gptq" else None
    if hessian is not None and hessian.is_cuda:
        chunk = out_features  # one pass over the columns: on a GPU its per-column kernel launches dominate

    def one_chunk(start: int) -> tuple[float, float]:
        rows = weight[start:start + chunk].float()
        groups = rows.reshape(-1, group_size)
        # Per-group norms: one fused pass, and each group's sum has a fixed order, so the reported error does
        # not depend on the thread count. A non-finite norm is how a NaN or Inf weight shows itself cheaply.
        ref = torch.linalg.vector_norm(groups, dim=-1)
        if not bool(torch.isfinite(ref).all()):
            check_finite(rows, name, start)
            ref = torch.linalg.vector_norm(groups.double(), dim=-1)  # finite, but too large to square in fp32
        c, s = group_solver(rows, groups)
        s16 = s.to(scale_dtype)
        if not torch.isfinite(s16).all():
            raise BonsaiError(f"{name}: a group scale overflows {scale_dtype} (max |w| too large); "
                              f"use scale_dtype: bfloat16 in the recipe")
        codes[start:start + len(rows)] = c.reshape(rows.shape)
        scales[start:start + len(rows)] = s16.reshape(len(rows), -1)
        err = torch.linalg.vector_norm(torch.addcmul(groups, c, s16.float()[:, None], value=-1), dim=-1)
        # fsum is exact, so no summation order (threads) shows in the result
        return math.fsum(err.double().square().tolist()), math.fsum(ref.double().square().tolist())

    starts = range(0, out_features, chunk)
    if solver in CALIBRATED_SOLVERS or len(starts) == 1:
        parts = [one_chunk(start) for start in starts]
    else:
        # numpy's sort and much of the solvers run on one core: chunks side by side use them all. Results are
        # taken in chunk order, so the sums and the first error raised are those of a sequential run.
        with ThreadPoolExecutor(max_workers=min(len(starts), max(1, torch.get_num_threads()))) as pool:
            parts = list(pool.map(one_chunk, starts))
    err2 = math.fsum(p[0] for p in parts)
    ref2 = math.fsum(p[1] for p in parts)
    rel = (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0
    if solver == "grid" and err2 > 0:
        raise BonsaiError(f"{name}: solver 'grid' needs weights already on a {mode} grid (each group of "
                          f"{group_size} holding only {'-s, +s' if mode == 'binary' else '-s, 0, +s'} with s exact "
                          f"in {str(scale_dtype).removeprefix('torch.')}), but re-quantizing changes it (relative "
                          f"error {rel:.3g}); valid: a checkpoint written by `bonsai-quant distill "
                          "--save-checkpoint`, or a rounding solver")
    return QuantizedTensor(codes, scales, rel)


def _group_solver(mode: str, solver: str, stats, name: str, in_features: int, group_size: int,
                  scale_dtype: torch.dtype):
    """A function (rows [r, in], the same rows as groups [r * in/g, g]) -> (codes, float32 scales [r * in/g])."""
    if solver not in CALIBRATED_SOLVERS:
        return lambda rows, groups: _MODULES[mode].quantize_groups(groups, solver)
    need = CALIBRATED_SOLVERS[solver]
    value = getattr(stats, need, None) if stats is not None else None
    if value is None:
        what = "the full input second moments H = E[x x^T]" if need == "hessian" else "input second moments"
        raise BonsaiError(f"{name}: solver {solver!r} needs calibration statistics ({what}) for this tensor; "
                          "valid: give a calibration set (--calib SET, or `calibration:` in the recipe) or a "
                          "data-free solver")
    expected = (in_features,) if need == "diag" else (in_features, in_features)
    if tuple(value.shape) != expected:
        raise BonsaiError(f"{name}: calibration statistics {need} have shape {list(value.shape)}, expected "
                          f"{list(expected)} for in_features {in_features}; was the calibration set made for "
                          "another model?")
    if solver == "act-aware":
        d = value.to(device="cpu", dtype=torch.float64).clamp(min=0).reshape(1, -1, group_size)

        def act_aware_solver(rows, groups):
            return act_aware.quantize_groups(groups, d.expand(len(rows), -1, -1).reshape(-1, group_size), mode)

        return act_aware_solver
    hinv_upper, dead = gptq.prepare(value, name=name)  # once per tensor, shared by every row chunk

    def gptq_solver(rows, groups):  # on the device of H: a GPU when the statistics were gathered on one
        codes, scales = gptq.quantize_rows(rows.to(value.device), hinv_upper, dead, value, mode, group_size,
                                           scale_dtype)
        return codes.cpu().reshape(groups.shape), scales.cpu().reshape(-1)

    return gptq_solver


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """codes * scales as float32 [out, in]: the exact quantized weight (written into `out` when given: a
    buffer reused layer after layer saves the page faults of a fresh ~340 MB tensor, which cost more than the
    two passes here)."""
    out_features, in_features = codes.shape
    if out is None:
        out = torch.empty(out_features, in_features, device=codes.device)
    out.copy_(codes)
    out.view(out_features, -1, group_size).mul_(scales[:, :, None])  # in float32: codes are -1, 0 or +1
    return out


def check_finite(tensor: torch.Tensor, name: str, row_offset: int = 0) -> None:
    """Every tensor a pack takes from a checkpoint, quantized or kept, must be finite: one error for all."""
    bad = ~torch.isfinite(tensor)
    if bad.any():
        idx = [int(i) for i in bad.nonzero()[0]]
        value = tensor[tuple(idx)].item()
        if idx:
            idx[0] += row_offset
        raise BonsaiError(f"{name}: non-finite weight {value} at {idx}; a checkpoint must hold finite weights")
