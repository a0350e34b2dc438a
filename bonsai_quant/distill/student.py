"""The student: a FLUX.2 transformer whose quantized linears hold latent weights and trainable group scales.

Forward, each such linear uses exactly the weight a pack would hold: codes from the latent weight (binary: sign,
0 counting as +1; ternary: round(w / s) clipped to [-1, 1]) times the scale rounded to the recipe's 16-bit
scale dtype. Backward is straight-through: the latent weight gets the gradient of the quantized weight, the
scale the gradient of s * codes with the codes held fixed. The quantized weight is rebuilt in backward rather
than saved, so training holds no second copy of the weights; only the activations autograd saves anyway.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Latent weights start inside their code's cell, this fraction of a scale away from its edge, so that the
# student's first forward is exactly the post-training quantized model.
CELL_MARGIN = 1e-3


def codes_of(weight: torch.Tensor, scales16: torch.Tensor, mode: str, group_size: int) -> torch.Tensor:
    """Codes (float, in {-1, +1} or {-1, 0, +1}) of a latent weight [out, in] under 16-bit-rounded scales."""
    if mode == "binary":
        return torch.where(weight >= 0, 1.0, -1.0)
    out_features, in_features = weight.shape
    tiny = torch.finfo(torch.float32).tiny
    groups = weight.reshape(out_features, -1, group_size) / scales16.clamp(min=tiny)[..., None]
    return groups.round().clamp(-1, 1).reshape(out_features, in_features)


def rounded_scales(scales: torch.Tensor, scale_dtype: torch.dtype) -> torch.Tensor:
    """Scales as the pack stores them: positive, rounded to the 16-bit scale dtype, back in float32."""
    return scales.detach().abs().to(scale_dtype).float()


def quantized_weight(weight: torch.Tensor, scales: torch.Tensor, mode: str, group_size: int,
                     scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(float32 quantized weight, codes, rounded scales): what the pack decodes to."""
    s16 = rounded_scales(scales, scale_dtype)
    codes = codes_of(weight.detach().float(), s16, mode, group_size)
    out_features, in_features = weight.shape
    w = (codes.reshape(out_features, -1, group_size) * s16[..., None]).reshape(out_features, in_features)
    return w, codes, s16


class _FakeQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scales, bias, mode, group_size, scale_dtype):
        w, _, _ = quantized_weight(weight, scales, mode, group_size, scale_dtype)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.save_for_backward(x, weight, scales, bias)
        ctx.config = (mode, group_size, scale_dtype, dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.linear(x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        x, weight, scales, bias = ctx.saved_tensors
        mode, group_size, scale_dtype, dtype = ctx.config
        w, codes, _ = quantized_weight(weight, scales, mode, group_size, scale_dtype)
        grad_x = grad_w = grad_s = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.to(dtype) @ w.to(dtype)).to(x.dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g2 = grad.reshape(-1, grad.shape[-1]).float()
            gw = g2.t() @ x.reshape(-1, x.shape[-1]).float()  # float32: small updates must not vanish
            if ctx.needs_input_grad[1]:
                grad_w = gw.to(weight.dtype)
            if ctx.needs_input_grad[2]:
                out_features = weight.shape[0]
                grad_s = (gw * codes).reshape(out_features, -1, group_size).sum(-1)
                grad_s = (grad_s * torch.sign(scales.detach()).where(scales.detach() != 0, 1.0)).to(scales.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            grad_b = grad.reshape(-1, grad.shape[-1]).sum(0).to(bias.dtype)
        return grad_x, grad_w, grad_s, grad_b, None, None, None


class FakeQuantLinear(torch.nn.Module):
    """Drop-in for an nn.Linear the recipe quantizes: `weight` is the latent weight, `scales` one per group."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, mode: str,
                 group_size: int, scale_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.mode, self.group_size, self.scale_dtype = mode, group_size, scale_dtype
        self.weight = torch.nn.Parameter(weight.float())
        self.scales = torch.nn.Parameter(scales.float())
        self.bias = None if bias is None else torch.nn.Parameter(bias.float())

    @classmethod
    def from_quantized(cls, linear: torch.nn.Linear, codes: torch.Tensor, scales: torch.Tensor, mode: str,
                       group_size: int) -> FakeQuantLinear:
        """The student layer whose forward is exactly codes * scales: the source weight moved just inside each
        code's cell, so the latent keeps what the rounding discarded (how far each weight is from flipping)."""
        s = scales.float()
        cell = torch.repeat_interleave(s, group_size, dim=1)
        w = linear.weight.detach().float()
        c = codes.float()
        margin = CELL_MARGIN * cell
        if mode == "binary":
            w = torch.where(c > 0, w.clamp(min=0) + margin * (w <= 0), w.clamp(max=-margin))
        else:
            half = 0.5 * cell
            w = torch.where(c > 0, torch.maximum(w, half + margin),
                            torch.where(c < 0, torch.minimum(w, -half - margin),
                                        w.clamp(-half + margin, half - margin)))
        return cls(w, s, linear.bias.detach() if linear.bias is not None else None, mode, group_size, scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FakeQuantLinear.apply(x, self.weight, self.scales, self.bias, self.mode, self.group_size,
                                      self.scale_dtype)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes int8, scales in the scale dtype): what the pack will hold."""
        _, codes, s16 = quantized_weight(self.weight, self.scales, self.mode, self.group_size, self.scale_dtype)
        return codes.to(torch.int8), s16.to(self.scale_dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, mode={self.mode}, group_size={self.group_size}"


def install(model: torch.nn.Module, module_name: str, layer: torch.nn.Module) -> None:
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, layer)
