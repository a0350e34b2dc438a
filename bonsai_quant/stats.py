"""Calibration statistics of linear inputs, gathered with forward hooks over a calibration set.

For each requested linear, the hook sees its input x (all tokens of the batch, flattened to rows of
in_features) and adds to running sums: always sum x_j^2 per input channel (the diagonal second moments that
`act-aware` weighs errors by), and, when asked, the full X^T X (`gptq`'s H). Only sums are kept, so memory is
the statistics themselves plus one batch of activations, however large the set: in_features floats per layer
for the diagonal, in_features^2 for H (klein's widest, 12288 inputs: 1.2 GB in float64). `BlockStats` bounds
the H memory of a whole model by gathering one transformer block at a time.

Statistics are means (sums / number of input rows), so sets of different sizes give comparable numbers.
Accumulation is in float64: sums over ~10^5 rows of values spanning orders of magnitude lose digits in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import BonsaiError


@dataclass
class LayerStats:
    rows: int                       # input vectors seen (tokens x calls)
    diag: torch.Tensor              # [in] float64: E[x_j^2]
    hessian: torch.Tensor | None    # [in, in] float64: E[x x^T], when asked for


class _Accumulator:
    def __init__(self, in_features: int, full: bool, device: torch.device, dtype: torch.dtype):
        self.rows = 0
        self.sq = torch.zeros(in_features, dtype=dtype, device=device)
        self.xtx = torch.zeros(in_features, in_features, dtype=dtype, device=device) if full else None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.sq.dtype)
        self.rows += x.shape[0]
        self.sq += x.square().sum(dim=0)
        if self.xtx is not None:
            self.xtx.addmm_(x.T, x)

    def result(self) -> LayerStats:
        n = max(self.rows, 1)
        # Left on the device they were gathered on: gptq runs where its H is (a GPU when there is one).
        return LayerStats(self.rows, self.sq / n, None if self.xtx is None else self.xtx / n)


def module_name(tensor_name: str) -> str:
    return tensor_name.removesuffix(".weight")


class StatsCollector:
    """Context manager: while open, every forward of `model` adds the inputs of the named linears to the sums.

    `wanted` maps tensor names (`...weight`) to "diag" or "hessian"."""

    def __init__(self, model: torch.nn.Module, wanted: dict[str, str], dtype: torch.dtype = torch.float64):
        modules = dict(model.named_modules())
        self.model, self.handles, self.acc = model, [], {}
        device = next(model.parameters()).device
        for name, need in wanted.items():
            if need not in ("diag", "hessian"):
                raise ValueError(f"{name}: statistics {need!r}; valid: diag, hessian")
            module = modules.get(module_name(name))
            if not isinstance(module, torch.nn.Linear):
                raise BonsaiError(f"{name}: no Linear module {module_name(name)!r} in the model to gather "
                                  "calibration statistics from")
            self.acc[name] = _Accumulator(module.in_features, need == "hessian", device, dtype)
            self.acc[name].module = module

    def __enter__(self) -> "StatsCollector":
        for acc in self.acc.values():
            self.handles.append(acc.module.register_forward_pre_hook(lambda m, args, a=acc: a.add(args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def result(self) -> dict[str, LayerStats]:
        return {name: acc.result() for name, acc in self.acc.items()}


@torch.no_grad()
def collect_stats(model: torch.nn.Module, calib, wanted: dict[str, str], batch_size: int = 64,
                  max_calls: int | None = None) -> dict[str, LayerStats]:
    """Run `model` over the calibration set `calib` (a `calibration.CalibrationSet`) and return the statistics
    of the `wanted` linears (tensor name -> "diag" | "hessian")."""
    if not wanted:
        return {}
    param = next(model.parameters())
    with StatsCollector(model, wanted) as collector:
        for batch in calib.batches(batch_size, device=param.device, dtype=param.dtype, max_calls=max_calls):
            model(**batch)
    return collector.result()


def block_of(tensor_name: str) -> str:
    """The transformer block a tensor belongs to ("transformer_blocks.3"), or its module for tensors outside
    the blocks (embedders, modulation, output)."""
    parts = tensor_name.split(".")
    if parts[0] in ("transformer_blocks", "single_transformer_blocks") and len(parts) > 1:
        return ".".join(parts[:2])
    return module_name(tensor_name)


class BlockStats:
    """Statistics on demand, one transformer block at a time: asking for a tensor of a new block runs the
    calibration set once, gathering that block's wanted linears, and drops the previous block's. Peak memory is
    one block's H (klein: 2.1 GB in float64 for a double block, 1.3 GB for a single one) instead of the
    whole model's (36 GB).

    The model must be the unmodified full-precision one: the statistics are those of its inputs."""

    def __init__(self, model: torch.nn.Module, calib, wanted: dict[str, str], batch_size: int = 64,
                 log: Callable[[str], None] = lambda m: None):
        self.model, self.calib, self.wanted, self.batch_size, self.log = model, calib, wanted, batch_size, log
        self.block: str | None = None
        self.stats: dict[str, LayerStats] = {}
        self.passes = 0

    def get(self, tensor_name: str) -> LayerStats | None:
        if tensor_name not in self.wanted:
            return None
        block = block_of(tensor_name)
        if block != self.block:
            self.stats = {}  # free the previous block's H before gathering the next
            names = {n: need for n, need in self.wanted.items() if block_of(n) == block}
            self.stats = collect_stats(self.model, self.calib, names, self.batch_size)
            self.block = block
            self.passes += 1
            self.log(f"calibration statistics for {block}: {len(names)} linear(s), {self.calib.calls} calls")
        return self.stats[tensor_name]
