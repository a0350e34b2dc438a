"""The compact bonsai pack: in convert, and repacked losslessly into byte-identical runtime packs."""

import filecmp
import json

import pytest
from safetensors.torch import load_file, save_file

from bonsai_quant.cli import main
from bonsai_quant.convert import convert
from bonsai_quant.errors import OutputExistsError, PackError
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
