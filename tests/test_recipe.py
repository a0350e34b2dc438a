import json
import re
import textwrap

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from bonsai_quant.errors import RecipeError
from bonsai_quant.recipe import (
    GROUP_SIZES,
    KEPT_DTYPES,
    MODES,
    SCALE_DTYPES,
    SOLVERS,
    TARGETS,
    Recipe,
    Rule,
    default_recipe,
    load_recipe,
    parse_recipe,
)

KLEIN_4B_CONFIG = dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256,
                       mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6,
                       guidance_embeds=False)


def klein_names(double=5, single=20):
    """The transformer's tensor names, from the REFERENCE.md inventory: (quantized, kept)."""
    quantized, kept = [], []
    for i in range(double):
        b = f"transformer_blocks.{i}"
        quantized += [f"{b}.attn.{p}.weight" for p in
                      ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out")]
        quantized += [f"{b}.{ff}.{lin}.weight" for ff in ("ff", "ff_context") for lin in ("linear_in", "linear_out")]
        kept += [f"{b}.attn.{n}.weight" for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")]
    for i in range(single):
        b = f"single_transformer_blocks.{i}"
        quantized += [f"{b}.attn.to_qkv_mlp_proj.weight", f"{b}.attn.to_out.weight"]
        kept += [f"{b}.attn.norm_q.weight", f"{b}.attn.norm_k.weight"]
    kept += ["x_embedder.weight", "context_embedder.weight", "proj_out.weight", "norm_out.linear.weight",
             "time_guidance_embed.timestep_embedder.linear_1.weight",
             "time_guidance_embed.timestep_embedder.linear_2.weight",
             "double_stream_modulation_img.linear.weight", "double_stream_modulation_txt.linear.weight",
             "single_stream_modulation.linear.weight"]
    return quantized, kept


QUANTIZED, KEPT = klein_names()
ALL = QUANTIZED + KEPT


def kept_by(recipe, names):
    return {n for n in names if (r := recipe.rule_for(n)) is not None and r.action == "keep"}


def parse(text, **kw):
    return parse_recipe(textwrap.dedent(text), source="r.yaml", **kw)


# -- shipped recipes ------------------------------------------------------------------------------------------

def test_inventory_has_the_published_counts():
    assert (len(ALL), len(set(ALL)), len(QUANTIZED), len(KEPT)) == (169, 169, 100, 69)


def test_inventory_matches_diffusers():
    accelerate = pytest.importorskip("accelerate")
    diffusers = pytest.importorskip("diffusers")
    with accelerate.init_empty_weights():
        model = diffusers.Flux2Transformer2DModel(**KLEIN_4B_CONFIG)
    assert set(model.state_dict()) == set(ALL)


@pytest.mark.parametrize("mode, solver", [("binary", "absmean"), ("ternary", "optimal")])
def test_shipped_recipe_keeps_exactly_the_published_set(mode, solver):
    recipe = default_recipe(mode)
    assert (recipe.name, recipe.mode, recipe.solver, recipe.group_size) == (f"bonsai-{mode}", mode, solver, 128)
    assert (recipe.scale_dtype, recipe.kept_dtype, recipe.targets) == ("bfloat16", "source", ("mlx", "gemlite"))
    assert all(r.action == "keep" for r in recipe.rules)
    assert kept_by(recipe, ALL) == set(KEPT)
    recipe.check_matches(ALL)
    # Every rule still matches something in a small model of the same shape, e.g. the tiny test preset.
    recipe.check_matches(sum(klein_names(double=1, single=1), []))


def test_shipped_recipes_load_from_the_top_level_symlink():
    for mode in MODES:
        assert load_recipe(f"recipes/{mode}.yaml").to_dict() == default_recipe(mode).to_dict()


# -- matching -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pattern, name, expected", [
    ("x_embedder", "x_embedder.weight", True),                  # module name
    ("x_embedder.weight", "x_embedder.weight", True),           # full name
    ("x_embedder", "x_embedder_2.weight", False),               # not a prefix match
    ("norm_out", "norm_out.linear.weight", False),              # a parent module does not match its children
    ("transformer_blocks.*.attn.to_q", "transformer_blocks.3.attn.to_q.weight", True),
    ("transformer_blocks.*", "single_transformer_blocks.0.attn.to_out.weight", False),  # anchored at the start
    ("*.to_out", "single_transformer_blocks.0.attn.to_out.weight", True),              # * crosses dots
    ("*.to_out", "transformer_blocks.0.attn.to_out.0.weight", False),
    ("*", "weight", True),
])
def test_rule_matches(pattern, name, expected):
    assert Rule("keep", pattern).matches(name) is expected


def test_first_match_wins():
    to_out = "single_transformer_blocks.7.attn.to_out.weight"
    override_first = parse("""\
        format_version: 1
        mode: binary
        rules:
          - quantize: single_transformer_blocks.*.attn.to_out
            mode: ternary
          - keep: single_transformer_blocks.*
        """)
    rule = override_first.rule_for(to_out)
    assert (rule.action, rule.line, override_first.mode_for(rule), override_first.solver_for(rule)) == \
        ("quantize", 4, "ternary", "optimal")
    assert override_first.rule_for("single_transformer_blocks.7.attn.to_qkv_mlp_proj.weight").action == "keep"
    assert override_first.rule_for("transformer_blocks.0.attn.to_q.weight") is None

    keep_first = parse("""\
        format_version: 1
        mode: binary
        rules:
          - keep: single_transformer_blocks.*
          - quantize: single_transformer_blocks.*.attn.to_out
        """)
    assert keep_first.rule_for(to_out).action == "keep"


def test_solver_for_and_mode_for():
    recipe = parse("""\
        format_version: 1
        mode: ternary
        solver: threshold
        rules:
          - quantize: a
          - quantize: b
            mode: binary
          - quantize: c
            solver: optimal
          - quantize: d
            mode: ternary
          - keep: e
        """)
    a, b, c, d, e = recipe.rules
    assert [recipe.mode_for(r) for r in (None, a, b, c, d)] == ["ternary", "ternary", "binary", "ternary", "ternary"]
    # The explicit top-level solver applies wherever the mode is the top-level mode; a switch of mode gets that
    # mode's default.
    assert [recipe.solver_for(r) for r in (None, a, b, c, d)] == ["threshold", "threshold", "absmean", "optimal",
                                                                  "threshold"]
    with pytest.raises(ValueError):
        recipe.solver_for(e)


def test_defaults():
    recipe = parse_recipe("format_version: 1\nmode: ternary\n")
    assert recipe == Recipe(name="custom", mode="ternary", group_size=128, scale_dtype="bfloat16",
                            kept_dtype="source", solver="optimal", targets=("mlx", "gemlite"), rules=(),
                            source="<string>", text="format_version: 1\nmode: ternary\n")


@pytest.mark.parametrize("targets, want", [("[mlx]", "bfloat16"), ("[mflux]", "bfloat16"),
                                           ("[gemlite, mlx]", "bfloat16"), ("[gemlite]", "float16"),
                                           ("[bonsai, gemlite]", "float16")])
def test_scale_dtype_defaults_to_bf16_for_mlx_consumers(targets, want):
    """mlx-vlm holds scales in bf16, so a recipe writing an MLX-family pack defaults to bf16; others to fp16."""
    assert parse_recipe(f"format_version: 1\nmode: binary\ntargets: {targets}\n").scale_dtype == want
    text = f"format_version: 1\nmode: binary\ntargets: {targets}\nscale_dtype: float16\n"
    assert parse_recipe(text).scale_dtype == "float16"


def test_binary_mflux_recipe_is_group_64():
    from importlib.resources import files

    from bonsai_quant.recipe import load_recipe

    recipe = load_recipe(files("bonsai_quant") / "recipes" / "binary-mflux.yaml")
    assert (recipe.mode, recipe.group_size, recipe.scale_dtype, recipe.targets) == (
        "binary", 64, "bfloat16", ("mflux", "mlx"))
    assert kept_by(recipe, ALL) == set(KEPT)


def test_name_defaults_to_the_file_stem(tmp_path):
    path = tmp_path / "my-recipe.yaml"
    path.write_text("format_version: 1\nmode: binary\n")
    recipe = load_recipe(path)
    assert (recipe.name, recipe.source, recipe.solver) == ("my-recipe", str(path), "absmean")


# -- with_mode ----------------------------------------------------------------------------------------------

def test_with_mode_follows_the_default_solver():
    binary = default_recipe("binary")
    ternary = binary.with_mode("ternary")
    assert (ternary.mode, ternary.solver, ternary.rules) == ("ternary", "optimal", binary.rules)
    assert binary.mode == "binary"  # frozen: a new recipe, not a mutation
    assert ternary.with_mode("binary") == binary


def test_with_mode_rejects_an_explicit_solver_of_the_old_mode():
    recipe = parse("""\
        format_version: 1
        mode: binary
        solver: absmean
        """)
    with pytest.raises(RecipeError, match=r"^r\.yaml:3: solver: 'absmean' is a binary solver, but the mode is "
                                          r"ternary \(mode overridden from binary to ternary\); valid: optimal"):
        recipe.with_mode("ternary")


def test_with_mode_revalidates_rule_solvers():
    recipe = parse("""\
        format_version: 1
        mode: ternary
        rules:
          - quantize: a
            mode: ternary
            solver: threshold
          - quantize: b
            solver: threshold
        """)
    with pytest.raises(RecipeError, match=r"^r\.yaml:8: rules\[1\]\.solver: 'threshold' is a ternary solver"):
        recipe.with_mode("binary")


def test_with_mode_rejects_an_unknown_mode():
    with pytest.raises(RecipeError, match=r"\.yaml:\d+: mode: override 'trinary' is not a mode \(did you mean "
                                          r"'ternary'\?\); valid: binary, ternary"):
        default_recipe("binary").with_mode("trinary")


# -- errors ---------------------------------------------------------------------------------------------------

HEAD = "format_version: 1\nmode: binary\n"

ERRORS = [
    # unknown keys, with a suggestion
    (HEAD + "group_sise: 64\n",
     r"r\.yaml:3: group_sise: unknown key \(did you mean 'group_size'\?\); valid: format_version, name, mode, "),
    (HEAD + "rules:\n  - quantize: a\n    solvr: absmean\n",
     r"r\.yaml:5: rules\[0\]\.solvr: unknown key \(did you mean 'solver'\?\); valid: keep, quantize, mode, solver"),
    # wrong types
    (HEAD + "group_size: abc\n", r"r\.yaml:3: group_size: expected an integer, got string 'abc'; valid: 32, 64, 128"),
    (HEAD + "group_size: '128'\n", r"r\.yaml:3: group_size: expected an integer, got string '128'"),
    (HEAD + "group_size: true\n", r"r\.yaml:3: group_size: expected an integer, got boolean true"),
    (HEAD + "group_size: [128]\n", r"r\.yaml:3: group_size: expected an integer, got a list"),
    ("format_version: 1\nmode: 2\n", r"r\.yaml:2: mode: expected a string, got integer 2; valid: binary, ternary"),
    (HEAD + "targets: mlx\n", r"r\.yaml:3: targets: expected a list, got string 'mlx'; valid: a non-empty list"),
    (HEAD + "rules:\n  keep: x\n", r"r\.yaml:4: rules: expected a list, got a mapping; valid: a list of"),
    (HEAD + "rules:\n  - x_embedder\n", r"r\.yaml:4: rules\[0\]: expected a mapping, got string 'x_embedder'"),
    (HEAD + "rules:\n  - keep: [a, b]\n", r"r\.yaml:4: rules\[0\]\.keep: expected a string, got a list"),
    (HEAD + "name: !!python/name:os.system x\n", r"r\.yaml:3: \(yaml\): cannot build a value: "),
    # invalid enum values
    ("format_version: 1\nmode: trinary\n",
     r"r\.yaml:2: mode: unknown mode 'trinary' \(did you mean 'ternary'\?\); valid: binary, ternary$"),
    (HEAD + "group_size: 256\n", r"r\.yaml:3: group_size: unsupported group size 256; valid: 32, 64, 128$"),
    (HEAD + "scale_dtype: float32\n",
     r"r\.yaml:3: scale_dtype: unknown scale dtype 'float32'.*; valid: float16, bfloat16$"),
    (HEAD + "kept_dtype: fp16\n", r"r\.yaml:3: kept_dtype: unknown kept dtype 'fp16'.*; valid: source, float16, "),
    (HEAD + "solver: absmin\n", r"r\.yaml:3: solver: unknown solver 'absmin' \(did you mean 'absmean'\?\); "
                                r"valid: absmean, act-aware, gptq, grid$"),
    (HEAD + "targets: [mlx, cuda]\n", r"r\.yaml:3: targets\[1\]: unknown target 'cuda'; valid: mlx, gemlite, bonsai, mflux$"),
    (HEAD + "rules:\n  - quantize: a\n    mode: int4\n", r"r\.yaml:5: rules\[0\]\.mode: unknown mode 'int4'"),
    ("format_version: 2\nmode: binary\nfuture_key: 1\n",
     r"r\.yaml:1: format_version: unsupported version 2; valid: 1$"),
    # empty or absent
    ("mode: binary\n", r"r\.yaml:1: format_version: required key is missing; valid: 1$"),
    ("\n\nformat_version: 1\nname: x\n", r"r\.yaml:3: mode: required key is missing; valid: binary, ternary$"),
    ("format_version: 1\nmode:\n", r"r\.yaml:2: mode: is empty; valid: binary, ternary$"),
    (HEAD + "name: ''\n", r"r\.yaml:3: name: is empty; valid: a non-empty string$"),
    (HEAD + "solver: ~\n", r"r\.yaml:3: solver: is empty; valid: absmean, act-aware, gptq, grid$"),
    (HEAD + "targets: []\n", r"r\.yaml:3: targets: is empty; valid: at least one of mlx, gemlite, bonsai, mflux$"),
    (HEAD + "rules:\n", r"r\.yaml:3: rules: is empty; valid: "),
    (HEAD + "rules:\n  - keep: ''\n", r"r\.yaml:4: rules\[0\]\.keep: is empty; valid: a glob"),
    (HEAD + "rules:\n  - quantize:\n", r"r\.yaml:4: rules\[0\]\.quantize: is empty; valid: a glob"),
    (HEAD + "rules:\n  - mode: ternary\n",
     r"r\.yaml:4: rules\[0\]: has neither keep nor quantize; valid: exactly one of keep, quantize$"),
    # duplicates
    ("format_version: 1\nmode: binary\nname: a\nmode: ternary\n",
     r"r\.yaml:4: mode: duplicate key \(first set at line 2\); valid: each key once$"),
    (HEAD + "rules:\n  - quantize: a\n    mode: binary\n    mode: ternary\n",
     r"r\.yaml:6: rules\[0\]\.mode: duplicate key \(first set at line 5\)"),
    (HEAD + "targets: [mlx, gemlite, mlx]\n", r"r\.yaml:3: targets\[2\]: 'mlx' is already listed at targets\[0\]"),
    (HEAD + "rules:\n  - keep: a\n  - keep: b\n  - quantize: a\n",
     r"r\.yaml:6: rules\[2\]\.quantize: pattern 'a' already used by rules\[0\] \(line 4\).*; valid: each pattern once"),
    # impossible combinations
    ("format_version: 1\nmode: binary\nsolver: optimal\n",
     r"r\.yaml:3: solver: 'optimal' is a ternary solver, but the mode is binary; valid: absmean, act-aware, gptq, grid$"),
    (HEAD + "rules:\n  - quantize: a\n    solver: optimal\n",
     r"r\.yaml:5: rules\[0\]\.solver: 'optimal' is a ternary solver, but the mode is binary; valid: absmean, act-aware, gptq, grid$"),
    (HEAD + "rules:\n  - quantize: a\n    mode: ternary\n    solver: absmean\n",
     r"r\.yaml:6: rules\[0\]\.solver: 'absmean' is a binary solver, but the mode is ternary "
     r"\(set by rules\[0\]\.mode\); valid: optimal, threshold, act-aware, gptq, grid$"),
    (HEAD + "rules:\n  - keep: a\n    mode: ternary\n",
     r"r\.yaml:5: rules\[0\]\.mode: a keep rule takes no mode; valid: drop mode, or use quantize: a "),
    (HEAD + "rules:\n  - keep: a\n    solver: absmean\n",
     r"r\.yaml:5: rules\[0\]\.solver: a keep rule takes no solver"),
    (HEAD + "rules:\n  - keep: a\n    quantize: a\n",
     r"r\.yaml:4: rules\[0\]: has both keep and quantize; valid: exactly one of keep, quantize$"),
    # YAML syntax and document shape
    (HEAD + "rules: [a\n", r"r\.yaml:4: \(yaml\): syntax error: .*; valid: well-formed YAML"),
    ("format_version: 1\n mode: binary\n", r"r\.yaml:2: \(yaml\): syntax error: mapping values are not allowed"),
    ("format_version: 1\n\tmode: binary\n", r"r\.yaml:2: \(yaml\): syntax error: "),
    (HEAD + "---\nmode: binary\n", r"r\.yaml:3: \(yaml\): syntax error: expected a single document"),
    ("mode: \x07binary\n", r"r\.yaml:1: \(yaml\): cannot read the text: "),
    ("", r"r\.yaml:1: \(recipe\): the document is empty; valid: a mapping"),
    ("# only a comment\n", r"r\.yaml:1: \(recipe\): the document is empty"),
    ("\n- mode: binary\n", r"r\.yaml:2: \(recipe\): expected a mapping at top level, got a list; valid: a mapping "
                           r"with keys format_version, name, mode"),
    ("binary\n", r"r\.yaml:1: \(recipe\): expected a mapping at top level, got string 'binary'"),
    ("? [a, b]\n: 1\n", r"r\.yaml:1: \?: a key must be a plain name, got a list"),
]


@pytest.mark.parametrize("text, message", ERRORS, ids=[str(i) for i in range(len(ERRORS))])
def test_errors_name_file_line_and_key(text, message):
    with pytest.raises(RecipeError, match="^" + message):
        parse_recipe(text, source="r.yaml")


def test_file_errors(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(RecipeError, match=f"^{re.escape(str(missing))}: \\(file\\): does not exist; valid: "):
        load_recipe(missing)
    with pytest.raises(RecipeError, match=f"^{re.escape(str(tmp_path))}: \\(file\\): is a directory"):
        load_recipe(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes(b"format_version: 1\nname: caf\xe9\n")
    with pytest.raises(RecipeError, match=f"^{re.escape(str(latin1))}:2: \\(file\\): is not UTF-8 text"):
        load_recipe(latin1)
    listed = tmp_path / "listed.yaml"
    listed.write_text("- keep: x_embedder\n")
    with pytest.raises(RecipeError, match=f"^{re.escape(str(listed))}:1: \\(recipe\\): expected a mapping"):
        load_recipe(listed)


def test_default_recipe_rejects_an_unknown_mode():
    with pytest.raises(RecipeError, match="unknown mode 'int4'; valid: binary, ternary"):
        default_recipe("int4")


# -- check_matches --------------------------------------------------------------------------------------------

def test_check_matches_names_every_dead_rule_with_a_hint():
    recipe = parse("""\
        format_version: 1
        mode: binary
        rules:
          - keep: x_embeder
          - keep: proj_out
          - quantize: transformer_blocks.*.attn.to_qq
            mode: ternary
        """)
    with pytest.raises(RecipeError) as info:
        recipe.check_matches(ALL)
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert re.match(r"r\.yaml:4: rules\[0\]\.keep: pattern 'x_embeder' matches no tensor of the checkpoint; "
                    r"valid: closest names: x_embedder", lines[0])
    assert re.match(r"r\.yaml:6: rules\[2\]\.quantize: pattern 'transformer_blocks\.\*\.attn\.to_qq' matches no "
                    r"tensor of the checkpoint; valid: closest names: transformer_blocks\.\d\.attn\.to_q", lines[1])
    recipe.check_matches(ALL + ["x_embeder.weight", "transformer_blocks.9.attn.to_qq.weight"])


def test_check_matches_without_close_names_explains_patterns():
    recipe = parse(HEAD + "rules:\n  - keep: zzz\n")
    with pytest.raises(RecipeError, match=r"^r\.yaml:4: rules\[0\]\.keep: .*; valid: a glob over tensor or module"):
        recipe.check_matches(ALL)


# -- properties -----------------------------------------------------------------------------------------------

names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.*0123456789", min_size=1, max_size=20).filter(
    lambda s: s.strip())


@st.composite
def recipe_dicts(draw):
    mode = draw(st.sampled_from(MODES))
    d = {"format_version": 1, "mode": mode}
    if draw(st.booleans()):
        d["name"] = draw(names)
    for key, choices in (("group_size", GROUP_SIZES), ("scale_dtype", SCALE_DTYPES), ("kept_dtype", KEPT_DTYPES),
                         ("solver", SOLVERS[mode])):
        if draw(st.booleans()):
            d[key] = draw(st.sampled_from(choices))
    if draw(st.booleans()):
        d["targets"] = draw(st.permutations(TARGETS).flatmap(lambda t: st.integers(1, len(t)).map(lambda n: t[:n])))
    patterns = draw(st.lists(names, unique=True, max_size=6))
    rules = []
    for pattern in patterns:
        if draw(st.booleans()):
            rules.append({"keep": pattern})
            continue
        rule = {"quantize": pattern}
        rule_mode = draw(st.sampled_from((None,) + MODES))
        if rule_mode:
            rule["mode"] = rule_mode
        if draw(st.booleans()):
            rule["solver"] = draw(st.sampled_from(SOLVERS[rule_mode or mode]))
        rules.append(rule)
    if rules or draw(st.booleans()):
        d["rules"] = rules
    return d


@settings(max_examples=60, deadline=None)
@given(recipe_dicts())
def test_valid_recipes_round_trip_through_to_dict(d):
    recipe = parse_recipe(yaml.safe_dump(d, sort_keys=False), source="r.yaml")
    out = recipe.to_dict()
    assert json.loads(json.dumps(out)) == out
    assert {k: v for k, v in out.items() if k in d} == d
    again = parse_recipe(yaml.safe_dump(out), source="r.yaml")
    assert again.to_dict() == out
    for rule in recipe.rules:
        if rule.action == "quantize":
            assert recipe.solver_for(rule) in SOLVERS[recipe.mode_for(rule)]


SHIPPED = default_recipe("binary").text


@settings(max_examples=150, deadline=None)
@given(st.one_of(
    st.text(max_size=80),
    st.builds(lambda i, j, junk: SHIPPED[:i] + junk + SHIPPED[j:],
              st.integers(0, len(SHIPPED)), st.integers(0, len(SHIPPED)), st.text(max_size=12)),
))
def test_any_text_gives_a_recipe_or_a_located_recipe_error(text):
    try:
        recipe = parse_recipe(text, source="r.yaml")
    except RecipeError as e:
        assert re.match(r"r\.yaml(:\d+)?: \S.*; valid: ", str(e), re.S), str(e)
    else:
        assert recipe.mode in MODES and recipe.solver in SOLVERS[recipe.mode]
