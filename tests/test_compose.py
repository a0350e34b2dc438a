"""The compose benchmark: world and grammar determinism, held-out exclusion, text and latents, the judge on real
scenes, and `bonsai-quant eval --benchmark compose` on the shipped flux2-tiny-compose."""

from __future__ import annotations

import json
import random

import pytest
import torch

from bonsai_quant.cli import main
from bonsai_quant.compose import grammar, model, world
from bonsai_quant.compose.benchmark import grid_size, noise_for, wants_compose
from bonsai_quant.compose.grammar import (
    CATEGORIES,
    HELD_OUT_COLOUR,
    HELD_OUT_PAIRS,
    benchmark_prompts,
    make_prompt,
    scene_allowed,
    scene_for,
    training_example,
)
from bonsai_quant.compose.judge import Judge, accuracy_on_real, answer, real_scenes, to_cells
from bonsai_quant.compose.model import TextEncoder, model_dir
from bonsai_quant.compose.world import COLOURS, GLYPH, PALETTE, Obj, Placement, render
from bonsai_quant.errors import BonsaiError

SAMPLES = 1  # per prompt: 288 images, seconds at 4 steps on 2 cores


@pytest.fixture(scope="module")
def encoder():
    return TextEncoder.load()


@pytest.fixture(scope="module")
def judge():
    return Judge.load()


def _eval_json(capsys, *argv) -> dict:
    assert main(["eval", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ---------------------------------------------------------------- world

def test_glyph_split_is_fixed_disjoint_and_complete():
    train, held, every = (world.glyph_index(s) for s in ("train", "held_out", "all"))
    for d in range(10):
        assert not set(train[d]) & set(held[d])
        assert sorted(train[d] + held[d]) == list(every[d])
        assert len(held[d]) == round(len(every[d]) * 0.2)
    assert sum(len(x) for x in every) == 1797
    assert held[3][:3] == world.glyph_index("held_out")[3][:3]
    with pytest.raises(BonsaiError, match="glyph split 'test'"):
        world.glyph_index("test")


def test_render_places_a_tinted_glyph_in_its_cell():
    bank = world.glyphs()
    obj, p = Obj(7, "blue", cell=3), Placement(glyph=world.glyph_index("all")[7][0], dy=2, dx=1)
    img = render([((obj,), (p,))])[0]
    y, x = 16 + 2, 16 + 1
    expected = bank[p.glyph][None] * torch.tensor(PALETTE["blue"])[:, None, None]
    torch.testing.assert_close(img[:, y:y + GLYPH, x:x + GLYPH], expected, rtol=0, atol=0)
    img[:, y:y + GLYPH, x:x + GLYPH] = 0
    assert img.abs().sum() == 0  # nothing outside the glyph
    with pytest.raises(BonsaiError, match="distinct cells"):
        render([((obj, Obj(1, "red", 3)), (p, p))])


def test_render_batch_matches_render():
    rng = random.Random(5)
    scenes = []
    for _ in range(6):
        _, objects = training_example(rng)
        scenes.append((objects, world.place(objects, rng)))
    rows = {k: [] for k in ("digit", "colour", "cell", "glyph", "dy", "dx", "present")}
    for objects, placements in scenes:
        pad = 4 - len(objects)
        rows["digit"].append([o.digit for o in objects] + [0] * pad)
        rows["colour"].append([COLOURS.index(o.colour) for o in objects] + [0] * pad)
        rows["cell"].append([o.cell for o in objects] + [0] * pad)
        rows["glyph"].append([q.glyph for q in placements] + [0] * pad)
        rows["dy"].append([q.dy for q in placements] + [0] * pad)
        rows["dx"].append([q.dx for q in placements] + [0] * pad)
        rows["present"].append([1.0] * len(objects) + [0.0] * pad)
    t = {k: torch.tensor(v) for k, v in rows.items()}
    batch = world.render_batch(t["digit"], t["colour"], t["cell"], t["glyph"], t["dy"], t["dx"], t["present"])
    torch.testing.assert_close(batch, render(scenes), rtol=0, atol=1e-7)


# ---------------------------------------------------------------- grammar

def test_prompt_texts():
    assert make_prompt("counting", [(5, None)], count=3).text == "three 5s"
    assert make_prompt("position", [(4, None), (9, None)], relation="left of").text == "a 4 left of a 9"
    assert make_prompt("color_attr", [(1, "red"), (8, "green")]).text == "a red 1 and a green 8"
    assert make_prompt("colors", [(2, "blue")]).text == "a blue 2"
    with pytest.raises(BonsaiError, match="unknown category 'shape'"):
        make_prompt("shape", [(1, None)])


def test_benchmark_prompts_are_fixed():
    assert [p.text for p in benchmark_prompts("two_object")[:4]] == [
        "a 9 and a 0", "a 8 and a 7", "a 3 and a 2", "a 3 and a 6"]
    assert [p.text for p in benchmark_prompts("color_attr")[:2]] == ["a pink 2 and a white 7", "a blue 3 and a blue 2"]
    assert [p.text for p in benchmark_prompts("single_object")[:3]] == ["a 0", "a 1", "a 2"]
    for c in CATEGORIES:
        ps = benchmark_prompts(c)
        assert len(ps) == 48 and [p.text for p in ps] == [p.text for p in benchmark_prompts(c)]
        held = sum(p.held_out for p in ps)
        assert held == (16 if grammar.has_held_out(c) else 0), c
        assert all(p.held_out == (k % 3 == 0) for k, p in enumerate(ps)) or not grammar.has_held_out(c)
    counts = [p.count for p in benchmark_prompts("counting")]
    assert {counts.count(n) for n in (2, 3, 4)} == {16}


def test_held_out_combinations():
    assert sorted(HELD_OUT_COLOUR.values()).count("red") >= 1 and len(HELD_OUT_COLOUR) == 10
    assert {tuple(sorted(p)) for p in HELD_OUT_PAIRS} == {(0, 9), (1, 8), (2, 7), (3, 6), (4, 5)}
    assert make_prompt("colors", [(3, HELD_OUT_COLOUR[3])]).held_out
    assert not make_prompt("colors", [(3, next(c for c in COLOURS if c != HELD_OUT_COLOUR[3]))]).held_out
    assert make_prompt("position", [(2, None), (7, None)], relation="above").held_out
    assert not scene_allowed((Obj(1, "red", 0), Obj(8, "red", 1)))
    assert not scene_allowed((Obj(0, HELD_OUT_COLOUR[0], 2),))


def test_training_never_shows_a_held_out_combination():
    rng = random.Random(0)
    for _ in range(5000):
        p, objects = training_example(rng)
        assert not p.held_out and scene_allowed(objects), (p, objects)
        assert answer(p, objects)  # the scene shows what its prompt says
    a = [training_example(random.Random(9))[0].text for _ in range(3)]
    assert a == [training_example(random.Random(9))[0].text for _ in range(3)]


def test_every_benchmark_prompt_has_a_true_scene():
    rng = random.Random(1)
    for c in CATEGORIES:
        for p in benchmark_prompts(c):
            objects = scene_for(p, rng)
            assert answer(p, objects), (p, objects)


def test_answer_rules():
    left = make_prompt("position", [(4, None), (9, None)], relation="left of")
    assert answer(left, (Obj(4, "red", 0), Obj(9, "blue", 1)))
    assert not answer(left, (Obj(4, "red", 1), Obj(9, "blue", 0)))
    assert not answer(left, (Obj(4, "red", 0), Obj(9, "blue", 2)))  # stacked, not side by side
    three = make_prompt("counting", [(5, None)], count=3)
    assert answer(three, (Obj(5, "red", 0), Obj(5, "red", 1), Obj(5, "red", 3), Obj(2, "red", 2)))
    assert not answer(three, (Obj(5, "red", 0), Obj(5, "red", 1)))
    attr = make_prompt("color_attr", [(1, "red"), (8, "green")])
    assert answer(attr, (Obj(8, "green", 3), Obj(1, "red", 0)))
    assert not answer(attr, (Obj(1, "green", 0), Obj(8, "red", 1)))  # colours swapped: binding failed
    assert not answer(make_prompt("two_object", [(3, None), (7, None)]), (Obj(3, "red", 0),))


# ---------------------------------------------------------------- text and latents

def test_text_encoder(encoder):
    config = json.loads((model_dir() / "config.json").read_text())
    assert encoder.dim == config["joint_attention_dim"]
    v = model.VOCAB
    assert encoder.token_ids("three 5s") == [v.index("three"), v.index("5"), v.index("s")] + [0] * 5
    assert encoder.token_ids("a red 1 and a green 8")[:7] == [v.index(w) for w in "a red 1 and a green 8".split()]
    e = encoder.encode(["a red 1", "A RED 1", "a 1 red"])
    assert torch.equal(e[0], e[1]) and not torch.equal(e[0], e[2])
    torch.testing.assert_close(encoder.table, model.make_embedding_table(encoder.dim, seed=0))
    with pytest.raises(BonsaiError, match="unknown word 'cat'"):
        encoder.encode(["a red cat"])
    with pytest.raises(BonsaiError, match="at most 8"):
        encoder.encode(["a red 1 and a green 2 and a 3"])


def test_latent_packing():
    img = torch.rand(2, 3, 32, 32)
    lat = model.image_to_latent(img)
    assert lat.shape == (2, 64, 48)
    # pixel (c, y, x) -> token (y // 4) * 8 + x // 4, channel ((y % 4) * 4 + x % 4) * 3 + c
    for c, y, x in [(0, 0, 0), (2, 5, 30), (1, 31, 31), (0, 13, 6)]:
        assert lat[1, (y // 4) * 8 + x // 4, ((y % 4) * 4 + x % 4) * 3 + c] == pytest.approx(img[1, c, y, x] * 2 - 1)
    torch.testing.assert_close(model.latent_to_image(lat), img)
    assert model.img_ids().tolist() == [[0, k // 8, k % 8, 0] for k in range(64)]
    assert model.txt_ids().tolist() == [[0, 0, 0, n] for n in range(8)]


def test_shipped_model_config():
    from bonsai_quant.flux2 import inventory, read_config

    config = read_config(model_dir() / "config.json")
    assert config["_bonsai_benchmark"] == "compose" and wants_compose(model_dir())
    specs = inventory(config)
    block = [s for s in specs.values() if s.is_linear_weight and s.role in ("attention", "mlp", "fused_projection")]
    assert len(block) == 4 * 12 + 4 * 2
    assert all(s.shape[1] % 128 == 0 for s in block)
    assert (model_dir() / "diffusion_pytorch_model.safetensors").stat().st_size < 30e6
    with pytest.raises(BonsaiError, match="not a FLUX.2 compose model: in_channels is 4"):
        model.check_compatible({**config, "in_channels": 4}, TextEncoder.load(), "x")


def test_noise_extends_with_n():
    assert torch.equal(noise_for("counting", 5, 2, 0), noise_for("counting", 5, 6, 0)[:2])
    assert not torch.equal(noise_for("counting", 5, 2, 0), noise_for("colors", 5, 2, 0))


# ---------------------------------------------------------------- judge

def test_judge_on_held_out_real_scenes(judge):
    shipped = judge.info["held_out_accuracy"]
    assert set(shipped) == set(CATEGORIES) and min(shipped.values()) >= 0.97, shipped
    again = accuracy_on_real(judge, per_prompt=1, split="held_out", seed=11)
    assert min(again.values()) >= 0.93, again
    f = judge.info["features"]
    assert judge.real_mean.shape == (4 * f,) and judge.real_cov.shape == (4 * f, 4 * f)
    found, feats = judge.read(torch.zeros(2, 3, 32, 32))
    assert found == [(), ()] and feats.shape == (2, 4 * f)


def test_cells_are_row_major():
    img = torch.zeros(1, 3, 32, 32)
    img[0, 1, 20, 3] = 1.0  # row 1, column 0 -> cell 2
    cells = to_cells(img)
    assert cells.shape == (4, 3, 16, 16) and cells[2, 1, 4, 3] == 1.0 and cells.sum() == 1.0


def test_real_scenes_score_high_and_fd_low(judge):
    prompts = benchmark_prompts("color_attr")[:12]
    found, feats = judge.read(real_scenes(prompts, 2, "held_out", seed=0))
    assert sum(answer(prompts[i // 2], o) for i, o in enumerate(found)) >= 23


# ---------------------------------------------------------------- eval

@pytest.fixture(scope="module")
def shipped_report():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["eval", "--benchmark", "compose", "--samples", str(SAMPLES), "--json"]) == 0
    return json.loads(out.getvalue())


# Floors of the shipped weights at 1 sample per prompt, 4 steps, on the CPU: they score 0.958 / 0.521 / 0.854 /
# 0.958 / 0.938 / 0.458, overall 0.781 (the model card's 4-sample figure on the GPU: 0.790). About 0.1 below each,
# so that a regression of the model, sampler or judge fails and float rounding across machines does not.
FLOORS = {"single_object": 0.85, "two_object": 0.4, "counting": 0.75, "colors": 0.85, "position": 0.83,
          "color_attr": 0.35}
OVERALL_FLOOR = 0.7


def test_eval_shipped_compose_model_meets_floors(shipped_report):
    r = shipped_report
    assert r["benchmark"] == "compose" and r["model"] == str(model_dir()) and r["kind"] == "full-precision"
    assert r["steps"] == 4 and r["samples_per_prompt"] == SAMPLES and r["prompts_per_category"] == 48
    for c, floor in FLOORS.items():
        assert r["categories"][c] >= floor, (c, r["categories"])
    assert OVERALL_FLOOR <= r["overall"] <= 0.95, r["overall"]  # room above: the benchmark does not saturate
    assert r["overall"] == pytest.approx(sum(r["categories"].values()) / 6, abs=1e-4)
    assert r["held_out"]["single_object"] is None and r["held_out"]["colors"] is not None
    # fidelity: far closer to real scenes than the sampler's own noise
    assert r["frechet_distance"] < 0.5 * noise_fd()


def noise_fd() -> float:
    from bonsai_quant.compose.grammar import all_benchmark_prompts

    judge = Judge.load()
    noise = torch.cat([model.latent_to_image(noise_for(c, i, 1, 0)) for c in CATEGORIES
                       for i in range(len(all_benchmark_prompts()[c]))])
    _, feats = judge.read(noise)
    return judge.frechet_to_real(feats)


def test_compose_model_picks_compose_by_default(capsys, shipped_report):
    r = _eval_json(capsys, str(model_dir()), "--samples", "1")
    assert r["benchmark"] == "compose" and r["categories"] == shipped_report["categories"]  # deterministic
    digits = _eval_json(capsys, "--samples", "1", "--steps", "1")
    assert "benchmark" not in digits and "accuracy" in digits  # the digits model keeps the digits benchmark


def test_digits_model_is_refused_by_compose(capsys):
    from bonsai_quant.digits import model_dir as digits_dir

    assert main(["eval", str(digits_dir()), "--benchmark", "compose"]) == 2
    assert "not a FLUX.2 compose model: in_channels is 4" in capsys.readouterr().err


def test_grid_and_text_report(tmp_path, capsys):
    from PIL import Image

    path = tmp_path / "g.png"
    assert main(["eval", "--benchmark", "compose", "--samples", "2", "--steps", "1", "--grid", str(path)]) == 0
    out = capsys.readouterr().out
    assert "overall (mean of six):" in out and "color_attr" in out and "held-out combinations" in out
    with Image.open(path) as im:
        assert im.size == grid_size(18, 2) == (150 + 2 * 66 + 2, 18 * 66 + 2) and im.mode == "RGB"


def test_fake_quant_and_packs(tmp_path, capsys):
    from bonsai_quant.convert import convert
    from bonsai_quant.recipe import default_recipe

    fq = _eval_json(capsys, "--benchmark", "compose", "--fake-quant", "ternary", "--samples", "1", "--steps", "2")
    assert fq["kind"] == "fake-quant" and fq["mode"] == "ternary"
    out = tmp_path / "ternary"
    convert(model_dir(), default_recipe("ternary"), out, targets=("mlx", "gemlite", "bonsai"), verbose=False)
    for target in ("mlx", "gemlite", "bonsai"):
        r = _eval_json(capsys, str(out), "--target", target, "--samples", "1", "--steps", "2")  # compose by config
        assert r["benchmark"] == "compose" and r["kind"] == "pack" and r["target"] == target
        assert abs(r["overall"] - fq["overall"]) <= 0.05, (target, r["overall"], fq["overall"])


def test_calibration_set_of_the_compose_model(tmp_path):
    from bonsai_quant.calibration import calibrate
    from bonsai_quant.compose import calib

    prompts = calib.prompts()
    assert len(prompts) == 10 + 5 * 16 and len(set(prompts)) == len(prompts)
    assert not any(p for p in prompts if p in {q.text for c in CATEGORIES for q in benchmark_prompts(c) if q.held_out})
    s = calibrate(model_dir(), tmp_path / "c", samples_per_prompt=1, steps=2)
    assert s.trajectories == len(prompts) and s.meta["image_tokens"] == 64 and s.meta["in_channels"] == 48
    assert s.meta["text_encoder"] == "compose text embedding (fixed table)"
    row = s.dataset[0]
    assert row["latents"].shape == (2, 64, 48) and row["encoder_hidden_states"].shape == (8, 128)
