"""The registry of solvers: which modes each serves, what calibration statistics it needs, the defaults.

Recipes validate solver names against it; `quantize` dispatches on it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Solver:
    name: str
    modes: tuple[str, ...]
    needs: str | None = None   # calibration statistics: "diag" (E[x_j^2]) or "hessian" (E[x x^T]); None: data-free


# In the order recipes list them to the user. act-aware and gptq are calibrated (they need a calibration set:
# --calib or the `calibration:` key). grid reads weights already on the grid (a distilled checkpoint) and
# refuses anything else.
_REGISTRY = (
    Solver("absmean", ("binary",)),
    Solver("optimal", ("ternary",)),
    Solver("threshold", ("ternary",)),
    Solver("act-aware", ("binary", "ternary"), needs="diag"),
    Solver("gptq", ("binary", "ternary"), needs="hessian"),
    Solver("grid", ("binary", "ternary")),
)
SOLVERS: dict[str, Solver] = {s.name: s for s in _REGISTRY}
DEFAULT_SOLVERS = {"binary": "absmean", "ternary": "optimal"}
# What a calibrated solver needs from the calibration statistics.
CALIBRATED_SOLVERS = {s.name: s.needs for s in _REGISTRY if s.needs is not None}


def solvers_for(mode: str) -> tuple[str, ...]:
    return tuple(s.name for s in _REGISTRY if mode in s.modes)


MODE_SOLVERS = {mode: solvers_for(mode) for mode in DEFAULT_SOLVERS}
