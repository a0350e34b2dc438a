"""bonsai pack: exact round trip, bytes equal to an independent encoder, hand-worked golden bytes, strict unpack."""

from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bonsai_quant.errors import PackError
from bonsai_quant.packing import bonsai as P

try:  # tests/ is on sys.path under pytest's default rootdir-relative imports
    from pack_helpers import full_codes, full_scales, make_codes, make_scales
except ImportError:  # tests/ made a package
    from tests.pack_helpers import full_codes, full_scales, make_codes, make_scales


make_scales_nz = functools.partial(make_scales, negative_zero=True)  # this layout must keep -0.0 too

SETTINGS = settings(max_examples=60, deadline=None)


def reference_bytes(codes: torch.Tensor, mode: str) -> torch.Tensor:
    """The format written out digit by digit in int64, independent of the module's uint8 arithmetic."""
    out, inn = codes.shape
    if mode == "binary":
        bits = (codes == 1).to(torch.int64).view(out, inn // 8, 8)
        return (bits << torch.arange(8)).sum(-1).to(torch.uint8)
    trits = codes.to(torch.int64) + 1
    pad = -inn % 5
    trits = torch.cat([trits, torch.ones(out, pad, dtype=torch.int64)], 1).view(out, -1, 5)
    return (trits * 3 ** torch.arange(5)).sum(-1).to(torch.uint8)


def same_bits16(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.int16), b.reshape(-1).view(torch.int16))


@st.composite
def cases(draw):
    mode = draw(st.sampled_from(["binary", "ternary"]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    gs = draw(st.sampled_from([32, 64, 128]))
    out = draw(st.integers(1, 40))
    groups = draw(st.integers(1, 5))  # in % 5 takes every value 0..4 over these (e.g. 160, 256, 512, 128, 384)
    seed = draw(st.integers(0, 2**31 - 1))
    codes = make_codes(mode, out, gs * groups, draw(st.booleans()), seed)
    return mode, gs, codes, make_scales_nz(out, groups, dtype, seed)


def check_round_trip(mode, gs, codes, scales):
    codes_before, scales_before = codes.clone(), scales.clone()
    packed = P.pack(codes, scales, mode, gs)
    spec = P.layout(codes.shape[0], codes.shape[1], mode, gs, scales.dtype)
    assert tuple(packed) == tuple(spec) == P.SUFFIXES
    for key, (dtype, shape) in spec.items():
        t = packed[key]
        assert (t.dtype, tuple(t.shape), t.device.type) == (dtype, shape, "cpu"), key
        assert t.is_contiguous() and t.stride(-1) == 1, key
    assert torch.equal(packed["codes"], reference_bytes(codes, mode))
    assert same_bits16(packed["scales"], scales)  # s itself, not 2s
    got_codes, got_scales = P.unpack(packed, mode, gs)
    assert got_codes.dtype == torch.int8 and got_codes.is_contiguous() and torch.equal(got_codes, codes)
    assert same_bits16(got_scales, scales)
    assert torch.equal(codes, codes_before) and same_bits16(scales, scales_before)  # pure
    again = P.pack(codes, scales, mode, gs)
    assert all(torch.equal(again[k], packed[k]) for k in packed)  # deterministic
    return packed


@SETTINGS
@given(cases())
def test_pack_matches_layout_reference_and_round_trips(case):
    check_round_trip(*case)


@pytest.mark.parametrize("inn, gs", [(160, 32), (256, 128), (512, 128), (128, 128), (384, 128), (96, 32)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ternary_every_padding_length(inn, gs, dtype):
    codes = make_codes("ternary", 7, inn, ramp=True, seed=0)
    packed = check_round_trip("ternary", gs, codes, make_scales_nz(7, inn // gs, dtype, seed=inn))
    assert packed["codes"].shape[1] == -(-inn // 5)
    # Padding is trit 1 (code 0): every byte decoded whole is the row followed by zero weights.
    whole = P.unpack_trits(packed["codes"], packed["codes"].shape[1] * 5)
    assert torch.equal(whole[:, :inn], codes) and not whole[:, inn:].any()
    assert int(packed["codes"].max()) <= 242


def test_golden_ternary_bytes():
    codes = torch.zeros((2, 32), dtype=torch.int8)
    codes[0, :10] = torch.tensor([-1, 0, 1, 1, -1, 1, 1, 1, 1, 1], dtype=torch.int8)
    codes[0, 30], codes[0, 31] = 1, -1
    codes[1] = -1
    scales = torch.tensor([[0.5], [-0.25]], dtype=torch.float16)
    packed = P.pack(codes, scales, "ternary", 32)
    # 32 trits -> ceil(32/5) = 7 bytes per row, byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4 with t = code + 1.
    # Row 0: codes -1 0 1 1 -1 -> t 0 1 2 2 0 -> 0 + 3 + 18 + 54 + 0 = 75;
    #        codes 1 1 1 1 1 -> t 2 2 2 2 2 -> 2 * 121 = 242, the largest valid byte;
    #        codes 0 x5 -> t 1 x5 -> 1 + 3 + 9 + 27 + 81 = 121 (bytes 2..5);
    #        last byte: 2 real trits, codes 1 -1 -> t 2 0, then 3 padding trits t = 1:
    #        2 + 0*3 + 9 + 27 + 81 = 119.
    # Row 1: all codes -1 -> t 0 -> bytes 0, and the last byte is the padding alone: 9 + 27 + 81 = 117.
    assert packed["codes"].tolist() == [[75, 242, 121, 121, 121, 121, 119], [0, 0, 0, 0, 0, 0, 117]]
    assert packed["scales"].tolist() == [[0.5], [-0.25]]
    got, s = P.unpack(packed, "ternary", 32)
    assert torch.equal(got, codes) and same_bits16(s, scales)


def test_golden_binary_bytes():
    codes = torch.full((2, 32), -1, dtype=torch.int8)
    codes[0, :8] = torch.tensor([1, -1, -1, 1, -1, -1, -1, 1], dtype=torch.int8)
    codes[1, 8:16] = 1
    codes[1, 31] = 1
    scales = torch.tensor([[0.5], [0.25]], dtype=torch.bfloat16)
    packed = P.pack(codes, scales, "binary", 32)
    # Bit j % 8 of byte j // 8 is 1 for +1, LSB first. Row 0, codes + - - + - - - + -> bits 0, 3, 7:
    # 1 + 8 + 128 = 137 = 0x89; the rest are -1 -> 0. Row 1: byte 1 all +1 -> 0xFF; j = 31 -> bit 7 of byte 3.
    assert packed["codes"].tolist() == [[0x89, 0, 0, 0], [0, 0xFF, 0, 0x80]]
    assert packed["scales"].tolist() == [[0.5], [0.25]]  # s, not 2s: no overflow concern for binary
    got, s = P.unpack(packed, "binary", 32)
    assert torch.equal(got, codes) and same_bits16(s, scales)


def test_binary_keeps_large_scales():
    codes, scales = make_codes("binary", 2, 128, True, 0), torch.full((2, 1), 60000.0, dtype=torch.float16)
    got, s = P.unpack(P.pack(codes, scales, "binary", 128), "binary", 128)
    assert torch.equal(got, codes) and same_bits16(s, scales)


def test_bits_per_weight_at_3072():
    def nbytes(mode):
        spec = P.layout(3072, 3072, mode, 128, torch.float16)
        return sum(shape[0] * shape[1] * dtype.itemsize for dtype, shape in spec.values())

    assert nbytes("binary") == 3072 * 384 + 3072 * 24 * 2
    assert nbytes("ternary") == 3072 * 615 + 3072 * 24 * 2
    assert nbytes("binary") * 8 / 3072**2 == 1.125
    assert nbytes("ternary") * 8 / 3072**2 == 1.7265625  # codes alone 1.6016, log2(3) = 1.585
    assert P.layout(3072, 3072, "ternary", 128, torch.bfloat16)["codes"] == (torch.uint8, (3072, 615))


def _codes(out=2, inn=128, value=1):
    return full_codes(out, inn, value)


def _scales(out=2, groups=1, dtype=torch.float16, value=0.5):
    return full_scales(out, groups, dtype, value)


def test_errors_in_layout():
    with pytest.raises(PackError, match="unknown mode 'quaternary'"):
        P.layout(2, 128, "quaternary", 128, torch.float16)
    with pytest.raises(PackError, match="in_features 96 is not divisible by group_size 64"):
        P.layout(2, 96, "ternary", 64, torch.float16)
    with pytest.raises(PackError, match="in_features 36 is not divisible by 8, the codes per uint8"):
        P.layout(2, 36, "binary", 4, torch.float16)
    assert P.layout(2, 36, "ternary", 4, torch.float16)["codes"] == (torch.uint8, (2, 8))  # any width packs
    with pytest.raises(PackError, match="scale dtype must be torch.float16 or torch.bfloat16, got torch.float32"):
        P.layout(2, 128, "binary", 128, torch.float32)
    with pytest.raises(PackError, match="group_size must be a positive int"):
        P.layout(2, 128, "ternary", 0, torch.float16)


def test_errors_in_pack_inputs():
    with pytest.raises(PackError, match="codes must be a 2-D torch.int8 tensor, got int32"):
        P.pack(_codes().int(), _scales(), "ternary", 128)
    with pytest.raises(PackError, match=r"scales shape \[2, 2\] does not match .* expected \[2, 1\]"):
        P.pack(_codes(), _scales(groups=2), "ternary", 128)
    with pytest.raises(PackError, match="scale dtype must be torch.float16 or torch.bfloat16, got torch.float32"):
        P.pack(_codes(), _scales().float(), "binary", 128)
    inf = _scales()
    inf[1, 0] = float("inf")
    with pytest.raises(PackError, match="scales contain inf or NaN"):
        P.pack(_codes(), inf, "ternary", 128)
    with pytest.raises(PackError, match="unknown mode 'Ternary'"):
        P.pack(_codes(), _scales(), "Ternary", 128)


def _ternary_pack(inn=128):
    return P.pack(make_codes("ternary", 3, inn, True, 0), _scales(3, inn // 32), "ternary", 32)


@pytest.mark.parametrize("value", [243, 255])
def test_unpack_rejects_bytes_above_242(value):
    good = _ternary_pack()
    codes = good["codes"].clone()
    codes[1, 4] = value
    codes[2, 0] = 250  # a later bad byte: the first one is named
    with pytest.raises(PackError, match=rf"byte {value} at \[row, byte\] \[1, 4\] is >= 243"):
        P.unpack({**good, "codes": codes}, "ternary", 32)


def test_unpack_rejects_non_canonical_padding():
    good = _ternary_pack()  # in 128 = 25 * 5 + 3: 3 real trits and 2 padding trits in byte 25
    codes = good["codes"].clone()
    codes[2, 25] -= 81  # the top padding trit 1 -> 0; still a valid byte below 243
    with pytest.raises(PackError, match=r"row 2, byte 25 .*padding trits \[1, 0\] after its 3 real ones; "
                                        r"padding must be trit 1 \(code 0\), making the byte 108 \+"):
        P.unpack({**good, "codes": codes}, "ternary", 32)
    codes = good["codes"].clone()
    codes[0, 25] += 27  # padding trit 1 -> 2
    with pytest.raises(PackError, match=r"row 0, byte 25 .*padding trits \[2, 1\]"):
        P.unpack({**good, "codes": codes}, "ternary", 32)


def test_unpack_errors_name_the_key():
    good = P.pack(_codes(), _scales(), "ternary", 128)  # codes [2, 26], scales [2, 1]
    with pytest.raises(PackError, match=r"key 'codes': expected a 2-D uint8 tensor, got int8 \[2, 26\]"):
        P.unpack({**good, "codes": good["codes"].view(torch.int8)}, "ternary", 128)
    with pytest.raises(PackError, match=r"key 'codes': expected a 2-D uint8 tensor, got uint8 \[52\]"):
        P.unpack({**good, "codes": good["codes"].reshape(-1)}, "ternary", 128)
    with pytest.raises(PackError, match=r"key 'codes': expected a 2-D uint8 tensor, got NoneType"):
        P.unpack({"scales": good["scales"]}, "ternary", 128)
    with pytest.raises(PackError, match=r"key 'scales': expected a 2-D float16 or bfloat16 tensor, "
                                        r"got float32 \[2, 1\]"):
        P.unpack({**good, "scales": good["scales"].float()}, "ternary", 128)
    with pytest.raises(PackError, match=r"key 'scales': expected float16 \[2, 1\], got float16 \[1, 2\]"):
        P.unpack({**good, "scales": good["scales"].reshape(1, 2)}, "ternary", 128)
    with pytest.raises(PackError, match=r"key 'scales': expected float16 \[2, 1\], got float16 \[2, 2\]"):
        P.unpack({**good, "scales": _scales(groups=2)}, "ternary", 128)
    with pytest.raises(PackError, match=r"key 'codes': 25 bytes per row hold 121 to 125 ternary codes, "
                                        r"none of them a multiple of group_size 128"):
        P.unpack({**good, "codes": good["codes"][:, :25]}, "ternary", 128)
    with pytest.raises(PackError, match=r"missing \[\], unexpected \['extra'\]"):
        P.unpack({**good, "extra": good["scales"]}, "ternary", 128)
    with pytest.raises(PackError, match="pack must be a dict of tensors, got list"):
        P.unpack([good["codes"], good["scales"]], "ternary", 128)
    with pytest.raises(PackError, match="unknown mode 'trinary'"):
        P.unpack(good, "trinary", 128)
    with pytest.raises(PackError, match="group_size must be a positive int, got 0"):
        P.unpack(good, "ternary", 0)


def test_unpack_in_the_wrong_mode():
    binary = P.pack(_codes(), _scales(), "binary", 128)  # 16 bytes per row
    with pytest.raises(PackError, match="16 bytes per row hold 76 to 80 ternary codes"):
        P.unpack(binary, "ternary", 128)
    ternary = P.pack(_codes(), _scales(), "ternary", 128)  # 26 bytes per row read as 208 bits
    with pytest.raises(PackError, match="in_features 208 is not divisible by group_size 128"):
        P.unpack(ternary, "binary", 128)


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_unpack_accepts_strided_tensors(mode):
    codes, scales = make_codes(mode, 5, 256, False, 3), make_scales_nz(5, 2, torch.float16, 3)
    packed = P.pack(codes, scales, mode, 128)
    strided = {k: v.t().contiguous().t() for k, v in packed.items()}
    assert not strided["codes"].is_contiguous()
    got_codes, got_scales = P.unpack(strided, mode, 128)
    assert torch.equal(got_codes, codes) and same_bits16(got_scales, scales)
    assert got_codes.is_contiguous() and got_scales.is_contiguous()
