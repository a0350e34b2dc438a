"""gemlite pack: W_q equal to gemlite's own packer, metadata as gemlite's pack() sets it (the round trip is
test_pack_contract's)."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bonsai_quant.errors import PackError
from bonsai_quant.packing import gemlite as P

try:  # tests/ is on sys.path under pytest's default rootdir-relative imports
    from pack_helpers import full_codes, full_scales, make_codes, make_scales
except ImportError:  # tests/ made a package
    from tests.pack_helpers import full_codes, full_scales, make_codes, make_scales

try:  # tests/ is on sys.path under pytest's default rootdir-relative imports
    import gemlite_oracle
except ImportError:  # tests/ made a package
    from tests import gemlite_oracle

BITS = {"binary": 1, "ternary": 2}
SETTINGS = settings(max_examples=50, deadline=None)
BITPACK, ORACLE_SOURCE = gemlite_oracle.load_bitpack()
needs_oracle = pytest.mark.skipif(BITPACK is None, reason=ORACLE_SOURCE)


@st.composite
def cases(draw):
    mode = draw(st.sampled_from(["binary", "ternary"]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    gs = draw(st.sampled_from([32, 64, 128]))
    out = draw(st.integers(1, 64))
    groups = draw(st.integers(2, 4))  # gemlite needs two groups or more per row
    seed = draw(st.integers(0, 2**31 - 1))
    codes = make_codes(mode, out, gs * groups, draw(st.booleans()), seed)
    return mode, gs, codes, make_scales(out, groups, dtype, seed)


def same_bits16(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.int16), b.reshape(-1).view(torch.int16))


@needs_oracle
@SETTINGS
@given(cases())
def test_w_q_equals_gemlite_packer_and_decodes_to_codes_times_scales(case):
    mode, gs, codes, scales = case
    packed = P.pack(codes, scales, mode, gs)
    q = (codes + 1) // 2 if mode == "binary" else codes + 1
    # Exactly the call GemLiteLinearTriton.pack makes on CPU tensors (core.py 625-631).
    want, per_byte = gemlite_oracle.pack_weights_over_cols(q.to(torch.uint8), BITS[mode], 8, True)
    assert per_byte == 8 // BITS[mode]
    assert want.dtype == torch.uint8 and torch.equal(packed["W_q"], want)

    # Decode the way gemlite's kernels do (triton_kernels/utils.py `dequantize`), with gemlite's own unpacker:
    # W_group_mode 4: q * scales + zeros; W_group_mode 3 with a scalar zero: (q - zeros) * scales.
    q_back = BITPACK.unpack_over_cols_torch(packed["W_q"].t().contiguous(), BITS[mode], codes.shape[1], torch.uint8)
    assert torch.equal(q_back, q.to(torch.uint8))
    s_full = packed["scales"].t().repeat_interleave(gs, dim=1)
    if mode == "binary":
        w = q_back.to(scales.dtype) * s_full + packed["zeros"].t().repeat_interleave(gs, dim=1)
    else:
        w = (q_back.int() - packed["zeros"]).to(scales.dtype) * s_full
    ref = codes.float() * scales.float().repeat_interleave(gs, dim=1)
    assert torch.equal(w.float(), ref)  # exact: every product and sum is one of -s, 0, s


# Hand-derived from gemlite 0.6.0.post2 core.py for GemLiteLinearTriton(W_nbits, gs, in, out, DT, DT)
# after set_packing_bitwidth(8) and pack(q_uint8, scales, zeros), i.e. get_meta_args() (core.py 804-817):
#   0 scaled_activations  0    fp16/bf16 compute dtype forces it off (core.py 371-372)
#   1 W_nbits             1 / 2
#   2 group_size          gs
#   3 unpack_mask         2**W_nbits - 1
#   4 elements_per_sample 8 // W_nbits, from pack_weights_over_cols_torch at packing bitwidth 8 (core.py 626)
#   5 input_dtype         DType.FP16 = 1 / DType.BF16 = 2 (dtypes.py)
#   6 output_dtype        same
#   7 acc_dtype           GEMLITE_ACC_DTYPE[FP16 or BF16] = DType.FP32 = 0 (core.py 41-42, 368)
#   8 meta_dtype          TORCH_TO_DTYPE[scales.dtype] (core.py 758-759)
#   9 channel_scale_mode  0: several groups per row, so meta_is_channelwise is False (core.py 664, 667)
#  10 W_group_mode        4 for a zeros tensor in fma mode (core.py 673-675), 3 for an int zero (core.py 679-682)
#  11 data_contiguous     1: contiguous=True for packed uint8 non-MX weights (core.py 633-637, 717-718)
# These lists were also compared with a real GemLiteLinearTriton.pack on an H100 (all 12 slots equal).
EXPECTED_METADATA = {
    ("binary", torch.float16, 128): [0, 1, 128, 1, 8, 1, 1, 0, 1, 0, 4, 1],
    ("binary", torch.bfloat16, 64): [0, 1, 64, 1, 8, 2, 2, 0, 2, 0, 4, 1],
    ("ternary", torch.float16, 128): [0, 2, 128, 3, 4, 1, 1, 0, 1, 0, 3, 1],
    ("ternary", torch.bfloat16, 32): [0, 2, 32, 3, 4, 2, 2, 0, 2, 0, 3, 1],
}


@pytest.mark.parametrize("mode, dtype, gs", list(EXPECTED_METADATA))
def test_metadata_and_side_tensors_as_gemlite_sets_them(mode, dtype, gs):
    out, inn = 24, 4 * gs
    packed = P.pack(make_codes(mode, out, inn, True, 0), make_scales(out, 4, dtype, 0), mode, gs)
    assert packed["metadata"].dtype == torch.int32
    assert packed["metadata"].tolist() == EXPECTED_METADATA[(mode, dtype, gs)]
    assert packed["orig_shape"].tolist() == [out, inn]  # [out_features, in_features] (core.py 778-781)
    assert packed["meta_scale"].dtype == torch.float32 and packed["meta_scale"].item() == 0.0  # core.py 387, 786-796
    if mode == "ternary":  # int zero -> torch.tensor(1, dtype=int32), a 0-d tensor (core.py 709-710)
        assert packed["zeros"].dtype == torch.int32 and packed["zeros"].shape == () and packed["zeros"].item() == 1


@pytest.mark.parametrize("mode, bits", [("binary", 1), ("ternary", 2)])
def test_flux_layer_layout(mode, bits):
    spec = P.layout(3072, 3072, mode, 128, torch.float16)
    assert spec == {
        "W_q": (torch.uint8, (3072 * bits // 8, 3072)),
        "scales": (torch.float16, (24, 3072)),
        "zeros": (torch.float16, (24, 3072)) if mode == "binary" else (torch.int32, ()),
        "metadata": (torch.int32, (12,)),
        "orig_shape": (torch.int32, (2,)),
        "meta_scale": (torch.float32, ()),
    }


def test_golden_binary_bytes():
    codes = torch.full((2, 128), -1, dtype=torch.int8)
    codes[0] = torch.tensor([-1, 1], dtype=torch.int8).repeat(64)  # q = 0,1,0,1,... -> odd bits set
    codes[1, [0, 33, 127]] = 1
    scales = torch.tensor([[0.5, 0.5], [0.25, 0.25]], dtype=torch.float16)
    packed = P.pack(codes, scales, "binary", 64)
    # W_q is [in/8, out]: column n is output row n, byte k holds elements 8k..8k+7 with element 8k+j at bit j.
    # Row 1 has q=1 at j=0 (byte 0 bit 0), j=33 (byte 4 bit 1) and j=127 (byte 15 bit 7).
    assert packed["W_q"][:, 0].tolist() == [0xAA] * 16
    assert packed["W_q"][:, 1].tolist() == [0x01, 0, 0, 0, 0x02] + [0] * 10 + [0x80]
    assert packed["scales"].tolist() == [[1.0, 0.5], [1.0, 0.5]]  # 2s, transposed to [groups, out]
    assert packed["zeros"].tolist() == [[-0.5, -0.25], [-0.5, -0.25]]  # -s, transposed


def test_golden_ternary_bytes():
    codes = torch.zeros((2, 128), dtype=torch.int8)
    codes[0] = (torch.arange(128) % 3 - 1).to(torch.int8)  # q = 0,1,2,0,1,2,...
    codes[1, 0], codes[1, 127] = 1, -1
    scales = torch.tensor([[0.5, 0.5], [0.25, 0.25]], dtype=torch.float16)
    packed = P.pack(codes, scales, "ternary", 64)
    # Byte k holds elements 4k..4k+3 at bits 0,2,4,6: byte 0 = q 0,1,2,0 = 0 + 1<<2 + 2<<4 + 0<<6 = 0x24,
    # byte 1 = q 1,2,0,1 = 0x49, byte 2 = q 2,0,1,2 = 0x92, then the period repeats. These are the bytes of the
    # MLX golden word 0x24924924 read little-endian: both targets share one LSB-first bit stream per row.
    assert packed["W_q"][:6, 0].tolist() == [0x24, 0x49, 0x92, 0x24, 0x49, 0x92]
    # Row 1: q=1 everywhere (0b01010101 = 0x55) except q=2 at j=0 and q=0 at j=127 (top field of byte 31).
    assert packed["W_q"][:, 1].tolist() == [0x56] + [0x55] * 30 + [0x15]
    assert packed["scales"].tolist() == [[0.5, 0.25], [0.5, 0.25]]
    assert packed["zeros"].item() == 1


def _codes(out=2, inn=256, value=1):
    return full_codes(out, inn, value)


def _scales(out=2, groups=2, dtype=torch.float16, value=0.5):
    return full_scales(out, groups, dtype, value)


def test_layout_enforces_gemlite_constraints():
    with pytest.raises(PackError, match="unknown mode 'int4'"):
        P.layout(8, 256, "int4", 128, torch.float16)
    with pytest.raises(PackError, match="in_features 320 is not divisible by group_size 128"):
        P.layout(8, 320, "binary", 128, torch.float16)
    with pytest.raises(PackError, match="power of two >= 32, got 16"):
        P.layout(8, 256, "binary", 16, torch.float16)
    with pytest.raises(PackError, match="power of two >= 32, got 96"):
        P.layout(8, 384, "ternary", 96, torch.float16)
    with pytest.raises(PackError, match="at least two groups per row: in_features 128 == group_size"):
        P.layout(8, 128, "binary", 128, torch.float16)
    with pytest.raises(PackError, match="in_features 12 is not divisible by 8, the codes per uint8"):
        P.layout(8, 12, "binary", 4, torch.float16)
    with pytest.raises(PackError, match="scale dtype must be torch.float16 or torch.bfloat16"):
        P.layout(8, 256, "binary", 128, torch.float32)


def test_binary_scale_whose_double_overflows():
    big = _scales(dtype=torch.bfloat16, value=2.0e38)  # bf16 max is ~3.39e38
    with pytest.raises(PackError, match=r"gemlite binary stores 2\*scale, which overflows torch.bfloat16"):
        P.pack(_codes(), big, "binary", 128)
    P.pack(_codes(), big, "ternary", 128)


def test_unpack_errors_name_the_key():
    good = P.pack(_codes(), _scales(), "binary", 128)
    with pytest.raises(PackError, match=r"key 'zeros': expected float16 \[2, 2\], got int32 \[\]"):
        P.unpack({**good, "zeros": torch.tensor(1, dtype=torch.int32)}, "binary", 128)
    with pytest.raises(PackError, match=r"key 'W_q': expected uint8 \[32, 2\], got uint8 \[2, 32\]"):
        P.unpack({**good, "W_q": good["W_q"].t().contiguous()}, "binary", 128)
    with pytest.raises(PackError, match=r"key 'orig_shape': expected int32 \[2\], got int64 \[2\]"):
        P.unpack({**good, "orig_shape": good["orig_shape"].long()}, "binary", 128)
    with pytest.raises(PackError, match=r"missing \['meta_scale'\], unexpected \[\]"):
        P.unpack({k: v for k, v in good.items() if k != "meta_scale"}, "binary", 128)
    metadata = good["metadata"].clone()
    metadata[7] = 1  # an fp16 accumulator, which set_acc_dtype(DType.FP16) would have recorded
    with pytest.raises(PackError, match=r"metadata': slot 7 \(acc_dtype\) is 1, expected 0"):
        P.unpack({**good, "metadata": metadata}, "binary", 128)
    ternary = P.pack(_codes(), _scales(), "ternary", 128)
    metadata = ternary["metadata"].clone()
    metadata[10] = 4
    with pytest.raises(PackError, match=r"slot 10 \(W_group_mode\) is 4, expected 3"):
        P.unpack({**ternary, "metadata": metadata}, "ternary", 128)
    with pytest.raises(PackError, match=r"scales must equal 2 \* -zeros bit-for-bit.*at \[out, group\] \[1, 1\]"):
        zeros = good["zeros"].clone()
        zeros[1, 1] = -0.25
        P.unpack({**good, "zeros": zeros}, "binary", 128)


def test_unpack_accepts_strided_tensors():
    # Packs read from disk or sliced by a runtime need not be row-major; unpack must not depend on it.
    codes, scales = make_codes("ternary", 5, 256, False, 3), make_scales(5, 2, torch.bfloat16, 3)
    packed = P.pack(codes, scales, "ternary", 128)
    strided = {k: (v.t().contiguous().t() if v.dim() == 2 else v) for k, v in packed.items()}
    got_codes, got_scales = P.unpack(strided, "ternary", 128)
    assert torch.equal(got_codes, codes) and same_bits16(got_scales, scales)


def test_unpack_ternary_needs_integer_zero_one():
    good = P.pack(_codes(value=0), _scales(), "ternary", 128)
    with pytest.raises(PackError, match="stores the integer zero 1, got 2"):
        P.unpack({**good, "zeros": torch.tensor(2, dtype=torch.int32)}, "ternary", 128)
    w_q = good["W_q"].clone()
    w_q[3, 1] = 0xFF
    with pytest.raises(PackError, match="'W_q' holds the 2-bit value 3"):
        P.unpack({**good, "W_q": w_q}, "ternary", 128)


def test_oracle_leaves_no_stand_in_modules():
    if BITPACK is None:
        pytest.skip(ORACLE_SOURCE)
    assert "gemlite.bitpack" not in sys.modules
    gemlite = sys.modules.get("gemlite")
    assert gemlite is None or hasattr(gemlite, "GemLiteLinearTriton")  # only a real gemlite may stay
    triton = sys.modules.get("triton")
    assert triton is None or hasattr(triton, "__file__")
