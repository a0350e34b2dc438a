"""What the MLX and gemlite packs share: codes <-> unsigned slot values, LSB-first bit fields, checks.

Both targets store the same unsigned slot value ``q`` per weight (binary ``q = (code + 1) / 2``, ternary
``q = code + 1``) and pack it LSB-first along the input dimension; they differ only in word size, orientation
and the side tensors. Everything here works on uint8 so no full-size wider temporaries are made: the
conversion runs on 85M-weight tensors on two cores.
"""

from __future__ import annotations

import contextlib
import sys
import threading

import numpy as np
import torch

from bonsai_quant.errors import PackError
from bonsai_quant.packing import formats
from bonsai_quant.packing.formats import MODE_BITS

SCALE_DTYPES = tuple(formats.SCALE_DTYPES.values())
_ALPHABET = {"binary": "-1 or +1", "ternary": "-1, 0 or +1"}


def mode_bits(mode: str) -> int:
    try:
        return MODE_BITS[mode]
    except (KeyError, TypeError):
        raise PackError(f"unknown mode {mode!r}; expected 'binary' or 'ternary'") from None


def check_scale_dtype(scale_dtype: torch.dtype, what: str = "scale dtype") -> None:
    if scale_dtype not in SCALE_DTYPES:
        raise PackError(f"{what} must be torch.float16 or torch.bfloat16, got {scale_dtype}")


def check_dims(out_features: int, in_features: int, group_size: int, per_word: int, word: str) -> None:
    """The divisibility every pack needs: whole groups, whole packing words."""
    for name, value in (("out_features", out_features), ("in_features", in_features), ("group_size", group_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise PackError(f"{name} must be a positive int, got {value!r}")
    if in_features % group_size:
        raise PackError(f"in_features {in_features} is not divisible by group_size {group_size}")
    if in_features % per_word:
        raise PackError(
            f"in_features {in_features} is not divisible by {per_word}, the codes per {word} packing word"
        )


def check_codes_tensor(codes) -> None:
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.int8 or codes.dim() != 2:
        raise PackError(f"codes must be a 2-D torch.int8 tensor, got {describe(codes)}")


def check_scales(scales, out_features: int, in_features: int, group_size: int) -> None:
    if not isinstance(scales, torch.Tensor):
        raise PackError(f"scales must be a tensor, got {describe(scales)}")
    check_scale_dtype(scales.dtype, "scales dtype")
    want = (out_features, in_features // group_size)
    if tuple(scales.shape) != want:
        raise PackError(f"scales shape {list(scales.shape)} does not match codes [{out_features}, {in_features}] "
                        f"with group_size {group_size}: expected {list(want)}")
    if not bool(torch.isfinite(scales).all()):
        raise PackError("scales contain inf or NaN")


def check_pack_inputs(codes, scales, mode: str, group_size: int, layout) -> tuple[int, int]:
    """What every pack() checks before packing; returns (out_features, in_features)."""
    check_codes_tensor(codes)
    if not isinstance(scales, torch.Tensor):
        raise PackError(f"scales must be a tensor, got {type(scales).__name__}")
    out_features, in_features = codes.shape
    layout(out_features, in_features, mode, group_size, scales.dtype)
    check_scales(scales, out_features, in_features, group_size)
    return out_features, in_features


def doubled(scales: torch.Tensor, target: str) -> torch.Tensor:
    """2s in the scale dtype (exact, as doubling only moves the exponent), or an error where it overflows."""
    twice = scales * 2
    if bool(torch.isinf(twice).any()):
        where = torch.isinf(twice).nonzero()[0].tolist()
        raise PackError(f"{target} binary stores 2*scale, which overflows {scales.dtype} for scale "
                        f"{scales[tuple(where)].item()} at {where}")
    return twice


def codes_to_q(codes: torch.Tensor, mode: str) -> torch.Tensor:
    """int8 codes -> uint8 slot values, checking the alphabet on the way (no int64 temporaries).

    Inside `shared_slots()` the result for one codes tensor is computed once for every target that asks."""
    shared = getattr(_SHARED, "memo", None)
    key = ("q", id(codes), codes._version, mode)
    if shared is not None and key in shared:
        return shared[key][1]
    # Adding 1 in uint8 wraps -1 (0xFF) to 0, so the alphabet check is a cheap bit test / max.
    q = codes.contiguous().view(torch.uint8) + 1
    if mode == "binary":
        bad = bool(torch.bitwise_and(q, 0xFD).any())  # valid q are 0 and 2
    else:
        bad = bool(q.max() > 2)
    if bad:
        ok = (codes == 1) | (codes == -1) if mode == "binary" else (codes >= -1) & (codes <= 1)
        where = (~ok).nonzero()[0].tolist()
        raise PackError(f"codes for mode {mode!r} must be {_ALPHABET[mode]}; found {codes[tuple(where)].item()} "
                        f"at {where}")
    if mode == "binary":
        q >>= 1
    if shared is not None:
        shared[key] = (codes, q)  # holding codes keeps its id from being reused within the block
    return q


_SHARED = threading.local()  # .memo: the open shared_slots() block's results, per thread


@contextlib.contextmanager
def shared_slots():
    """Within the block, slot values and packed bytes are computed once per codes tensor: convert packs each
    layer for several targets, and MLX, gemlite and (binary) bonsai store the same LSB-first bytes."""
    outer = getattr(_SHARED, "memo", None)
    _SHARED.memo = {}
    try:
        yield
    finally:
        _SHARED.memo = outer


def q_to_codes(q: torch.Tensor, mode: str, what: str) -> torch.Tensor:
    if mode == "binary":
        return (q << 1).sub_(1).view(torch.int8)  # 0 -> 0xFF = -1, 1 -> +1
    if bool(q.max() > 2):
        raise PackError(f"{what} holds the 2-bit value 3, which is no ternary code")
    return q.sub_(1).view(torch.int8)


def pack_bytes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [rows, cols] of values < 2**bits -> uint8 [rows, cols*bits/8], element j of a byte at bits j*bits.."""
    shared = getattr(_SHARED, "memo", None)
    key = ("bytes", id(q), q._version, bits)
    if shared is not None and key in shared:
        return shared[key][1]
    per_byte = 8 // bits
    rows = q.shape[0]
    if q.shape[1] % per_byte:
        raise PackError(f"{q.shape[1]} values per row do not fill whole bytes of {per_byte} {bits}-bit fields")
    held = q  # kept in the memo with the result, so its id is not reused within the block
    q = q.contiguous()
    if bits == 1:
        out = torch.from_numpy(np.packbits(q.numpy(), axis=-1, bitorder="little"))
    elif bits == 2:
        # Four slots are one little-endian word q0 + q1<<8 + q2<<16 + q3<<24; shifting by 6, 12 and 18 brings
        # q1, q2, q3 to bits 2, 4 and 6 of the low byte, and nothing else lands there (values are < 4). numpy's
        # uint32 shifts run at twice the speed of the strided uint8 passes; the cast keeps the low byte.
        _require_little_endian()
        words = q.numpy().view(np.uint32)
        acc = words >> 6
        acc |= words
        acc |= words >> 12
        acc |= words >> 18
        out = torch.from_numpy(acc.astype(np.uint8))
    else:
        raise PackError(f"{bits}-bit slots: packs hold 1-bit (binary) or 2-bit (ternary) slots")
    out = out.reshape(rows, -1)
    if shared is not None:
        shared[key] = (held, out)
    return out


def unpack_bytes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_bytes: uint8 [rows, n] (any strides) -> uint8 [rows, n*8/bits], row-major."""
    per_byte = 8 // bits
    if bits == 1 and packed.device.type == "cpu":
        return torch.from_numpy(np.unpackbits(packed.contiguous().numpy(), axis=-1, bitorder="little"))
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    fields = (packed.unsqueeze(-1) >> shifts).bitwise_and_((1 << bits) - 1)
    # The shift's output follows the input's memory order, so a strided input needs reshape, not view.
    return fields.reshape(packed.shape[0], packed.shape[1] * per_byte).contiguous()


def bytes_to_words(packed: torch.Tensor) -> torch.Tensor:
    """LSB-first bytes -> LSB-first uint32 words; byte 0 is the low byte only on a little-endian host."""
    _require_little_endian()
    return packed.view(torch.uint32)


def words_to_bytes(words: torch.Tensor) -> torch.Tensor:
    _require_little_endian()
    return dense(words).view(torch.uint8)


def check_tensors(tensors: dict, expected: dict, target: str) -> None:
    """Keys, dtypes and shapes of a pack against its layout, naming the first thing that differs."""
    if not isinstance(tensors, dict):
        raise PackError(f"{target} pack must be a dict of tensors, got {type(tensors).__name__}")
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise PackError(f"{target} pack keys differ from {sorted(expected)}: missing {missing}, unexpected {extra}")
    for key, (dtype, shape) in expected.items():
        check_tensor(tensors[key], key, dtype, shape, target)


def check_tensor(t, key: str, dtype: torch.dtype, shape: tuple, target: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise PackError(f"{target} pack key {key!r}: expected {_fmt(dtype, shape)}, got {describe(t)}")


def dense(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy with row-major strides.

    `.contiguous()` is not enough: a transposed [1, n] tensor counts as contiguous while its last stride
    is n, and dtype views (ours, and byte-level writers') reject that.
    """
    out = torch.empty(t.shape, dtype=t.dtype)
    out.copy_(t)
    return out


def first_mismatch(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Index of the first bitwise difference between two 16-bit float tensors of one shape."""
    flat = (_bits16(a) != _bits16(b)).nonzero()[0].item()
    return [int(i) for i in torch.unravel_index(torch.tensor(flat), a.shape)]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality of 16-bit floats, so -0.0 and +0.0 count as different."""
    return torch.equal(_bits16(a), _bits16(b))


def _bits16(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.int16)


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise PackError("packing to uint32 words assumes a little-endian host")


def _fmt(dtype: torch.dtype, shape: tuple) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


def describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return _fmt(t.dtype, tuple(t.shape))
    return type(t).__name__
