"""MLX affine pack: the tensors `mlx.nn.QuantizedLinear(bits=1|2)` loads, with w = scales * q + biases.

Binary uses bits=1, q = (code + 1) / 2, scales = 2s, biases = -s; ternary uses bits=2, q = code + 1,
scales = s, biases = -s. Both decode exactly in 16-bit arithmetic (q*scales + biases is one of -s, 0, s
with no rounding), so `mx.dequantize` returns codes * s bit-for-bit.
"""

from __future__ import annotations

import torch

from bonsai_quant.errors import PackError
from bonsai_quant.packing import bits as B

SUFFIXES: tuple[str, ...] = ("weight", "scales", "biases")
# diffusers' file name, which the published MLX snapshots keep and mlx-vlm's Bonsai loader requires.
WEIGHTS_STEM = "diffusion_pytorch_model"
_TARGET = "MLX"
_GROUP_SIZES = (32, 64, 128)


def layout(out_features: int, in_features: int, mode: str, group_size: int,
           scale_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    bits = B.mode_bits(mode)
    B.check_dims(out_features, in_features, group_size, 32 // bits, "uint32")
    # MLX's CPU build decodes other sizes too, but these are the affine group sizes MLX documents, and a
    # Mac's Metal backend, where this pack is meant to run, is only promised those.
    if group_size not in _GROUP_SIZES:
        raise PackError(f"MLX supports group_size 32, 64 or 128, got {group_size}")
    B.check_scale_dtype(scale_dtype)
    groups = (out_features, in_features // group_size)
    return {
        "weight": (torch.uint32, (out_features, in_features * bits // 32)),
        "scales": (scale_dtype, groups),
        "biases": (scale_dtype, groups),
    }


def pack(codes: torch.Tensor, scales: torch.Tensor, mode: str, group_size: int) -> dict[str, torch.Tensor]:
    out_features, in_features = B.check_pack_inputs(codes, scales, mode, group_size, layout)
    bits = B.mode_bits(mode)

    weight = B.bytes_to_words(B.pack_bytes(B.codes_to_q(codes.cpu(), mode), bits))
    s = B.dense(scales)
    # Binary slots hold 0/1, so the step between them must be 2s for the two levels to land on -s and +s.
    stored = B.doubled(s, _TARGET) if mode == "binary" else s.clone()
    return {"weight": weight, "scales": stored, "biases": -s}


def unpack(tensors: dict[str, torch.Tensor], mode: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    bits = B.mode_bits(mode)
    if not isinstance(tensors, dict):
        raise PackError(f"{_TARGET} pack must be a dict of tensors, got {type(tensors).__name__}")
    weight, stored = tensors.get("weight"), tensors.get("scales")
    # The weight's shape is the only place in_features is recorded, so read it before checking the rest.
    if not isinstance(weight, torch.Tensor) or weight.dtype != torch.uint32 or weight.dim() != 2:
        raise PackError(f"{_TARGET} pack key 'weight': expected a 2-D uint32 tensor, got {B.describe(weight)}")
    if not isinstance(stored, torch.Tensor) or stored.dtype not in B.SCALE_DTYPES:
        raise PackError(f"{_TARGET} pack key 'scales': expected float16 or bfloat16, got {B.describe(stored)}")
    out_features, in_features = weight.shape[0], weight.shape[1] * 32 // bits
    B.check_tensors(tensors, layout(out_features, in_features, mode, group_size, stored.dtype), _TARGET)

    q = B.unpack_bytes(B.words_to_bytes(weight), bits)
    codes = B.q_to_codes(q, mode, f"{_TARGET} pack key 'weight'")
    stored = B.dense(stored)
    biases = B.dense(tensors["biases"])
    s = -biases
    expect = s * 2 if mode == "binary" else s
    if not B.same_bits(stored, expect):
        at = B.first_mismatch(stored, expect)
        rel = "2 * -biases" if mode == "binary" else "-biases"
        raise PackError(f"{_TARGET} {mode} pack: scales must equal {rel} bit-for-bit to decode to codes * s; "
                        f"at {at} scales={stored[tuple(at)].item()} biases={biases[tuple(at)].item()}")
    return codes, s
