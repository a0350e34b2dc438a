"""verify's MLX steps judge what MLX itself reads: MLX tensors that differ from the decode verify holds them to
are caught by the layer check and by the MLX forward, also where the layer check runs QuantizedLinear on part of
a layer only (MLX's CPU quantized_matmul is slow, so repeated shapes run on their first output features)."""

import shutil

import pytest

from bonsai_quant.convert import convert
from bonsai_quant.recipe import default_recipe
from bonsai_quant.verify_pack import MLX_LAYER_ROWS, PackVerifier, Step, _Fail
from tests.pack_helpers import reseal_in_place

# to_k has to_q's shape, so the layer check runs QuantizedLinear on its first MLX_LAYER_ROWS rows only.
MODULE, ROW = "transformer_blocks.1.attn.to_k", 200


@pytest.fixture(scope="module")
def pack(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify-mlx") / "ternary"
    convert(tiny_ckpt, default_recipe("ternary"), out, targets=("mlx",), verbose=False)
    return out / "mlx"


def _verifier(folder):
    v = PackVerifier(folder, None, image_tokens=16, text_tokens=8, seed=0)
    v.integrity(Step("integrity"))
    return v


def test_a_full_run_of_the_layer_check_covers_every_shape(pack):
    step = Step("runtime")
    _verifier(pack).real_runtime(step)
    assert step.status == "pass"
    assert ROW >= MLX_LAYER_ROWS
    assert "dequantize exact and QuantizedLinear on all output features of one layer per shape (5 shapes) and " \
           f"on the first {MLX_LAYER_ROWS} of the others, dequantize exact on every (scale, bias, code) of those " \
           "others too: 28 layers; max rel error" in step.detail


@pytest.mark.parametrize("tensor", ["scales", "biases", "both"])
def test_mlx_steps_catch_a_wrong_mlx_scale_or_bias(pack, tmp_path, monkeypatch, tensor):
    good = _verifier(pack)
    damaged = tmp_path / "mlx"
    shutil.copytree(pack, damaged)

    def edit(t):
        # One row of one layer; "both" keeps biases = -scales, so the pack stays self-consistent (only a
        # comparison with what it should decode to can tell).
        s = t[f"{MODULE}.scales"][ROW]
        if tensor in ("scales", "both"):
            t[f"{MODULE}.scales"][ROW] = s * 2
        if tensor in ("biases", "both"):
            t[f"{MODULE}.biases"][ROW] = -s * 2
    reseal_in_place(damaged, edit)
    v = _verifier(damaged)
    monkeypatch.setattr(v, "decode", good.decode)  # what the pack should decode to

    with pytest.raises(_Fail, match=rf"^{MODULE}: mlx.core.dequantize gives \S+ at \[{ROW}, \d+\], the pack "
                                    r"decodes to \S+$"):
        v.real_runtime(Step("runtime"))
    inputs = good.inputs()
    step = Step("mlx-end-to-end")
    with pytest.raises(_Fail, match=r"^MLX transformer forward differs from the torch reference by \S+ "
                                    r"\(bound 0.0001\)$"):
        v.mlx_end_to_end(step, inputs, good.reference_output(inputs))
    assert step.data["rel_error"] > 5 * step.data["bound"]  # one row of one layer, far above rounding
