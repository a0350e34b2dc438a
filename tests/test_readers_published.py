"""The published Bonsai Image layouts, imitated from our own packs: inspect, verify, eval and repack read them."""

import json
import os

import pytest
import torch
from published_helpers import SKIP_PATTERNS, gemlite_snapshot, mlx_snapshot
from safetensors.torch import load_file, save_file

from bonsai_quant.cli import main
from bonsai_quant.convert import convert
from bonsai_quant.describe import describe
from bonsai_quant.errors import PackError
from bonsai_quant.packing import bonsai, mlx
from bonsai_quant.readers.published import bf16_ulp, find_published, load_pickle, open_published
from bonsai_quant.recipe import default_recipe, parse_recipe
from bonsai_quant.repack import repack
from bonsai_quant.runtime.loader import PackReader
from bonsai_quant.verify import verify

TARGETS = ("bonsai", "mlx", "gemlite")


def bf16_recipe(mode):
    return parse_recipe(default_recipe(mode).text.replace("scale_dtype: float16", "scale_dtype: bfloat16"))


@pytest.fixture(scope="module", params=["binary", "ternary"])
def ours(request, tiny_ckpt, tmp_path_factory):
    """Our own packs of the tiny checkpoint with bf16 scales, every target."""
    out = tmp_path_factory.mktemp("ours") / request.param
    convert(tiny_ckpt, bf16_recipe(request.param), out, targets=TARGETS, verbose=False)
    return request.param, out


def _tensors(folder):
    (file,) = folder.glob("*.safetensors")  # each target names its own weights file
    return load_file(str(file))


def _bitwise_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.reshape(-1).view(torch.uint8),
                                                                       b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("layout", ["mlx", "gemlite"])
def test_exact_imitation_repacks_byte_identical_to_our_packs(ours, tmp_path, layout):
    mode, out = ours
    snapshot = (mlx_snapshot if layout == "mlx" else gemlite_snapshot)(out / "bonsai", tmp_path / "snap")
    for target in TARGETS:
        result = repack(snapshot, target, tmp_path / target)
        assert result["lossless"] and result["lossy_tensors"] == [] and result["scale_dtype"] == "bfloat16"
        want, got = _tensors(out / target), _tensors(tmp_path / target)
        assert set(want) == set(got)
        for name in want:
            assert _bitwise_equal(want[name], got[name]), (target, name)
        qc = json.loads((tmp_path / target / "quantization_config.json").read_text())
        assert qc["format"] == target and qc["source"]["layout"] == f"published-{layout}"
        assert qc["skipped_patterns"] == (SKIP_PATTERNS if layout == "mlx" else [])
    assert main(["verify", str(tmp_path / "bonsai")]) == 0  # the converted pack is a pack like any other


def test_strict_unpack_refuses_published_rounding_the_reader_measures_it(ours, tmp_path, capsys):
    mode, out = ours
    snapshot = mlx_snapshot(out / "bonsai", tmp_path / "snap", rounding=True)
    pack = open_published(find_published(snapshot)[0])
    module = "transformer_blocks.0.attn.to_q"
    stored = load_file(str(pack.folder / "diffusion_pytorch_model.safetensors"))
    ours_codes, ours_s = bonsai.unpack({k: PackReader(out / "bonsai").get(f"{module}.{k}") for k in bonsai.SUFFIXES},
                                       mode, 128)
    d = pack.decode(module)
    assert torch.equal(d.codes, ours_codes)
    assert bool(((d.s - ours_s.float()).abs() <= bf16_ulp(ours_s)).all())
    if mode == "ternary":  # ternary biases = -scales: negation is exact, so the layer is exact
        assert d.symmetric and torch.equal(d.s, ours_s.float())
        return
    with pytest.raises(PackError, match="scales must equal 2 \\* -biases bit-for-bit"):
        mlx.unpack({k: stored[f"{module}.{k}"] for k in mlx.SUFFIXES}, mode, 128)
    assert not d.symmetric and 0 < d.worst()[1] <= 2**-7
    result = repack(snapshot, "bonsai", tmp_path / "b")
    assert not result["lossless"] and module in {t["tensor"] for t in result["lossy_tensors"]}
    assert main(["repack", str(snapshot), "--target", "gemlite", "--out", str(tmp_path / "g")]) == 0
    printed = capsys.readouterr().out
    assert "layer(s) not lossless" in printed and f"  {module}: levels move by up to" in printed
    qc = json.loads((tmp_path / "b" / "quantization_config.json").read_text())
    assert qc["source"]["lossless"] is False and qc["source"]["lossy_tensors"] == result["lossy_tensors"]
    codes, _ = bonsai.unpack({k: PackReader(tmp_path / "b").get(f"{module}.{k}") for k in bonsai.SUFFIXES}, mode, 128)
    assert torch.equal(codes, ours_codes)


def test_inspect_published_layouts(ours, tmp_path, capsys):
    mode, out = ours
    bits = 1 if mode == "binary" else 2
    for layout, build in (("mlx", mlx_snapshot), ("gemlite", gemlite_snapshot)):
        (info,) = describe(build(out / "bonsai", tmp_path / layout))
        assert info["format"] == f"published-{layout}" and info["mode"] == mode and info["bits"] == bits
        assert info["quantized_tensors"] == 28 and info["kept_tensors"] == 21 and info["group_size"] == 128
        weights = info["quantized_weights"]
        if layout == "mlx":
            assert info["scale_dtype"] == "bfloat16" and info["skip_patterns"] == SKIP_PATTERNS
            assert info["bits_per_weight"] == pytest.approx(bits + 32 / 128, rel=1e-12)
        else:  # fp32 scales and zeros, plus 12 + 2 int32 of metadata and orig_shape per layer
            assert info["scale_dtype"] == "float32"
            assert info["quantized_bytes"] == weights * (bits + 64 / 128) / 8 + 28 * 14 * 4
    assert main(["inspect", str(tmp_path / "mlx")]) == 0
    printed = capsys.readouterr().out
    assert "published-mlx pack" in printed and "skip_patterns: x_embedder, context_embedder" in printed


def test_verify_published_with_source(ours, tiny_ckpt, tmp_path):
    mode, out = ours
    snapshot = mlx_snapshot(out / "bonsai", tmp_path / "snap", rounding=True)
    report = verify(snapshot, source=tiny_ckpt)
    steps = {s["name"]: s for s in report["packs"][0]["steps"]}
    assert report["ok"], steps
    assert [s["status"] for s in steps.values()] == ["pass"] * 5
    assert "equal re-quantizing" in steps["exactness"]["detail"] and "one bf16 unit" in steps["exactness"]["detail"]
    assert steps["mlx-end-to-end"]["data"]["rel_error"] < 1e-4
    gem = gemlite_snapshot(out / "bonsai", tmp_path / "gsnap", rounding=True)
    steps = {s["name"]: s["status"] for s in verify(gem)["packs"][0]["steps"]}
    assert steps == {"integrity": "pass", "exactness": "pass", "runtime": "skip", "end-to-end": "pass",
                     "mlx-end-to-end": "skip"}


def test_verify_fails_beyond_the_tolerance(ours, tmp_path, capsys):
    mode, out = ours
    snapshot = mlx_snapshot(out / "bonsai", tmp_path / "snap")
    file = snapshot / "transformer-packed-mflux" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(file))
    key = "single_transformer_blocks.1.attn.to_out.biases"
    b = tensors[key].clone()
    b[3, 2] = b[3, 2] * (1 + 2**-5)  # four bf16 ulps: no rounding explains it
    tensors[key] = b
    save_file(tensors, str(file))
    assert main(["verify", str(snapshot)]) == 1
    printed = capsys.readouterr().out
    assert "exactness       FAIL" in printed and "single_transformer_blocks.1.attn.to_out: not symmetric" in printed
    assert "at [out, group] [3, 2]" in printed
    with pytest.raises(PackError, match="not symmetric within the tolerance"):
        repack(snapshot, "bonsai", tmp_path / "x")
    assert not (tmp_path / "x").exists()


class Gadget:
    """Not a tensor: the pickle reader must refuse it without running anything."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_is_read_with_weights_only(ours, tmp_path, monkeypatch):
    mode, out = ours
    monkeypatch.chdir(tmp_path)
    gemlite_snapshot(out / "bonsai", tmp_path / "evil", extra={"gadget": Gadget()})
    with pytest.raises(PackError, match=r"state_dict.pt: holds (posix|nt)\.system, which is not a tensor"):
        open_published(tmp_path / "evil" / f"transformer-gemlite-int{1 if mode == 'binary' else 2}")
    assert not (tmp_path / "pwned").exists()
    gemlite_snapshot(out / "bonsai", tmp_path / "list", extra={"extras": [1, 2]})
    folder = next((tmp_path / "list").iterdir())
    with pytest.raises(PackError, match="key 'extras' holds a list; valid: tensors only"):
        load_pickle(folder / "state_dict.pt")
    gemlite_snapshot(out / "bonsai", tmp_path / "stray", extra={"stray.weight": torch.zeros(2)})
    with pytest.raises(PackError, match="tensor 'stray.weight' is not part of config.json's architecture"):
        open_published(next((tmp_path / "stray").iterdir()))


def test_structure_errors_name_the_tensor(ours, tmp_path):
    mode, out = ours
    snapshot = gemlite_snapshot(out / "bonsai", tmp_path / "g")
    folder = next(snapshot.iterdir())
    state = torch.load(folder / "state_dict.pt", weights_only=True)
    state["transformer_blocks.0.attn.to_k.metadata"][10] = 3
    torch.save(state, folder / "state_dict.pt")
    with pytest.raises(PackError, match=r"to_k.metadata slot 10 \(W_group_mode\) is 3, expected 4"):
        open_published(folder)
    del state["transformer_blocks.0.attn.to_k.zeros"]
    torch.save(state, folder / "state_dict.pt")
    with pytest.raises(PackError, match="to_k has .* but lacks transformer_blocks.0.attn.to_k.zeros"):
        open_published(folder)


def test_eval_reads_a_published_digits_pack(tmp_path):
    from bonsai_quant.digits import TextEncoder, model_dir
    from bonsai_quant.evaluate import evaluate, load_for_eval

    convert(model_dir(), bf16_recipe("binary"), tmp_path / "ours", targets=("bonsai", "mlx"), verbose=False)
    snapshot = mlx_snapshot(tmp_path / "ours" / "bonsai", tmp_path / "snap")
    encoder = TextEncoder.load()
    published = load_for_eval(snapshot, encoder)
    assert (published.kind, published.mode, published.target) == ("pack", "binary", "published-mlx")
    a, _ = evaluate(published, samples=3, steps=2, encoder=encoder)
    b, _ = evaluate(load_for_eval(tmp_path / "ours" / "mlx", encoder), samples=3, steps=2, encoder=encoder)
    assert a["per_digit_accuracy"] == b["per_digit_accuracy"] and a["frechet_distance"] == b["frechet_distance"]


def test_our_own_pack_in_the_mflux_folder_is_ours_not_published(ours, tmp_path):
    """`release` writes our MLX pack into transformer-packed-mflux/ (the Bonsai layout): our quantization_config
    (it names its "format") makes it ours; the same folder without that key is read as a published pack."""
    import shutil

    from bonsai_quant.runtime.loader import resolve_pack

    mode, out = ours
    folder = tmp_path / "transformer-packed-mflux"
    shutil.copytree(out / "mlx", folder)
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()  # the published file name, our pack
    assert find_published(tmp_path) == [] and find_published(folder) == []
    assert resolve_pack(tmp_path, "mlx") == folder
    info = describe(tmp_path)
    assert [(p["folder"], p["format"], p["mode"], p["tool"]["name"]) for p in info] == [
        (str(folder), "mlx", mode, "bonsai-quant")]

    qpath = folder / "quantization_config.json"
    qc = json.loads(qpath.read_text())
    qpath.write_text(json.dumps({k: v for k, v in qc.items() if k != "format"}, indent=2) + "\n")
    assert find_published(tmp_path) == [folder] and find_published(folder) == [folder]
    info = describe(tmp_path)
    assert [(p["folder"], p["format"], p["mode"]) for p in info] == [(str(folder), "published-mlx", mode)]
