"""Conversion recipes: YAML text -> a frozen, fully validated `Recipe`.

Every problem becomes one `RecipeError` reading `<file>:<line>: <key path>: <what is wrong>; valid: <options>`,
so the user can jump to the line. We walk `yaml.compose`'s node tree instead of using `safe_load` because only
the nodes carry line numbers, and `safe_load` silently lets a duplicated key win.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Iterable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from .errors import RecipeError
from .packing.formats import GROUP_SIZES, MODES, RECIPE_KEPT_DTYPES
from .packing.formats import SCALE_DTYPE_NAMES as SCALE_DTYPES
from .packing.targets import NAMES as TARGETS
from .packing.targets import target as registered
from .quantizers.solvers import DEFAULT_SOLVERS
from .quantizers.solvers import MODE_SOLVERS as SOLVERS

FORMAT_VERSION = 1
KEPT_DTYPES = RECIPE_KEPT_DTYPES
DEFAULT_TARGETS = ("mlx", "gemlite")

_TOP_KEYS = ("format_version", "name", "mode", "group_size", "scale_dtype", "kept_dtype", "solver", "targets",
             "calibration", "distill", "rules")
_RULE_KEYS = ("keep", "quantize", "mode", "solver")
_PATTERN_HINT = "a glob over tensor or module names, e.g. x_embedder or transformer_blocks.*.attn.norm_*"


@dataclass(frozen=True)
class Rule:
    action: str                 # "keep" | "quantize"
    pattern: str
    mode: str | None = None     # quantize rules only: override of the recipe's mode
    solver: str | None = None   # quantize rules only: override of the solver
    line: int = 0
    source: str = "<string>"

    def matches(self, tensor_name: str) -> bool:
        # Matching the module name too lets a rule say `x_embedder` rather than `x_embedder.weight`, and keeps
        # matching if a layer ever gains a bias.
        module = tensor_name.rpartition(".")[0]
        return fnmatch.fnmatchcase(tensor_name, self.pattern) or (
            bool(module) and fnmatch.fnmatchcase(module, self.pattern))

    def to_dict(self) -> dict:
        d = {self.action: self.pattern}
        if self.mode is not None:
            d["mode"] = self.mode
        if self.solver is not None:
            d["solver"] = self.solver
        return d


@dataclass(frozen=True)
class Recipe:
    name: str
    mode: str
    group_size: int
    scale_dtype: str
    kept_dtype: str
    solver: str
    targets: tuple[str, ...]
    rules: tuple[Rule, ...]
    source: str
    text: str = field(repr=False)
    calibration: str | None = None  # a calibration set folder, relative to the recipe file's folder
    calibration_line: int = 0
    distill: dict | None = None  # `distill:` settings given in the file (bonsai_quant.distill_settings)

    def rule_for(self, tensor_name: str) -> Rule | None:
        """The first rule matching `tensor_name` (first match wins), or None."""
        return next((r for r in self.rules if r.matches(tensor_name)), None)

    def mode_for(self, rule: Rule | None) -> str:
        _require_quantize(rule)
        return rule.mode if rule is not None and rule.mode is not None else self.mode

    def solver_for(self, rule: Rule | None) -> str:
        _require_quantize(rule)
        if rule is not None and rule.solver is not None:
            return rule.solver
        mode = self.mode_for(rule)
        # The top-level solver belongs to the top-level mode; a rule switching mode gets that mode's default.
        return self.solver if mode == self.mode else DEFAULT_SOLVERS[mode]

    def calibration_path(self) -> Path | None:
        """The `calibration:` folder, resolved against the folder of the recipe file (or the working folder for
        a recipe given as text)."""
        if self.calibration is None:
            return None
        path = Path(self.calibration).expanduser()
        if path.is_absolute() or self.source == "<string>":
            return path
        return Path(self.source).parent / path

    def with_mode(self, mode: str) -> Recipe:
        """This recipe with its top-level mode replaced, re-validated from `text` (so an explicit solver that
        does not fit the new mode is an error, while a defaulted one follows the mode)."""
        return _Parser(self.source, mode_override=mode).parse(self.text)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "mode": self.mode,
            "group_size": self.group_size,
            "scale_dtype": self.scale_dtype,
            "kept_dtype": self.kept_dtype,
            "solver": self.solver,
            "targets": list(self.targets),
            **({"calibration": self.calibration} if self.calibration is not None else {}),
            **({"distill": dict(self.distill)} if self.distill is not None else {}),
            "rules": [r.to_dict() for r in self.rules],
        }

    def check_matches(self, tensor_names: Iterable[str]) -> None:
        """Raise if a rule matches none of `tensor_names`: almost always a typo that would silently quantize
        (or keep) something the user meant otherwise."""
        names = list(tensor_names)
        candidates = sorted(set(names) | {n.rpartition(".")[0] for n in names if "." in n})
        problems = []
        for index, rule in enumerate(self.rules):
            if any(rule.matches(n) for n in names):
                continue
            close = difflib.get_close_matches(rule.pattern, candidates, n=3, cutoff=0.5)
            valid = f"closest names: {', '.join(close)}" if close else _PATTERN_HINT
            problems.append(_message(rule.source, rule.line, f"rules[{index}].{rule.action}",
                                     f"pattern {rule.pattern!r} matches no tensor of the checkpoint", valid))
        if problems:
            raise RecipeError("\n".join(problems))


def parse_recipe(text: str, source: str = "<string>") -> Recipe:
    return _Parser(source).parse(text)


def load_recipe(path: str | os.PathLike) -> Recipe:
    source = os.fspath(path)
    hint = "a recipe YAML file, e.g. recipes/binary.yaml"
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise RecipeError(_message(source, None, "(file)", "does not exist", hint)) from None
    except IsADirectoryError:
        raise RecipeError(_message(source, None, "(file)", "is a directory", hint)) from None
    except OSError as e:
        raise RecipeError(_message(source, None, "(file)", f"cannot be read ({e.strerror})", hint)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise RecipeError(_message(source, line, "(file)", "is not UTF-8 text", "a UTF-8 YAML file")) from None
    return parse_recipe(text, source)


def default_recipe(mode: str) -> Recipe:
    if mode not in MODES:
        raise RecipeError(f"default_recipe: mode: unknown mode {mode!r}; valid: {', '.join(MODES)}")
    resource = files(__package__) / "recipes" / f"{mode}.yaml"
    return parse_recipe(resource.read_text(encoding="utf-8"), str(resource))


def _require_quantize(rule: Rule | None) -> None:
    if rule is not None and rule.action != "quantize":
        raise ValueError(f"{rule.pattern!r} is a {rule.action} rule; only quantize rules have a mode and solver")


def _message(source: str, line: int | None, path: str, what: str, valid: str) -> str:
    where = source if line is None else f"{source}:{line}"
    return f"{where}: {path}: {what}; valid: {valid}"


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _line(node: Node) -> int:
    return node.start_mark.line + 1


class _Parser:
    def __init__(self, source: str, mode_override: str | None = None):
        self.source = source
        self.mode_override = mode_override
        self.constructor = yaml.constructor.SafeConstructor()

    def fail(self, node_or_line: Node | int | None, path: str, what: str, valid: str) -> RecipeError:
        line = _line(node_or_line) if isinstance(node_or_line, Node) else node_or_line
        return RecipeError(_message(self.source, line, path, what, valid))

    def parse(self, text: str) -> Recipe:
        root = self.compose(text)
        if root is None:
            raise self.fail(1, "(recipe)", "the document is empty", "a mapping with at least format_version and mode")
        if not isinstance(root, MappingNode):
            raise self.fail(root, "(recipe)", f"expected a mapping at top level, got {self.describe(root)}",
                            f"a mapping with keys {', '.join(_TOP_KEYS)}")
        fields = self.mapping(root, "")
        # Checked before unknown keys, so a file from a newer format says so instead of listing unknown keys.
        version = self.required(fields, root, "format_version", str(FORMAT_VERSION))
        if self.integer(version, "format_version", str(FORMAT_VERSION)) != FORMAT_VERSION:
            raise self.fail(version, "format_version", f"unsupported version {version.value}", str(FORMAT_VERSION))
        self.reject_unknown(root, "", _TOP_KEYS)

        mode_node = self.required(fields, root, "mode", ", ".join(MODES))
        mode = self.choice(mode_node, "mode", MODES, "mode")
        mode_note = ""
        if self.mode_override is not None:
            if self.mode_override not in MODES:
                raise self.fail(mode_node, "mode", f"override {self.mode_override!r} is not a mode"
                                f"{_did_you_mean(self.mode_override, MODES)}", ", ".join(MODES))
            if self.mode_override != mode:
                mode, mode_note = self.mode_override, f" (mode overridden from {mode} to {self.mode_override})"

        name = Path(self.source).stem if self.source != "<string>" else "custom"
        if "name" in fields:
            name = self.string(fields["name"], "name", "a non-empty string")
        group_size = 128
        if "group_size" in fields:
            node = fields["group_size"]
            valid = ", ".join(map(str, GROUP_SIZES))
            group_size = self.integer(node, "group_size", valid)
            if group_size not in GROUP_SIZES:
                raise self.fail(node, "group_size", f"unsupported group size {group_size}", valid)
        targets = self.targets(fields["targets"]) if "targets" in fields else DEFAULT_TARGETS
        # bf16 where any target's consumers hold bf16 scales (`Target.default_scale_dtype`): they then load
        # exactly what was quantized.
        wanted = {registered(t).default_scale_dtype for t in targets}
        default_scale = "bfloat16" if "bfloat16" in wanted else "float16"
        scale_dtype = self.optional_choice(fields, "scale_dtype", SCALE_DTYPES, default_scale, "scale dtype")
        kept_dtype = self.optional_choice(fields, "kept_dtype", KEPT_DTYPES, "source", "kept dtype")
        solver = DEFAULT_SOLVERS[mode]
        if "solver" in fields:
            solver = self.solver(fields["solver"], "solver", mode, mode_note)
        calibration, calibration_line = None, 0
        if "calibration" in fields:
            calibration = self.string(fields["calibration"], "calibration",
                                      "a calibration set folder made by `bonsai-quant calibrate`, relative to "
                                      "this file, e.g. ../calibration/flux2-tiny-digits")
            calibration_line = _line(fields["calibration"])
        rules = self.rules(fields["rules"], mode, mode_note) if "rules" in fields else ()
        distill = self.distill(fields["distill"]) if "distill" in fields else None
        return Recipe(name=name, mode=mode, group_size=group_size, scale_dtype=scale_dtype, kept_dtype=kept_dtype,
                      solver=solver, targets=targets, rules=rules, source=self.source, text=text,
                      calibration=calibration, calibration_line=calibration_line, distill=distill)

    def distill(self, node: Node) -> dict:
        from .distill_settings import KEYS, DistillSettings

        if not isinstance(node, MappingNode):
            raise self.fail(node, "distill", f"expected a mapping, got {self.describe(node)}",
                            f"a mapping of {', '.join(KEYS)}")
        fields = self.mapping(node, "distill.")
        self.reject_unknown(node, "distill.", tuple(KEYS))
        values = {}
        for key, value_node in fields.items():
            kind = KEYS[key]
            path = f"distill.{key}"
            if kind == "int":
                values[key] = self.integer(value_node, path, "an integer")
            elif kind == "float":
                value = self.value(value_node) if isinstance(value_node, ScalarNode) else None
                if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
                    try:
                        value = float(value)
                    except ValueError:
                        pass
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise self.fail(value_node, path, f"expected a number, got {self.describe(value_node)}",
                                    "a number, e.g. 2.0e-4")
                values[key] = float(value)
            elif kind == "bool":
                value = self.value(value_node) if isinstance(value_node, ScalarNode) else None
                if not isinstance(value, bool):
                    raise self.fail(value_node, path, f"expected true or false, got {self.describe(value_node)}",
                                    "true, false")
                values[key] = value
            else:
                values[key] = self.string(value_node, path, "a string")
        for key, what, valid in DistillSettings().updated(**values).problems():
            raise self.fail(fields[key], f"distill.{key}", what, valid)
        return values

    def compose(self, text: str) -> Node | None:
        try:
            return yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            what = ": ".join(part for part in (e.context, e.problem) if part)
            raise self.fail(mark.line + 1 if mark else None, "(yaml)", f"syntax error: {what}",
                            "well-formed YAML, as in the shipped recipes/binary.yaml") from None
        except yaml.reader.ReaderError as e:  # a control character: it has a position instead of a mark
            line = text.count("\n", 0, e.position) + 1
            code = ord(e.character) if isinstance(e.character, str) else e.character
            raise self.fail(line, "(yaml)", f"cannot read the text: {e.reason} (U+{code:04X})",
                            "printable UTF-8 YAML") from None
        except RecursionError:  # the YAML composer recurses once per nesting level
            raise self.fail(None, "(yaml)", "nested too deeply to read",
                            "a recipe as flat as the shipped recipes/binary.yaml") from None

    # -- structure --------------------------------------------------------------------------------------------

    def mapping(self, node: MappingNode, prefix: str) -> dict[str, Node]:
        fields: dict[str, Node] = {}
        first_line: dict[str, int] = {}
        for key, value in node.value:
            if not isinstance(key, ScalarNode):
                raise self.fail(key, prefix + "?", f"a key must be a plain name, got {self.describe(key)}",
                                "a plain name")
            if key.value in fields:
                raise self.fail(key, prefix + key.value,
                                f"duplicate key (first set at line {first_line[key.value]})", "each key once")
            fields[key.value] = value
            first_line[key.value] = _line(key)
        return fields

    def reject_unknown(self, node: MappingNode, prefix: str, allowed: tuple[str, ...]) -> None:
        for key, _ in node.value:
            if key.value not in allowed:
                raise self.fail(key, prefix + key.value, f"unknown key{_did_you_mean(key.value, allowed)}",
                                ", ".join(allowed))

    def required(self, fields: dict[str, Node], parent: MappingNode, key: str, valid: str) -> Node:
        if key not in fields:
            raise self.fail(parent, key, "required key is missing", valid)
        return fields[key]

    # -- scalars ----------------------------------------------------------------------------------------------

    def value(self, node: Node):
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.constructor.ConstructorError as e:
            mark = e.problem_mark or node.start_mark
            raise self.fail(mark.line + 1, "(yaml)", f"cannot build a value: {e.problem}",
                            "plain YAML scalars, lists and mappings (no tags)") from None
        except (ValueError, RecursionError) as e:  # e.g. an integer of more digits than Python converts
            raise self.fail(node.start_mark.line + 1, "(yaml)", f"cannot build a value: {str(e)[:120]}",
                            "plain YAML scalars of ordinary size") from None

    def describe(self, node: Node) -> str:
        if isinstance(node, MappingNode):
            return "a mapping"
        if isinstance(node, SequenceNode):
            return "a list"
        value = self.value(node)
        if value is None:
            return "nothing"
        kind = {bool: "boolean", int: "integer", float: "number", str: "string"}.get(type(value), type(value).__name__)
        return f"{kind} {value!r}" if isinstance(value, str) else f"{kind} {node.value}"

    def scalar(self, node: Node, path: str, expected: type, noun: str, valid: str):
        if isinstance(node, ScalarNode):
            value = self.value(node)
            if value is None:
                raise self.fail(node, path, "is empty", valid)
            # bool is an int subclass in Python, but `group_size: yes` is no integer.
            if isinstance(value, expected) and not isinstance(value, bool):
                return value
        raise self.fail(node, path, f"expected {noun}, got {self.describe(node)}", valid)

    def integer(self, node: Node, path: str, valid: str) -> int:
        return self.scalar(node, path, int, "an integer", valid)

    def string(self, node: Node, path: str, valid: str) -> str:
        value = self.scalar(node, path, str, "a string", valid)
        if not value.strip():
            raise self.fail(node, path, "is empty", valid)
        return value

    def choice(self, node: Node, path: str, choices: tuple[str, ...], noun: str) -> str:
        value = self.string(node, path, ", ".join(choices))
        if value not in choices:
            raise self.fail(node, path, f"unknown {noun} {value!r}{_did_you_mean(value, choices)}",
                            ", ".join(choices))
        return value

    def optional_choice(self, fields, key: str, choices: tuple[str, ...], default: str, noun: str) -> str:
        return self.choice(fields[key], key, choices, noun) if key in fields else default

    def solver(self, node: Node, path: str, mode: str, mode_note: str) -> str:
        valid = ", ".join(SOLVERS[mode])
        value = self.string(node, path, valid)
        if value not in SOLVERS[mode]:
            owner = next((m for m, names in SOLVERS.items() if value in names), None)
            what = (f"{value!r} is a {owner} solver, but the mode is {mode}{mode_note}" if owner else
                    f"unknown solver {value!r}{_did_you_mean(value, SOLVERS[mode])}")
            raise self.fail(node, path, what, valid)
        return value

    # -- lists ------------------------------------------------------------------------------------------------

    def sequence(self, node: Node, path: str, valid: str) -> list[Node]:
        if isinstance(node, SequenceNode):
            return node.value
        if isinstance(node, ScalarNode) and self.value(node) is None:
            raise self.fail(node, path, "is empty", valid)
        raise self.fail(node, path, f"expected a list, got {self.describe(node)}", valid)

    def targets(self, node: Node) -> tuple[str, ...]:
        items = self.sequence(node, "targets", f"a non-empty list drawn from {', '.join(TARGETS)}, "
                                               f"e.g. [{', '.join(TARGETS)}]")
        if not items:
            raise self.fail(node, "targets", "is empty", f"at least one of {', '.join(TARGETS)}")
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            target = self.choice(item, f"targets[{i}]", TARGETS, "target")
            if target in seen:
                raise self.fail(item, f"targets[{i}]", f"{target!r} is already listed at targets[{seen[target]}]",
                                "each target once")
            seen[target] = i
        return tuple(seen)

    def rules(self, node: Node, mode: str, mode_note: str) -> tuple[Rule, ...]:
        items = self.sequence(node, "rules", "a list of {keep: PATTERN} or {quantize: PATTERN, mode: ..., "
                                             "solver: ...} mappings; [] or no rules key for none")
        rules: list[Rule] = []
        for i, item in enumerate(items):
            rule = self.rule(item, f"rules[{i}]", mode, mode_note)
            earlier = next((j for j, r in enumerate(rules) if r.pattern == rule.pattern), None)
            if earlier is not None:
                raise self.fail(rule.line, f"rules[{i}].{rule.action}",
                                f"pattern {rule.pattern!r} already used by rules[{earlier}] "
                                f"(line {rules[earlier].line}), so this rule can never match first",
                                "each pattern once")
            rules.append(rule)
        return tuple(rules)

    def rule(self, node: Node, path: str, mode: str, mode_note: str) -> Rule:
        if not isinstance(node, MappingNode):
            raise self.fail(node, path, f"expected a mapping, got {self.describe(node)}",
                            "{keep: PATTERN} or {quantize: PATTERN, mode: ..., solver: ...}")
        fields = self.mapping(node, path + ".")
        self.reject_unknown(node, path + ".", _RULE_KEYS)
        actions = [a for a in ("keep", "quantize") if a in fields]
        if len(actions) != 1:
            what = "has both keep and quantize" if actions else "has neither keep nor quantize"
            raise self.fail(node, path, what, "exactly one of keep, quantize")
        action = actions[0]
        pattern_node = fields[action]
        pattern = self.string(pattern_node, f"{path}.{action}", _PATTERN_HINT)
        if action == "keep":
            for key in ("mode", "solver"):
                if key in fields:
                    raise self.fail(fields[key], f"{path}.{key}", f"a keep rule takes no {key}",
                                    f"drop {key}, or use quantize: {pattern} to override it")
        rule_mode = self.choice(fields["mode"], f"{path}.mode", MODES, "mode") if "mode" in fields else None
        if rule_mode is not None:
            mode, mode_note = rule_mode, f" (set by {path}.mode)"
        rule_solver = self.solver(fields["solver"], f"{path}.solver", mode, mode_note) if "solver" in fields else None
        return Rule(action=action, pattern=pattern, mode=rule_mode, solver=rule_solver, line=_line(pattern_node),
                    source=self.source)
