"""A pack's structure is checked before anything is built from it: by load_transformer, eval, repack and verify.

Each damaged pack is resealed (its manifest rewritten) where the damage is structural, so only the structural
check can tell; a pack whose manifest no longer matches its files' sizes is refused as stale.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from bonsai_quant.cli import main
from bonsai_quant.convert import convert
from bonsai_quant.errors import BonsaiError, PackError
from bonsai_quant.manifest import write_manifest
from bonsai_quant.recipe import default_recipe
from bonsai_quant.runtime import load_transformer
from bonsai_quant.verify import verify

try:  # tests/ is on sys.path under pytest's default rootdir-relative imports
    from pack_helpers import watchdog
except ImportError:  # tests/ made a package
    from tests.pack_helpers import watchdog

Q = "transformer_blocks.0.attn.to_q"


@pytest.fixture(scope="module")
def packs(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "ternary"
    convert(tiny_ckpt, default_recipe("ternary"), out, verbose=False)
    return out


@pytest.fixture(scope="module")
def sharded(tiny_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "sharded"
    convert(tiny_ckpt, default_recipe("ternary"), out, targets=("mlx",), max_shard_bytes=1_500_000, verbose=False)
    return out / "mlx"


@pytest.fixture
def mlx(packs, tmp_path):
    shutil.copytree(packs / "mlx", tmp_path / "mlx")
    return tmp_path / "mlx"


def _reseal(folder):
    (folder / "manifest.json").unlink()
    write_manifest(folder)


def _edit_qconfig(folder, edit, reseal=True):
    path = folder / "quantization_config.json"
    q = json.loads(path.read_text())
    edit(q)
    path.write_text(json.dumps(q, indent=2) + "\n")
    if reseal:
        _reseal(folder)


def _edit_tensors(folder, edit):
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "mlx"})
    _reseal(folder)


def test_good_packs_load_without_a_word(packs, sharded, recwarn):
    for folder in (packs / "mlx", packs / "gemlite", sharded):
        model = load_transformer(folder)
        assert model.transformer_blocks[0].attn.to_q.out_features == 256
    assert not [w for w in recwarn if "manifest" in str(w.message)]


def test_pack_without_a_manifest_loads_and_says_so(mlx):
    (mlx / "manifest.json").unlink()
    with pytest.warns(UserWarning) as warned:
        load_transformer(mlx)
    assert [str(w.message) for w in warned] == [
        f"{mlx}: no manifest.json, so its files cannot be checked against their sha256; its structure was "
        "checked, its bytes were not"]


def test_stale_manifest_is_refused(mlx):
    _edit_qconfig(mlx, lambda q: q.update(note="edited after conversion"), reseal=False)
    size = (mlx / "quantization_config.json").stat().st_size
    listed = json.loads((mlx / "manifest.json").read_text())["files"]["quantization_config.json"]["bytes"]
    with pytest.raises(PackError) as e:
        load_transformer(mlx)
    assert str(e.value) == (f"{mlx / 'quantization_config.json'}: {size} bytes, manifest.json says {listed} "
                            "(truncated or replaced); the pack changed since it was written: bonsai-quant verify "
                            "names what differs")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"proj_out.weight": t["proj_out.weight"].float()}),
     "tensor 'proj_out.weight' is torch.float32[64, 256], expected torch.bfloat16[64, 256]"),
    (lambda t: t.update({f"{Q}.scales": t[f"{Q}.scales"][:128].clone()}),
     f"tensor '{Q}.scales' is torch.bfloat16[128, 2], expected torch.bfloat16[256, 2]"),
    (lambda t: t.update({"lora.weight": torch.zeros(2)}),
     "tensor 'lora.weight' in diffusion_pytorch_model.safetensors is not described by quantization_config.json"),
    (lambda t: t.pop(f"{Q}.biases"), f"tensor '{Q}.biases' is missing from the pack's safetensors"),
])
def test_tensors_against_the_config_are_checked_before_loading(mlx, edit, message):
    _edit_tensors(mlx, edit)
    with pytest.raises(PackError) as e:
        load_transformer(mlx)
    assert str(e.value) == f"{mlx}: {message}"


def _set(path, value):
    def edit(q):
        *parents, last = path
        node = q
        for key in parents:
            node = node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return edit


NORM = "transformer_blocks.0.attn.norm_q"


def _quantize_a_norm(q):
    del q["kept"][f"{NORM}.weight"]
    q["quantized"][NORM] = {"mode": "ternary", "bits": 2, "shape": [64, 1]}


@pytest.mark.parametrize("edit, message", [
    (_set(["quantized"], KeyError), "missing key 'quantized'"),
    (_set(["quantized", Q], "x"), f"quantized[{Q!r}]: expected an object with mode, bits and shape, got 'x'"),
    (_set(["quantized", Q, "shape"], [10**9, 256]),
     f"quantized[{Q!r}]: shape [1000000000, 256], but config.json's architecture has [256, 256]"),
    (_set(["quantized", Q, "shape"], [512, 256]),
     f"quantized[{Q!r}]: shape [512, 256], but config.json's architecture has [256, 256]"),
    (_set(["quantized", Q, "bits"], 3), f"quantized[{Q!r}]: bits 3 for mode 'ternary'; valid: 2"),
    (_set(["quantized", Q, "mode"], "quaternary"),
     f"quantized[{Q!r}]: mode 'quaternary'; valid: binary, ternary"),
    (_set(["quantized", "proj_out"], {"mode": "ternary", "bits": 2, "shape": [64, 256]}),
     "quantized['proj_out'] and kept['proj_out.weight'] both name 'proj_out.weight'"),
    (_quantize_a_norm, f"quantized['{NORM}']: '{NORM}.weight' is no Linear weight of config.json's architecture; "
                       "valid: list it under kept"),
    (_set(["group_size"], "128"), "group_size '128'; valid: 32, 64, 128"),
    (_set(["group_size"], 256), "group_size 256; valid: 32, 64, 128"),
    (_set(["scale_dtype"], "nn"), "scale_dtype 'nn'; valid: float16, bfloat16"),
    (_set(["kept", "proj_out.weight", "dtype"], "nn"), "kept['proj_out.weight']: dtype 'nn'; valid: float16, bfloat16, float32"),
    (_set(["kept", "proj_out.weight", "dtype"], "float64"),
     "kept['proj_out.weight']: dtype 'float64'; valid: float16, bfloat16, float32"),
    (_set(["kept", "proj_out.weight"], KeyError),
     "tensor 'proj_out.weight' of the config.json architecture is neither quantized nor kept"),
    (_set(["kept", "lora.weight"], {"dtype": "float16"}), "lists 'lora.weight', which config.json's architecture does not have"),
])
def test_malformed_quantization_config_is_named(mlx, edit, message):
    _edit_qconfig(mlx, edit)
    with pytest.raises(PackError) as e:
        load_transformer(mlx)
    assert str(e.value) == f"{mlx / 'quantization_config.json'}: {message}"


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON (Expecting property name enclosed in double quotes at line 1)"),
    ("[1]", "expected a JSON object"),
])
def test_unreadable_quantization_config_is_named(mlx, text, message):
    (mlx / "quantization_config.json").write_text(text)
    _reseal(mlx)
    with pytest.raises(PackError) as e:
        load_transformer(mlx)
    assert str(e.value) == f"{mlx / 'quantization_config.json'}: {message}"


def test_config_json_not_matching_the_pack_is_named(mlx):
    config = json.loads((mlx / "config.json").read_text())
    config["num_layers"] = 1
    (mlx / "config.json").write_text(json.dumps(config))
    _reseal(mlx)
    with pytest.raises(PackError, match=r"quantization_config\.json: lists 'transformer_blocks\.1\.attn\.add_k_proj"
                                        r"\.weight', which config\.json's architecture does not have"):
        load_transformer(mlx)


def test_config_json_far_larger_than_the_pack_is_refused_before_building(mlx):
    config = json.loads((mlx / "config.json").read_text())
    config["num_single_layers"] = 10**6
    (mlx / "config.json").write_text(json.dumps(config))
    _reseal(mlx)
    pack_bytes = sum(i["bytes"] for f, i in json.loads((mlx / "manifest.json").read_text())["files"].items()
                     if f.endswith(".safetensors"))
    with watchdog(30, "load_transformer"), pytest.raises(BonsaiError) as e:
        load_transformer(mlx)
    assert str(e.value).startswith(f"{mlx / 'config.json'}: describes ")
    assert "num_single_layers 1000000" in str(e.value) and "at 1 bit(s) each" in str(e.value)
    assert pack_bytes > int(str(e.value).split("hold ")[1].split(" bytes")[0].replace(",", "")) > 0.9 * pack_bytes


@pytest.mark.parametrize("where", ["parent", "absolute"])
def test_pack_index_entry_outside_the_folder_is_refused(sharded, tmp_path, where):
    pack = tmp_path / "mlx"
    shutil.copytree(sharded, pack)
    index_path = pack / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.move(pack / first, tmp_path / first)
    name = f"../{first}" if where == "parent" else str(tmp_path / first)
    index["weight_map"] = {n: (name if f == first else f) for n, f in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    _reseal(pack)
    with pytest.raises(PackError, match=rf"model\.safetensors\.index\.json: shard {name!r} is not a file name in "
                                        "this folder"):
        load_transformer(pack)


def test_stray_safetensors_file_is_refused(mlx):
    save_file({"lora.weight": torch.zeros(2)}, str(mlx / "extra.safetensors"))
    _reseal(mlx)
    with pytest.raises(PackError, match=r"extra\.safetensors: a safetensors file the pack does not use"):
        load_transformer(mlx)


def test_resolve_pack_names_a_broken_quantization_config(packs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packs, out)
    (out / "gemlite" / "quantization_config.json").write_text("[]")
    with pytest.raises(PackError, match=r"gemlite/quantization_config\.json: expected a JSON object"):
        load_transformer(out)


def test_verify_integrity_names_a_malformed_entry(packs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packs, out)
    _edit_qconfig(out / "mlx", _set(["quantized", Q], "x"))
    _edit_qconfig(out / "gemlite", _set(["kept", "proj_out.weight", "dtype"], "nn"))
    report = verify(out)
    steps = {p["folder"].rsplit("/", 1)[1]: p["steps"][0] for p in report["packs"]}
    assert not report["ok"] and {s["status"] for s in steps.values()} == {"fail"}
    assert steps["mlx"]["detail"].endswith(f"quantized[{Q!r}]: expected an object with mode, bits and shape, got 'x'")
    assert steps["gemlite"]["detail"].endswith("kept['proj_out.weight']: dtype 'nn'; valid: float16, bfloat16, float32")


@pytest.fixture(scope="module")
def digits_pack(tmp_path_factory):
    from bonsai_quant.digits import model_dir

    out = tmp_path_factory.mktemp("eval") / "ternary"
    convert(model_dir(), default_recipe("ternary"), out, targets=("mlx",), verbose=False)
    return out / "mlx"


def test_eval_names_a_malformed_pack(digits_pack, tmp_path, capsys):
    pack = tmp_path / "mlx"
    shutil.copytree(digits_pack, pack)
    _edit_qconfig(pack, _set(["kept"], KeyError))
    assert main(["eval", str(pack), "--samples", "1", "--steps", "1"]) == 2
    assert capsys.readouterr().err == f"error: {pack / 'quantization_config.json'}: missing key 'kept'\n"


def test_mlx_runtime_refuses_an_index_entry_outside_the_folder(sharded, tmp_path):
    from bonsai_quant.runtime.mlx_flux2 import load_mlx_transformer

    pack = tmp_path / "mlx"
    shutil.copytree(sharded, pack)
    index_path = pack / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    shutil.move(pack / first, tmp_path / first)
    index["weight_map"] = {n: (f"../{first}" if f == first else f) for n, f in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(PackError, match=rf"model\.safetensors\.index\.json: shard '\.\./{first}' is not a file name "
                                        "in this folder"):
        load_mlx_transformer(pack)


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_gemlite_state_is_rebuilt_from_the_loaded_buffers(tiny_ckpt, tmp_path, mode):
    """use_gemlite builds each GemLiteLinearTriton from what load_transformer read: the rebuilt state must be the
    pack's stored tensors bit for bit (side tensors included), so the pack is never read a second time."""
    from bonsai_quant.packing.gemlite import SUFFIXES
    from bonsai_quant.runtime.gemlite_backend import gemlite_state
    from bonsai_quant.runtime.loader import PackReader
    from bonsai_quant.runtime.packed_linear import PackedLinear

    convert(tiny_ckpt, default_recipe(mode), tmp_path / "out", targets=("gemlite",), verbose=False)
    folder = tmp_path / "out" / "gemlite"
    model = load_transformer(folder, dtype=torch.bfloat16)
    reader = PackReader(folder)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 28
    for name, module in layers:
        state = gemlite_state(module)
        assert sorted(state) == sorted(SUFFIXES)
        for suffix in SUFFIXES:
            stored = reader.get(f"{name}.{suffix}")
            assert state[suffix].dtype == stored.dtype and state[suffix].shape == stored.shape, (name, suffix)
            assert torch.equal(state[suffix].view(torch.uint8) if state[suffix].dim() else state[suffix],
                               stored.view(torch.uint8) if stored.dim() else stored), (name, suffix)
