"""Sensitivity ranking: what it measures, the budgeted choice, the recipe it writes, and the CLI."""

from pathlib import Path

import pytest
import torch

from bonsai_quant.calibration import load_calibration, load_model
from bonsai_quant.cli import main
from bonsai_quant.digits import model_dir
from bonsai_quant.errors import BonsaiError
from bonsai_quant.flux2 import inventory
from bonsai_quant.plan import decide_all
from bonsai_quant.quantizers import dequantize, quantize
from bonsai_quant.recipe import load_recipe
from bonsai_quant.sensitivity import (
    BlockReplay,
    Sensitivity,
    candidates,
    choose,
    compare_with_published,
    measure,
    published_budget,
    start_block,
    write_recipe,
)

SET = Path(__file__).resolve().parents[1] / "calibration" / "flux2-tiny-digits"
CALLS = 24


def sens(name, score, nbytes, published=False, role="attention"):
    return Sensitivity(name, role, (1, 1), published, score, nbytes)


def test_choose_takes_the_most_sensitive_that_fit():
    ranking = [sens("a", 9, 60), sens("b", 8, 50), sens("c", 7, 30), sens("d", 1, 10)]
    assert [s.name for s in choose(ranking, 100)] == ["a", "c", "d"]  # b does not fit after a; smaller ones do
    assert [s.name for s in choose(ranking, 0)] == []
    assert [s.name for s in choose(ranking, 150)] == ["a", "b", "c", "d"]
    with pytest.raises(BonsaiError, match="must be >= 0"):
        choose(ranking, -1)


def test_comparison_with_the_published_set():
    ranking = [sens("a", 9, 1), sens("b", 8, 1, published=True), sens("c", 7, 1, published=True)]
    cmp = compare_with_published(ranking, [ranking[0], ranking[1]])
    assert (cmp["same"], cmp["both"], cmp["only_published"], cmp["only_ranking"]) == (False, ["b"], ["c"], ["a"])
    assert cmp["published_ranks"] == [2, 3]
    assert compare_with_published(ranking, ranking[1:])["same"]
    assert published_budget(ranking) == 2


@pytest.fixture(scope="module")
def ranked():
    model = load_model(model_dir())
    calib = load_calibration(SET)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ranking = measure(model, calib, "binary", max_calls=CALLS)
    return model, calib, before, ranking


def test_measure_leaves_the_model_unchanged(ranked):
    model, _, before, _ = ranked
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ranking_covers_every_quantizable_linear(ranked):
    model, _, _, ranking = ranked
    specs = inventory(dict(model.config))
    expected = {n for n, s in specs.items() if s.is_linear_weight and s.shape[1] % 128 == 0}
    assert {s.name for s in ranking} == expected
    assert "x_embedder.weight" not in expected  # 4 input channels: not a multiple of the group
    assert [s.score for s in ranking] == sorted((s.score for s in ranking), reverse=True)
    published = {s.name for s in ranking if s.published_keep}
    assert published == {"context_embedder.weight", "proj_out.weight", "norm_out.linear.weight",
                         "time_guidance_embed.timestep_embedder.linear_1.weight",
                         "time_guidance_embed.timestep_embedder.linear_2.weight",
                         "double_stream_modulation_img.linear.weight", "double_stream_modulation_txt.linear.weight",
                         "single_stream_modulation.linear.weight"}


def test_score_is_the_relative_output_change(ranked):
    model, calib, _, ranking = ranked
    entry = ranking[len(ranking) // 2]
    params = dict(model.named_parameters())
    (batch,) = list(calib.batches(64, max_calls=CALLS))
    with torch.no_grad():
        ref = model(**batch)[0]
        original = params[entry.name].detach().clone()
        q = quantize(original, "binary", 128, torch.float16, "absmean")
        params[entry.name].copy_(dequantize(q.codes, q.scales, 128))
        out = model(**batch)[0]
        params[entry.name].copy_(original)
    assert entry.score == pytest.approx(float((out - ref).square().sum() / ref.square().sum()), rel=1e-4)
    assert entry.bytes16 == 2 * original.numel()


def test_scores_equal_whole_forwards_for_every_candidate(ranked):
    """measure() re-runs only the blocks from each tensor's own on; its scores are those of whole forwards, bit
    for bit."""
    model, calib, _, ranking = ranked
    params = dict(model.named_parameters())
    batches = list(calib.batches(64, max_calls=CALLS))
    assert len(batches) == 1
    with torch.no_grad():
        ref = [model(**b)[0].float() for b in batches]
        ref2 = sum(float(r.square().sum()) for r in ref)
        for entry in ranking:
            original = params[entry.name].detach().clone()
            q = quantize(original, "binary", 128, torch.float16, "absmean")
            params[entry.name].copy_(dequantize(q.codes, q.scales, 128))
            err2 = sum(float((model(**b)[0].float() - r).square().sum()) for b, r in zip(batches, ref))
            params[entry.name].copy_(original)
            assert entry.score == err2 / ref2, entry.name


def test_block_replay_gives_the_whole_forward_of_each_block_on():
    model = load_model(model_dir())
    batches = list(load_calibration(SET).batches(8, max_calls=16))
    assert len(batches) == 2
    params = dict(model.named_parameters())
    replay = BlockReplay(model, batches)
    assert (replay.double, len(replay.blocks)) == (2, 4)
    found = candidates(model, 128)
    starts = {n: start_block(n, 2, 4) for n in found}
    assert starts["context_embedder.weight"] == 0 and starts["transformer_blocks.1.ff.linear_out.weight"] == 1
    assert starts["single_stream_modulation.linear.weight"] == 2
    assert starts["single_transformer_blocks.1.attn.to_out.weight"] == 3 and starts["proj_out.weight"] == 4
    with torch.no_grad():
        ref = [model(**b)[0] for b in batches]
        for name in sorted(found, key=starts.get):
            replay.advance(starts[name])
            original = params[name].detach().clone()
            params[name].mul_(0.5)  # any change of this tensor: its block on must see it
            whole = [model(**b)[0] for b in batches]
            replayed = [replay.forward(j) for j in range(len(batches))]
            params[name].copy_(original)
            assert not torch.equal(whole[0], ref[0]), name
            assert all(torch.equal(w, r) for w, r in zip(whole, replayed)), name
        assert all(torch.equal(replay.forward(j), ref[j]) for j in range(2))  # the model forward is itself again
        assert all("forward" not in vars(b) for b in replay.blocks)
    with pytest.raises(ValueError, match="replay start 1 is before the current one, 4"):
        replay.advance(1)


def test_written_recipe_keeps_exactly_the_chosen_tensors(ranked, tmp_path):
    model, _, _, ranking = ranked
    chosen = choose(ranking, published_budget(ranking))
    path = tmp_path / "s.yaml"
    write_recipe(ranking, chosen, "binary", None, published_budget(ranking), path)
    recipe = load_recipe(path)
    specs = inventory(dict(model.config))
    recipe.check_matches(specs)
    decisions = {d.name: d.action for d in decide_all(specs, {n: torch.bfloat16 for n in specs}, recipe)}
    for s in ranking:
        assert decisions[s.name] == ("keep" if s in chosen else "quantize"), s.name
    assert decisions["x_embedder.weight"] == "keep" and decisions["transformer_blocks.0.attn.norm_q.weight"] == "keep"
    assert "# rank  score" in path.read_text()


def test_sensitivity_cli(tmp_path, capsys):
    out = tmp_path / "keep.yaml"
    assert main(["sensitivity", "--calib", str(SET), "--mode", "ternary", "--max-calls", "8", "--budget-bytes",
                 "300000", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = captured.out
    rows = [line for line in captured.err.splitlines() if line.startswith("  [")]
    n = len(rows)  # one row per candidate linear, printed as it is measured, in order
    assert n > 28 and [r.split("]")[0] for r in rows] == [f"  [{i}/{n}" for i in range(1, n + 1)]
    assert captured.err.index("reference forward over 8 calibration calls") < captured.err.index("  [1/")
    assert "budget 300,000 bytes of 16-bit Linear weights" in text and f"recipe: {out}" in text
    assert "published keep set" in text
    recipe = load_recipe(out)
    assert recipe.mode == "ternary" and recipe.name == "sensitivity-ternary"
    assert main(["sensitivity", "--calib", str(tmp_path / "none"), "--out", str(out)]) == 2
    assert "none: no such calibration set folder" in capsys.readouterr().err
    assert main(["sensitivity", "--calib", str(SET), "--solver", "absmean", "--out", str(out)]) == 2
    assert "--solver 'absmean' is not a ternary solver" in capsys.readouterr().err
