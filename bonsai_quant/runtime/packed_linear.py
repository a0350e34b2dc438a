"""Low-bit Linear modules that compute straight from pack buffers.

The weight is never held dense: each forward decodes a slice of output features, multiplies, and drops it,
so resident memory stays at the pack's size (the decoded slice is bounded by `SLICE_BYTES`).
"""

from __future__ import annotations

import torch

from . import decode

SLICE_BYTES = 32 * 2**20
LAYOUT_BUFFERS = {"mlx": ("weight", "scales", "biases"), "gemlite": ("W_q", "scales", "zeros"),
                  "bonsai": ("codes", "scales"), "mflux": ("weight", "scales", "biases")}
_DECODERS = {"mlx": decode.mlx_rows, "gemlite": decode.gemlite_rows, "bonsai": decode.bonsai_rows,
             "mflux": decode.mlx_rows}


class PackedLinear(torch.nn.Module):
    """y = x @ W^T with W decoded on the fly from an MLX- or gemlite-layout pack."""

    def __init__(self, layout: str, in_features: int, out_features: int, bits: int, group_size: int,
                 buffers: dict[str, torch.Tensor]):
        super().__init__()
        if layout not in LAYOUT_BUFFERS:
            raise ValueError(f"unknown layout {layout!r}")
        self.layout, self.in_features, self.out_features = layout, in_features, out_features
        self.bits, self.group_size = bits, group_size
        names = LAYOUT_BUFFERS[layout]
        for name in names:
            self.register_buffer(name, buffers[name])
        self._names = names

    def dense_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        buffers = [getattr(self, n) for n in self._names]
        return _DECODERS[self.layout](*buffers, self.bits, self.group_size, start, stop, dtype)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.dense_rows(0, self.out_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        step = max(1, SLICE_BYTES // (self.in_features * x.element_size()))
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, step):
            stop = min(start + step, self.out_features)
            out[..., start:stop] = x @ self.dense_rows(start, stop, x.dtype).t()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout}, "
                f"bits={self.bits}, group_size={self.group_size}")
