"""verify on tiny packs: every step passes on a good pack, and each kind of damage is caught and named."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from bonsai_quant.checkpoint import read_header
from bonsai_quant.cli import main
from bonsai_quant.consumers import installed
from bonsai_quant.convert import convert
from bonsai_quant.manifest import write_manifest
from bonsai_quant.recipe import default_recipe
from bonsai_quant.verify import verify
from tests.pack_helpers import reseal_in_place


@pytest.fixture(scope="module")
def packs(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify") / "ternary"
    convert(tiny_ckpt, default_recipe("ternary"), out, verbose=False)
    return out


@pytest.fixture
def damaged(packs, tmp_path):
    copy = tmp_path / "pack"
    shutil.copytree(packs, copy)
    return copy


def _steps(report, target):
    pack = next(p for p in report["packs"] if p["folder"].endswith(target))
    return {s["name"]: s for s in pack["steps"]}


def _flip_bit(folder, tensor, byte=0, bit=0):
    (file,) = folder.glob("*.safetensors")
    info = read_header(file)[tensor]
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    data = bytearray(file.read_bytes())
    data[8 + n + info.offset + byte] ^= 1 << bit
    file.write_bytes(bytes(data))


def _rewrite(folder, edit):
    """Change the tensors and re-seal the manifest, as a careful tamperer would: values change in place, so
    the header stays byte-identical and only the deeper checks can tell; a changed set of tensors is saved anew."""
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(str(file))
    edit(tensors)
    header = read_header(file)
    if set(tensors) != set(header) or any(tensors[k].dtype != i.dtype or tuple(tensors[k].shape) != i.shape
                                          for k, i in header.items()):
        save_file(tensors, str(file))
        (folder / "manifest.json").unlink()
        write_manifest(folder)
        return
    reseal_in_place(folder, lambda t: t.update(tensors))


def test_good_pack_passes_every_step_that_can_run(packs, tiny_ckpt):
    report = verify(packs, source=tiny_ckpt)
    assert report["ok"]
    mlx = _steps(report, "mlx")
    cuda = mlx.pop("cuda-runtime")
    assert [s["status"] for s in mlx.values()][:5] == ["pass"] * 5
    if not torch.cuda.is_available():
        assert cuda["status"] == "skip" and "needs a CUDA GPU" in cuda["detail"]
    # The Mac applications (tests/test_consumers.py has them in detail): mflux reads only its own format.
    assert mlx["mlx-vlm-flux2"]["status"] == ("pass" if installed("mlx-vlm-flux2") else "skip")
    assert mlx["mflux"]["status"] == "skip"
    assert mlx["end-to-end"]["data"]["rel_error"] <= 1e-4
    assert 0.1 < mlx["end-to-end"]["data"]["rel_error_vs_unquantized_source"] < 1.0  # reported, not gated
    assert mlx["mlx-end-to-end"]["data"]["rel_error"] <= 1e-4
    assert "equal to re-quantizing" in mlx["exactness"]["detail"]
    gem = _steps(report, "gemlite")
    assert gem["runtime"]["status"] == "skip" and "no CUDA GPU here" in gem["runtime"]["detail"]
    assert gem["mlx-end-to-end"]["status"] == "skip"
    assert gem["end-to-end"]["status"] == "pass"


@pytest.mark.parametrize("tensor", [
    "transformer_blocks.0.attn.to_q.weight",     # a code word
    "transformer_blocks.0.attn.to_q.scales",     # a scale
    "context_embedder.weight",                   # a kept tensor
])
def test_one_flipped_bit_is_named(damaged, tensor):
    _flip_bit(damaged / "mlx", tensor, byte=3, bit=5)
    report = verify(damaged)
    assert not report["ok"]
    step = _steps(report, "mlx")["integrity"]
    assert step["status"] == "fail"
    assert f"tensor {tensor!r} differs from its sha256 in manifest.json" in step["detail"]
    assert _steps(report, "gemlite")["integrity"]["status"] == "pass"


def test_truncated_file_is_named(damaged):
    file = damaged / "gemlite" / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-7])
    step = _steps(verify(damaged), "gemlite")["integrity"]
    assert step["status"] == "fail" and "model.safetensors" in step["detail"] and "truncated" in step["detail"]


def test_deleted_tensor_is_named(damaged):
    _rewrite(damaged / "mlx", lambda t: t.pop("single_transformer_blocks.1.attn.to_out.biases"))
    step = _steps(verify(damaged), "mlx")["integrity"]
    assert step["status"] == "fail"
    assert "tensor 'single_transformer_blocks.1.attn.to_out.biases' is missing" in step["detail"]


def test_edited_config_is_caught(damaged):
    config = json.loads((damaged / "mlx" / "config.json").read_text())
    config["num_single_layers"] = 3
    (damaged / "mlx" / "config.json").write_text(json.dumps(config))
    (damaged / "mlx" / "manifest.json").unlink()
    write_manifest(damaged / "mlx")
    step = _steps(verify(damaged), "mlx")["integrity"]
    assert step["status"] == "fail"
    assert "'single_transformer_blocks.2.attn.to_qkv_mlp_proj.weight' of the config.json architecture" in step["detail"]


def test_resealed_code_flip_is_caught_against_the_source(damaged, tiny_ckpt):
    def edit(t):
        words = t["transformer_blocks.1.ff.linear_in.weight"].view(torch.int32)
        q = int(words[5, 2]) & 3  # slot 0 of word 2 in row 5: input 32
        words[5, 2] = (int(words[5, 2]) & ~3) | ((q + 1) % 3)  # another valid ternary code
    _rewrite(damaged / "mlx", edit)
    step = _steps(verify(damaged, source=tiny_ckpt), "mlx")["exactness"]
    assert step["status"] == "fail"
    assert step["detail"].startswith("transformer_blocks.1.ff.linear_in: ")
    assert "[5, 32]" in step["detail"]  # word 2 of a 2-bit row starts at input 32


def test_resealed_ternary_slot_value_3_is_not_a_code(damaged):
    def edit(t):
        t["transformer_blocks.0.attn.to_k.weight"][0, 0] |= 3
    _rewrite(damaged / "mlx", edit)
    step = _steps(verify(damaged), "mlx")["exactness"]
    assert step["status"] == "fail" and "2-bit value 3" in step["detail"]
    assert step["detail"].startswith("transformer_blocks.0.attn.to_k: ")


def test_resealed_kept_tensor_change_is_caught_against_the_source(damaged, tiny_ckpt):
    def edit(t):
        t["proj_out.weight"][1, 2] += 1
    _rewrite(damaged / "gemlite", edit)
    step = _steps(verify(damaged, source=tiny_ckpt), "gemlite")["exactness"]
    assert step["status"] == "fail" and "kept tensor 'proj_out.weight' differs from the source at [1, 2]" in step["detail"]


def test_cli_exit_codes_and_json(packs, damaged, capsys):
    assert main(["verify", str(packs / "mlx"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and len(report["packs"]) == 1
    _flip_bit(damaged / "mlx", "proj_out.weight")
    assert main(["verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert "integrity       FAIL" in out and "verify: FAIL" in out


def _count_calls(monkeypatch, owner, name):
    calls = []
    original = getattr(owner, name)

    def counted(*args, **kwargs):
        calls.append(args[1] if len(args) > 1 and isinstance(args[1], str) else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def test_packs_of_one_source_share_its_read_requantization_and_forwards(packs, tiny_ckpt, monkeypatch):
    """Two packs of one convert: each source tensor read once for the comparison and once for the unquantized
    forward, each quantized layer re-quantized once, and one reference forward for both."""
    from collections import Counter

    from bonsai_quant import verify_pack
    from bonsai_quant.checkpoint import Checkpoint
    from bonsai_quant.packing.config import PackConfig

    loads = _count_calls(monkeypatch, Checkpoint, "load")
    quantized = []
    original_quantize = verify_pack.quantize
    monkeypatch.setattr(verify_pack, "quantize",
                        lambda w, *a, **k: quantized.append(k["name"]) or original_quantize(w, *a, **k))
    references = _count_calls(monkeypatch, verify_pack.PackVerifier, "_reference_forward")
    report = verify(packs, source=tiny_ckpt)
    assert report["ok"] and [p["folder"].rsplit("/", 1)[-1] for p in report["packs"]] == ["gemlite", "mlx"]
    names = {n for f in tiny_ckpt.glob("*.safetensors") for n in read_header(f)}
    assert Counter(loads) == {n: 2 for n in names}
    layers = PackConfig.load(packs / "mlx").quantized
    assert sorted(quantized) == sorted(f"{m}.weight" for m in layers)
    assert len(references) == 1
    for target in ("gemlite", "mlx"):
        steps = _steps(report, target)
        assert steps["end-to-end"]["data"]["rel_error"] <= 1e-4
        assert 0.1 < steps["end-to-end"]["data"]["rel_error_vs_unquantized_source"] < 1.0


@pytest.mark.parametrize("target", ["gemlite", "mlx"])
def test_a_resealed_code_flip_in_either_pack_is_caught_when_packs_share_the_work(damaged, tiny_ckpt, target):
    from tests.pack_helpers import flip_code

    flip_code(damaged / target, "single_transformer_blocks.0.attn.to_out", 3, 130)
    report = verify(damaged, source=tiny_ckpt)
    assert not report["ok"]
    step = _steps(report, target)["exactness"]
    assert step["status"] == "fail"
    assert step["detail"].startswith("single_transformer_blocks.0.attn.to_out: code at [3, 130] is ")
    other = _steps(report, "mlx" if target == "gemlite" else "gemlite")
    assert all(s["status"] != "fail" for s in other.values())


def test_packs_that_decode_differently_each_get_their_own_reference(damaged, monkeypatch):
    """Without a source, a pack is compared with its own decoded weights: two packs that differ in one code
    both pass (each is self-consistent) and each has its own reference forward."""
    from bonsai_quant import verify_pack
    from tests.pack_helpers import flip_code

    references = _count_calls(monkeypatch, verify_pack.PackVerifier, "_reference_forward")
    assert verify(damaged)["ok"] and len(references) == 1
    flip_code(damaged / "gemlite", "transformer_blocks.1.attn.to_v", 0, 0)
    references.clear()
    report = verify(damaged)
    assert report["ok"] and len(references) == 2
