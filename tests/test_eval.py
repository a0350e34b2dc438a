"""`bonsai-quant eval` on the shipped flux2-tiny-digits: quality floor, determinism, grid, inputs and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bonsai_quant import digits, evaluate
from bonsai_quant.cli import main
from bonsai_quant.digits import TextEncoder, model_dir
from bonsai_quant.digits_judge import Judge
from bonsai_quant.evaluate import evaluate as run_eval
from bonsai_quant.evaluate import generate_digits, grid_size, load_for_eval, noise_for, save_grid

SAMPLES = 20  # per digit: 200 images, a few seconds at 4 steps on 2 cores


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.load()


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


@pytest.fixture(scope="module")
def shipped(encoder):
    return load_for_eval(None, encoder)


def _eval_json(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_eval_shipped_model_meets_quality_floor(capsys):
    report = _eval_json(capsys, str(model_dir()), "--samples", str(SAMPLES))
    assert report["kind"] == "full-precision" and report["steps"] == 4 and report["shift"] == 3.0
    assert report["samples_per_digit"] == SAMPLES
    assert report["accuracy"] >= 0.90, report
    assert min(report["per_digit_accuracy"]) >= 0.5, report
    # fidelity: far closer to the real digits than pure noise drawn the same way
    noise_images = torch.stack([digits.latent_to_image(noise_for(d, SAMPLES, 0)) for d in range(10)])
    judge = Judge.load()
    assert report["frechet_distance"] < 0.5 * evaluate.score(noise_images, judge)["frechet_distance"]


def test_default_model_is_the_shipped_one(capsys):
    report = _eval_json(capsys, "--samples", "2", "--steps", "1")
    assert report["model"] == str(model_dir())


def test_eval_is_deterministic(shipped, encoder, judge):
    a, images_a = run_eval(shipped, samples=5, steps=4, seed=3, encoder=encoder, judge=judge)
    b, images_b = run_eval(shipped, samples=5, steps=4, seed=3, encoder=encoder, judge=judge)
    assert torch.equal(images_a, images_b)
    for key in ("accuracy", "per_digit_accuracy", "frechet_distance"):
        assert a[key] == b[key]
    c, images_c = run_eval(shipped, samples=5, steps=4, seed=4, encoder=encoder, judge=judge)
    assert not torch.equal(images_a, images_c)


def test_samples_extend_with_n(shipped, encoder):
    # sample k of a digit depends on (seed, digit, k) only, so a grid of the first samples is stable in N
    assert torch.equal(noise_for(7, 3, 0), noise_for(7, 9, 0)[:3])
    small = generate_digits(shipped.model, encoder, 2, 4)
    large = generate_digits(shipped.model, encoder, 5, 4)
    torch.testing.assert_close(small, large[:, :2], atol=1e-5, rtol=0)


def test_more_steps_run(shipped, encoder, judge):
    report, images = run_eval(shipped, samples=3, steps=8, encoder=encoder, judge=judge)
    assert images.shape == (10, 3, 8, 8) and report["steps"] == 8
    assert 0.0 <= images.min() and images.max() <= 1.0


def test_grid_png(tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "sub" / "grid.png"
    report = _eval_json(capsys, "--samples", "3", "--grid", str(path))
    assert report["grid"] == str(path)
    with Image.open(path) as im:
        assert im.size == grid_size(10, 3) == (4 * 32 + 5 * 2, 10 * 32 + 11 * 2)
        assert im.mode == "L"


def test_grid_pixels(tmp_path):
    from PIL import Image

    images = torch.rand(10, 12, 8, 8)
    size = save_grid(images, tmp_path / "g.png", columns=10)
    assert size == (11 * 32 + 12 * 2, 342)
    with Image.open(tmp_path / "g.png") as im:
        px = torch.from_numpy(np.asarray(im).astype(np.int64))
    # digit 4, sample 2: its tile starts after the label column and two samples; 4x nearest upscale, ink dark
    y, x = 2 + 4 * 34, 2 + 3 * 34
    expected = (255 * (1 - images[4, 2])).round().to(torch.int64)
    assert torch.equal(px[y:y + 32:4, x:x + 32:4], expected)
    assert torch.equal(px[y + 3:y + 32:4, x + 3:x + 32:4], expected)


def test_text_report(capsys):
    assert main(["eval", "--samples", "2", "--steps", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "prompt following (judge accuracy):" in out and "Fréchet distance" in out and "1 steps" in out
    # Before the minute or two of sampling, stderr says what runs (a bar follows on a terminal).
    assert "sampling 20 digits (2 per digit, 1 steps) with " in captured.err
    assert "  20/20 samples, " in captured.err  # not a terminal: a line per chunk of samples instead of a bar
    assert main(["eval", "--samples", "26", "--steps", "1"]) == 0
    lines = [line.split(",")[0] for line in capsys.readouterr().err.splitlines() if "samples, " in line]
    assert lines == ["  250/260 samples", "  260/260 samples"]
    assert main(["eval", "--samples", "2", "--steps", "1", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "sampling" not in err and "samples, " not in err


def test_bench_quality_prints_each_row_as_it_is_measured():
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_quality.py"
    done = subprocess.run([sys.executable, str(tool), "--only", "full precision", "--samples", "1"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    header = lines.index(f"| {'model':<44} | steps | accuracy | Fréchet distance | retention | seconds |")
    row = lines[header + 2]
    assert row.startswith(f"| {'full precision':<44} |     4 | ") and "100.0%" in row
    assert "full precision: preparing" in done.stderr


def test_constants_agree_with_the_library():
    from bonsai_quant.plan import TARGETS

    assert evaluate.SHIFT == digits.SHIFT and evaluate.IMAGE_SIZE == digits.IMAGE_SIZE
    assert evaluate.TARGETS == TARGETS


# ---------------------------------------------------------------- errors

def test_missing_folder(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err


def test_file_not_folder(capsys, tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert main(["eval", str(f)]) == 2
    assert "expected a folder" in capsys.readouterr().err


def test_folder_without_checkpoint(capsys, tmp_path):
    assert main(["eval", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err


def test_wrong_architecture(capsys, tiny_ckpt):
    # the random tiny preset is a valid FLUX.2 checkpoint, but takes 64 channels, not 8x8 digit patches
    assert main(["eval", str(tiny_ckpt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not a FLUX.2 digits model: in_channels is 64" in err


def test_corrupt_checkpoint(capsys, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text((model_dir() / "config.json").read_text())
    data = (model_dir() / "diffusion_pytorch_model.safetensors").read_bytes()
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["eval", str(folder)]) == 2
    assert "error:" in capsys.readouterr().err


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--samples", "0"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["eval", "--fake-quant", "quaternary"])


def test_target_on_plain_checkpoint(capsys):
    assert main(["eval", "--target", "mlx"]) == 2
    assert "no pack" in capsys.readouterr().err


# ---------------------------------------------------------------- fake-quant and packs

def test_fake_quant(encoder, judge):
    fp = load_for_eval(None, encoder)
    q = load_for_eval(None, encoder, fake_quant="binary")
    assert q.kind == "fake-quant" and q.mode == "binary"
    w_fp = fp.model.transformer_blocks[0].attn.to_q.weight
    w_q = q.model.transformer_blocks[0].attn.to_q.weight
    assert not torch.equal(w_fp, w_q)
    # binary: within each group of 128 input weights one magnitude s, with the sign of the source weight
    groups = w_q.reshape(w_q.shape[0], -1, 128)
    assert torch.equal(groups.abs(), groups.abs().amax(-1, keepdim=True).expand_as(groups))
    assert torch.equal(torch.sign(w_q), torch.where(w_fp >= 0, 1.0, -1.0))
    # kept tensors are untouched
    assert torch.equal(fp.model.x_embedder.weight, q.model.x_embedder.weight)
    report, _ = run_eval(q, samples=3, steps=4, encoder=encoder, judge=judge)
    assert 0.0 <= report["accuracy"] <= 1.0 and report["mode"] == "binary" and report["kind"] == "fake-quant"


def test_fake_quant_recipe_file(encoder, tmp_path):
    from bonsai_quant.recipe import default_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(default_recipe("ternary").text)
    q = load_for_eval(None, encoder, recipe_path=recipe)
    assert q.kind == "fake-quant" and q.mode == "ternary"
    w = q.model.single_transformer_blocks[1].attn.to_out.weight.reshape(256, -1, 128)
    assert all(len(torch.unique(g.abs())) <= 2 for g in w[:4].reshape(-1, 128))  # {0, s}


def test_pack_through_runtime(tmp_path, capsys, encoder):
    from bonsai_quant.convert import convert
    from bonsai_quant.recipe import default_recipe

    out = tmp_path / "ternary"
    convert(model_dir(), default_recipe("ternary"), out, verbose=False)
    report = _eval_json(capsys, str(out), "--samples", "3")
    assert report["kind"] == "pack" and report["mode"] == "ternary" and report["target"] == "mlx"
    assert report["model"] == str(out / "mlx")
    report_g = _eval_json(capsys, str(out), "--samples", "3", "--target", "gemlite")
    assert report_g["target"] == "gemlite"
    report_dir = _eval_json(capsys, str(out / "gemlite"), "--samples", "3")
    assert report_dir["accuracy"] == report_g["accuracy"]
    # the pack draws what the fake-quantized model draws (same weights, different kernels)
    fq, _ = run_eval(load_for_eval(None, encoder, fake_quant="ternary"), samples=3, encoder=encoder)
    assert abs(fq["accuracy"] - report["accuracy"]) <= 0.1
    assert main(["eval", str(out), "--fake-quant", "binary"]) == 2
    assert "already a quantized pack" in capsys.readouterr().err
