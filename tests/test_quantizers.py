import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bonsai_quant.errors import BonsaiError
from bonsai_quant.quantizers import dequantize, quantize


def test_binary_signs_and_absmean_scale():
    w = torch.tensor([[0.5, -0.25, 0.0, -1.0, 2.0, -0.0, 0.25, -0.5]])
    q = quantize(w, "binary", 4, torch.float16, "absmean")
    assert q.codes.tolist() == [[1, -1, 1, -1, 1, 1, 1, -1]]  # 0 and -0 count as +1
    assert q.scales.tolist() == [[0.4375, 0.6875]]
    assert q.scales.dtype == torch.float16


def test_ternary_optimal_on_a_hand_worked_group():
    # Sorted |w| = 4, 3, 1, 0: S_k^2/k = 16, 24.5, 21.33, 16 -> k=2, s=3.5.
    w = torch.tensor([[1.0, -4.0, 0.0, 3.0]])
    q = quantize(w, "ternary", 4, torch.float16, "optimal")
    assert q.codes.tolist() == [[0, -1, 0, 1]]
    assert q.scales.tolist() == [[3.5]]
    expected_err = ((1.0**2 + 0.5**2 + 0.5**2) / (1 + 16 + 9)) ** 0.5
    assert q.rel_error == pytest.approx(expected_err, rel=1e-6)


def test_ternary_threshold_rule():
    # mean|w| = 2, threshold 1.4: support {-4, 3}, s = 3.5
    w = torch.tensor([[1.0, -4.0, 0.0, 3.0]])
    q = quantize(w, "ternary", 4, torch.float16, "threshold")
    assert q.codes.tolist() == [[0, -1, 0, 1]]
    assert q.scales.tolist() == [[3.5]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-4, 4, allow_nan=False, width=16), min_size=6, max_size=6))
def test_ternary_optimal_beats_every_ternary_assignment(values):
    w = torch.tensor([values], dtype=torch.float32)
    q = quantize(w, "ternary", 6, torch.bfloat16, "optimal")
    # compare against the unrounded optimum of all 3^6 assignments, allowing the bf16 rounding of the scale
    best = min(
        float(((w - (w * t).sum() / max((t != 0).sum(), 1) * t) ** 2).sum())
        for t in (torch.tensor([c], dtype=torch.float32) for c in itertools.product((-1, 0, 1), repeat=6))
    )
    got = float(((w - dequantize(q.codes, q.scales, 6)) ** 2).sum())
    assert got <= best + 1e-2 * float((w**2).sum()) + 1e-12


@pytest.mark.parametrize("mode, solver", [("binary", "absmean"), ("ternary", "optimal"), ("ternary", "threshold")])
def test_all_zero_group_has_zero_scale(mode, solver):
    w = torch.zeros(2, 8)
    w[1, 4:] = torch.tensor([1.0, -2.0, 3.0, -4.0])
    q = quantize(w, mode, 4, torch.float16, solver)
    assert q.scales[0].tolist() == [0.0, 0.0]
    assert q.scales[1, 0].item() == 0.0
    assert torch.equal(dequantize(q.codes, q.scales, 4)[:, :4], torch.zeros(2, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weight_is_an_error_naming_the_tensor(bad):
    w = torch.ones(3, 8)
    w[2, 5] = bad
    with pytest.raises(BonsaiError, match=r"blocks\.0\.attn\.to_q\.weight: non-finite weight .* at \[2, 5\]"):
        quantize(w, "ternary", 4, torch.float16, "optimal", name="blocks.0.attn.to_q.weight")


def test_in_features_not_divisible_by_group_is_an_error():
    with pytest.raises(BonsaiError, match=r"shape \[4, 100\] cannot be quantized in groups of 128"):
        quantize(torch.ones(4, 100), "binary", 128, torch.float16, "absmean", name="x")


def test_scale_overflowing_float16_is_an_error():
    w = torch.full((1, 4), 1e6)
    with pytest.raises(BonsaiError, match="overflows torch.float16"):
        quantize(w, "binary", 4, torch.float16, "absmean", name="x")
    assert quantize(w, "binary", 4, torch.bfloat16, "absmean").scales.dtype == torch.bfloat16


def test_quantized_weight_is_codes_times_16bit_scale_exactly():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(3))
    for mode, solver in (("binary", "absmean"), ("ternary", "optimal")):
        q = quantize(w, mode, 128, torch.float16, solver)
        deq = dequantize(q.codes, q.scales, 128)
        per_group = deq.reshape(64, 2, 128).abs()
        nonzero_values = {float(v) for v in per_group[per_group > 0]}
        assert nonzero_values <= {float(s) for s in q.scales.flatten().float()}
        rel = float((w - deq).norm() / w.norm())
        assert q.rel_error == pytest.approx(rel, rel=1e-4)
