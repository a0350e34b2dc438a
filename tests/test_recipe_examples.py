"""The example recipes the README names: each exists, loads, and runs the command the README shows it with."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bonsai_quant.calibration import calibrate
from bonsai_quant.checkpoint import Checkpoint
from bonsai_quant.cli import main
from bonsai_quant.digits import model_dir
from bonsai_quant.plan import make_plan
from bonsai_quant.recipe import default_recipe, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
EXAMPLES = ("gptq-binary", "gptq-ternary", "mixed", "distill")


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    prompts = tmp_path_factory.mktemp("p") / "prompts.txt"
    prompts.write_text("a handwritten digit 1\na handwritten digit 7\n")
    return calibrate(None, tmp_path_factory.mktemp("sets") / "two", prompts_path=prompts, samples_per_prompt=2,
                     steps=2, seed=3)


def test_every_recipe_the_readme_names_is_shipped_and_loads():
    named = set(re.findall(r"recipes/([\w.-]+\.yaml)", (ROOT / "README.md").read_text()))
    assert {f"{n}.yaml" for n in EXAMPLES} <= named
    for name in sorted(named):
        recipe = load_recipe(RECIPES / name)
        assert recipe.name and recipe.mode in ("binary", "ternary"), name


def test_gptq_examples_keep_the_published_set():
    ckpt = Checkpoint(model_dir())
    for mode in ("binary", "ternary"):
        want = make_plan(ckpt, default_recipe(mode), ("mlx",))
        got = make_plan(ckpt, load_recipe(RECIPES / f"gptq-{mode}.yaml"), ("mlx",))
        assert [d.name for d in got.kept] == [d.name for d in want.kept]
        assert [d.name for d in got.quantized] == [d.name for d in want.quantized]


@pytest.mark.parametrize("name", ["gptq-binary", "gptq-ternary", "mixed"])
def test_convert_runs_with_each_example(name, tmp_path, small_set, capsys):
    out = tmp_path / "packs"
    assert main(["convert", "--recipe", str(RECIPES / f"{name}.yaml"), "--calib", str(small_set.path),
                 "--target", "mlx", "--out", str(out), "--quiet"]) == 0
    summary = capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    qc = json.loads((out / "mlx" / "quantization_config.json").read_text())
    modes = {m: q["mode"] for m, q in qc["quantized"].items()}
    solvers = {q["solver"] for q in qc["quantized"].values()}
    if name == "mixed":
        assert "transformer_blocks.0.attn.to_out.0.weight" in qc["kept"]
        assert {modes[m] for m in modes if ".ff." in m or ".ff_context." in m} == {"binary"}
        assert {modes[m] for m in modes if ".attn." in m} == {"ternary"}
        assert solvers == {"absmean", "optimal"}
        assert "objective" not in report and "output error on the calibration inputs" not in summary
    else:
        # Beside the plain weight error, the summary reports what gptq minimises: the output error.
        o = report["objective"]
        assert o["tensors"] == 28 and 0 < o["mean_rel_error"] < report["mean_rel_error"]
        assert all("objective_rel_error" in t for t in report["tensors"] if t["action"] == "quantize")
        assert (f"output error on the calibration inputs (what the calibrated solvers minimise; 28 layers): mean "
                f"{o['mean_rel_error']:.4f}") in summary
        assert set(modes.values()) == {name.split("-")[1]} and solvers == {"gptq"}
        assert qc["calibration"]["fingerprint"] == small_set.fingerprint()


def test_distill_runs_with_its_example(tmp_path, small_set):
    out = tmp_path / "qat"
    assert main(["distill", "--recipe", str(RECIPES / "distill.yaml"), "--calib", str(small_set.path),
                 "--steps", "1", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "mlx" / "quantization_config.json").read_text())["distill"]
    assert record["recipe"]["name"] == "distill-binary" and record["settings"]["steps"] == 1
    assert record["settings"]["lr"] == 2.0e-4 and record["settings"]["inputs"] == "continuous"
