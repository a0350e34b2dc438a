"""bonsai pack: the compact distribution layout, at (binary) or within 1.05% of (ternary) the information bound.

Per quantized linear ``W [out, in]`` with codes ``c`` and 16-bit scales ``s`` (``w = s * c``):

- ``codes`` uint8 ``[out, in / 8]`` (binary) or ``[out, ceil(in / 5)]`` (ternary);
- ``scales`` ``[out, in / group_size]`` in the scale dtype: ``s`` itself (not 2s), exactly as quantized.

binary:  one bit per weight, bit = 1 for +1 and 0 for -1, LSB-first along the input dimension: weight ``j`` of
         a row is bit ``j % 8`` of byte ``j // 8`` (the same bit order as the MLX and gemlite packs).
ternary: five trits per byte (3**5 = 243 <= 256). Trit ``t = c + 1`` in {0, 1, 2}; weights ``5k .. 5k+4``
         of a row make byte ``k = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4`` (``t0`` the lowest base-3 digit), so every
         byte is < 243 and bytes 243..255 are invalid. When ``in % 5 = r != 0`` the last byte of each row holds
         ``r`` real trits and ``5 - r`` padding trits, which are always ``t = 1`` (code 0): decoding every byte
         of a row whole therefore gives the row followed by zero weights, so a kernel may run over
         ``5 * ceil(in / 5)`` inputs without masking. Any other padding is rejected on unpack.

Bits per weight at ``in = 3072``, group 128, 16-bit scales: binary 1 + 16/128 = 1.125; ternary
615 * 8 / 3072 = 1.6016 for the codes (log2 3 = 1.585 is the bound) + 0.125 = 1.7266.
"""

from __future__ import annotations

import numpy as np
import torch

from bonsai_quant.errors import PackError
from bonsai_quant.packing import bits as B

SUFFIXES: tuple[str, ...] = ("codes", "scales")
WEIGHTS_STEM = "model"
_TARGET = "bonsai"
TRITS_PER_BYTE = 5
_TRIT_BYTES = 3 ** TRITS_PER_BYTE  # 243: bytes at or above this hold no 5-trit group


def _trit_table() -> torch.Tensor:
    """int8 [256, 5]: row v holds the codes (trit - 1) of byte v, lowest digit first; rows >= 243 unused."""
    v = torch.arange(256, dtype=torch.int64).unsqueeze(1)
    codes = torch.div(v, 3 ** torch.arange(TRITS_PER_BYTE), rounding_mode="floor") % 3 - 1
    codes[_TRIT_BYTES:] = 0
    return codes.to(torch.int8)


# Read-only lookup table (a constant, so packing stays pure); numpy's take decodes straight into a strided
# output, which torch's index_select cannot, and saves a copy when in % 5 != 0.
_DECODE = _trit_table().numpy()
_DECODE.flags.writeable = False


def layout(out_features: int, in_features: int, mode: str, group_size: int,
           scale_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    B.mode_bits(mode)
    # Binary needs whole bytes; ternary pads each row's last byte, so any in_features fits.
    B.check_dims(out_features, in_features, group_size, 8 if mode == "binary" else 1, "uint8")
    B.check_scale_dtype(scale_dtype)
    return {
        "codes": (torch.uint8, (out_features, code_bytes(in_features, mode))),
        "scales": (scale_dtype, (out_features, in_features // group_size)),
    }


def code_bytes(in_features: int, mode: str) -> int:
    """Bytes of packed codes per row."""
    if B.mode_bits(mode) == 1:
        return in_features // 8
    return -(-in_features // TRITS_PER_BYTE)


def pack(codes: torch.Tensor, scales: torch.Tensor, mode: str, group_size: int) -> dict[str, torch.Tensor]:
    out_features, in_features = B.check_pack_inputs(codes, scales, mode, group_size, layout)

    q = B.codes_to_q(codes.cpu(), mode)  # binary 0/1, ternary the trit 0/1/2; checks the alphabet
    packed = B.pack_bytes(q, 1) if mode == "binary" else pack_trits(q)
    return {"codes": packed, "scales": B.dense(scales)}


def unpack(tensors: dict[str, torch.Tensor], mode: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    B.mode_bits(mode)
    _check_group_size(group_size)
    if not isinstance(tensors, dict):
        raise PackError(f"{_TARGET} pack must be a dict of tensors, got {type(tensors).__name__}")
    packed, scales = tensors.get("codes"), tensors.get("scales")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise PackError(f"{_TARGET} pack key 'codes': expected a 2-D uint8 tensor, got {B.describe(packed)}")
    if not isinstance(scales, torch.Tensor) or scales.dtype not in B.SCALE_DTYPES or scales.dim() != 2:
        raise PackError(f"{_TARGET} pack key 'scales': expected a 2-D float16 or bfloat16 tensor, "
                        f"got {B.describe(scales)}")
    in_features = _in_features(packed.shape[1], scales.shape[1], mode, group_size)
    B.check_tensors(tensors, layout(packed.shape[0], in_features, mode, group_size, scales.dtype), _TARGET)

    packed = packed.cpu()
    if mode == "binary":
        codes = B.q_to_codes(B.unpack_bytes(packed, 1), mode, f"{_TARGET} pack key 'codes'")
    else:
        codes = unpack_trits(packed, in_features)
    return codes, B.dense(scales)


def pack_trits(q: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols] trits in {0, 1, 2} -> uint8 [rows, ceil(cols / 5)], five base-3 digits per byte.

    A short last group is padded with trit 1 (code 0). No wider temporaries: Horner's rule in uint8
    (t3 + 3 t4, then t2 + 3 acc, ...) never exceeds 242, one strided pass per digit.
    """
    rows, cols = q.shape
    full, rest = divmod(cols, TRITS_PER_BYTE)
    out = torch.empty((rows, full + (rest > 0)), dtype=torch.uint8)
    if full:
        digits = q[:, :full * TRITS_PER_BYTE].view(rows, full, TRITS_PER_BYTE)
        acc = out[:, :full]
        torch.add(digits[..., 3], digits[..., 4], alpha=3, out=acc)
        for j in (2, 1, 0):
            torch.add(digits[..., j], acc, alpha=3, out=acc)
    if rest:
        tail = torch.full((rows,), _padding_value(rest), dtype=torch.uint8)
        for j in range(rest):
            tail += q[:, full * TRITS_PER_BYTE + j] * 3 ** j
        out[:, full] = tail
    return out


def unpack_trits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of pack_trits, straight to int8 codes: uint8 [rows, ceil(cols / 5)] (any strides) -> int8
    [rows, cols], row-major. Rejects bytes >= 243 and padding other than trit 1, naming where."""
    rows, width = packed.shape
    full, rest = divmod(cols, TRITS_PER_BYTE)
    if width != full + (rest > 0):
        raise PackError(f"{_TARGET} pack key 'codes': {width} bytes per row do not hold {cols} trits")
    bad = packed >= _TRIT_BYTES
    if bool(bad.any()):
        row, col = bad.nonzero()[0].tolist()
        raise PackError(f"{_TARGET} ternary pack key 'codes': byte {packed[row, col].item()} at [row, byte] "
                        f"[{row}, {col}] is >= 243 = 3**5, so it holds no five trits")
    codes = np.empty((rows, cols), dtype=np.int8)
    source = packed.numpy()
    if full:
        # Each byte's table row lands on its five output slots; the view is strided when rest != 0.
        np.take(_DECODE, source[:, :full], axis=0,
                out=codes[:, :full * TRITS_PER_BYTE].reshape(rows, full, TRITS_PER_BYTE))
    if rest:
        last = _DECODE[source[:, full]]  # [rows, 5]
        pad_ok = (last[:, rest:] == 0).all(axis=1)  # padding trit 1 is code 0
        if not pad_ok.all():
            row = int(np.flatnonzero(~pad_ok)[0])
            raise PackError(
                f"{_TARGET} ternary pack key 'codes': row {row}, byte {full} (value {int(source[row, full])}) "
                f"has padding trits {(last[row, rest:] + 1).tolist()} after its {rest} real ones; "
                f"padding must be trit 1 (code 0), making the byte {_padding_value(rest)} + its real trits")
        codes[:, full * TRITS_PER_BYTE:] = last[:, :rest]
    return torch.from_numpy(codes)


def _padding_value(rest: int) -> int:
    """What the padding trits (all 1) at digits rest..4 add to a row's last byte: 120, 117, 108 or 81."""
    return sum(3 ** j for j in range(rest, TRITS_PER_BYTE))


def _in_features(width: int, groups: int, mode: str, group_size: int) -> int:
    """in_features from the packed width, using the scales only where the width leaves a choice.

    Binary widths are exact. A ternary width n holds 5n-4 .. 5n weights; of those, the one the scales name
    wins, else the first multiple of group_size (so a wrong scales shape is blamed on 'scales').
    """
    if mode == "binary":
        return width * 8
    low, high = max(TRITS_PER_BYTE * width - 4, 1), TRITS_PER_BYTE * width
    if low <= groups * group_size <= high:
        return groups * group_size
    for in_features in range(low, high + 1):
        if in_features % group_size == 0:
            return in_features
    raise PackError(f"{_TARGET} pack key 'codes': {width} bytes per row hold {low} to {high} ternary codes, "
                    f"none of them a multiple of group_size {group_size}")


def _check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise PackError(f"group_size must be a positive int, got {group_size!r}")
