"""MLX pack: the real MLX runtime decodes it to codes * s (the round trip is test_pack_contract's)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bonsai_quant.errors import PackError
from bonsai_quant.packing import mlx as P

try:  # tests/ is on sys.path under pytest's default rootdir-relative imports
    from pack_helpers import full_codes, full_scales, make_codes, make_scales
except ImportError:  # tests/ made a package
    from tests.pack_helpers import full_codes, full_scales, make_codes, make_scales

mx = pytest.importorskip("mlx.core")
nn = pytest.importorskip("mlx.nn")

BITS = {"binary": 1, "ternary": 2}
MX_DTYPE = {torch.float16: mx.float16, torch.bfloat16: mx.bfloat16}
SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def cases(draw):
    mode = draw(st.sampled_from(["binary", "ternary"]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    gs = draw(st.sampled_from([32, 64, 128]))
    out = draw(st.integers(1, 64))
    groups = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    codes = make_codes(mode, out, gs * groups, draw(st.booleans()), seed)
    return mode, gs, codes, make_scales(out, groups, dtype, seed)


def to_mx(t: torch.Tensor):
    if t.dtype in MX_DTYPE:  # numpy has no bfloat16; float32 holds every 16-bit value exactly
        return mx.array(t.float().numpy()).astype(MX_DTYPE[t.dtype])
    return mx.array(t.numpy())


def expected_weight(codes: torch.Tensor, scales: torch.Tensor, gs: int) -> np.ndarray:
    return (codes.float() * scales.float().repeat_interleave(gs, dim=1)).numpy()


def same_bits16(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.view(torch.int16), b.view(torch.int16))


@SETTINGS
@given(cases())
def test_mlx_dequantize_is_exactly_codes_times_scales(case):
    mode, gs, codes, scales = case
    packed = P.pack(codes, scales, mode, gs)
    w = mx.dequantize(to_mx(packed["weight"]), to_mx(packed["scales"]), to_mx(packed["biases"]),
                      group_size=gs, bits=BITS[mode])
    assert w.dtype == MX_DTYPE[scales.dtype]
    got = np.array(w.astype(mx.float32))
    want = expected_weight(codes, scales, gs)
    # Bit-for-bit as float32, except the sign of zero: with s = 0, MLX computes 0*0 + (-0) = +0 where
    # codes*s gives -0. Adding +0.0 maps -0 to +0 and leaves every other value's bits alone.
    assert np.array_equal((got + 0.0).view(np.uint32), (want + 0.0).view(np.uint32))


@pytest.mark.parametrize("mode", ["binary", "ternary"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gs", [32, 64, 128])
def test_quantized_linear_reproduces_float_matmul(mode, dtype, gs):
    out, inn = 48, 4 * gs
    codes = make_codes(mode, out, inn, ramp=False, seed=gs)
    scales = make_scales(out, inn // gs, dtype, seed=gs).abs()
    packed = P.pack(codes, scales, mode, gs)
    layer = nn.QuantizedLinear(inn, out, bias=False, group_size=gs, bits=BITS[mode])
    layer.weight, layer.scales, layer.biases = (to_mx(packed[k]) for k in P.SUFFIXES)
    x = torch.randn(8, inn, generator=torch.Generator().manual_seed(7))
    y = np.array(layer(mx.array(x.numpy())), dtype=np.float64)
    ref = x.double().numpy() @ expected_weight(codes, scales, gs).astype(np.float64).T
    # float32 activations: the dequantized weights are exact, so only float32 summation order differs
    # (measured ~4e-7). 1e-5 is far below what one wrong weight in a row of <= 512 would cause (~1e-2).
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 1e-5


def test_golden_binary_words():
    codes = torch.full((2, 128), -1, dtype=torch.int8)
    codes[0] = torch.tensor([-1, 1], dtype=torch.int8).repeat(64)  # q = 0,1,0,1,... -> odd bits set
    codes[1, [0, 33, 127]] = 1
    scales = torch.tensor([[0.5], [0.25]], dtype=torch.float16)
    packed = P.pack(codes, scales, "binary", 128)
    # Element j sits at bit j % 32 of word j // 32: row 1 has q=1 at j=0 (word 0 bit 0), j=33 (word 1 bit 1)
    # and j=127 (word 3 bit 31).
    assert packed["weight"].tolist() == [[0xAAAAAAAA] * 4, [0x00000001, 0x00000002, 0x00000000, 0x80000000]]
    assert packed["scales"].tolist() == [[1.0], [0.5]]  # 2s
    assert packed["biases"].tolist() == [[-0.5], [-0.25]]  # -s


def test_golden_ternary_words():
    codes = torch.zeros((2, 128), dtype=torch.int8)
    codes[0] = (torch.arange(128) % 3 - 1).to(torch.int8)  # q = 0,1,2,0,1,2,...
    codes[1, 0], codes[1, 127] = 1, -1
    scales = torch.tensor([[0.5], [0.25]], dtype=torch.float16)
    packed = P.pack(codes, scales, "ternary", 128)
    # Element j sits at bits 2*(j % 16) of word j // 16, so each hex digit holds q[2n] + 4*q[2n+1]:
    # word 0 = q 0,1 | 2,0 | 1,2 | 0,1 | 2,0 | 1,2 | 0,1 | 2,0 -> digits (low first) 4,2,9,4,2,9,4,2.
    # The ramp has period 3 words. Row 1: all q=1 (0b01 fields, 0x55555555), but q=2 at j=0 (low field)
    # and q=0 at j=127 (top field of word 7).
    assert packed["weight"][0, :4].tolist() == [0x24924924, 0x49249249, 0x92492492, 0x24924924]
    assert packed["weight"][1].tolist() == [0x55555556] + [0x55555555] * 6 + [0x15555555]
    assert packed["scales"].tolist() == [[0.5], [0.25]]
    assert packed["biases"].tolist() == [[-0.5], [-0.25]]


def _codes(out=2, inn=128, value=1):
    return full_codes(out, inn, value)


def _scales(out=2, groups=1, dtype=torch.float16, value=0.5):
    return full_scales(out, groups, dtype, value)


def test_errors_in_layout():
    with pytest.raises(PackError, match="unknown mode 'quaternary'"):
        P.layout(2, 128, "quaternary", 128, torch.float16)
    with pytest.raises(PackError, match="in_features 96 is not divisible by group_size 64"):
        P.layout(2, 96, "binary", 64, torch.float16)
    with pytest.raises(PackError, match="in_features 48 is not divisible by 32, the codes per uint32"):
        P.layout(2, 48, "binary", 16, torch.float16)
    with pytest.raises(PackError, match="in_features 24 is not divisible by 16"):
        P.layout(2, 24, "ternary", 8, torch.float16)
    with pytest.raises(PackError, match="scale dtype must be torch.float16 or torch.bfloat16, got torch.float32"):
        P.layout(2, 128, "binary", 128, torch.float32)
    with pytest.raises(PackError, match="MLX supports group_size 32, 64 or 128, got 256"):
        P.layout(2, 512, "binary", 256, torch.float16)
    with pytest.raises(PackError, match="MLX supports group_size 32, 64 or 128, got 16"):
        P.layout(2, 64, "ternary", 16, torch.float16)
    with pytest.raises(PackError, match="group_size must be a positive int"):
        P.layout(2, 128, "binary", 0, torch.float16)


def test_errors_in_pack_inputs():
    with pytest.raises(PackError, match="codes must be a 2-D torch.int8 tensor, got int32"):
        P.pack(_codes().int(), _scales(), "binary", 128)
    with pytest.raises(PackError, match=r"scales shape \[2, 2\] does not match .* expected \[2, 1\]"):
        P.pack(_codes(), _scales(groups=2), "binary", 128)
    nan = _scales()
    nan[0, 0] = float("nan")
    with pytest.raises(PackError, match="scales contain inf or NaN"):
        P.pack(_codes(), nan, "ternary", 128)
    with pytest.raises(PackError, match="unknown mode"):
        P.pack(_codes(), _scales(), "Binary", 128)


def test_binary_scale_whose_double_overflows():
    # fp16 max is 65504: s = 40000 is representable but the stored 2s is not.
    with pytest.raises(PackError, match=r"MLX binary stores 2\*scale, which overflows torch.float16 for scale 40000"):
        P.pack(_codes(), _scales(value=40000.0), "binary", 128)
    P.pack(_codes(), _scales(value=40000.0), "ternary", 128)  # ternary stores s itself
    P.pack(_codes(), _scales(value=32752.0), "binary", 128)  # largest fp16 whose double is finite


def test_unpack_errors_name_the_key():
    good = P.pack(_codes(), _scales(), "binary", 128)
    with pytest.raises(PackError, match=r"key 'scales': expected float16 or bfloat16, got float32 \[2, 1\]"):
        P.unpack({**good, "scales": good["scales"].float()}, "binary", 128)
    with pytest.raises(PackError, match=r"key 'biases': expected float16 \[2, 1\], got bfloat16 \[2, 1\]"):
        P.unpack({**good, "biases": good["biases"].bfloat16()}, "binary", 128)
    with pytest.raises(PackError, match=r"key 'biases': expected float16 \[2, 1\], got float16 \[1, 2\]"):
        P.unpack({**good, "biases": good["biases"].reshape(1, 2)}, "binary", 128)
    with pytest.raises(PackError, match=r"key 'weight': expected a 2-D uint32 tensor, got int32 \[2, 4\]"):
        P.unpack({**good, "weight": good["weight"].view(torch.int32)}, "binary", 128)
    with pytest.raises(PackError, match=r"missing \['biases'\], unexpected \['bias'\]"):
        P.unpack({"weight": good["weight"], "scales": good["scales"], "bias": good["biases"]}, "binary", 128)
    with pytest.raises(PackError, match=r"scales must equal 2 \* -biases bit-for-bit.*at \[1, 0\]"):
        P.unpack({**good, "biases": torch.tensor([[-0.5], [-0.25]], dtype=torch.float16)}, "binary", 128)
    # A binary pack read as ternary: 4 words per row hold only 64 two-bit codes.
    with pytest.raises(PackError, match="in_features 64 is not divisible by group_size 128"):
        P.unpack(good, "ternary", 128)


def test_unpack_accepts_strided_tensors():
    codes, scales = make_codes("binary", 5, 256, False, 3), make_scales(5, 2, torch.float16, 3)
    packed = P.pack(codes, scales, "binary", 128)
    strided = {k: v.t().contiguous().t() for k, v in packed.items()}
    got_codes, got_scales = P.unpack(strided, "binary", 128)
    assert torch.equal(got_codes, codes) and same_bits16(got_scales, scales)


def test_unpack_rejects_the_unused_ternary_slot_value():
    good = P.pack(_codes(value=0), _scales(), "ternary", 128)
    weight = good["weight"].clone()
    weight[0, 0] = 0x55555557  # field 0 = 0b11
    with pytest.raises(PackError, match="holds the 2-bit value 3"):
        P.unpack({**good, "weight": weight}, "ternary", 128)
