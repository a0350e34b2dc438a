"""What the calibrated solvers minimise, as a figure to report beside the plain weight error.

act-aware and gptq do not minimise ||W - W_hat|| / ||W||: they minimise the layer's output error on the
calibration inputs, ||(W - W_hat) x|| over x ~ the set. So a gptq pack can have a larger weight error than the
data-free default and still draw far better images. `objective_rel_error` is sqrt(tr(E H E^T) / tr(W H W^T)),
E = W - W_hat, H = E[x x^T] (gptq's statistics); with only the diagonal E[x_j^2] (act-aware's), H's diagonal.
"""

from __future__ import annotations

import torch

from . import CALIBRATED_SOLVERS, ROWS_PER_CHUNK, dequantize


def objective_rel_error(weight: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, group_size: int,
                        solver: str, stats) -> float | None:
    """The relative output error on the calibration inputs for a calibrated solver's result; None for data-free
    solvers. float64 throughout, so that the figure does not depend on the thread count."""
    if solver not in CALIBRATED_SOLVERS or stats is None:
        return None
    hessian = getattr(stats, "hessian", None)
    h = hessian.double() if hessian is not None else None
    d = None if h is not None else stats.diag.to(device="cpu", dtype=torch.float64).clamp(min=0)
    err2 = ref2 = 0.0
    for start in range(0, weight.shape[0], ROWS_PER_CHUNK):
        stop = start + ROWS_PER_CHUNK
        w = weight[start:stop].double()
        e = w - dequantize(codes[start:stop], scales[start:stop], group_size).double()
        if h is not None:
            w, e = w.to(h.device), e.to(h.device)
            err2 += float(((e @ h) * e).sum())
            ref2 += float(((w @ h) * w).sum())
        else:
            err2 += float((e.square() * d).sum())
            ref2 += float((w.square() * d).sum())
    return (err2 / ref2) ** 0.5 if ref2 > 0 else 0.0
