"""Swap a gemlite-layout model's `PackedLinear`s for real gemlite `GemLiteLinearTriton` layers (CUDA only)."""

from __future__ import annotations

import torch

from ..errors import BonsaiError
from ..packing import gemlite as gemlite_pack
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


def gemlite_state(module: PackedLinear) -> dict[str, torch.Tensor]:
    """The `GemLiteLinearTriton` state dict of a gemlite-layout PackedLinear: its buffers as load_transformer
    read them, plus the side tensors its configuration determines."""
    mode = "binary" if module.bits == 1 else "ternary"
    state = {name: getattr(module, name) for name in gemlite_pack.BUFFERS}
    side = gemlite_pack.side_tensors(module.out_features, module.in_features, mode, module.group_size,
                                     module.scales.dtype)
    return {**state, **{name: t.to(module.scales.device) for name, t in side.items()}}


def use_gemlite(model: torch.nn.Module) -> int:
    """Replace every gemlite-layout PackedLinear by a GemLiteLinearTriton holding the same buffers (no second read
    of the pack); returns the count."""
    if not gemlite_available():
        raise BonsaiError("gemlite needs a CUDA GPU and the gemlite package (pip install gemlite)")
    import gemlite
    from gemlite.core import DType, GemLiteLinearTriton

    gemlite.set_packing_bitwidth(8)
    swapped = 0
    for name, module in list(model.named_modules()):
        if not (isinstance(module, PackedLinear) and module.layout == "gemlite"):
            continue
        scale_dtype = module.scales.dtype
        dt = {torch.float16: DType.FP16, torch.bfloat16: DType.BF16}[scale_dtype]
        layer = GemLiteLinearTriton(module.bits, module.group_size, module.in_features, module.out_features, dt, dt)
        layer.load_state_dict({k: v.cuda() for k, v in gemlite_state(module).items()})
        model.set_submodule(name, _CastIO(layer, scale_dtype))
        swapped += 1
    return swapped
