"""gemlite 0.6 pack: the `state_dict()` of a packed `GemLiteLinearTriton`, rebuilt without gemlite or a GPU.

It equals what this gemlite code leaves behind (gemlite 0.6.0.post2 `core.py`, `GemLiteLinearTriton.pack`):

    gemlite.set_packing_bitwidth(8)
    layer = GemLiteLinearTriton(W_nbits, group_size, in_features, out_features, DType.FP16, DType.FP16)  # or BF16
    layer.pack(q.to(torch.uint8), scales, zeros, bias=None)

binary:  W_nbits=1, q = (code + 1) / 2, scales = 2s, zeros = a tensor of 0.5, which the default fma mode
         stores premultiplied as -0.5 * 2s = -s; kernel computes w = q * scales + zeros (W_group_mode 4).
ternary: W_nbits=2, q = code + 1, scales = s, zeros = the integer 1, stored as a 0-d int32; kernel computes
         w = (q - 1) * scales (W_group_mode 3), so no per-group zeros are stored.

Load with `GemLiteLinearTriton(...).load_state_dict(pack)` (or through a parent module with a key prefix).
"""

from __future__ import annotations

import torch

from bonsai_quant.errors import PackError
from bonsai_quant.packing import bits as B

SUFFIXES: tuple[str, ...] = ("W_q", "scales", "zeros", "metadata", "orig_shape", "meta_scale")
WEIGHTS_STEM = "model"
_TARGET = "gemlite"

# gemlite.dtypes.DType values as they appear in metadata.
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_W_GROUP_MODE = {"binary": 4, "ternary": 3}

# The 12 int32 of `metadata`, in GemLiteLinearTriton.get_meta_args() order; load_state_dict reads them back.
METADATA_SLOTS = (
    "scaled_activations",   # 0: fp16/bf16 activations are never quantized on the fly
    "W_nbits",              # 1: 1 (binary) or 2 (ternary)
    "group_size",           # 2
    "unpack_mask",          # 3: 2**W_nbits - 1
    "elements_per_sample",  # 4: codes per packed uint8 = 8 / W_nbits
    "input_dtype",          # 5: DType of the activations: FP16=1, BF16=2 (we match the scale dtype)
    "output_dtype",         # 6: same as input
    "acc_dtype",            # 7: FP32=0, gemlite's default accumulator for fp16/bf16 inputs
    "meta_dtype",           # 8: DType of the stored scales (pack() derives it from scales.dtype)
    "channel_scale_mode",   # 9: 0, no per-channel post-scaling since each row has several groups
    "W_group_mode",         # 10: 4 = q*scales + zeros (fma); 3 = (q - zeros)*scales
    "data_contiguous",      # 11: 1, pack() makes W_q contiguous after transposing it
)


def meta_args(mode: str, group_size: int, scale_dtype: torch.dtype) -> list[int]:
    """The `metadata` gemlite's pack() records for our two configurations."""
    bits = B.mode_bits(mode)
    dtype = _DTYPE_CODE[scale_dtype]
    return [0, bits, group_size, (1 << bits) - 1, 8 // bits, dtype, dtype, _DTYPE_CODE[torch.float32], dtype, 0,
            _W_GROUP_MODE[mode], 1]


def layout(out_features: int, in_features: int, mode: str, group_size: int,
           scale_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    bits = B.mode_bits(mode)
    B.check_dims(out_features, in_features, group_size, 8 // bits, "uint8")
    B.check_scale_dtype(scale_dtype)
    # The constructor only asks group_size >= 16 and in_features % 32 == 0, but the GEMM kernel reads one
    # scale per K tile ("BLOCK_SIZE_K <= group_size") and its autotune pruner makes tiles powers of two of
    # at least 32 (triton_kernels/gemm_kernels.py), so smaller or odd group sizes are outside what it handles.
    if group_size < 32 or group_size & (group_size - 1):
        raise PackError(f"gemlite needs group_size to be a power of two >= 32, got {group_size}")
    # With one group per row, pack() sees scales.numel() == out_features and switches to channel-wise
    # scaling (W_group_mode 1, different zeros semantics), so that layout is not this one.
    if in_features == group_size:
        raise PackError(f"gemlite needs at least two groups per row: in_features {in_features} == group_size "
                        f"makes gemlite treat the scales as per-channel")
    groups = (in_features // group_size, out_features)
    return {
        "W_q": (torch.uint8, (in_features * bits // 8, out_features)),
        "scales": (scale_dtype, groups),
        "zeros": (scale_dtype, groups) if mode == "binary" else (torch.int32, ()),
        "metadata": (torch.int32, (len(METADATA_SLOTS),)),
        "orig_shape": (torch.int32, (2,)),
        "meta_scale": (torch.float32, ()),
    }


def pack(codes: torch.Tensor, scales: torch.Tensor, mode: str, group_size: int) -> dict[str, torch.Tensor]:
    out_features, in_features = B.check_pack_inputs(codes, scales, mode, group_size, layout)
    bits = B.mode_bits(mode)

    # gemlite packs over K per output row, then stores the transpose: [K*bits/8, N].
    w_q = B.dense(B.pack_bytes(B.codes_to_q(codes.cpu(), mode), bits).t())
    s = scales.cpu()
    if mode == "binary":
        stored = B.dense(B.doubled(s, _TARGET).t())
        zeros = B.dense((-s).t())
    else:
        stored = B.dense(s.t())
        zeros = torch.tensor(1, dtype=torch.int32)
    return {
        "W_q": w_q,
        "scales": stored,
        "zeros": zeros,
        "metadata": torch.tensor(meta_args(mode, group_size, s.dtype), dtype=torch.int32),
        "orig_shape": torch.tensor([out_features, in_features], dtype=torch.int32),
        "meta_scale": torch.tensor(0.0, dtype=torch.float32),
    }


def unpack(tensors: dict[str, torch.Tensor], mode: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    bits = B.mode_bits(mode)
    if not isinstance(tensors, dict):
        raise PackError(f"{_TARGET} pack must be a dict of tensors, got {type(tensors).__name__}")
    orig_shape, stored = tensors.get("orig_shape"), tensors.get("scales")
    B.check_tensor(orig_shape, "orig_shape", torch.int32, (2,), _TARGET)
    if not isinstance(stored, torch.Tensor) or stored.dtype not in B.SCALE_DTYPES:
        raise PackError(f"{_TARGET} pack key 'scales': expected float16 or bfloat16, got {B.describe(stored)}")
    out_features, in_features = (int(v) for v in orig_shape.tolist())
    B.check_tensors(tensors, layout(out_features, in_features, mode, group_size, stored.dtype), _TARGET)

    got, want = tensors["metadata"].tolist(), meta_args(mode, group_size, stored.dtype)
    for slot, (g, w) in enumerate(zip(got, want)):
        if g != w:
            raise PackError(f"{_TARGET} pack key 'metadata': slot {slot} ({METADATA_SLOTS[slot]}) is {g}, "
                            f"expected {w} for a {mode} pack with group_size {group_size}")
    if tensors["meta_scale"].item() != 0.0:
        raise PackError(f"{_TARGET} pack key 'meta_scale': expected 0.0, got {tensors['meta_scale'].item()}")

    q = B.unpack_bytes(B.dense(tensors["W_q"].t()), bits)
    codes = B.q_to_codes(q, mode, f"{_TARGET} pack key 'W_q'")
    stored = B.dense(stored.t())
    if mode == "ternary":
        if tensors["zeros"].item() != 1:
            raise PackError(f"{_TARGET} pack key 'zeros': a ternary pack stores the integer zero 1, "
                            f"got {tensors['zeros'].item()}")
        return codes, stored
    zeros = B.dense(tensors["zeros"].t())
    s = -zeros
    if not B.same_bits(stored, s * 2):
        at = B.first_mismatch(stored, s * 2)
        raise PackError(f"{_TARGET} binary pack: scales must equal 2 * -zeros bit-for-bit to decode to codes * s; "
                        f"at [out, group] {at} scales={stored[tuple(at)].item()} zeros={zeros[tuple(at)].item()}")
    return codes, s
