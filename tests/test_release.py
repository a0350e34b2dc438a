"""The release pipeline on the tiny model: folder contents, reproducibility, --check, loading."""

import json

import pytest
import torch
import yaml

from bonsai_quant import load_transformer
from bonsai_quant.cli import main
from bonsai_quant.recipe import default_recipe
from bonsai_quant.release import check_release, release
from bonsai_quant.runtime import PackedLinear


@pytest.fixture(scope="module")
def released(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("release") / "bonsai-tiny-binary"
    result = release(tiny_ckpt, default_recipe("binary"), out)
    return out, result


def test_release_folder_contents(released):
    out, result = released
    # binary at group 128: no transformer/ (mflux reads 1-bit layers only at group 64)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "bonsai", "gemlite", "manifest.json", "recipe.yaml",
                                                     "report.json", "transformer-packed-mflux", "verify.json"]
    assert result["verify"]["ok"]
    manifest = json.loads((out / "manifest.json").read_text())
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files
    assert (out / "recipe.yaml").read_text() == default_recipe("binary").text


def test_model_card(released):
    out, result = released
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    # A random checkpoint in a plain folder says nothing about where it came from: no base model is claimed.
    assert "base_model" not in front and "base_model_relation" not in front
    assert card.split("---", 2)[2].lstrip().startswith(f"# {result['report']['source']['name']} — binary")
    assert "`bonsai-quant repack bonsai --target mlx|gemlite|mflux --out PACK`" in card
    assert front["pipeline_tag"] == "text-to-image" and "binary" in front["tags"]
    assert front["license"] == "apache-2.0"
    bonsai_bytes = result["report"]["targets"]["bonsai"]["files_bytes"]
    assert f"| `bonsai/` | compact distribution (repack to a runtime layout) | {bonsai_bytes / 1e6:.2f} MB | 1.125 |" \
        in card
    assert "| `transformer-packed-mflux/` | pass | pass | pass (" in card
    assert "| `gemlite/` | pass | pass | skipped |" in card


def test_release_is_reproducible(released, tiny_ckpt, tmp_path):
    out, _ = released
    again = tmp_path / "again"
    release(tiny_ckpt, default_recipe("binary"), again)
    for path in out.rglob("*"):
        if path.is_file():
            assert (again / path.relative_to(out)).read_bytes() == path.read_bytes(), path


def test_check_passes_then_catches_a_corrupted_download(released, tmp_path):
    import shutil

    out, _ = released
    assert check_release(out)["ok"]
    copy = tmp_path / "download"
    shutil.copytree(out, copy)
    data = bytearray((copy / "gemlite" / "model.safetensors").read_bytes())
    data[-5] ^= 0x10  # a byte in the last tensor's data
    (copy / "gemlite" / "model.safetensors").write_bytes(bytes(data))
    result = check_release(copy)
    assert not result["ok"]
    assert any("gemlite/model.safetensors: tensor" in p and "differs from its sha256" in p for p in result["manifest"])
    (copy / "recipe.yaml").unlink()
    assert any("recipe.yaml: listed in manifest.json but missing" in p for p in check_release(copy)["manifest"])


def test_cli_dry_run_writes_nothing_and_check_exit_codes(released, tiny_ckpt, tmp_path, capsys):
    out, _ = released
    assert main(["release", "--model", str(tiny_ckpt), "--mode", "ternary", "--out", str(tmp_path / "r"),
                 "--dry-run"]) == 0
    assert "bonsai   " in capsys.readouterr().out and not (tmp_path / "r").exists()
    assert main(["release", "--check", str(out)]) == 0
    assert "release check: PASS" in capsys.readouterr().out
    assert main(["release", "--out", str(tmp_path / "r")]) == 2
    assert "release needs --model and --out" in capsys.readouterr().err


def test_load_transformer_from_a_release_runs_on_cpu(released):
    out, _ = released
    model = load_transformer(out)
    assert isinstance(model.transformer_blocks[0].attn.to_q, PackedLinear)
    assert model.transformer_blocks[0].attn.to_q.layout == "mlx"
    gen = torch.Generator().manual_seed(0)
    kwargs = dict(hidden_states=torch.randn(1, 4, 64, generator=gen),
                  encoder_hidden_states=torch.randn(1, 3, 256, generator=gen), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(4, 4), txt_ids=torch.zeros(3, 4), return_dict=False)
    with torch.no_grad():
        a = model(**kwargs)[0]
        b = load_transformer(out / "bonsai")(**kwargs)[0]
    assert a.shape == (1, 4, 64) and torch.isfinite(a).all()
    assert torch.equal(a, b)  # both layouts decode to the same weights


def test_base_model_comes_from_the_source_or_the_flag(tmp_path, released):
    from bonsai_quant.release import model_card, source_model_id

    snapshot = tmp_path / "models--black-forest-labs--FLUX.2-klein-4B" / "snapshots" / "0123abc" / "transformer"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    assert source_model_id(snapshot) == "black-forest-labs/FLUX.2-klein-4B"
    named = tmp_path / "named"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "someone/klein-finetune"}))
    assert source_model_id(named) == "someone/klein-finetune"
    (named / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))  # a local path: no id
    assert source_model_id(named) is None
    out, result = released
    card = model_card(result["report"], default_recipe("binary"), None, None, False, "someone/klein-finetune",
                      "apache-2.0")
    front = yaml.safe_load(card.split("---")[1])
    assert front["base_model"] == "someone/klein-finetune" and front["base_model_relation"] == "quantized"
    assert "# klein-finetune — binary" in card
    assert "The transformer of [someone/klein-finetune](https://huggingface.co/someone/klein-finetune)" in card


def test_a_release_whose_second_pack_has_one_wrong_code_fails_naming_it(tiny_ckpt, tmp_path, monkeypatch):
    """As if the gemlite packer had written one wrong (but valid) code and sealed it: the release's verify
    compares every pack with one shared re-quantization of the source and names the pack and the layer."""
    from bonsai_quant import release as release_module
    from tests.pack_helpers import flip_code

    convert_into = release_module.convert_into

    def faulty(folder, *args, **kwargs):
        report = convert_into(folder, *args, **kwargs)
        flip_code(folder / "gemlite", "transformer_blocks.0.ff.linear_out", 2, 7)
        return report

    monkeypatch.setattr(release_module, "convert_into", faulty)
    out = tmp_path / "release"
    result = release(tiny_ckpt, default_recipe("ternary"), out, targets=("bonsai", "mlx", "gemlite"))
    checks = result["verify"]
    assert not checks["ok"]
    assert [p["folder"] for p in checks["packs"]] == ["bonsai", "gemlite", "transformer-packed-mflux"]
    steps = {p["folder"]: {s["name"]: s for s in p["steps"]} for p in checks["packs"]}
    assert steps["gemlite"]["exactness"]["status"] == "fail"
    assert steps["gemlite"]["exactness"]["detail"].startswith("transformer_blocks.0.ff.linear_out: code at [2, 7] is ")
    for folder in ("bonsai", "transformer-packed-mflux"):
        assert steps[folder]["exactness"]["status"] == "pass"
        assert steps[folder]["exactness"]["detail"].endswith(
            f"; equal to re-quantizing {tiny_ckpt.name} under the recorded recipe")  # a name, not a path
    assert json.loads((out / "verify.json").read_text())["ok"] is False


def test_the_release_manifest_reuses_the_digests_verify_checked(tiny_ckpt, tmp_path, monkeypatch):
    """Each pack file is hashed when its pack's manifest is written and when verify checks it, not a third time
    for the release's manifest, which still lists exactly what hashing would give (check_release reads it)."""
    from collections import Counter

    from bonsai_quant import manifest

    digested = Counter()
    original = manifest._digest_file
    monkeypatch.setattr(manifest, "_digest_file", lambda path: digested.update([path.name]) or original(path))
    out = tmp_path / "release"
    assert release(tiny_ckpt, default_recipe("ternary"), out, targets=("bonsai", "mlx"))["verify"]["ok"]
    assert digested["model.safetensors"] == 2 and digested["diffusion_pytorch_model.safetensors"] == 2
    digested.clear()
    assert check_release(out)["ok"]
    assert digested["model.safetensors"] == 2  # the release's manifest, then the pack's own
