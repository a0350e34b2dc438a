"""`CudaPackedLinear`: a quantized Linear whose weights stay resident in packed form on the GPU."""

from __future__ import annotations

import torch

from . import ops
from .dispatch import measured_table
from .layout import PackedWeights

MODE_OF = {"bits1": "binary", "bits2": "ternary", "trits": "ternary"}


def fp8_supported(device: torch.device) -> bool:
    """e4m3 tensor-core products need compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class CudaPackedLinear(torch.nn.Module):
    """y = x @ (codes * s)^T; the kernel is picked by the number of rows M (`dispatch`).

    `activations="bf16"` keeps the layer on the 16-bit-activation kernel at every M (for layers whose
    e4m3-rounded activations fail a quality gate); "auto" follows the measured crossover table."""

    def __init__(self, weights: PackedWeights, activations: str = "auto"):
        super().__init__()
        if activations not in ("auto", "bf16"):
            raise ValueError(f"activations must be 'auto' or 'bf16', got {activations!r}")
        self.in_features, self.out_features = weights.in_features, weights.out_features
        self.encoding, self.group_size = weights.encoding, weights.group_size
        self.activations = activations
        self.register_buffer("codes", weights.codes)
        self.register_buffer("scales", weights.scales)
        self.forced: str | None = None  # a kernel name to bypass the table (benchmarks)

    @property
    def weights(self) -> PackedWeights:
        return PackedWeights(self.encoding, self.codes, self.scales, self.in_features, self.out_features,
                             self.group_size)

    def kernel_for(self, m: int, dtype: torch.dtype) -> str:
        if self.forced is not None:
            return self.forced
        if dtype == torch.float32 or self.activations == "bf16" or not fp8_supported(self.codes.device):
            return "bf16"
        return measured_table().kernel(self.out_features, self.in_features, MODE_OF[self.encoding], m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        kernel = self.kernel_for(x2.shape[0], x.dtype)
        refusal_key = (self.out_features, self.in_features, x2.shape[0])
        if kernel == "fp8_scaled_mm" and refusal_key in ops.SCALED_MM_REFUSED:
            kernel = "fp8"
        if kernel == "bf16":
            y = ops.packed_matmul(x2, self.weights)
        elif kernel == "fp8":
            y = ops.packed_fp8_matmul(x2, self.weights, x.dtype)
        else:
            try:
                y = ops.scaled_mm_matmul(x2, self.weights, x.dtype)
            except ops.ScaledMmRefused as e:
                # the same arithmetic (e4m3 activations, 1x128 block scales) in our own fp8 kernel, slower;
                # the refusal is kept where the benchmark reports it
                ops.SCALED_MM_REFUSED[refusal_key] = str(e)
                y = ops.packed_fp8_matmul(x2, self.weights, x.dtype)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, encoding={self.encoding}, "
                f"group_size={self.group_size}, activations={self.activations}")
