"""`generate`: a release or pack inside diffusers' Flux2KleinPipeline, on a tiny klein pipeline of random weights
built from diffusers' and transformers' own classes (`bonsai_quant.tiny_pipeline`)."""

from __future__ import annotations

import shutil

import pytest
import torch

from bonsai_quant.cli import main
from bonsai_quant.convert import convert
from bonsai_quant.generate import generate, load_pipeline, run_pipeline
from bonsai_quant.recipe import default_recipe
from bonsai_quant.tiny_pipeline import COMPONENTS_WITHOUT_TRANSFORMER, write_tiny_pipeline

PROMPTS = ["a red fox", "a blue cat at night"]
FAST = dict(steps=2, size=(32, 32), max_text_tokens=16)  # 64 image tokens, 16 text tokens


@pytest.fixture(scope="module")
def tiny_pipe(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "klein-tiny")


@pytest.fixture(scope="module")
def ternary(tmp_path_factory, tiny_pipe):
    out = tmp_path_factory.mktemp("packs") / "tiny-ternary"
    convert(tiny_pipe, default_recipe("ternary"), out, targets=("mlx", "gemlite", "bonsai"), verbose=False)
    return out


def _release_with_components(tmp_path, tiny_pipe, ternary):
    """A release folder as `release --base-pipeline` lays it out: the packs beside model_index.json and the
    pipeline's text encoder, tokenizer, VAE and scheduler."""
    rel = tmp_path / "release"
    shutil.copytree(ternary, rel)
    for name in COMPONENTS_WITHOUT_TRANSFORMER:
        src = tiny_pipe / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, rel / name)
    return rel


def _decoded_dense(model):
    """diffusers' own Flux2Transformer2DModel holding the pack's decoded weights as plain nn.Linear weights."""
    from bonsai_quant.flux2 import build_model
    from bonsai_quant.runtime import PackedLinear

    dense = build_model(dict(model.config))
    state = {}
    for name, module in model.named_modules():
        if isinstance(module, PackedLinear):
            state[f"{name}.weight"] = module.dense(torch.float32)
    state.update({n: p.detach().float() for n, p in model.named_parameters()})
    dense.load_state_dict(state, strict=True)
    return dense.eval()


def test_tiny_pipeline_is_byte_identical_for_a_seed(tmp_path):
    a = write_tiny_pipeline(tmp_path / "a", transformer=False)
    b = write_tiny_pipeline(tmp_path / "b", transformer=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert {f.parts[0] for f in files} == set(COMPONENTS_WITHOUT_TRANSFORMER)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


@pytest.mark.parametrize("target", ["mlx", "gemlite", "bonsai"])
def test_quantized_pipeline_latents_equal_the_dense_pipeline_with_the_decoded_weights(tiny_pipe, ternary, target):
    """The pack's transformer in Flux2KleinPipeline samples what diffusers' own dense transformer does with the
    decoded weights: same text encoder, VAE, scheduler and noise; float32; only the matmul differs (a slice
    of decoded rows against the whole weight)."""
    from diffusers import Flux2KleinPipeline

    pipe, folder, base = load_pipeline(ternary, base_pipeline=tiny_pipe, target=target, device="cpu",
                                       progress=False)
    assert folder == ternary / target and base == tiny_pipe
    got = run_pipeline(pipe, PROMPTS, 2, 7, (32, 32), output_type="latent", max_sequence_length=16)
    dense = Flux2KleinPipeline.from_pretrained(str(tiny_pipe), transformer=_decoded_dense(pipe.transformer))
    dense.set_progress_bar_config(disable=True)
    want = run_pipeline(dense, PROMPTS, 2, 7, (32, 32), output_type="latent", max_sequence_length=16)
    assert got.shape == want.shape == (2, 16, 16, 16) and got.dtype == torch.float32
    assert torch.isfinite(got).all()
    # Summation order only: measured 0 (bit-identical) on this model; the bound leaves room for BLAS blocking.
    err = ((got - want).norm() / want.norm()).item()
    assert err <= 1e-6, err
    # ... and the source's own dense transformer gives other latents: the test sees the quantization.
    source = Flux2KleinPipeline.from_pretrained(str(tiny_pipe))
    source.set_progress_bar_config(disable=True)
    ref = run_pipeline(source, PROMPTS, 2, 7, (32, 32), output_type="latent", max_sequence_length=16)
    assert ((ref - want).norm() / want.norm()).item() > 1e-3


def test_generate_writes_an_image_from_a_release(tmp_path, tiny_pipe, ternary, capsys):
    from PIL import Image

    rel = _release_with_components(tmp_path, tiny_pipe, ternary)
    png = tmp_path / "scratch" / "fox.png"
    assert main(["generate", str(rel), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--steps", "2",
                 "--size", "32", "--max-text-tokens", "16", "--out", str(png), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"transformer: {rel / 'mlx'}, runtime: reference on cpu; pipeline components from {rel}" in captured.err
    assert captured.out.strip() == (f"wrote {png}: 2 image(s) of 32x32 (2 steps, seed 0; runtime reference on "
                                    "cpu)")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (64, 32) and im.mode == "RGB"
        pixels = torch.tensor(list(im.get_flattened_data()), dtype=torch.float32)
    assert pixels.std() > 1.0  # not a blank canvas
    assert [p.name for p in png.parent.iterdir()] == ["fox.png"]  # no temporaries left
    # The same through the Python API, image by image: image i depends on seed + i only.
    one = generate(rel, [PROMPTS[1]], seed=1, progress=False, **FAST)
    two = generate(rel, PROMPTS, seed=0, progress=False, **FAST)
    assert list(one.images[0].get_flattened_data()) == list(two.images[1].get_flattened_data())
    assert two.runtime == "reference" and two.pack == rel / "mlx" and two.base_pipeline == rel


def test_generate_takes_a_pack_inside_a_release_and_a_base_pipeline_flag(tmp_path, tiny_pipe, ternary):
    rel = _release_with_components(tmp_path, tiny_pipe, ternary)
    inner = generate(rel / "gemlite", PROMPTS[:1], progress=False, **FAST)
    assert inner.base_pipeline == rel and inner.pack == rel / "gemlite"
    flagged = generate(ternary / "gemlite", PROMPTS[:1], base_pipeline=tiny_pipe, progress=False, **FAST)
    assert list(inner.images[0].get_flattened_data()) == list(flagged.images[0].get_flattened_data())


def test_generate_errors_name_what_is_missing(tmp_path, tiny_pipe, ternary, capsys):
    png = tmp_path / "x.png"
    assert main(["generate", str(ternary), "--prompt", "a fox", "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ternary}: holds no pipeline components (model_index.json")
    assert "--base-pipeline DIR" in err
    broken = tmp_path / "broken"
    shutil.copytree(tiny_pipe, broken, ignore=shutil.ignore_patterns("vae"))
    assert main(["generate", str(ternary), "--base-pipeline", str(broken), "--prompt", "a fox",
                 "--out", str(png)]) == 2
    assert f"error: {broken}: the pipeline lacks vae" in capsys.readouterr().err
    assert main(["generate", str(ternary), "--base-pipeline", str(tiny_pipe), "--prompt", "a fox", "--size", "30",
                 "--out", str(png), "--quiet"]) == 2
    assert "--size 30x30: width and height must be multiples of 4" in capsys.readouterr().err
    assert main(["generate", str(ternary), "--base-pipeline", str(tiny_pipe), "--out", str(png)]) == 2
    assert "give at least one --prompt" in capsys.readouterr().err
    png.write_bytes(b"mine")
    assert main(["generate", str(ternary), "--base-pipeline", str(tiny_pipe), "--prompt", "a fox",
                 "--out", str(png)]) == 2
    assert f"error: {png}: already exists; pass --force" in capsys.readouterr().err
    assert png.read_bytes() == b"mine"
    assert not list(tmp_path.glob(".x.png*"))


def test_generate_draws_the_digits_model_with_its_prompts(tmp_path, capsys):
    """A digits pack needs no pipeline: its own text embedding and klein's sampler, exactly as `eval` samples."""
    from PIL import Image

    from bonsai_quant.digits import TextEncoder, model_dir
    from bonsai_quant.digits import generate as digits_generate
    from bonsai_quant.digits_judge import Judge
    from bonsai_quant.runtime import load_transformer

    pack = tmp_path / "digits-ternary"
    convert(model_dir(), default_recipe("ternary"), pack, targets=("mlx",), verbose=False)
    png = tmp_path / "digits.png"
    assert main(["generate", str(pack), "--out", str(png), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote {png}: 10 image(s) of 64x64 (4 steps, seed 0; runtime "
                                               "reference on cpu)")
    with Image.open(png) as im:
        assert im.size == (640, 64)
        ink = 1 - torch.tensor(list(im.convert("L").get_flattened_data()), dtype=torch.float32).reshape(64, 640) / 255
    # 8x8 pixels each, upscaled by 8: every 8x8 block is one pixel.
    digits = ink.reshape(8, 8, 10, 8, 8).permute(2, 0, 3, 1, 4)[..., 0, 0]
    noise = torch.stack([torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(10)])
    want = digits_generate(load_transformer(pack), TextEncoder.load(), list(range(10)), noise, 4)
    assert torch.allclose(digits, want, atol=0.51 / 255)
    pred, _ = Judge.load().classify(want)
    assert int((pred == torch.arange(10)).sum()) >= 8  # the ternary pack keeps ~90% accuracy at 4 steps
    assert main(["generate", str(pack), "--prompt", "7", "--prompt", "a handwritten digit 3", "--out",
                 str(tmp_path / "two.png"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["generate", str(pack), "--prompt", "a red fox", "--out", str(tmp_path / "bad.png")]) == 2
    assert "unknown word 'red'" in capsys.readouterr().err
    assert main(["generate", str(pack), "--size", "64", "--out", str(tmp_path / "bad.png")]) == 2
    assert "the digits model draws 8x8 images; --size does not apply" in capsys.readouterr().err
