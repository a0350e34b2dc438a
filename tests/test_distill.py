"""bonsai-quant distill: the straight-through student, the grid solver, training, resume, export, processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bonsai_quant.cli import main
from bonsai_quant.distill.inputs import TrajectoryInputs, process_slice
from bonsai_quant.distill.settings import DistillSettings
from bonsai_quant.distill.student import FakeQuantLinear
from bonsai_quant.errors import BonsaiError
from bonsai_quant.quantizers import dequantize, quantize
from bonsai_quant.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "calibration" / "flux2-tiny-digits"
FAST = ["--calib", str(CALIB), "--batch-size", "16", "--quiet"]


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


# ---------------------------------------------------------------- student


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_student_forward_is_exactly_the_quantized_weight(mode):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 8)
    q = quantize(linear.weight.detach(), mode, 128, torch.float16, "optimal" if mode == "ternary" else "absmean")
    layer = FakeQuantLinear.from_quantized(linear, q.codes, q.scales, mode, 128)
    codes, scales = layer.quantized()
    assert torch.equal(codes, q.codes) and torch.equal(scales, q.scales)
    x = torch.randn(5, 256)
    want = F.linear(x, dequantize(q.codes, q.scales, 128), linear.bias)
    assert torch.equal(layer(x), want)


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_student_gradients_are_straight_through(mode):
    torch.manual_seed(1)
    linear = torch.nn.Linear(128, 4)
    q = quantize(linear.weight.detach(), mode, 128, torch.float16, "optimal" if mode == "ternary" else "absmean")
    layer = FakeQuantLinear.from_quantized(linear, q.codes, q.scales, mode, 128)
    x = torch.randn(3, 7, 128)
    layer(x).square().sum().backward()
    # Reference: the same loss with the quantized weight as an ordinary leaf tensor.
    w = dequantize(q.codes, q.scales, 128).requires_grad_()
    b = linear.bias.detach().clone().requires_grad_()
    F.linear(x, w, b).square().sum().backward()
    torch.testing.assert_close(layer.weight.grad, w.grad)
    torch.testing.assert_close(layer.scales.grad, (w.grad * q.codes.float()).reshape(4, 1, 128).sum(-1))
    torch.testing.assert_close(layer.bias.grad, b.grad)


def test_student_codes_flip_when_the_latent_crosses_its_cell():
    layer = FakeQuantLinear(torch.tensor([[0.2, -0.2, 0.04, -0.06] * 32]), torch.tensor([[0.1]]), None,
                            "ternary", 128, torch.float16)
    codes, scales = layer.quantized()
    assert codes[0, :4].tolist() == [1, -1, 0, -1]  # |w| / s = 2, 2, 0.4, 0.6
    assert scales.dtype == torch.float16 and scales.item() == torch.tensor(0.1).half().item()


# ---------------------------------------------------------------- grid solver


@pytest.mark.parametrize("mode", ["binary", "ternary"])
def test_grid_solver_recovers_codes_and_scales_exactly(mode):
    torch.manual_seed(2)
    q = quantize(torch.randn(16, 256), mode, 128, torch.float16, "absmean" if mode == "binary" else "optimal")
    again = quantize(dequantize(q.codes, q.scales, 128), mode, 128, torch.float16, "grid", name="w")
    assert torch.equal(again.codes, q.codes) and torch.equal(again.scales, q.scales) and again.rel_error == 0.0


def test_grid_solver_refuses_weights_off_the_grid():
    with pytest.raises(BonsaiError, match=r"blocks\.0\.w: solver 'grid' needs weights already on a ternary grid"):
        quantize(torch.randn(4, 128), "ternary", 128, torch.float16, "grid", name="blocks.0.w")


# ---------------------------------------------------------------- settings and inputs


def test_recipe_distill_section_sets_the_defaults_the_cli_overrides():
    recipe = parse_recipe("format_version: 1\nmode: binary\ndistill:\n  steps: 12\n  lr: 1e-4\n  train_kept: false\n")
    settings = DistillSettings().updated(**recipe.distill).updated(steps=3, lr=None)
    assert (settings.steps, settings.lr, settings.train_kept) == (3, 1e-4, False)
    assert recipe.to_dict()["distill"] == {"steps": 12, "lr": 1e-4, "train_kept": False}


@pytest.mark.parametrize("text, message", [
    ("distill:\n  stepz: 3", "<string>:4: distill.stepz: unknown key (did you mean 'steps'?)"),
    ("distill:\n  steps: 0", "<string>:4: distill.steps: must be at least 1, got 0; valid: a positive integer"),
    ("distill:\n  lr: fast", "<string>:4: distill.lr: expected a number, got string 'fast'"),
    ("distill:\n  train_kept: 1", "<string>:4: distill.train_kept: expected true or false, got integer 1"),
    ("distill:\n  inputs: noise", "<string>:4: distill.inputs: unknown input kind 'noise'; valid: continuous, schedule"),
])
def test_recipe_distill_section_errors_name_the_line_and_key(text, message):
    with pytest.raises(BonsaiError) as e:
        parse_recipe("format_version: 1\nmode: binary\n" + text)
    assert str(e.value).startswith(message)


def test_batches_do_not_depend_on_the_number_of_processes():
    from bonsai_quant.calibration import load_calibration

    inputs = TrajectoryInputs(load_calibration(CALIB))
    whole = inputs.batch(0, 7, 8, process_slice(8, 0, 1))
    halves = [inputs.batch(0, 7, 8, process_slice(8, i, 2)) for i in range(2)]
    for key in ("hidden_states", "timestep", "encoder_hidden_states"):
        assert torch.equal(whole[key], torch.cat([h[key] for h in halves]))
    # Continuous inputs lie on the stored Euler polyline: between two stored steps of one trajectory.
    assert whole["timestep"].min() > 0 and whole["timestep"].max() <= 1
    with pytest.raises(BonsaiError, match="batch_size 9 does not split evenly over 2 processes; valid: a multiple of 2"):
        process_slice(9, 0, 2)


# ---------------------------------------------------------------- training and export


@pytest.fixture(scope="module")
def distilled(tmp_path_factory):
    """A short ternary distillation with a quality check at the end and the grid checkpoint saved."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("distill") / "tiny-ternary"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert run_cli("distill", "--mode", "ternary", "--out", out, "--steps", "12", "--eval-every", "5",
                       "--eval-samples", "4", "--save-checkpoint", *FAST) == 0
    (out.parent / "stdout.txt").write_text(printed.getvalue())
    return out


def test_distill_lowers_the_loss_and_records_its_training(distilled):
    qc = json.loads((distilled / "mlx" / "quantization_config.json").read_text())
    record = qc["distill"]
    assert record["loss"]["last"] < 0.5 * record["loss"]["first"]
    assert record["settings"]["steps"] == 12 and record["settings"]["batch_size"] == 16
    assert record["init_solvers"] == {"optimal": 28}
    assert record["recipe"]["name"] == "bonsai-ternary" and "keep: x_embedder" in record["recipe_yaml"]
    assert record["calibration"]["set"] == "flux2-tiny-digits" and record["processes"] == 1
    assert {d["solver"] for d in qc["quantized"].values()} == {"grid"}
    log = json.loads((distilled / "distill.json").read_text())
    assert [h["step"] for h in log["history"] if "loss" in h] == list(range(1, 13))
    # Evaluated every 5 steps and at the end: the score reported is the final student's, the packs' own.
    assert [h["step"] for h in log["history"] if "accuracy" in h] == [0, 5, 10, 12]
    assert record["quality"]["step"] == 12 and record["quality"]["samples_per_digit"] == 4
    q = record["quality"]
    assert (f"quality of the exported packs (step 12, 4 samples per digit, 4 steps): accuracy {q['accuracy']:.3f}, "
            f"FD {q['frechet_distance']:.1f}") in (distilled.parent / "stdout.txt").read_text()
    assert not (distilled.parent / "tiny-ternary.distill-state").exists()  # spent once the packs exist


def test_distilled_packs_pass_verify_also_against_the_saved_checkpoint(distilled, capsys):
    assert run_cli("verify", distilled) == 0
    assert run_cli("verify", distilled / "mlx", "--source", distilled / "checkpoint") == 0
    assert "verify: PASS" in capsys.readouterr().out


def test_release_from_the_saved_checkpoint_and_grid_recipe_gives_the_same_packs(distilled, tmp_path):
    assert run_cli("release", "--model", distilled / "checkpoint", "--recipe", distilled / "recipe.yaml",
                   "--out", tmp_path / "rel", "--quiet") == 0
    from bonsai_quant.packing.folders import weights_name
    from bonsai_quant.release import FOLDERS

    for target in ("mlx", "gemlite"):
        assert (tmp_path / "rel" / FOLDERS[target] / weights_name(target)).read_bytes() == \
            (distilled / target / weights_name(target)).read_bytes()


def test_distilled_pack_scores_what_the_student_scored(distilled):
    from bonsai_quant.digits import TextEncoder
    from bonsai_quant.evaluate import evaluate, load_for_eval

    student = json.loads((distilled / "distill.json").read_text())["record"]["quality"]
    report, _ = evaluate(load_for_eval(distilled, TextEncoder.load(), target="mlx"), samples=4)
    assert report["accuracy"] == student["accuracy"]
    assert report["frechet_distance"] == pytest.approx(student["frechet_distance"], rel=1e-9)


def test_distill_refuses_to_overwrite_output_or_state(distilled, tmp_path, capsys):
    assert run_cli("distill", "--out", distilled, "--steps", "1", *FAST) == 2
    assert f"error: {distilled}: already exists; pass --force to replace it" in capsys.readouterr().err
    state = tmp_path / "x.distill-state" / "step-0000005"
    state.mkdir(parents=True)
    assert run_cli("distill", "--out", tmp_path / "x", "--steps", "1", *FAST) == 2
    err = capsys.readouterr().err
    assert "x.distill-state: holds checkpoints of an earlier run (last: step-0000005); valid: --resume" in err
    assert not (tmp_path / "x").exists()


def test_distill_without_calibration_says_what_to_give(tmp_path, capsys):
    assert run_cli("distill", "--out", tmp_path / "x", "--steps", "1", "--quiet") == 2
    assert "distill needs a calibration set" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "bonsai_quant.cli", "distill", *map(str, args)]


def _pack_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "mlx" / "diffusion_pytorch_model.safetensors"))


def test_a_killed_run_resumes_and_finishes_with_the_uninterrupted_result(tmp_path):
    common = ["--mode", "binary", "--steps", "16", "--checkpoint-every", "2", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli("--out", tmp_path / "straight", *common), check=True, env=env)

    killed = subprocess.Popen(_cli("--out", tmp_path / "killed", *common), env=env)
    state = tmp_path / "killed.distill-state"
    deadline = time.monotonic() + 300
    while not (state / "step-0000006").exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed").exists()  # nothing half-written
    saved = sorted(p.name for p in state.glob("step-*"))
    assert saved and saved[-1] >= "step-0000006"

    result = subprocess.run(_cli("--out", tmp_path / "killed", "--resume", *common), env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    a, b = _pack_tensors(tmp_path / "straight"), _pack_tensors(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((tmp_path / "killed" / "distill.json").read_text())
    assert log["resumed_at_step"] >= 6 and len([h for h in log["history"] if "loss" in h]) == 16


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path, capsys):
    out = tmp_path / "x"
    common = ["--mode", "binary", "--checkpoint-every", "1", "--keep-state", *FAST]
    assert run_cli("distill", "--out", out, "--steps", "2", *common) == 0
    assert run_cli("distill", "--out", tmp_path / "y", "--state-dir", tmp_path / "x.distill-state", "--resume",
                   "--steps", "3", *common) == 2
    assert "is from a run with other settings; valid: resume with the same" in capsys.readouterr().err


def test_two_processes_through_accelerate_launch_match_one(tmp_path):
    common = ["--mode", "binary", "--steps", "6", "--checkpoint-every", "100", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cli("--out", tmp_path / "one", *common), check=True, env=env)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "bonsai_quant.cli", "distill", "--out", str(tmp_path / "two"), *common]
    result = subprocess.run(launch, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    one, two = (json.loads((tmp_path / n / "mlx" / "quantization_config.json").read_text())["distill"]
                for n in ("one", "two"))
    assert two["processes"] == 2
    assert two["loss"]["last"] == pytest.approx(one["loss"]["last"], rel=1e-4)
    a, b = _pack_tensors(tmp_path / "one"), _pack_tensors(tmp_path / "two")
    for name in a:
        if name.endswith(".weight") and a[name].dtype == torch.uint32:  # packed codes: nearly all equal
            assert (a[name] != b[name]).float().mean() < 1e-3, name
        else:  # scales, biases, kept tensors: equal up to a few 16-bit ulps (summation order across processes)
            torch.testing.assert_close(a[name].float(), b[name].float(), rtol=2e-3, atol=1e-4)


def test_data_loss_adds_flow_matching_on_the_shipped_real_digits(tmp_path):
    from bonsai_quant.digits import TextEncoder, latent_to_image
    from bonsai_quant.distill.inputs import DigitsData

    data = DigitsData(TextEncoder.load())
    assert data.latents.shape == (1797, 16, 4) and data.text.shape[0] == 1797
    images = latent_to_image(data.latents) * 16
    assert torch.equal(images, images.round()) and images.max() == 16  # the 17 grey levels, exactly
    batch, velocity = data.batch(0, 3, 8, process_slice(8, 0, 1))
    x0 = batch["hidden_states"] - batch["timestep"][:, None, None] * (velocity + 0)  # x = x0 + sigma (e - x0)
    assert any(torch.allclose(x0[0], data.latents[i], atol=1e-5) for i in range(len(data.latents)))

    firsts = {}
    for weight in ("0", "1.0"):
        out = tmp_path / f"w{weight}"
        assert run_cli("distill", "--mode", "ternary", "--out", out, "--steps", "1", "--data-loss", weight, *FAST) == 0
        record = json.loads((out / "mlx" / "quantization_config.json").read_text())["distill"]
        assert record["settings"]["data_loss"] == float(weight)
        firsts[weight] = record["loss"]["first"]
    assert firsts["1.0"] > firsts["0"] + 0.1  # the same teacher batch plus the data term (~velocity variance)
