"""The CUDA backend's quality gate (tools/cuda_quality.py): its pass rule, the layer kinds it can move to bf16
activations, and the eval loader options it relies on. The gate itself runs on the GPU (tools/bench_cuda.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from bonsai_quant.convert import convert
from bonsai_quant.digits import TextEncoder
from bonsai_quant.errors import BonsaiError
from bonsai_quant.eval_models import load_for_eval
from bonsai_quant.recipe import default_recipe
from bonsai_quant.runtime.packed_linear import PackedLinear

_spec = importlib.util.spec_from_file_location(
    "cuda_quality", Path(__file__).resolve().parents[1] / "tools" / "cuda_quality.py")
cq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cq)


def _report(accuracy, fd, samples=100):
    return {"accuracy": accuracy, "frechet_distance": fd, "samples_per_digit": samples}


def test_the_gate_passes_equal_accuracy_and_a_frechet_distance_within_five_percent():
    ref = _report(0.953, 2.0)
    assert cq.gate(ref, _report(0.953, 2.1)) == {"accuracy_delta": 0.0, "accuracy_delta_samples": 0,
                                                 "frechet_ratio": pytest.approx(1.05), "pass": True}
    assert cq.gate(ref, _report(0.953, 1.9))["pass"]  # 5 % better is within 5 % too
    worse = cq.gate(ref, _report(0.953, 2.2))
    assert not worse["pass"] and worse["reason"] == "Fréchet distance 2.2000 vs 2.0000 (+10.0 %; tolerance 5 %)"
    one_sample = cq.gate(ref, _report(0.952, 2.0))
    assert not one_sample["pass"] and one_sample["accuracy_delta_samples"] == -1
    assert one_sample["reason"] == "accuracy 0.9520 vs 0.9530 (-1 of 1000 samples; tolerance 0)"
    assert cq.gate(ref, _report(0.952, 2.0), accuracy_tolerance=0.001)["pass"]


@pytest.mark.parametrize("bad", [float("nan"), None, float("inf")])
def test_the_gate_fails_closed_on_a_missing_or_non_finite_figure(bad):
    for ref, cand in ((_report(0.9, 2.0), _report(0.9, bad)), (_report(0.9, 2.0), _report(bad, 2.0)),
                      (_report(0.9, bad), _report(0.9, 2.0))):
        out = cq.gate(ref, cand)
        assert out["pass"] is False and out["reason"].startswith("missing or non-finite figures")
    assert cq.gate(_report(0.9, 0.0), _report(0.9, 0.0))["pass"] is False  # no scale to be within 5 % of


@pytest.fixture(scope="module")
def binary_pack(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("quality") / "binary"
    convert(tiny_ckpt, default_recipe("binary"), out, targets=("mlx",), verbose=False)
    return out / "mlx"


def test_every_quantized_linear_has_a_kind_and_every_kind_occurs(binary_pack):
    names = json.loads((binary_pack / "quantization_config.json").read_text())["quantized"]
    kinds = {name: cq.layer_kind(name) for name in names}
    assert set(kinds.values()) == {k for k, _ in cq.KINDS}
    assert kinds["single_transformer_blocks.0.attn.to_out"] == "single_out"
    assert kinds["transformer_blocks.0.attn.to_out.0"] == "attn_out"
    assert kinds["transformer_blocks.0.attn.add_k_proj"] == "attn_in"
    assert kinds["transformer_blocks.0.ff_context.linear_out"] == "ff_out"
    with pytest.raises(ValueError, match=r"proj_out: not a quantized linear of a FLUX.2 transformer block; "
                                         r"kinds: single_in, single_out, attn_in, attn_out, ff_in, ff_out"):
        cq.layer_kind("proj_out")


def test_eval_loads_a_pack_in_the_dtype_and_backend_asked_for(binary_pack, monkeypatch):
    monkeypatch.setattr("bonsai_quant.eval_models._digits_check", lambda: lambda *a: None)
    encoder = TextEncoder.load()
    loaded = load_for_eval(binary_pack, encoder, backend="reference", dtype=torch.bfloat16)
    assert loaded.kind == "pack" and loaded.mode == "binary" and loaded.target == "mlx"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert sum(isinstance(m, PackedLinear) for m in loaded.model.modules()) > 0
    with pytest.raises(BonsaiError, match="device, backend and dtype choose how a pack runs, but this is no pack"):
        load_for_eval(None, encoder, backend="reference")


def test_every_linear_the_step_benchmark_quantizes_in_klein_has_a_kind():
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    from bonsai_quant.flux2 import model_kwargs, preset_config

    spec = importlib.util.spec_from_file_location(
        "bench_cuda", Path(__file__).resolve().parents[1] / "tools" / "bench_cuda.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    with init_empty_weights():
        model = Flux2Transformer2DModel(**model_kwargs(preset_config("klein-4b")))
    kinds = [cq.layer_kind(name) for name, _ in bench._quantized_names(model)]
    # klein: 5 double blocks (8 attention + 4 feed-forward linears each), 20 single blocks (2 each)
    assert {k: kinds.count(k) for k in set(kinds)} == {"attn_in": 30, "attn_out": 10, "ff_in": 10, "ff_out": 10,
                                                       "single_in": 20, "single_out": 20}
