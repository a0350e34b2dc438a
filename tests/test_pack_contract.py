"""The contract every registered pack target keeps (docs/design.md, "what a new target provides").

One parametrized suite over `packing.targets.TARGETS`: a new target runs it by being registered. What is
particular to one format (golden bytes, a reference encoder, the real MLX/gemlite runtimes) stays in its
test_pack_<target>.py.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bonsai_quant.errors import PackError
from bonsai_quant.packing.targets import NAMES, TARGETS, target

try:  # tests/ is on sys.path under pytest's default rootdir-relative imports
    from pack_helpers import full_codes, full_scales, make_codes, make_scales
except ImportError:  # tests/ made a package
    from tests.pack_helpers import full_codes, full_scales, make_codes, make_scales

SETTINGS = settings(max_examples=50, deadline=None)
BITS = {"binary": 1, "ternary": 2}


@st.composite
def cases(draw, name: str):
    mode = draw(st.sampled_from(["binary", "ternary"]))
    dtype = draw(st.sampled_from([torch.float16, torch.bfloat16]))
    gs = draw(st.sampled_from([32, 64, 128]))
    out = draw(st.integers(1, 64))
    groups = draw(st.integers(1, 4))
    try:  # shapes a format refuses (gemlite: one group per row) are its layout's to name, not a round trip
        TARGETS[name].layout(out, gs * groups, mode, gs, dtype)
    except PackError:
        assume(False)
    seed = draw(st.integers(0, 2**31 - 1))
    codes = make_codes(mode, out, gs * groups, draw(st.booleans()), seed)
    return mode, gs, codes, make_scales(out, groups, dtype, seed)


def same_bits16(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.int16), b.reshape(-1).view(torch.int16))


def test_registry_names_and_contract():
    assert NAMES == ("mlx", "gemlite", "bonsai", "mflux")
    for name, t in TARGETS.items():
        assert t.name == name and t.packer.__name__ == f"bonsai_quant.packing.{name}"
        assert set(t.buffers) <= set(t.suffixes) and len(set(t.suffixes)) == len(t.suffixes)
        for attr in ("layout", "pack", "unpack", "decode_rows"):
            assert callable(getattr(t.packer, attr)), (name, attr)
    with pytest.raises(PackError, match=r"unknown target 'gguf'; valid: mlx, gemlite, bonsai, mflux"):
        target("gguf")


@pytest.mark.parametrize("name", NAMES)
def test_pack_matches_layout_and_round_trips(name):
    t = TARGETS[name]

    @SETTINGS
    @given(cases(name))
    def check(case):
        mode, gs, codes, scales = case
        codes_before, scales_before = codes.clone(), scales.clone()
        packed = t.pack(codes, scales, mode, gs)
        spec = t.layout(codes.shape[0], codes.shape[1], mode, gs, scales.dtype)
        assert tuple(packed) == tuple(spec) == t.suffixes
        for key, (dtype, shape) in spec.items():
            got = packed[key]
            assert (got.dtype, tuple(got.shape), got.device.type) == (dtype, shape, "cpu"), key
            assert got.is_contiguous() and (got.dim() == 0 or got.stride(-1) == 1), key
        got_codes, got_scales = t.unpack(packed, mode, gs)
        assert got_codes.dtype == torch.int8 and torch.equal(got_codes, codes)
        assert same_bits16(got_scales, scales)
        assert torch.equal(codes, codes_before) and same_bits16(scales, scales_before)  # pure
        again = t.pack(codes, scales, mode, gs)
        assert all(torch.equal(again[k], packed[k]) for k in packed)  # deterministic

    check()


@pytest.mark.parametrize("name", NAMES)
def test_decode_rows_is_exactly_codes_times_scales(name):
    """The runtime decoder (`PackedLinear`) of each target, on any slice of output features."""
    t = TARGETS[name]

    @SETTINGS
    @given(cases(name), st.data())
    def check(case, data):
        mode, gs, codes, scales = case
        packed = t.pack(codes, scales, mode, gs)
        out = codes.shape[0]
        start = data.draw(st.integers(0, out - 1))
        stop = data.draw(st.integers(start + 1, out))
        want = (codes.float() * scales.float().repeat_interleave(gs, dim=1))[start:stop]
        got = t.decode_rows(*(packed[b] for b in t.buffers), BITS[mode], gs, start, stop, torch.float32)
        assert got.dtype == torch.float32 and torch.equal(got, want)

    check()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode, bad", [("binary", 0), ("binary", 2), ("ternary", 2), ("ternary", -128),
                                       ("ternary", 5)])
@pytest.mark.parametrize("at", [(1, 5), (0, 200)])
def test_codes_outside_alphabet(name, mode, bad, at):
    # the largest group size the target takes for these layers (mflux: binary only at 64)
    gs = next(g for g in (128, 64) if _accepts(TARGETS[name], 2, 256, mode, g))
    codes = full_codes(2, 256)
    codes[at] = bad
    with pytest.raises(PackError, match=rf"codes for mode '{mode}' must be .*found {bad} at \[{at[0]}, {at[1]}\]"):
        TARGETS[name].pack(codes, full_scales(2, 256 // gs), mode, gs)


def _accepts(t, out: int, inp: int, mode: str, gs: int) -> bool:
    try:
        t.layout(out, inp, mode, gs, torch.float16)
    except PackError:
        return False
    return True


NAMES_SEEN = ("time_guidance_embed.timestep_embedder.linear_1.weight", "transformer_blocks.3.attn.to_out.0.scales",
              "single_transformer_blocks.0.attn.to_out.weight", "transformer_blocks.0.attn.to_q.biases",
              "x_embedder.weight")


@pytest.mark.parametrize("name", NAMES)
def test_stored_names_translate_back(name):
    """What a target's files call a tensor, and back (pack_check.pack_headers reads packs by diffusers name)."""
    t = TARGETS[name]
    stored = [t.stored_name(n) for n in NAMES_SEEN]
    assert [t.source_name(s) for s in stored] == list(NAMES_SEEN)
    assert len(set(stored)) == len(stored)
    want = list(NAMES_SEEN) if name != "mflux" else [  # mflux's module names differ from diffusers' in two places
        "time_guidance_embed.linear_1.weight", "transformer_blocks.3.attn.to_out.scales", *NAMES_SEEN[2:]]
    assert stored == want


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_packing_every_target_in_one_shared_block_gives_the_bytes_of_packing_each_alone(mode):
    """convert packs a layer for all targets inside `shared_slots()` (slot bytes computed once): each target's
    tensors must be those it writes alone, and codes changed in place must not be served from the block."""
    from bonsai_quant.packing.bits import shared_slots

    codes = make_codes(mode, 48, 256, False, 3)
    scales = make_scales(48, 2, torch.bfloat16, 3).abs()
    alone = {name: TARGETS[name].pack(codes, scales, mode, 128) for name in ("mlx", "gemlite", "bonsai")}
    with shared_slots():
        shared = {name: TARGETS[name].pack(codes, scales, mode, 128) for name in ("mlx", "gemlite", "bonsai")}
        was = int(codes[0, 0])
        codes[0, 0] = -1 if was == 1 else 1  # in place: a new version of the same tensor
        flipped = TARGETS["mlx"].pack(codes, scales, mode, 128)
    for name in alone:
        assert alone[name].keys() == shared[name].keys()
        for key, tensor in alone[name].items():
            assert tensor.dtype == shared[name][key].dtype and torch.equal(tensor, shared[name][key]), (name, key)
    assert torch.equal(TARGETS["mlx"].unpack(flipped, mode, 128)[0], codes)
    codes[0, 0] = was
    assert not torch.equal(flipped["weight"], alone["mlx"]["weight"])
