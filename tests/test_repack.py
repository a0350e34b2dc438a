"""The compact bonsai pack: in convert, and repacked losslessly into byte-identical runtime packs."""

import filecmp
import json

import pytest
from safetensors.torch import load_file, save_file

from bonsai_quant.cli import main
from bonsai_quant.convert import convert
from bonsai_quant.errors import OutputExistsError, PackError
from bonsai_quant.manifest import write_manifest
from bonsai_quant.recipe import default_recipe
from bonsai_quant.repack import repack


@pytest.fixture(scope="module", params=["binary", "ternary"])
def three_packs(request, tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("repack") / request.param
    report = convert(tiny_ckpt, default_recipe(request.param), out, targets=("bonsai", "mlx", "gemlite"),
                     max_shard_bytes=1_500_000, verbose=False)
    return request.param, out, report


def _same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files, (cmp.left_only, cmp.right_only, cmp.diff_files)
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    assert not mismatch and not errors


@pytest.mark.parametrize("target", ["mlx", "gemlite"])
def test_repack_is_byte_identical_to_convert(three_packs, target, tmp_path):
    _, out, _ = three_packs
    result = repack(out / "bonsai", target, tmp_path / target)
    _same_tree(out / target, tmp_path / target)
    assert result["files_bytes"] == sum(p.stat().st_size for p in (out / target).iterdir())


def test_compact_pack_is_at_the_information_bound(three_packs):
    mode, out, report = three_packs
    # tiny in_features are 256, 768 and 1024: ternary rows take ceil(in/5) bytes
    weights = {"binary": 1.125, "ternary": None}[mode]
    bpw = report["targets"]["bonsai"]["bits_per_weight"]
    if weights:
        assert bpw == pytest.approx(1.125, rel=1e-12)
    else:
        assert 1.71 < bpw < 1.75
    assert bpw < report["targets"]["mlx"]["bits_per_weight"]
    assert json.loads((out / "bonsai" / "quantization_config.json").read_text())["format"] == "bonsai"


def test_repack_refuses_other_formats_and_existing_output(three_packs, tmp_path):
    _, out, _ = three_packs
    with pytest.raises(PackError, match="no bonsai pack here"):
        repack(out / "mlx", "gemlite", tmp_path / "x")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        repack(out, "mlx", tmp_path / "exists")
    with pytest.raises(PackError, match="repack target 'bonsai'"):
        repack(out, "bonsai", tmp_path / "y")


def test_corrupt_trit_byte_is_named_and_nothing_is_written(three_packs, tmp_path):
    mode, out, _ = three_packs
    if mode != "ternary":
        pytest.skip("base-3 bytes exist in ternary packs only")
    import shutil
    src = tmp_path / "src"
    shutil.copytree(out / "bonsai", src)
    files = sorted(src.glob("model*.safetensors"))
    for f in files:
        tensors = load_file(str(f))
        key = "transformer_blocks.0.attn.to_v.codes"
        if key in tensors:
            tensors[key][3, 7] = 250
            save_file(tensors, str(f), metadata={"format": "pt"})
    (src / "manifest.json").unlink()  # resealed: only decoding the codes can tell
    write_manifest(src)
    with pytest.raises(PackError, match=r"transformer_blocks\.0\.attn\.to_v: .*byte 250 at \[row, byte\] \[3, 7\] is >= 243"):
        repack(src, "mlx", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_cli_repack(three_packs, tmp_path, capsys):
    _, out, _ = three_packs
    assert main(["repack", str(out), "--target", "mlx", "--out", str(tmp_path / "m")]) == 0
    assert "mlx pack" in capsys.readouterr().out
    assert main(["repack", str(out / "mlx"), "--target", "mlx", "--out", str(tmp_path / "n")]) == 2
    assert "error: " in capsys.readouterr().err


def _resealed_copy(three_packs, tmp_path, edit_config=None, edit_qconfig=None):
    import shutil

    _, out, _ = three_packs
    src = tmp_path / "src"
    shutil.copytree(out / "bonsai", src)
    for name, edit in (("config.json", edit_config), ("quantization_config.json", edit_qconfig)):
        if edit is not None:
            data = json.loads((src / name).read_text())
            edit(data)
            (src / name).write_text(json.dumps(data, indent=2) + "\n")
    (src / "manifest.json").unlink()
    write_manifest(src)
    return src


def test_repack_checks_the_quantization_config_against_config_json(three_packs, tmp_path):
    src = _resealed_copy(three_packs, tmp_path, edit_config=lambda c: c.update(num_single_layers=1))
    with pytest.raises(PackError) as e:
        repack(src, "mlx", tmp_path / "out")
    assert str(e.value) == (f"{src / 'quantization_config.json'}: lists 'single_transformer_blocks.1.attn.norm_k."
                            "weight', which config.json's architecture does not have")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_repack_accepts_only_the_listed_dtype_names(three_packs, tmp_path):
    def edit(q):
        q["kept"]["proj_out.weight"]["dtype"] = "nn"
    src = _resealed_copy(three_packs, tmp_path, edit_qconfig=edit)
    with pytest.raises(PackError, match=r"quantization_config\.json: kept\['proj_out\.weight'\]: dtype 'nn'; "
                                        r"valid: float16, bfloat16, float32$"):
        repack(src, "gemlite", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("key, value, message", [
    ("shard_bytes", "big", "shard_bytes 'big'; valid: a whole number of bytes > 0"),
    ("recipe", None, "recipe None; valid: the recipe object convert records, with a name and a mode"),
])
def test_repack_checks_what_it_copies_into_the_new_pack(three_packs, tmp_path, key, value, message):
    src = _resealed_copy(three_packs, tmp_path, edit_qconfig=lambda q: q.update({key: value}))
    with pytest.raises(PackError) as e:
        repack(src, "mlx", tmp_path / "out")
    assert str(e.value) == f"{src / 'quantization_config.json'}: {message}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
