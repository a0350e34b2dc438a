"""The CUDA backend on CPU: its Triton kernels under Triton's interpreter, their layout, dispatch and selection.

The interpreter runs the kernels' own code with numpy. Two of its gaps shape these tests: its dot product of
bfloat16 operands multiplies the raw 16-bit patterns (so the 16-bit kernel is checked with float16 and
float32 activations; bf16 is the same code with another dtype), and its float32 -> e4m3 cast mis-rounds near
powers of two (the quantize kernel rounds on the e4m3 grid itself before casting, so it is compared bit for bit
with torch's cast). The GPU run of tools/bench_cuda.py checks the compiled kernels against the same oracles.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # also set by conftest.py, before anything imports triton
pytest.importorskip("triton")

from bonsai_quant.convert import convert  # noqa: E402
from bonsai_quant.errors import BonsaiError  # noqa: E402
from bonsai_quant.packing import bonsai, gemlite, mflux, mlx  # noqa: E402
from bonsai_quant.recipe import default_recipe  # noqa: E402
from bonsai_quant.runtime import load_transformer  # noqa: E402
from bonsai_quant.runtime.cuda import choose_backend, dispatch, emulate, layout, ops  # noqa: E402
from bonsai_quant.runtime.cuda.linear import CudaPackedLinear  # noqa: E402
from bonsai_quant.runtime.packed_linear import LAYOUT_BUFFERS, PackedLinear  # noqa: E402
from tests.pack_helpers import make_codes  # noqa: E402

PACKERS = {"mlx": mlx, "gemlite": gemlite, "bonsai": bonsai, "mflux": mflux}
# mflux reads binary only at group 64, and the CUDA backend runs group 128 only.
CASES = [(fmt, mode) for fmt in PACKERS for mode in ("binary", "ternary") if (fmt, mode) != ("mflux", "binary")]
BITS = {"binary": 1, "ternary": 2}


def _scales(out: int, groups: int, seed: int, dtype=torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return ((torch.rand(out, groups, generator=g) + 0.25) * 10.0 ** torch.randint(-3, 2, (out, groups),
                                                                               generator=g)).to(dtype)


def _weights(fmt: str, mode: str, out: int = 48, inn: int = 384, seed: int = 0):
    codes = make_codes(mode, out, inn, ramp=False, seed=seed)
    scales = _scales(out, inn // 128, seed)
    tensors = PACKERS[fmt].pack(codes, scales, mode, 128)
    buffers = {s: tensors[s] for s in LAYOUT_BUFFERS[fmt]}
    w = layout.from_buffers(fmt, buffers, inn, out, BITS[mode], 128)
    return codes, scales, tensors, w


@pytest.mark.parametrize("fmt,mode", CASES)
def test_every_pack_format_decodes_to_its_codes_and_scales(fmt, mode):
    codes, scales, tensors, w = _weights(fmt, mode)
    want = {"mlx": "bits1" if mode == "binary" else "bits2", "gemlite": "bits1" if mode == "binary" else "bits2",
            "bonsai": "bits1" if mode == "binary" else "trits", "mflux": "bits2"}[fmt]
    assert w.encoding == want
    assert torch.equal(layout.codes_of(w), codes)
    assert torch.equal(w.scales.t().view(torch.int16), scales.view(torch.int16))
    # Resident bytes: never more than the pack's (binary drops MLX's and gemlite's second scale tensor).
    pack_bytes = sum(tensors[s].numel() * tensors[s].element_size() for s in LAYOUT_BUFFERS[fmt])
    assert w.nbytes <= pack_bytes
    code_bytes = {"bits1": 384 // 8, "bits2": 384 // 4, "trits": -(-384 // 5)}[want] * 48
    assert w.nbytes == code_bytes + scales.numel() * 2
    # The same weights built straight from codes have the same bytes.
    direct = layout.from_codes(codes, scales, want, 128)
    assert torch.equal(direct.codes, w.codes) and torch.equal(direct.scales, w.scales)


@pytest.mark.parametrize("encoding", ["bits1", "bits2", "trits"])
def test_expand_kernel_reads_the_packed_codes_bit_exact(encoding):
    mode = "binary" if encoding == "bits1" else "ternary"
    codes = make_codes(mode, 40, 384, ramp=True, seed=0)
    scales = _scales(40, 3, 1)
    w = layout.from_codes(codes, scales, encoding, 128)
    e4m3, s32 = ops.expand_e4m3(w)
    assert torch.equal(e4m3.float(), codes.float())
    assert torch.equal(s32, scales.t().float())


@pytest.mark.parametrize("encoding", ["bits1", "bits2"])
def test_expand_kernel_turns_every_possible_code_byte_into_its_codes(encoding):
    # The word kernel builds four e4m3 codes per integer multiply: every byte value a pack can hold is checked
    # (all 256 for binary, the 81 whose four 2-bit slots are codes for ternary) in every position of a group.
    values = [v for v in range(256) if encoding == "bits1" or all((v >> (2 * i)) & 3 != 3 for i in range(4))]
    per = layout.CODES_PER_BYTE[encoding]
    rows = 256 // per  # two groups
    codes = torch.tensor(values, dtype=torch.uint8).repeat(rows, 1)
    codes = torch.roll(codes, shifts=1, dims=1) if encoding == "bits1" else codes
    codes[::2] = torch.flip(codes[::2], dims=[1])  # neighbouring rows differ
    scales = _scales(len(values), 2, 3)
    w = layout.PackedWeights(encoding, codes.contiguous(), scales.t().contiguous(), 256, len(values), 128)
    e4m3, s32 = ops.expand_e4m3(w)
    assert ops.EXPAND["words"] is True
    assert torch.equal(e4m3.float(), layout.codes_of(w).float())
    assert torch.equal(s32, scales.t().float())


@pytest.mark.parametrize("encoding", ["bits1", "bits2", "trits"])
def test_16_bit_kernel_matches_the_dense_product(encoding):
    mode = "binary" if encoding == "bits1" else "ternary"
    codes = make_codes(mode, 72, 384, ramp=False, seed=3)
    scales = _scales(72, 3, 4)
    w = layout.from_codes(codes, scales, encoding, 128)
    x = torch.randn(19, 384, generator=torch.Generator().manual_seed(5))
    ref = x.double() @ layout.dense_of(w, torch.float64).t()
    y32 = ops.packed_matmul(x, w)  # fp32 activations: ieee products, only the summation order differs
    assert y32.dtype == torch.float32
    assert float((y32.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    y16 = ops.packed_matmul(x.half(), w)  # exact fp16 products summed in fp32: the fp16 output rounding
    ref16 = x.half().double() @ layout.dense_of(w, torch.float64).t()
    assert y16.dtype == torch.float16
    assert float(((y16.double() - ref16).abs() / ref16.abs().clamp(min=1e-3)).max()) <= 2.0 ** -11


def _tile(kind, bn, split, bm=1, last=False):
    return dict(kind=kind, BLOCK_N=bn, SPLIT=split, BLOCK_M=bm, num_warps=4, num_stages=3, LAST_REDUCES=last)


SMALL_M_CONFIGS = [(1, _tile("gemv", 64, 1)), (1, _tile("gemv", 128, 4)), (3, _tile("gemv", 256, 2, last=True)),
                   (1, _tile("gemv", 64, 4, last=True)), (1, _tile("dot", 64, 4, 16)),
                   (16, _tile("dot", 128, 1, 16)), (16, _tile("dot", 64, 2, 16)),
                   (40, _tile("dot", 64, 4, 64, last=True)), (16, _tile("tiled", 32, 1, 16)),
                   (1, _tile("dot_xsplit", 64, 4, 16, last=True)), (16, _tile("dot_xsplit", 128, 1, 16)),
                   (40, _tile("dot_xsplit", 64, 2, 64, last=True)), (3, _tile("dot_t", 64, 4, 16, last=True)),
                   (16, _tile("dot_t", 128, 1, 16)), (16, _tile("dot_t", 64, 2, 16)),
                   (40, _tile("dot_t", 128, 4, 64, last=True))]


@pytest.mark.parametrize("encoding", ["bits1", "bits2"])
@pytest.mark.parametrize("m,cfg", SMALL_M_CONFIGS,
                         ids=[f"M{m}-{c['kind']}-n{c['BLOCK_N']}-split{c['SPLIT']}{'-last' * c['LAST_REDUCES']}"
                              for m, c in SMALL_M_CONFIGS])
def test_every_small_m_tile_computes_the_exact_group_sums(encoding, m, cfg):
    mode = "binary" if encoding == "bits1" else "ternary"
    codes = make_codes(mode, 200, 512, ramp=False, seed=11)  # 200: a partial last column tile
    scales = _scales(200, 4, 12)
    w = layout.from_codes(codes, scales, encoding, 128)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(13)).half()
    ref = x.double() @ layout.dense_of(w, torch.float64).t()
    y = torch.full((m, 200), float("nan"))
    ops.small_m_matmul(x, w, y, **cfg)
    # fp16 x times codes is exact in fp32; each group's 128 products are summed in fp32 and then scaled, the
    # splits added in order: only fp32 summation rounding is left (every output written: no NaN survives).
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-6
    y16 = torch.empty(m, 200, dtype=torch.float16)
    ops.small_m_matmul(x, w, y16, **cfg)
    assert float(((y16.double() - ref).abs() / ref.abs().clamp(min=1e-3)).max()) <= 2.0 ** -11
    # the split-K arrival counters are back at zero for the next call (and for CUDA-graph replays)
    assert int(ops.Counters.get(x.device).count_nonzero()) == 0


@pytest.mark.parametrize("n,k", [(3072, 3072), (18432, 3072), (3072, 9216), (27648, 3072), (3072, 12288),
                                 (200, 512)])
def test_small_m_candidates_split_only_whole_groups(n, k):
    for m in (1, 3, 16, 64):
        cands = ops._small_m_candidates(m, k // 128, n)
        assert all((k // 128) % c["SPLIT"] == 0 for c in cands)
        assert cands[-1]["kind"] == "tiled" and len(cands) >= 2
        kinds = [c["kind"] for c in cands[:-1]]
        # bounded by rule: two gemv tiles for a few rows, the two new tensor-core kernels at the best one or two
        # (tile, split) pairs, the round-2 dot kernel once above 4 rows; no tile twice
        want = ({"gemv": 2, "dot_xsplit": 1, "dot_t": 1} if m <= 4 else {"dot_xsplit": 2, "dot_t": 2, "dot": 1})
        assert {kind: kinds.count(kind) for kind in set(kinds)} == want
        assert len({tuple(sorted(c.items())) for c in cands}) == len(cands)
        assert all(c["LAST_REDUCES"] == (c["SPLIT"] > 1) for c in cands[:-1])
    # klein's 3072-wide layers get a K split (a bare 3072 / 64 = 48 column tiles would idle most of the GPU)
    if (n, k) == (3072, 3072):
        assert min(c["SPLIT"] for c in ops._small_m_candidates(1, 24, n)[:-1]) >= 8


def test_quantize_kernel_equals_the_torch_emulation_bit_for_bit():
    m, k = 37, 512
    g = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=g) * torch.logspace(-30, 30, m, base=2)[:, None]
    x[3, :128] = 0.0                          # an all-zero block: scale 1, codes 0
    x[5, 128:256] *= 2.0 ** -12               # values on e4m3's subnormal grid
    x[6, :128] = torch.linspace(-448, 448, 128)
    x[7, :128] = 1.75 * 2.0 ** torch.arange(128).remainder(9)  # amax exactly 1.75 * 2**8: scale 1
    x[8, 2] = 7.9                              # rounds up across a power of two (the interpreter's own cast fails)
    q, sx = ops.quantize_e4m3(x)
    q_ref, sx_ref = emulate.quantize_e4m3(x)
    assert torch.equal(sx, sx_ref)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert float(sx[7, 0]) == 1.0 and float(sx[3, 0]) == 1.0
    # Every block's largest value lands in [224, 448] (amax just above 224 may round to it): no saturation.
    top = q.float().view(m, -1, 128).abs().amax(-1)
    nonzero = top > 0
    assert bool(((top[nonzero] >= 224) & (top[nonzero] <= 448)).all())
    # Column-major scales (torch._scaled_mm's layout) hold the same values.
    q2, sx2 = ops.quantize_e4m3(x, column_major_scales=True)
    assert sx2.stride() == (1, m) and torch.equal(sx2, sx) and torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


@pytest.mark.parametrize("encoding", ["bits1", "trits"])
def test_fp8_kernel_follows_the_block_scale_order_of_the_emulation(encoding):
    mode = "binary" if encoding == "bits1" else "ternary"
    codes = make_codes(mode, 64, 512, ramp=False, seed=7)
    scales = _scales(64, 4, 8)
    w = layout.from_codes(codes, scales, encoding, 128)
    x = torch.randn(33, 512, generator=torch.Generator().manual_seed(9))
    y = ops.packed_fp8_matmul(x, w, torch.float32)
    emu = emulate.fp8_matmul(x, codes, scales)
    # Same e4m3 inputs, same per-block fp32 promotion; only the order of the 128 fp32 adds inside a block
    # differs, so the two agree to float32 resolution.
    assert float((y - emu).abs().max() / emu.abs().max()) < 1e-6
    ref = x.double() @ layout.dense_of(w, torch.float64).t()
    err = float((y.double() - ref).norm() / ref.norm())
    assert 5e-3 < err < 4e-2  # e4m3 activations: ~2.5e-2 on Gaussian inputs (not exact, not broken)


def test_crossover_rows_pick_the_fastest_kernel_per_m():
    rows = dispatch.crossover_rows({1: {"bf16": 1.0, "fp8": 2.0}, 16: {"bf16": 1.0, "fp8": 1.5},
                                    256: {"bf16": 3.0, "fp8": 2.0, "fp8_scaled_mm": 2.5},
                                    4096: {"bf16": 9.0, "fp8": 5.0, "fp8_scaled_mm": 4.0}})
    assert rows == [[16, "bf16"], [256, "fp8"], [None, "fp8_scaled_mm"]]
    assert [dispatch.pick(rows, m) for m in (1, 16, 17, 256, 257, 100000)] == \
        ["bf16", "bf16", "fp8", "fp8", "fp8_scaled_mm", "fp8_scaled_mm"]
    table = dispatch.Table({"shapes": {"96,384": {"binary": rows}}})
    assert table.kernel(96, 384, "binary", 300) == "fp8_scaled_mm"
    assert table.kernel(96, 384, "ternary", 300) == "fp8_scaled_mm"  # unmeasured: the default rule
    assert table.kernel(96, 384, "ternary", 64) == "bf16"


@pytest.mark.parametrize("rows,message", [
    ([], "non-empty list"),
    ([[16, "bf16"]], "last row must have m_max null"),
    ([[None, "bf16"], [16, "fp8"]], "only the last row"),
    ([[16, "bf16"], [8, "fp8"], [None, "fp8"]], "m_max must be an int above 16"),
    ([[16, "int4"], [None, "fp8"]], "one of bf16, fp8, fp8_scaled_mm"),
])
def test_a_malformed_crossover_table_is_named(rows, message):
    with pytest.raises(ValueError, match=message):
        dispatch.Table({"shapes": {"96,384": {"binary": rows}}})


def test_the_packaged_table_is_valid_and_covers_every_m():
    table = dispatch.measured_table()
    for m in (1, 16, 64, 65, 1024, 4096, 10**6):
        assert table.kernel(3072, 3072, "binary", m) in dispatch.KERNELS


def test_backend_names_and_devices_are_checked():
    with pytest.raises(BonsaiError, match="unknown backend 'triton'; valid: reference, gemlite, cuda"):
        choose_backend("triton", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(BonsaiError, match="cuda backend runs on a CUDA device, and the model is on cpu"):
            choose_backend("cuda", "cpu")
        assert choose_backend(None, "cpu") == "reference"
    assert choose_backend("reference", "cpu") == "reference"


@pytest.fixture(scope="module")
def tiny_packs(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "binary"
    convert(tiny_ckpt, default_recipe("binary"), out, targets=("mlx", "bonsai"), verbose=False)
    return out


def test_load_transformer_refuses_a_bad_backend_before_reading(tiny_packs):
    with pytest.raises(BonsaiError, match="unknown backend 'fast'"):
        load_transformer(tiny_packs / "does-not-exist", backend="fast")
    if not torch.cuda.is_available():
        with pytest.raises(BonsaiError, match="use backend='reference'"):
            load_transformer(tiny_packs, backend="cuda")


@pytest.mark.parametrize("fmt", ["mlx", "bonsai"])
def test_a_whole_model_through_the_kernels_matches_the_reference_runtime(tiny_packs, fmt):
    model = load_transformer(tiny_packs / fmt, backend="reference")
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    kwargs = dict(hidden_states=torch.randn(1, 16, cfg.in_channels, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 4), txt_ids=torch.zeros(8, 4),
                  return_dict=False)
    with torch.no_grad():
        ref = model(**kwargs)[0]
        swapped = 0
        for name, module in list(model.named_modules()):
            if isinstance(module, PackedLinear):
                buffers = {n: getattr(module, n) for n in module._names}
                w = layout.from_buffers(module.layout, buffers, module.in_features, module.out_features,
                                        module.bits, module.group_size)
                model.set_submodule(name, CudaPackedLinear(w))
                swapped += 1
        got = model(**kwargs)[0]
    assert swapped == len([m for m in model.modules() if isinstance(m, CudaPackedLinear)]) > 0
    assert float((got - ref).norm() / ref.norm()) < 1e-5  # fp32 both ways: summation order only


def test_an_installed_table_replaces_the_packaged_one_until_removed():
    packaged = dispatch.measured_table()
    rows = [[4, "bf16"], [None, "fp8"]]
    try:
        dispatch.install({"shapes": {"96,384": {"binary": rows}}, "default": [[None, "fp8_scaled_mm"]]})
        table = dispatch.measured_table()
        assert [table.kernel(96, 384, "binary", m) for m in (1, 4, 5)] == ["bf16", "bf16", "fp8"]
        assert table.kernel(3072, 3072, "binary", 1) == "fp8_scaled_mm"  # its own default row
        with pytest.raises(ValueError, match=r"shapes\['96,384'\]\['ternary'\]\[0\]: m_max must be an int above 0, got 'x'"):
            dispatch.install({"shapes": {"96,384": {"ternary": [["x", "bf16"]]}}})
        assert dispatch.measured_table() is table  # a rejected table leaves the installed one in place
    finally:
        dispatch.install(None)
    assert dispatch.measured_table() is packaged


def test_a_disabled_kernel_kind_is_never_a_candidate_and_the_reference_stays():
    try:
        ops.DISABLED_KINDS.update({"dot_t", "gemv"})
        for m in (1, 16):
            kinds = [c["kind"] for c in ops._small_m_candidates(m, 24, 3072)]
            assert "dot_t" not in kinds and "gemv" not in kinds and kinds[-1] == "tiled"
            assert "dot_xsplit" in kinds
    finally:
        ops.DISABLED_KINDS.clear()
    assert "dot_t" in [c["kind"] for c in ops._small_m_candidates(16, 24, 3072)]


def test_an_unknown_small_m_kernel_is_named():
    w = layout.from_codes(make_codes("binary", 64, 128, ramp=False, seed=0), _scales(64, 1, 0), "bits1", 128)
    x = torch.zeros(1, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="unknown small-M kernel 'int4'; valid: gemv, dot, dot_xsplit, dot_t, tiled"):
        ops.small_m_matmul(x, w, torch.empty(1, 64), kind="int4", BLOCK_N=64, SPLIT=1, num_warps=4, num_stages=1)


def test_a_layer_whose_block_scales_scaled_mm_refuses_runs_our_fp8_kernel(monkeypatch):
    codes = make_codes("ternary", 64, 256, ramp=False, seed=21)
    scales = _scales(64, 2, 22)
    lin = CudaPackedLinear(layout.from_codes(codes, scales, "bits2", 128))
    lin.forced = "fp8_scaled_mm"
    calls = []

    def refuse(x, w, out_dtype):
        calls.append(x.shape[0])
        raise ops.ScaledMmRefused("torch._scaled_mm refuses 1x128 block scales for [64, 256] at M = 33: test")

    monkeypatch.setattr(ops, "scaled_mm_matmul", refuse)
    monkeypatch.setattr(ops, "SCALED_MM_REFUSED", {})
    x = torch.randn(33, 256, generator=torch.Generator().manual_seed(23))
    for _ in range(2):
        y = lin(x)
        emu = emulate.fp8_matmul(x, codes, scales)
        assert float((y - emu).abs().max() / emu.abs().max()) < 1e-6  # the same e4m3 arithmetic
    assert calls == [33]  # refused once, remembered for that layer and M
    assert ops.SCALED_MM_REFUSED == {(64, 256, 33): "torch._scaled_mm refuses 1x128 block scales for [64, 256] "
                                                    "at M = 33: test"}
