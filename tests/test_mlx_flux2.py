"""The MLX FLUX.2 forward against diffusers' own: dense weights, and MLX packs against fake-quantized weights."""

import inspect
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from diffusers import Flux2Transformer2DModel
from mlx.utils import tree_flatten
from safetensors.torch import load_file

from bonsai_quant import mlx_cpu
from bonsai_quant.convert import convert
from bonsai_quant.errors import PackError
from bonsai_quant.flux2 import build_model, inventory, preset_config
from bonsai_quant.packing import mlx as mlx_layout
from bonsai_quant.quantizers import dequantize
from bonsai_quant.recipe import default_recipe
from bonsai_quant.runtime.mlx_flux2 import (
    CONFIG_DEFAULTS,
    MLXFlux2,
    from_torch_state_dict,
    load_mlx_transformer,
    mlx_forward_numpy,
    pack_relative_error,
    relative_error,
)

# Both sides compute in float32 with different summation orders and transcendental implementations, so they
# can only agree to float32 rounding accumulated over the 4 blocks. Measured: 4e-7 (dense, diffusers' init),
# 1.3e-6 to 1.9e-6 (synthetic checkpoint, dense or packed); torch's own float32 forward is 3e-7 to 4e-7 from a
# float64 one. Most of the gap is one entry of the 128 timestep frequencies, where torch's float32 exp is one
# ulp from the correctly rounded value MLX uses, turned into a 6e-5 rad phase by t*1000; with torch's table the
# packs agree to 6e-7. 5e-6 (~40 float32 epsilons) leaves room for other BLAS builds while any modelling slip
# (RoPE pairing, shift/scale order, the text-first token order) lands orders of magnitude above.
FP32_BOUND = 5e-6


def _inputs(config, batch=2, img_tokens=16, txt_tokens=8, seed=0):
    rng = np.random.default_rng(seed)
    side = int(img_tokens ** 0.5)
    # FLUX.2 ids are (t, h, w, l): image tokens on an h x w grid (t = 10, as for a reference image, so every
    # axis turns), text tokens along l.
    t, h, w = np.meshgrid([10], np.arange(side), np.arange(side), indexing="ij")
    img_ids = np.stack([t, h + 3, w, np.zeros_like(t)], -1).reshape(-1, 4)
    txt_ids = np.stack([np.zeros(txt_tokens), np.zeros(txt_tokens), np.zeros(txt_tokens), np.arange(txt_tokens)], -1)
    return dict(
        hidden_states=rng.standard_normal((batch, img_tokens, config["in_channels"])).astype(np.float32),
        encoder_hidden_states=rng.standard_normal(
            (batch, txt_tokens, config["joint_attention_dim"])).astype(np.float32),
        timestep=np.array([0.3, 0.9][:batch], dtype=np.float32),
        img_ids=img_ids.astype(np.int64),
        txt_ids=txt_ids.astype(np.int64),
    )


def _torch_forward(model, inputs, guidance=None):
    args = {k: torch.from_numpy(v) for k, v in inputs.items()}
    with torch.no_grad():
        return model(**args, guidance=guidance, return_dict=False)[0]


def test_config_defaults_are_diffusers_defaults():
    params = inspect.signature(Flux2Transformer2DModel.__init__).parameters
    diffusers_defaults = {k: p.default for k, p in params.items() if k != "self"}
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in CONFIG_DEFAULTS.items()} == \
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in diffusers_defaults.items()}


@pytest.mark.parametrize("variant", ["tiny", "guidance_and_out_channels"])
def test_dense_forward_matches_diffusers(variant):
    config = preset_config("tiny")
    guidance = None
    if variant != "tiny":
        config |= {"guidance_embeds": True, "out_channels": 32}
        guidance = torch.tensor([1.0, 4.0])
    torch.manual_seed(0)
    model = build_model(config).eval()
    # diffusers initialises RMSNorm gains to 1; perturb them so a swapped norm would be seen.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    inputs = _inputs(config)
    ref = _torch_forward(model, inputs, guidance)

    mlx_model = from_torch_state_dict(config, model.state_dict())
    if guidance is not None:  # also: ids with a leading batch axis, which diffusers drops
        inputs = inputs | {"img_ids": inputs["img_ids"][None], "txt_ids": inputs["txt_ids"][None]}
    out = np.array(mlx_model(**inputs, guidance=None if guidance is None else guidance.numpy()))
    assert out.shape == tuple(ref.shape)
    assert relative_error(out, ref) < FP32_BOUND


@pytest.fixture(scope="module", params=["binary", "ternary"])
def mlx_pack(request, tiny_ckpt, tmp_path_factory):
    mode = request.param
    out = tmp_path_factory.mktemp("mlxpack") / mode
    # Binary is written in 1 MB shards, ternary as one file: both ways of storing a pack get loaded.
    shard = {"binary": 1_000_000, "ternary": 2 * 10**9}[mode]
    convert(tiny_ckpt, default_recipe(mode), out, targets=("mlx",), max_shard_bytes=shard, verbose=False)
    return mode, out / "mlx"


def _fake_quantized_reference(ckpt, pack):
    """diffusers with the checkpoint's weights, each quantized linear replaced by codes * s decoded from the pack."""
    model = Flux2Transformer2DModel.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    qc = json.loads((pack / "quantization_config.json").read_text())
    packed = {}
    for f in sorted(pack.glob("*.safetensors")):
        packed.update(load_file(str(f)))
    modules = dict(model.named_modules())
    for name, entry in qc["quantized"].items():
        codes, scales = mlx_layout.unpack({s: packed[f"{name}.{s}"] for s in mlx_layout.SUFFIXES},
                                        entry["mode"], qc["group_size"])
        with torch.no_grad():
            modules[name].weight.copy_(dequantize(codes, scales, qc["group_size"]))
    return model


def test_pack_forward_matches_fake_quantized_diffusers(mlx_pack, tiny_ckpt):
    mode, pack = mlx_pack
    assert (pack / "diffusion_pytorch_model.safetensors.index.json").exists() == (mode == "binary")
    inputs = _inputs(preset_config("tiny"), seed=1)
    ref = _torch_forward(_fake_quantized_reference(tiny_ckpt, pack), inputs)
    assert pack_relative_error(pack, inputs, ref) < FP32_BOUND
    # A convert output folder (holding mlx/) is accepted too.
    assert relative_error(mlx_forward_numpy(pack.parent, inputs), ref) < FP32_BOUND

    model = load_mlx_transformer(pack)
    bits = {"binary": 1, "ternary": 2}[mode]
    layer = model.single_transformer_blocks[0].attn.to_qkv_mlp_proj
    assert (layer.bits, layer.group_size, layer.weight.dtype) == (bits, 128, mx.uint32)


def test_pack_forward_through_quantized_matmul_as_on_a_mac(mlx_pack, tiny_ckpt, monkeypatch):
    # On a Linux CPU the quantized linears run as MLX's dequantize + a dense matmul (quantized_matmul is a slow
    # loop there); Macs run MLX's quantized_matmul. Both must give the pack's forward.
    mode, pack = mlx_pack
    inputs = _inputs(preset_config("tiny"), seed=1)
    ref = _torch_forward(_fake_quantized_reference(tiny_ckpt, pack), inputs)
    dense_calls = []
    dense = mlx_cpu.dense_quantized_matmul
    monkeypatch.setattr(mlx_cpu, "dense_quantized_matmul", lambda layer, x: dense_calls.append(1) or dense(layer, x))
    linux = mlx_forward_numpy(pack, inputs)
    quantized = len(json.loads((pack / "quantization_config.json").read_text())["quantized"])
    assert len(dense_calls) == quantized == 2 * 12 + 2 * 2  # every quantized linear once
    monkeypatch.setattr(mlx_cpu, "quantized_kernel_is_slow", lambda: False)
    mac = mlx_forward_numpy(pack, inputs)
    assert len(dense_calls) == quantized
    assert relative_error(linux, ref) < FP32_BOUND and relative_error(mac, ref) < FP32_BOUND
    assert relative_error(linux, mac) < FP32_BOUND
    assert not np.array_equal(linux, mac)  # two different computations, not one path taken twice


def test_pack_forward_in_bfloat16_stays_close(mlx_pack):
    _, pack = mlx_pack
    inputs = _inputs(preset_config("tiny"), seed=2)
    fp32 = mlx_forward_numpy(pack, inputs)
    bf16 = mlx_forward_numpy(pack, inputs, dtype="bfloat16")
    # bf16 keeps 8 significant bits (eps 2^-8 = 4e-3); over 4 blocks the output drifts by a few of those.
    assert relative_error(bf16, fp32) < 3e-2


def test_klein_4b_builds_with_diffusers_names_and_shapes():
    config = preset_config("klein-4b")
    specs = inventory(config)
    model = MLXFlux2(config)  # parameters stay lazy: nothing of the 3.9B weights is computed
    params = dict(_flat(model))
    assert {k: tuple(v.shape) for k, v in params.items()} == {k: s.shape for k, s in specs.items()}

    quantized = {n.removesuffix(".weight"): 1 for n, s in specs.items()
                 if s.is_linear_weight and s.role in ("attention", "mlp", "fused_projection")}
    assert len(quantized) == 100
    model.quantize_modules(quantized, 128)
    params = dict(_flat(model))
    assert params["single_transformer_blocks.19.attn.to_qkv_mlp_proj.weight"].shape == (27648, 3072 // 32)
    assert params["transformer_blocks.4.ff.linear_out.scales"].shape == (3072, 9216 // 128)
    assert params["context_embedder.weight"].shape == (3072, 7680)


def _flat(model):
    return tree_flatten(model.parameters())


def test_not_an_mlx_pack_is_refused(tmp_path, mlx_pack):
    with pytest.raises(PackError, match="quantization_config.json: not found"):
        load_mlx_transformer(tmp_path)
    _, pack = mlx_pack
    other = tmp_path / "gemlite"
    shutil.copytree(pack, other)
    qc = json.loads((other / "quantization_config.json").read_text())
    (other / "quantization_config.json").write_text(json.dumps(qc | {"format": "gemlite"}))
    with pytest.raises(PackError, match="format is 'gemlite', not 'mlx'"):
        load_mlx_transformer(other)


def test_pack_missing_a_tensor_names_it(tmp_path, mlx_pack):
    mode, pack = mlx_pack
    broken = tmp_path / "broken"
    shutil.copytree(pack, broken)
    if mode == "binary":  # sharded: drop a whole shard
        index = json.loads((broken / "diffusion_pytorch_model.safetensors.index.json").read_text())
        shard = sorted(set(index["weight_map"].values()))[-1]
        (broken / shard).unlink()
        with pytest.raises(PackError, match=f"{shard}: weights file not found"):
            load_mlx_transformer(broken)
    else:
        tensors = mx.load(str(broken / "diffusion_pytorch_model.safetensors"))
        del tensors["transformer_blocks.1.attn.to_k.scales"]
        mx.save_safetensors(str(broken / "diffusion_pytorch_model.safetensors"), tensors)
        with pytest.raises(PackError, match="diffusion_pytorch_model.safetensors: missing tensor "
                                            "'transformer_blocks.1.attn.to_k.scales'"):
            load_mlx_transformer(broken)
