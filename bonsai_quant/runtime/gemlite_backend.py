"""Swap a gemlite-layout model's `PackedLinear`s for real gemlite `GemLiteLinearTriton` layers (CUDA only)."""

from __future__ import annotations

import torch

from ..errors import BonsaiError
from ..packing import gemlite as gemlite_pack
from .loader import PackReader
from .packed_linear import PackedLinear


class _CastIO(torch.nn.Module):
    """gemlite kernels take activations in the pack's scale dtype; the model may run in another."""

    def __init__(self, layer: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.layer, self.dtype = layer, dtype

    def forward(self, x):
        return self.layer(x.to(self.dtype)).to(x.dtype)


def gemlite_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import gemlite  # noqa: F401
    except Exception:
        return False
    return True


def use_gemlite(model: torch.nn.Module, folder) -> int:
    """Replace every gemlite-layout PackedLinear by GemLiteLinearTriton loaded from the pack; returns the count."""
    if not gemlite_available():
        raise BonsaiError("gemlite needs a CUDA GPU and the gemlite package (pip install gemlite)")
    import gemlite
    from gemlite.core import DType, GemLiteLinearTriton

    gemlite.set_packing_bitwidth(8)
    reader = PackReader(folder)
    swapped = 0
    for name, module in list(model.named_modules()):
        if not (isinstance(module, PackedLinear) and module.layout == "gemlite"):
            continue
        scale_dtype = module.scales.dtype
        dt = {torch.float16: DType.FP16, torch.bfloat16: DType.BF16}[scale_dtype]
        layer = GemLiteLinearTriton(module.bits, module.group_size, module.in_features, module.out_features, dt, dt)
        layer.load_state_dict({s: reader.get(f"{name}.{s}").cuda() for s in gemlite_pack.SUFFIXES})
        model.set_submodule(name, _CastIO(layer, scale_dtype))
        swapped += 1
    return swapped
