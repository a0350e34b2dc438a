"""End-to-end conversion of the tiny model: both modes, both targets, the real MLX runtime as the judge."""

import hashlib
import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bonsai_quant.checkpoint import Checkpoint
from bonsai_quant.cli import main
from bonsai_quant.convert import convert
from bonsai_quant.errors import BonsaiError, OutputExistsError, RecipeError
from bonsai_quant.packing import gemlite as gemlite_pack
from bonsai_quant.packing.folders import index_name
from bonsai_quant.quantizers import dequantize, quantize
from bonsai_quant.recipe import default_recipe, parse_recipe

GROUP = 128


def _load_pack(folder):
    tensors = {}
    for f in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "report.json"}


@pytest.fixture(scope="module", params=["binary", "ternary"])
def converted(request, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / request.param
    report = convert(tiny_ckpt, default_recipe(request.param), out, max_shard_bytes=1_000_000, verbose=False)
    return request.param, out, report


def test_report_and_folder_layout(converted, tiny_ckpt):
    mode, out, report = converted
    assert report["tensors_quantized"] == 28 and report["tensors_kept"] == 21
    assert report["quantized_weights"] == 5_111_808
    # gemlite adds per layer metadata int32[12], orig_shape int32[2], meta_scale fp32 (+ the int32 zero point
    # of ternary): 60 or 64 bytes on each of the 28 layers.
    overhead = 8 * 28 * {"binary": 60, "ternary": 64}[mode] / 5_111_808
    for target, bpw in (("mlx", {"binary": 1.25, "ternary": 2.25}[mode]),
                        ("gemlite", {"binary": 1.25, "ternary": 2.125}[mode] + overhead)):
        folder = out / target
        assert (folder / "config.json").read_bytes() == (tiny_ckpt / "config.json").read_bytes()
        assert (folder / index_name(target)).exists()  # 1 MB shards force sharding
        qc = json.loads((folder / "quantization_config.json").read_text())
        assert (qc["format"], qc["mode"], qc["bits"], qc["group_size"]) == (target, mode, {"binary": 1, "ternary": 2}[mode], 128)
        assert len(qc["quantized"]) == 28 and len(qc["kept"]) == 21
        assert report["targets"][target]["bits_per_weight"] == pytest.approx(bpw, rel=1e-12)
        manifest = json.loads((folder / "manifest.json").read_text())["files"]
        for name, entry in manifest.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"]
    assert json.loads((out / "report.json").read_text())["tensors_quantized"] == 28


def test_mlx_pack_decodes_in_real_mlx_to_the_quantized_weights(converted, tiny_ckpt):
    mode, out, _ = converted
    ckpt = Checkpoint(tiny_ckpt)
    packed = {}
    for f in sorted((out / "mlx").glob("*.safetensors")):
        packed.update(mx.load(str(f)))
    bits = {"binary": 1, "ternary": 2}[mode]
    solver = {"binary": "absmean", "ternary": "optimal"}[mode]
    for name in ("transformer_blocks.1.ff.linear_in.weight", "single_transformer_blocks.0.attn.to_out.weight",
                 "transformer_blocks.0.attn.to_add_out.weight"):
        module = name.removesuffix(".weight")
        q = quantize(ckpt.load(name), mode, GROUP, torch.bfloat16, solver)
        got = mx.dequantize(packed[f"{module}.weight"], packed[f"{module}.scales"], packed[f"{module}.biases"],
                            group_size=GROUP, bits=bits)
        expected = dequantize(q.codes, q.scales, GROUP)
        assert np.array_equal(np.array(got.astype(mx.float32)), expected.numpy()), name


def test_kept_tensors_are_bit_identical_to_the_source(converted, tiny_ckpt):
    _, out, _ = converted
    ckpt = Checkpoint(tiny_ckpt)
    for target in ("mlx", "gemlite"):
        pack = _load_pack(out / target)
        kept = json.loads((out / target / "quantization_config.json").read_text())["kept"]
        for name in kept:
            assert pack[name].dtype == torch.bfloat16 and torch.equal(pack[name], ckpt.load(name)), name


def test_gemlite_pack_unpacks_to_the_quantized_codes(converted, tiny_ckpt):
    mode, out, _ = converted
    ckpt = Checkpoint(tiny_ckpt)
    pack = _load_pack(out / "gemlite")
    name = "transformer_blocks.1.attn.to_q.weight"
    module = name.removesuffix(".weight")
    tensors = {k.removeprefix(module + "."): v for k, v in pack.items() if k.startswith(module + ".")}
    codes, scales = gemlite_pack.unpack(tensors, mode, GROUP)
    q = quantize(ckpt.load(name), mode, GROUP, torch.bfloat16, {"binary": "absmean", "ternary": "optimal"}[mode])
    assert torch.equal(codes, q.codes) and torch.equal(scales, q.scales)


def test_same_input_gives_byte_identical_packs(converted, tiny_ckpt, tmp_path):
    mode, out, _ = converted
    again = tmp_path / "again"
    convert(tiny_ckpt, default_recipe(mode), again, max_shard_bytes=1_000_000, verbose=False)
    assert _digest(again) == _digest(out)


def test_existing_output_is_refused_then_replaced_with_force(tiny_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(OutputExistsError, match="already exists; pass --force"):
        convert(tiny_ckpt, default_recipe("binary"), out, verbose=False)
    assert (out / "precious.txt").read_text() == "keep me"
    convert(tiny_ckpt, default_recipe("binary"), out, force=True, verbose=False)
    assert not (out / "precious.txt").exists() and (out / "mlx" / "diffusion_pytorch_model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_mid_stream_leaves_nothing_behind(tiny_ckpt, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_ckpt, src)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    target = "single_transformer_blocks.1.attn.to_out.weight"  # late in the plan: earlier tensors get written
    tensors[target][3, 7] = float("nan")
    from safetensors.torch import save_file
    index = json.loads((src / "diffusion_pytorch_model.safetensors.index.json").read_text())
    for f in sorted(src.glob("*.safetensors")):
        names = [n for n, file in index["weight_map"].items() if file == f.name]
        save_file({n: tensors[n] for n in names}, str(f))
    out = tmp_path / "out"
    with pytest.raises(BonsaiError, match=r"single_transformer_blocks\.1\.attn\.to_out\.weight: non-finite weight nan at \[3, 7\]"):
        convert(src, default_recipe("ternary"), out, verbose=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_mixed_recipe_and_fp16_kept_cast(tiny_ckpt, tmp_path):
    recipe = parse_recipe(
        "format_version: 1\nmode: binary\nkept_dtype: float16\ntargets: [mlx]\nrules:\n"
        "  - keep: x_embedder\n"
        "  - quantize: 'single_transformer_blocks.*.attn.to_out'\n    mode: ternary\n")
    report = convert(tiny_ckpt, recipe, tmp_path / "out", verbose=False)
    qc = json.loads((tmp_path / "out" / "mlx" / "quantization_config.json").read_text())
    assert qc["mode"] == "mixed"
    assert qc["quantized"]["single_transformer_blocks.0.attn.to_out"]["bits"] == 2
    assert qc["quantized"]["transformer_blocks.0.attn.to_q"]["bits"] == 1
    assert qc["kept"]["proj_out.weight"]["dtype"] == "float16"
    assert not (tmp_path / "out" / "gemlite").exists()
    # bf16 -> fp16 is exact for these magnitudes; a flushed tiny value would be named in warnings
    assert all("change in the cast" in w for w in report["warnings"])


def test_quantize_rule_on_a_norm_is_refused_before_writing(tiny_ckpt, tmp_path):
    recipe = parse_recipe("format_version: 1\nmode: ternary\nrules:\n  - quantize: '*.norm_q'\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"r\.yaml:4: rule 'quantize: \*\.norm_q' matches .*norm_q\.weight' \(norm, shape \[64\]\), which is not a Linear weight"):
        convert(tiny_ckpt, recipe, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_quantize_rule_with_indivisible_in_features(tiny_ckpt, tmp_path):
    recipe = parse_recipe("format_version: 1\nmode: ternary\nrules:\n  - quantize: x_embedder\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"'x_embedder\.weight' has in_features 64, not a multiple of group_size 128"):
        convert(tiny_ckpt, recipe, tmp_path / "out", verbose=False)


def test_recipe_pattern_matching_nothing_is_refused(tiny_ckpt, tmp_path):
    recipe = parse_recipe("format_version: 1\nmode: ternary\nrules:\n  - keep: 'transformer_blocks.9.*'\n", "r.yaml")
    with pytest.raises(RecipeError, match=r"r\.yaml:4: .*transformer_blocks\.9\.\*"):
        convert(tiny_ckpt, recipe, tmp_path / "out", verbose=False)
    assert not (tmp_path / "out").exists()


def test_cli_convert_plan_inspect(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "packs"
    assert main(["convert", "--model", str(tiny_ckpt), "--mode", "binary", "--target", "mlx", "--out", str(out),
                 "--quiet"]) == 0
    assert "28 quantized (5,111,808 weights), 21 kept" in capsys.readouterr().out
    assert main(["convert", "--model", str(tiny_ckpt), "--out", str(out), "--quiet"]) == 2
    assert f"error: {out}: already exists; pass --force to replace it" in capsys.readouterr().err
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mlx pack, binary (1-bit slots), group 128, bfloat16 scales" in text
    assert "28 quantized tensors (5,111,808 weights, 798,720 bytes, 1.250 bits/weight)" in text
    assert main(["plan", "--model", str(tiny_ckpt), "--mode", "ternary"]) == 0
    text = capsys.readouterr().out
    assert "transformer_blocks.0.attn.to_q.weight" in text and "28 tensors quantized, 21 kept" in text
    assert "gemlite: 4,048,128 bytes; quantized linears 1,359,616 bytes at 2.128 bits/weight" in text


@pytest.mark.parametrize("args, message", [
    (["convert", "--model", "{tmp}/missing"], "missing: no such checkpoint folder"),
    (["convert", "--recipe", "{tmp}/nope.yaml", "--model", "{ckpt}"], "nope.yaml: (file)"),
    (["inspect", "{tmp}"], "no quantization_config.json here or one level down"),
])
def test_cli_bad_input_is_one_clear_line(args, message, tiny_ckpt, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, ckpt=tiny_ckpt) for a in args]
    assert main(args + (["--out", str(tmp_path / "o")] if args[0] == "convert" else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def _broken_checkpoint(tiny_ckpt, tmp_path, how):
    src = tmp_path / "broken"
    shutil.copytree(tiny_ckpt, src)
    shard = sorted(src.glob("*-00002-of-*.safetensors"))[0]
    if how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif how == "config":
        (src / "config.json").write_text("{not json")
    elif how == "shape":
        config = json.loads((src / "config.json").read_text())
        config["num_attention_heads"] = 2
        (src / "config.json").write_text(json.dumps(config))
    elif how == "index":
        (src / "diffusion_pytorch_model.safetensors.index.json").write_text('{"weight_map": 3}')
    return src, shard


@pytest.mark.parametrize("how, message", [
    ("truncated", "truncated or corrupt: the header describes"),
    ("config", "config.json: not valid JSON"),
    ("shape", "has shape [256, 256], config.json implies [128, 256]"),
    ("index", "not a safetensors index"),
])
def test_cli_refuses_a_broken_checkpoint_and_writes_nothing(how, message, tiny_ckpt, tmp_path, capsys):
    src, shard = _broken_checkpoint(tiny_ckpt, tmp_path, how)
    out = tmp_path / "out"
    assert main(["convert", "--model", str(src), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_cli_default_model_is_the_shipped_digits_model(tmp_path, capsys):
    out = tmp_path / "default"
    assert main(["convert", "--mode", "ternary", "--target", "mlx", "--out", str(out), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "using the built-in flux2-tiny-digits model" in captured.err
    report = json.loads((out / "report.json").read_text())
    assert report["source"]["name"] == "flux2-tiny-digits" and report["tensors_quantized"] == 28
