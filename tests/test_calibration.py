"""Calibration sets (sampling, storage, loading), hook statistics, and calibrated conversion end to end."""

import json
from pathlib import Path

import pytest
import torch

from bonsai_quant.calibration import (
    CalibrationError,
    calibrate,
    load_calibration,
    load_model,
    noise_seed,
    resolve_calibration,
)
from bonsai_quant.cli import main
from bonsai_quant.digits import img_ids, model_dir, sigma_schedule, txt_ids
from bonsai_quant.recipe import RecipeError, default_recipe, parse_recipe
from bonsai_quant.stats import BlockStats, StatsCollector, collect_stats

SHIPPED_SET = Path(__file__).resolve().parents[1] / "calibration" / "flux2-tiny-digits"


@pytest.fixture(scope="module")
def digits_model():
    return load_model(model_dir())


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """Two digit prompts, 2 trajectories each, 3 steps: built by the code under test."""
    prompts = tmp_path_factory.mktemp("p") / "prompts.txt"
    prompts.write_text("# two digits\na handwritten digit 3\n\na handwritten digit 8\n")
    return calibrate(None, tmp_path_factory.mktemp("sets") / "small", prompts_path=prompts, samples_per_prompt=2,
                     steps=3, seed=7)


def test_set_layout_and_metadata(small_set):
    m = small_set.meta
    assert (m["trajectories"], m["steps"], m["transformer_calls"], m["prompt_count"]) == (4, 3, 12, 2)
    assert (m["in_channels"], m["joint_attention_dim"], m["image_tokens"], m["text_tokens"]) == (4, 128, 16, 8)
    row = small_set.dataset[0]
    assert row["prompt"] == "a handwritten digit 3"
    assert row["latents"].shape == (3, 16, 4) and row["encoder_hidden_states"].shape == (8, 128)
    assert torch.equal(row["img_ids"], img_ids()) and torch.equal(row["txt_ids"], txt_ids())
    assert torch.allclose(row["timesteps"].double(), sigma_schedule(3)[:-1])


def test_trajectories_are_the_samplers_inputs(small_set, digits_model):
    """Step 0 is the seeded noise; each later latent is one Euler step of the full-precision model from the last."""
    rows = small_set.dataset[:]
    sigmas = sigma_schedule(3)
    for r in range(4):
        noise = torch.randn(16, 4, generator=torch.Generator().manual_seed(noise_seed(7, r // 2, r % 2)))
        assert torch.equal(rows["latents"][r, 0], noise)
        x = rows["latents"][r, 0][None]
        for s in range(2):
            v = digits_model(hidden_states=x, encoder_hidden_states=rows["encoder_hidden_states"][r][None],
                             timestep=torch.tensor([float(sigmas[s])]), img_ids=img_ids(), txt_ids=txt_ids(),
                             return_dict=False)[0]
            x = x + float(sigmas[s + 1] - sigmas[s]) * v
            assert torch.allclose(x[0], rows["latents"][r, s + 1], atol=1e-5)


def test_batches_flatten_trajectories_into_calls(small_set):
    batches = list(small_set.batches(batch_size=6))
    assert [len(b["timestep"]) for b in batches] == [6, 6]  # 2 trajectories x 3 steps per batch
    b = batches[0]
    assert b["hidden_states"].shape == (6, 16, 4) and b["encoder_hidden_states"].shape == (6, 8, 128)
    row = small_set.dataset[0]
    assert torch.equal(b["hidden_states"][1], row["latents"][1])
    assert torch.equal(b["encoder_hidden_states"][2], row["encoder_hidden_states"])
    assert sum(len(b["timestep"]) for b in small_set.batches(batch_size=64, max_calls=5)) == 5


def test_shipped_set_is_small_and_made_by_the_shipped_model():
    calib = load_calibration(SHIPPED_SET)
    size = sum(f.stat().st_size for f in SHIPPED_SET.iterdir())
    assert size < 3_000_000
    assert calib.meta["model_config"]["num_layers"] == json.loads((model_dir() / "config.json").read_text())["num_layers"]
    # The first trajectory of each of two digits, re-sampled now, matches the shipped set: it is not stale.
    rows = calib.dataset[:]
    per_prompt = calib.meta["samples_per_prompt"]
    for digit in (0, 7):
        from bonsai_quant.calibration import sample_trajectories
        from bonsai_quant.digits import TextEncoder, prompt

        model = load_model(model_dir())
        noise = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(
            noise_seed(calib.meta["seed"], digit, 0)))
        text = TextEncoder.load().encode([prompt(digit)])
        latents, _ = sample_trajectories(model, text, txt_ids(), img_ids(), noise, calib.steps, calib.meta["shift"])
        assert rows["prompt"][digit * per_prompt] == prompt(digit)
        assert torch.allclose(latents[0], rows["latents"][digit * per_prompt], atol=1e-4)


def test_loading_errors_name_the_folder(tmp_path, small_set):
    with pytest.raises(CalibrationError, match=r"nope: no such calibration set folder"):
        load_calibration(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match=r"empty/calibration\.json: missing"):
        load_calibration(tmp_path / "empty")
    (tmp_path / "empty" / "calibration.json").write_text("{bad")
    with pytest.raises(CalibrationError, match=r"calibration\.json: not valid JSON"):
        load_calibration(tmp_path / "empty")
    (tmp_path / "empty" / "calibration.json").write_text('{"format_version": 9}')
    with pytest.raises(CalibrationError, match=r"format_version 9"):
        load_calibration(tmp_path / "empty")
    (tmp_path / "empty" / "calibration.json").write_text('{"format_version": 1}')
    with pytest.raises(CalibrationError, match=r"empty: cannot read the calibration data"):
        load_calibration(tmp_path / "empty")
    with pytest.raises(CalibrationError, match=r"does not fit m: in_channels is 64, the set has 4"):
        small_set.check_model({"in_channels": 64, "joint_attention_dim": 128}, "m")


def test_generic_path_with_a_prompt_file_and_synthetic_text(tmp_path, tiny_ckpt):
    """The klein path (prompt file, text encoder, image grid) on the tiny random preset: 64 channels, 256-dim text."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na lighthouse at dusk\n")
    calib = calibrate(tiny_ckpt, tmp_path / "set", prompts_path=prompts, synthetic_text=True, image_size=64,
                      max_text_tokens=6, steps=2)
    assert (calib.meta["image_tokens"], calib.meta["text_tokens"], calib.meta["store_dtype"]) == (16, 6, "float16")
    assert calib.dataset[0]["latents"].shape == (2, 16, 64)
    assert calib.dataset[1]["encoder_hidden_states"].shape == (6, 256)
    assert "synthetic" in calib.meta["text_encoder"]


def test_calibrate_cli_errors(tmp_path, tiny_ckpt, capsys):
    assert main(["calibrate", "--model", str(tiny_ckpt), "--out", str(tmp_path / "x")]) == 2
    assert "is not the digits model, so calibration needs --prompts FILE" in capsys.readouterr().err
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert main(["calibrate", "--model", str(tiny_ckpt), "--out", str(tmp_path / "x"), "--prompts", str(prompts)]) == 2
    assert "calibration needs its text encoder: --text-encoder PATH" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert main(["calibrate", "--out", str(tmp_path / "exists")]) == 2
    assert "exists: already exists; pass --force" in capsys.readouterr().err
    prompts.write_text("# only a comment\n")
    assert main(["calibrate", "--out", str(tmp_path / "y"), "--prompts", str(prompts)]) == 2
    assert "p.txt: holds no prompts" in capsys.readouterr().err
    prompts.write_text("a handwritten zebra\n")
    assert main(["calibrate", "--out", str(tmp_path / "y"), "--prompts", str(prompts)]) == 2
    assert "unknown word 'zebra'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# -- statistics ------------------------------------------------------------------------------------------------

def test_hooks_gather_means_of_squares_and_of_outer_products():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    model.config = {}
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 7, 5, generator=g), torch.randn(2, 7, 5, generator=g)]
    with StatsCollector(model, {"0.weight": "hessian", "2.weight": "diag"}) as collector:
        for x in xs:
            model(x)
    stats = collector.result()
    flat = torch.cat([x.reshape(-1, 5) for x in xs]).double()
    assert stats["0.weight"].rows == 42
    assert torch.allclose(stats["0.weight"].hessian, flat.T @ flat / 42)
    assert torch.allclose(stats["0.weight"].diag, flat.square().mean(0))
    hidden = torch.relu(model[0](torch.cat([x.reshape(-1, 5) for x in xs]))).double()
    assert stats["2.weight"].hessian is None
    assert torch.allclose(stats["2.weight"].diag, hidden.square().mean(0), atol=1e-6)
    model(xs[0])  # hooks are gone after the context
    assert collector.result()["0.weight"].rows == 42


def test_hooks_refuse_a_tensor_that_is_no_linear():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3))
    with pytest.raises(Exception, match=r"1\.weight: no Linear module '1'"):
        StatsCollector(model, {"1.weight": "diag"})


def test_block_statistics_equal_whole_model_statistics(digits_model, small_set):
    wanted = {"transformer_blocks.0.attn.to_q.weight": "hessian", "transformer_blocks.0.ff.linear_out.weight": "diag",
              "single_transformer_blocks.1.attn.to_out.weight": "hessian"}
    whole = collect_stats(digits_model, small_set, wanted)
    blocks = BlockStats(digits_model, small_set, wanted)
    for name in wanted:
        got = blocks.get(name)
        assert got.rows == whole[name].rows
        assert torch.allclose(got.diag, whole[name].diag)
        assert (got.hessian is None) == (whole[name].hessian is None)
    assert blocks.passes == 2  # one pass per block, not per tensor
    assert blocks.get("proj_out.weight") is None
    # 12 calls x 16 image tokens reach the image-stream linears
    assert whole["transformer_blocks.0.attn.to_q.weight"].rows == 12 * 16


# -- recipes and conversion ------------------------------------------------------------------------------------

def test_recipe_calibration_key(tmp_path):
    r = parse_recipe("format_version: 1\nmode: binary\nsolver: gptq\ncalibration: sets/a\n", str(tmp_path / "r.yaml"))
    assert r.calibration_path() == tmp_path / "sets" / "a" and r.calibration_line == 4
    assert r.to_dict()["calibration"] == "sets/a" and "calibration" not in default_recipe("binary").to_dict()
    with pytest.raises(RecipeError, match=r"r\.yaml:3: calibration: expected a string, got integer 3"):
        parse_recipe("format_version: 1\nmode: binary\ncalibration: 3\n", "r.yaml")
    with pytest.raises(CalibrationError, match=r"r\.yaml:4: calibration: .*sets/a: no such calibration set folder"):
        resolve_calibration(None, r, {"x.weight": "hessian"}, {}, "m")


def test_convert_with_a_calibrated_solver(tmp_path, small_set, digits_model, capsys):
    from safetensors.torch import load_file

    from bonsai_quant.fakequant import fake_quantize_model
    from bonsai_quant.packing import mlx
    from bonsai_quant.quantizers import dequantize

    recipe = tmp_path / "r.yaml"
    recipe.write_text("format_version: 1\nmode: ternary\nsolver: gptq\ntargets: [mlx]\nrules:\n"
                      "  - quantize: transformer_blocks.0.attn.to_q\n    solver: act-aware\n")
    args = ["convert", "--model", str(model_dir()), "--recipe", str(recipe), "--quiet"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "no calibration set was given; valid: --calib SET" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "a"), "--calib", str(small_set.path)]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--calib", str(small_set.path)]) == 0
    a, b = (tmp_path / p / "mlx" / "diffusion_pytorch_model.safetensors" for p in "ab")
    assert a.read_bytes() == b.read_bytes()  # calibrated solvers are deterministic too
    qc = json.loads((tmp_path / "a" / "mlx" / "quantization_config.json").read_text())
    assert qc["calibration"]["set"] == "small" and qc["calibration"]["tensors"] == {"diag": 1, "hessian": 27}
    assert qc["quantized"]["transformer_blocks.0.attn.to_q"]["solver"] == "act-aware"
    # The pack holds exactly what fake quantization with the same set computes.
    from bonsai_quant.recipe import load_recipe

    model = load_model(model_dir())
    fake_quantize_model(model, load_recipe(recipe), calib=small_set)
    packed = load_file(str(a))
    params = dict(model.named_parameters())
    for module in ("transformer_blocks.0.attn.to_q", "single_transformer_blocks.1.attn.to_out"):
        tensors = {k.removeprefix(module + "."): v for k, v in packed.items() if k.startswith(module + ".")}
        codes, scales = mlx.unpack(tensors, "ternary", 128)
        assert torch.equal(dequantize(codes, scales, 128), params[module + ".weight"].detach())
    # verify --source re-runs the calibrated solvers, given the same set, and says what is missing otherwise.
    capsys.readouterr()
    pack = tmp_path / "a" / "mlx"
    assert main(["verify", str(pack), "--source", str(model_dir())]) == 1
    out = capsys.readouterr().out
    assert "28 layers were quantized with calibrated solvers (act-aware, gptq); re-quantizing them needs the " \
           "calibration set the pack records ('small', sha256" in out and "--calib SET" in out
    assert main(["verify", str(pack), "--source", str(model_dir()), "--calib", str(small_set.path)]) == 0
    assert f"under the recorded recipe with calibration set {small_set.path}" in capsys.readouterr().out
    assert main(["verify", str(pack), "--source", str(model_dir()), "--calib", str(SHIPPED_SET)]) == 1
    assert "not the calibration set this pack was made with" in capsys.readouterr().out


def test_convert_refuses_a_set_made_for_another_model(tmp_path, tiny_ckpt, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("format_version: 1\nmode: binary\nsolver: act-aware\n")
    assert main(["convert", "--model", str(tiny_ckpt), "--recipe", str(recipe), "--calib", str(SHIPPED_SET),
                 "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "flux2-tiny-digits: calibration set does not fit" in err and "in_channels is 64, the set has 4" in err
    assert not (tmp_path / "o").exists()


def _tiny_qwen3(folder: Path, hidden: int) -> Path:
    """A klein-shaped text encoder folder (text_encoder/ + tokenizer/): a random 28-layer Qwen3, so layers 9, 18
    and 27 exist as in klein's, and a word-level tokenizer with a chat template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<unk>", "a", "red", "fox", "lighthouse", "at", "dusk"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    fast.save_pretrained(folder / "tokenizer")
    config = transformers.Qwen3Config(vocab_size=len(words), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=28, num_attention_heads=2, num_key_value_heads=1,
                                      head_dim=hidden // 2, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(folder / "text_encoder")
    return folder


def test_calibrate_with_a_qwen3_text_encoder_stores_the_klein_pipeline_embeddings(tmp_path, tiny_config):
    """The real-encoder path: text conditioning is exactly what diffusers' Flux2KleinPipeline computes (Qwen3
    hidden states of layers 9, 18, 27 stacked per token), through transformers."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    from bonsai_quant.synthetic import write_checkpoint

    encoder_dir = _tiny_qwen3(tmp_path / "qwen3", hidden=32)
    model = write_checkpoint({**tiny_config, "joint_attention_dim": 96}, tmp_path / "flux", seed=0)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\na lighthouse at dusk\n")
    assert main(["calibrate", "--model", str(model), "--out", str(tmp_path / "set"), "--prompts", str(prompts),
                 "--text-encoder", str(encoder_dir), "--image-size", "64", "--max-text-tokens", "6",
                 "--steps", "2"]) == 0
    calib = load_calibration(tmp_path / "set")
    assert calib.meta["text_encoder"] == f"Qwen3 ({encoder_dir})"
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir / "tokenizer"))
    encoder = Qwen3ForCausalLM.from_pretrained(str(encoder_dir / "text_encoder"), dtype=torch.bfloat16)
    for i, p in enumerate(["a red fox", "a lighthouse at dusk"]):
        want = Flux2KleinPipeline._get_qwen3_prompt_embeds(encoder, tokenizer, [p], dtype=torch.float32,
                                                           device="cpu", max_sequence_length=6)[0]
        got = calib.dataset[i]["encoder_hidden_states"]
        assert got.shape == (6, 96) and calib.dataset[i]["prompt"] == p
        assert torch.equal(got, want.to(got.dtype))


def test_a_remade_set_has_the_same_fingerprint_and_passes_verify(tmp_path, small_set, capsys):
    """Byte-identical data made again (another folder, another prompt-file path, other wall-clock seconds) is
    the same set; a set of other settings is not."""
    prompts = tmp_path / "elsewhere.txt"
    prompts.write_text("a handwritten digit 3\na handwritten digit 8\n")
    again = calibrate(None, tmp_path / "again", prompts_path=prompts, samples_per_prompt=2, steps=3, seed=7)
    assert again.meta["prompts"] != small_set.meta["prompts"]
    for a, b in zip(sorted(small_set.path.glob("*.arrow")), sorted(again.path.glob("*.arrow")), strict=True):
        assert a.read_bytes() == b.read_bytes()
    assert again.fingerprint() == small_set.fingerprint()
    meta = json.loads((again.path / "calibration.json").read_text())
    meta["seconds"] = meta["seconds"] + 1000.0
    (again.path / "calibration.json").write_text(json.dumps(meta, indent=2) + "\n")
    assert load_calibration(again.path).fingerprint() == small_set.fingerprint()
    meta["shift"] = 2.5  # a defining setting: another set
    (again.path / "calibration.json").write_text(json.dumps(meta, indent=2) + "\n")
    assert load_calibration(again.path).fingerprint() != small_set.fingerprint()
    meta["shift"] = small_set.meta["shift"]
    (again.path / "calibration.json").write_text(json.dumps(meta, indent=2) + "\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("format_version: 1\nmode: ternary\nsolver: act-aware\ntargets: [mlx]\n")
    assert main(["convert", "--model", str(model_dir()), "--recipe", str(recipe), "--quiet", "--out",
                 str(tmp_path / "p"), "--calib", str(small_set.path)]) == 0
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "p" / "mlx"), "--source", str(model_dir()), "--calib",
                 str(again.path)]) == 0
    assert f"under the recorded recipe with calibration set {again.path}" in capsys.readouterr().out
