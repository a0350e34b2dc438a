"""BFL single-file FLUX.2 checkpoints: read through diffusers' own conversion, converted to identical packs."""

import filecmp
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from bonsai_quant.checkpoint import Checkpoint
from bonsai_quant.cli import main
from bonsai_quant.convert import convert
from bonsai_quant.errors import CheckpointError
from bonsai_quant.flux2 import PRESETS
from bonsai_quant.readers.bfl import COMFY_PREFIX, BflCheckpoint, diffusers_config, diffusers_converter, write_bfl_file
from bonsai_quant.recipe import default_recipe
from bonsai_quant.synthetic import write_checkpoint

TARGETS = ("bonsai", "mlx", "gemlite")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """The tiny preset in the diffusers layout (config.json as diffusers serializes it) and as a BFL file."""
    root = tmp_path_factory.mktemp("bfl")
    folder = write_checkpoint(diffusers_config(PRESETS["tiny"]), root / "tiny", seed=3, max_shard_bytes=3_000_000)
    file = write_bfl_file(Checkpoint(folder), root / "flux-2-tiny.safetensors")
    return folder, file


def _same_packs(a, b):
    for target in TARGETS:
        cmp = filecmp.dircmp(a / target, b / target)
        assert not cmp.left_only and not cmp.right_only, (target, cmp.left_only, cmp.right_only)
        _, mismatch, errors = filecmp.cmpfiles(a / target, b / target, cmp.common_files, shallow=False)
        assert not mismatch and not errors, (target, mismatch)


def test_file_is_in_bfl_naming_with_fused_projections(both):
    folder, file = both
    names = set(load_file(str(file)))
    assert "double_blocks.0.img_attn.qkv.weight" in names and "single_blocks.1.linear1.weight" in names
    assert "final_layer.adaLN_modulation.1.weight" in names and "transformer_blocks.0.attn.to_q.weight" not in names
    assert len(names) == 41  # 49 diffusers tensors: 2 blocks x 2 streams fuse q, k, v (-8)
    assert load_file(str(file))["double_blocks.0.img_attn.qkv.weight"].shape == (768, 256)


def test_reader_equals_diffusers_conversion_of_the_whole_file(both):
    folder, file = both
    reader = BflCheckpoint(file)
    whole = diffusers_converter()(load_file(str(file)))  # diffusers' own path, everything in memory
    assert set(reader.tensors) == set(whole) == set(Checkpoint(folder).tensors)
    for name, tensor in whole.items():
        got = reader.load(name)
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert torch.equal(got, Checkpoint(folder).load(name)), name
    assert (reader.describe_source("transformer_blocks.1.attn.to_k.weight")
            == "double_blocks.1.img_attn.qkv.weight[256:512]")
    # diffusers swaps BFL's (shift, scale) of the final AdaLN: two runs of rows, in that order
    assert reader.describe_source("norm_out.linear.weight") == "final_layer.adaLN_modulation.1.weight[256:512, 0:256]"


def test_config_is_inferred_as_diffusers_writes_it(both):
    folder, file = both
    reader = BflCheckpoint(file)
    assert reader.config_bytes == (folder / "config.json").read_bytes()
    assert json.loads(reader.config_bytes)["axes_dims_rope"] == [16, 16, 16, 16]
    reader.validate()


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_convert_bfl_file_gives_byte_identical_packs(both, tmp_path, mode):
    folder, file = both
    convert(folder, default_recipe(mode), tmp_path / "a", targets=TARGETS, max_shard_bytes=1_000_000, verbose=False)
    report = convert(file, default_recipe(mode), tmp_path / "b", targets=TARGETS, max_shard_bytes=1_000_000,
                     verbose=False)
    _same_packs(tmp_path / "a", tmp_path / "b")
    assert len(list((tmp_path / "b" / "mlx").glob("diffusion_pytorch_model-*.safetensors"))) > 1  # sharded too
    assert report["source"]["name"] == "flux-2-tiny.safetensors" and report["tensors_quantized"] == 28


def test_comfyui_prefixed_file_and_cli(both, tmp_path, capsys):
    folder, _ = both
    prefixed = write_bfl_file(Checkpoint(folder), tmp_path / "comfy.safetensors", prefix=COMFY_PREFIX)
    assert all(n.startswith(COMFY_PREFIX) for n in load_file(str(prefixed)))
    assert main(["convert", "--model", str(prefixed), "--mode", "binary", "--target", "bonsai,mlx,gemlite",
                 "--out", str(tmp_path / "b"), "--quiet", "--shard-bytes", "1000000"]) == 0
    convert(folder, default_recipe("binary"), tmp_path / "a", targets=TARGETS, max_shard_bytes=1_000_000,
            verbose=False)
    _same_packs(tmp_path / "a", tmp_path / "b")
    assert main(["verify", str(tmp_path / "b" / "bonsai"), "--source", str(prefixed)]) == 0
    assert "verify: PASS" in capsys.readouterr().out


def test_refuses_files_that_are_not_flux2(both, tmp_path, capsys):
    _, file = both
    other = tmp_path / "other.safetensors"
    save_file({"model.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(CheckpointError, match="not a BFL FLUX.2 transformer file .*single_stream_modulation"):
        BflCheckpoint(other)
    assert main(["convert", "--model", str(other), "--out", str(tmp_path / "o")]) == 2
    assert "not a BFL FLUX.2 transformer file" in capsys.readouterr().err and not (tmp_path / "o").exists()
    stray = tmp_path / "stray.safetensors"
    tensors = load_file(str(file))
    tensors["double_blocks.0.img_attn.extra.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)
    save_file(tensors, str(stray))
    with pytest.raises(CheckpointError, match="diffusers' FLUX.2 single-file conversion refuses it .*KeyError"):
        BflCheckpoint(stray)
    broken = tmp_path / "broken.safetensors"
    del tensors["double_blocks.0.img_attn.extra.weight"]
    tensors["single_blocks.1.linear2.weight"] = tensors["single_blocks.1.linear2.weight"].to(torch.int32)
    save_file(tensors, str(broken))
    with pytest.raises(CheckpointError, match="tensor 'single_transformer_blocks.1.attn.to_out.weight' is "
                                              "torch.int32; valid: bfloat16"):
        BflCheckpoint(broken).validate()
    del tensors["single_blocks.1.linear2.weight"], tensors["single_blocks.1.norm.key_norm.scale"]
    save_file(tensors, str(broken))
    with pytest.raises(CheckpointError, match=r"broken.safetensors \(config read off its tensor shapes\): describes"):
        BflCheckpoint(broken).validate()
