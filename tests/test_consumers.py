"""The Mac applications load our packs with their own code: mlx-vlm's FLUX.2 loader, mlx-vlm's Bonsai loader and
mflux, at the versions setup.sh pins (installed with --no-deps: their Linux pins want CUDA builds of mlx).

Forwards run in float32 and are compared with our float32 reference runtime; the Bonsai loader, whose fused
forward needs Metal, is held to the weights it loads, exactly.
"""

from __future__ import annotations

import json
import shutil
from importlib.resources import files

import numpy as np
import pytest
import torch

from bonsai_quant import consumers
from bonsai_quant.convert import convert
from bonsai_quant.describe import describe
from bonsai_quant.errors import BonsaiError
from bonsai_quant.packing.config import PackConfig
from bonsai_quant.recipe import default_recipe, load_recipe
from bonsai_quant.release import check_release, release
from bonsai_quant.runtime import load_transformer
from bonsai_quant.verify import PackVerifier, verify

pytestmark = [pytest.mark.skipif(consumers.installed(n) is None, reason=f"{consumers.CONSUMERS[n].distribution} is "
                                 "not installed (setup.sh installs it)") for n in ("mlx-vlm-flux2", "mflux")]
BINARY_MFLUX = files("bonsai_quant") / "recipes" / "binary-mflux.yaml"
mx = pytest.importorskip("mlx.core")


@pytest.fixture(scope="module")
def packs(tiny_ckpt, tmp_path_factory):
    """(mode, group) -> convert output: ternary g128 and binary g64 with every MLX-family layout, binary g128
    without mflux (which cannot read it)."""
    root = tmp_path_factory.mktemp("consumers")
    out = {}
    for key, recipe, targets in ((("ternary", 128), default_recipe("ternary"), ("mlx", "mflux")),
                                 (("binary", 128), default_recipe("binary"), ("mlx",)),
                                 (("binary", 64), load_recipe(BINARY_MFLUX), ("mlx", "mflux"))):
        out[key] = root / f"{key[0]}{key[1]}"
        convert(tiny_ckpt, recipe, out[key], targets=targets, verbose=False)
    return out


def _inputs(config: dict) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    img_ids = torch.zeros(16, 4)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    txt_ids = torch.zeros(8, 4)
    txt_ids[:, 3] = torch.arange(8)
    return {"hidden_states": torch.randn(1, 16, config["in_channels"], generator=gen),
            "encoder_hidden_states": torch.randn(1, 8, config["joint_attention_dim"], generator=gen),
            "timestep": torch.tensor([0.375]), "img_ids": img_ids, "txt_ids": txt_ids}


@torch.no_grad()
def _reference(pack) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Inputs and the float32 output of our reference runtime on the pack."""
    model = load_transformer(pack, dtype=torch.float32)
    inputs = _inputs(json.loads((pack / "config.json").read_text()))
    return {k: v.numpy() for k, v in inputs.items()}, model(**inputs, return_dict=False)[0].numpy()


def _config(pack) -> dict:
    return json.loads((pack / "config.json").read_text())


def test_pinned_versions():
    assert consumers.installed("mlx-vlm-flux2") == consumers.installed("mlx-vlm-bonsai") == "0.7.10"
    assert consumers.installed("mflux") == "0.24.0"


def test_no_metadata_key_means_something_else_to_mlx_tools(packs):
    """mlx-vlm reads `mode` as MLX's quantization mode and `bits` / `group_size` as the layout: ours are prefixed."""
    for folder in packs.values():
        for pack in (p for p in folder.iterdir() if p.is_dir()):
            for file in pack.glob("*.safetensors"):
                _, meta = mx.load(str(file), return_metadata=True)
                assert not {"mode", "bits", "num_bits", "group_size", "quantization_group_size", "quantization",
                            "quantization_config"} & set(meta), file
                assert meta["bonsai_mode"] in ("binary", "ternary") and meta["format"] == "mlx"


def test_the_old_mode_key_is_what_mlx_vlm_refused(packs, tmp_path):
    from safetensors.torch import load_file, save_file

    pack = tmp_path / "old"
    shutil.copytree(packs["ternary", 128] / "mlx", pack)
    file = pack / "diffusion_pytorch_model.safetensors"
    save_file(load_file(str(file)), str(file), metadata={"format": "mlx", "mode": "ternary"})
    with pytest.raises(ValueError, match="Unsupported FLUX.2 quantization mode: ternary"):
        consumers.load_mlx_vlm_flux2(pack, _config(pack))


# Every MLX-family pack convert writes (no mflux pack of binary at group 128: mflux cannot read one).
@pytest.mark.parametrize("key, target", [(("ternary", 128), "mlx"), (("ternary", 128), "mflux"),
                                         (("binary", 128), "mlx"), (("binary", 64), "mlx"), (("binary", 64), "mflux")])
def test_mlx_vlm_flux2_loads_and_matches_the_reference(packs, key, target):
    pack = packs[key] / target
    model = consumers.load_mlx_vlm_flux2(pack, _config(pack))
    bits = {"ternary": 2, "binary": 1}[key[0]]
    assert model.quantization_config == {"bits": bits, "group_size": key[1], "mode": "affine"}
    to_q = model.transformer_blocks[0].attn.to_q
    assert type(to_q).__name__ == "QuantizedLinear" and (to_q.bits, to_q.group_size) == (bits, key[1])
    assert type(model.x_embedder).__name__ == "Linear"  # kept in 16-bit
    inputs, reference = _reference(pack)
    detail, data = consumers.check_forward("mlx-vlm-flux2", pack, _config(pack), inputs, reference)
    assert data["rel_error"] <= 1e-4 and "mlx-vlm-flux2 0.7.10" in detail


@pytest.mark.parametrize("key", [("ternary", 128), ("binary", 64)])
def test_mflux_loads_its_format_and_matches_the_reference(packs, key):
    pack = packs[key] / "mflux"
    model = consumers.load_mflux(pack, _config(pack))
    bits = {"ternary": 2, "binary": 1}[key[0]]
    for layer in (model.transformer_blocks[1].attn.to_out, model.single_transformer_blocks[0].attn.to_qkv_mlp_proj):
        assert type(layer).__name__ == "QuantizedLinear" and (layer.bits, layer.group_size) == (bits, key[1])
    assert type(model.time_guidance_embed.linear_1).__name__ == "Linear"
    inputs, reference = _reference(packs[key] / "mlx")
    _, data = consumers.check_forward("mflux", pack, _config(pack), inputs, reference)
    assert data["rel_error"] <= 1e-4
    # The same codes and scales as the MLX pack, under mflux's names, and the same reference output.
    assert np.array_equal(_reference(pack)[1], reference)


def test_mflux_reads_other_packs_as_a_plain_checkpoint(packs):
    with pytest.raises(consumers.ConsumerError, match="did not take it as its saved format"):
        consumers.load_mflux(packs["ternary", 128] / "mlx", _config(packs["ternary", 128] / "mlx"))


def test_mflux_target_refuses_binary_at_group_128(tiny_ckpt, tmp_path):
    with pytest.raises(BonsaiError, match="mflux reads 1-bit layers only at group_size 64 .* got group_size 128; "
                                          r"valid: ternary, or binary with group_size 64 \(recipes/binary-mflux.yaml\)"):
        convert(tiny_ckpt, default_recipe("binary"), tmp_path / "out", targets=("mflux",), verbose=False)
    assert not (tmp_path / "out").exists()


def _weights(pack):
    verifier = PackVerifier(pack, None, 16, 8, 0)
    verifier.qconfig = PackConfig.load(pack)
    tensors = {}
    for file in pack.glob("*.safetensors"):
        tensors.update(mx.load(str(file)))
    from bonsai_quant.quantizers import dequantize
    from bonsai_quant.runtime.loader import PackReader

    reader, g = PackReader(pack), verifier.qconfig.group_size

    def weight(module):
        if module in verifier.qconfig.quantized:
            return dequantize(*verifier.decode(module), g).numpy()
        return reader.get(f"{module}.weight").float().numpy()

    return verifier.qconfig, weight, tensors.__getitem__


@pytest.mark.parametrize("mode", ["ternary", "binary"])
def test_bonsai_loader_holds_our_decode_exactly(packs, mode):
    pack = packs[mode, 128] / "mlx"
    qconfig, weight, stored = _weights(pack)
    assert consumers.layout_problems(qconfig, ["diffusion_pytorch_model.safetensors"])["mlx-vlm-bonsai"] is None
    detail, data = consumers.check_bonsai(pack, _config(pack), qconfig, weight, stored)
    # tiny preset: 2 double blocks x (2 fused qkv + 6) + 2 single x 2 quantized; + 2 x 2 + 2 modulations + 4 outer
    assert data == {"matrices": 16 + 4 + 4 + 2 + 4, "dequantized": 16 + 4 + 4 + 2 + 4, "kernels": 16 + 4,
                    "kernels_called": KERNEL_SHAPES}
    assert "fused forward needs Metal" in detail or "fused forward ran" in detail


def test_bonsai_check_dequantizes_only_what_was_not_found_exact(packs):
    """Quantized kernels of modules whose mx.dequantize was already found exact are compared through the pack's
    tensors they hold; the 16-bit matrices are still compared with the pack's."""
    pack = packs["ternary", 128] / "mlx"
    qconfig, weight, stored = _weights(pack)
    calls = []

    def counted(module):
        calls.append(module)
        return weight(module)

    _, data = consumers.check_bonsai(pack, _config(pack), qconfig, counted, stored,
                                     dequantize_exact=frozenset(qconfig.quantized))
    assert data == {"matrices": 30, "dequantized": 4 + 2 + 4, "kernels": 20, "kernels_called": KERNEL_SHAPES}
    assert not set(calls) & set(qconfig.quantized)


# The tiny preset's quantized kernels as the Bonsai loader fuses them, by (out, in): fused qkv, attention out,
# feed-forward in / out (image and text streams alike), and the single blocks' fused input and output.
KERNEL_SHAPES = 6


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("suffix", ["weight", "scales", "biases"])
def test_bonsai_kernels_must_hold_the_packs_tensors_beyond_the_first_of_a_shape(packs, suffix, exact):
    """Each kernel shape is called once; every later kernel of that shape must hold exactly the pack's tensors
    (which is what makes its call equal mx.quantized_matmul on them)."""
    import mlx.core as mx

    pack = packs["ternary", 128] / "mlx"
    qconfig, weight, stored = _weights(pack)
    victim = f"transformer_blocks.1.ff.linear_out.{suffix}"  # the second block: its shape was called in the first

    def changed(name):
        array = stored(name)
        if name != victim:
            return array
        if suffix == "weight":
            return mx.bitwise_xor(array, mx.array(1, dtype=array.dtype))
        return array * 2

    with pytest.raises(consumers.ConsumerError, match=rf"mlx-vlm-bonsai: the kernel of transformer_blocks\.1\.ff\."
                                                      rf"linear_out holds a \w+ that is not the pack's {suffix}"):
        consumers.check_bonsai(pack, _config(pack), qconfig, weight, changed,
                               dequantize_exact=frozenset(qconfig.quantized) if exact else frozenset())


def test_bonsai_loader_changes_fp16_scales(tiny_ckpt, tmp_path):
    """The reason for bf16 scales: the Bonsai loader casts scales to bf16, so fp16 ones arrive changed."""
    import dataclasses

    recipe = dataclasses.replace(default_recipe("ternary"), scale_dtype="float16")
    convert(tiny_ckpt, recipe, tmp_path / "out", targets=("mlx",), verbose=False)
    pack = tmp_path / "out" / "mlx"
    qconfig, weight, stored = _weights(pack)
    assert "bf16" in consumers.layout_problems(qconfig, ["diffusion_pytorch_model.safetensors"])["mlx-vlm-bonsai"]
    with pytest.raises(consumers.ConsumerError, match="mlx-vlm-bonsai: transformer_blocks.0.attn.to_q.* holds .* "
                                                      "the pack decodes to"):
        consumers.check_bonsai(pack, _config(pack), qconfig, weight, stored)


def test_verify_runs_each_installed_consumer(packs):
    report = verify(packs["ternary", 128])
    assert report["ok"]
    steps = {p["folder"].rsplit("/", 1)[-1]: {s["name"]: s for s in p["steps"]} for p in report["packs"]}
    assert [steps["mlx"][n]["status"] for n in consumers.CONSUMERS] == ["pass", "pass", "skip"]
    assert [steps["mflux"][n]["status"] for n in consumers.CONSUMERS] == ["pass", "skip", "pass"]
    assert steps["mlx"]["mflux"]["detail"].startswith("mflux cannot load this pack: it reads only its saved format")
    assert steps["mflux"]["mflux"]["data"]["rel_error"] <= 1e-4


def test_inspect_names_the_layouts(packs):
    info = {p["format"]: p["consumers"] for p in describe(packs["binary", 64])}
    assert info["mflux"] == {"mlx-vlm-flux2": None, "mlx-vlm-bonsai": "it reads an MLX pack, this is a mflux pack",
                             "mflux": None}
    assert info["mlx"]["mlx-vlm-bonsai"] == "its kernels take group_size 128 only, this pack has 64"


def _pipeline(folder):
    """A stand-in klein pipeline folder: the parts release copies, and a transformer/ it must not."""
    for part in ("scheduler", "text_encoder", "tokenizer", "vae", "transformer", "text_encoder-mlx-4bit"):
        (folder / part).mkdir(parents=True)
    (folder / "model_index.json").write_text('{"_class_name": "Flux2KleinPipeline"}\n')
    (folder / "tokenizer" / "tokenizer.json").write_text("{}\n")
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.ones(4)}, str(folder / "text_encoder-mlx-4bit" / "model.safetensors"))
    (folder / "vae" / "config.json").write_text("{}\n")
    (folder / "transformer" / "config.json").write_text('{"not": "copied"}\n')
    return folder


def test_release_is_a_drop_in_of_the_published_snapshot(tiny_ckpt, tmp_path):
    from mlx_vlm.models.bonsai.download import validate_model_layout

    out = tmp_path / "release"
    result = release(tiny_ckpt, default_recipe("ternary"), out, base_pipeline=_pipeline(tmp_path / "klein"))
    assert result["verify"]["ok"]
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "bonsai", "gemlite", "manifest.json", "model_index.json", "recipe.yaml", "report.json",
        "scheduler", "text_encoder", "text_encoder-mlx-4bit", "tokenizer", "transformer", "transformer-packed-mflux",
        "vae", "verify.json"]
    assert validate_model_layout(out) == out  # mlx-vlm's own check of a Bonsai snapshot
    packed = out / "transformer-packed-mflux"
    assert sorted(p.name for p in packed.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                        "manifest.json", "quantization_config.json"]
    q = json.loads((packed / "quantization_config.json").read_text())
    assert (q["bits"], q["group_size"], q["scale_dtype"], q["format"]) == (2, 128, "bfloat16", "mlx")
    assert len(q["skip_patterns"]) == 10 and "x_embedder" in q["skip_patterns"]
    assert json.loads((out / "transformer" / "quantization_config.json").read_text())["format"] == "mflux"
    assert not (out / "transformer" / "config.json").read_text().startswith('{"not"')
    steps = {(p["folder"], s["name"]): s["status"] for p in result["verify"]["packs"] for s in p["steps"]}
    assert steps["transformer-packed-mflux", "mlx-vlm-bonsai"] == steps["transformer", "mflux"] == "pass"
    assert check_release(out)["ok"]
    card = (out / "README.md").read_text()
    assert "`text_encoder-mlx-4bit/model.safetensors` (klein's Qwen3 text encoder quantized by MLX to 4 bits, " \
           "group 64), `tokenizer/` and `vae/` (here)." in card
    assert "this folder is an mflux model folder and runs as it is." in card


def test_release_without_base_pipeline_says_what_to_add(tiny_ckpt, tmp_path):
    out = tmp_path / "release"
    release(tiny_ckpt, default_recipe("binary"), out, run_verify=False)
    assert not (out / "transformer").exists()  # mflux cannot read binary at group 128
    card = (out / "README.md").read_text()
    assert ": copy `text_encoder-mlx-4bit/` from a published Bonsai Image MLX snapshot and the rest from the base " \
           "model (`--base-pipeline`)." in card
    assert "mflux reads 1-bit layers only at group size 64: no `transformer/` here" in card
    with pytest.raises(BonsaiError, match=r"--base-pipeline .*: no model_index.json, scheduler, text_encoder, tokenizer, vae; valid"):
        release(tiny_ckpt, default_recipe("binary"), tmp_path / "r2", base_pipeline=tmp_path / "release")
    assert not (tmp_path / "r2").exists()
