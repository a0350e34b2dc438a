"""Recipe x checkpoint -> one decision per tensor, and the exact bytes each target will hold.

Everything here is decided from headers alone, before any weight is read: a bad rule or an impossible
combination fails the run before the first tensor is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint, Entry
from .errors import RecipeError
from .flux2 import TensorSpec
from .packing.formats import KEPT_DTYPES, SCALE_DTYPES
from .packing.packset import Slot, slot_entries
from .packing.targets import NAMES
from .packing.targets import target as _target
from .recipe import Recipe, Rule

TARGETS = NAMES  # the registered targets (packing/targets.py), as plans know them
# Roles whose linears are quantized when no rule names them: the matmul-heavy block projections. Everything
# else (embedders, modulation, output, norms) stays 16-bit unless a rule asks, as in the published release.
DEFAULT_QUANTIZED_ROLES = ("attention", "mlp", "fused_projection")


@dataclass(frozen=True)
class Decision:
    spec: TensorSpec
    source_dtype: torch.dtype
    action: str                 # "quantize" | "keep"
    rule: Rule | None           # None: the default for the tensor's role
    mode: str | None = None     # quantized tensors only
    solver: str | None = None
    kept_dtype: torch.dtype | None = None  # kept tensors only

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def source_nbytes(self) -> int:
        return self.spec.numel * self.source_dtype.itemsize

    @property
    def module(self) -> str:
        return self.spec.name.removesuffix(".weight")

    @property
    def slot(self) -> Slot:
        return Slot(self.name, self.spec.shape, self.action, self.mode, self.kept_dtype)

    @property
    def rule_label(self) -> str:
        return f"{self.rule.action}: {self.rule.pattern}" if self.rule else f"default ({self.spec.role})"


@dataclass(frozen=True)
class Plan:
    recipe: Recipe
    targets: tuple[str, ...]
    decisions: tuple[Decision, ...]
    scale_dtype: torch.dtype

    def entries(self, target: str) -> list[tuple[Decision, list[Entry]]]:
        """Output tensors per decision for one target, in plan order."""
        return [(d, slot_entries(d.slot, target, self.recipe.group_size, self.scale_dtype)) for d in self.decisions]

    @property
    def quantized(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "quantize"]

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.action == "keep"]


def make_plan(checkpoint: Checkpoint, recipe: Recipe, targets: tuple[str, ...] | None = None) -> Plan:
    specs = checkpoint.validate()
    recipe.check_matches(specs)
    targets = tuple(targets or recipe.targets)
    for t in targets:
        _target(t, RecipeError)
    decisions = decide_all(specs, {n: t.dtype for n, t in checkpoint.tensors.items()}, recipe)
    plan = Plan(recipe, targets, decisions, SCALE_DTYPES[recipe.scale_dtype])
    for t in targets:
        plan.entries(t)  # the packers' layout() refuses shapes the runtime cannot hold: fail before work
    return plan


def decide_all(specs: dict[str, TensorSpec], dtypes: dict[str, torch.dtype], recipe: Recipe) -> tuple[Decision, ...]:
    """One decision per tensor, first matching rule wins; also used on in-memory models (fake quantization)."""
    return tuple(_decide(spec, dtypes[spec.name], recipe) for spec in specs.values())


def _decide(spec: TensorSpec, dtype: torch.dtype, recipe: Recipe) -> Decision:
    rule = next((r for r in recipe.rules if r.matches(spec.name)), None)
    if rule is None:
        quantize = spec.is_linear_weight and spec.role in DEFAULT_QUANTIZED_ROLES
    else:
        quantize = rule.action == "quantize"
    if not quantize:
        kept = dtype if recipe.kept_dtype == "source" else KEPT_DTYPES[recipe.kept_dtype]
        return Decision(spec, dtype, "keep", rule, kept_dtype=kept)
    where = f"{rule.source}:{rule.line}: rule 'quantize: {rule.pattern}'" if rule else "default rule"
    if not spec.is_linear_weight:
        raise RecipeError(f"{where} matches {spec.name!r} ({spec.role}, shape {list(spec.shape)}), which is not "
                          "a Linear weight and cannot be quantized; valid: Linear weights only, add a keep rule "
                          "before it")
    if spec.shape[1] % recipe.group_size:
        raise RecipeError(f"{where}: {spec.name!r} has in_features {spec.shape[1]}, not a multiple of group_size "
                          f"{recipe.group_size}; valid: keep it, or a group_size dividing {spec.shape[1]}")
    return Decision(spec, dtype, "quantize", rule, mode=recipe.mode_for(rule), solver=recipe.solver_for(rule))


def summarize_bytes(plan: Plan, target: str) -> dict:
    """Bytes of the quantized linears (codes + scales + biases/zeros), of kept tensors, and bits per weight."""
    quant_bytes = kept_bytes = weights = 0
    for d, entries in plan.entries(target):
        size = sum(e.nbytes for e in entries)
        if d.action == "quantize":
            quant_bytes += size
            weights += d.spec.numel
        else:
            kept_bytes += size
    return {"quantized_bytes": quant_bytes, "kept_bytes": kept_bytes, "tensor_bytes": quant_bytes + kept_bytes,
            "quantized_weights": weights, "bits_per_weight": 8 * quant_bytes / weights if weights else 0.0}


def _rows(plan: Plan) -> list[tuple[Decision, str, int]]:
    return [(d, target, sum(e.nbytes for e in entries)) for target in plan.targets
            for d, entries in plan.entries(target)]


def plan_record(plan: Plan) -> dict:
    """`plan --json`: every tensor's rule, action, mode and bytes per target, and the totals."""
    return {"tensors": [{"name": d.name, "rule": d.rule_label, "action": d.action, "mode": d.mode, "target": t,
                         "bytes": b} for d, t, b in _rows(plan)],
            "totals": {t: summarize_bytes(plan, t) for t in plan.targets}}


def format_plan(plan: Plan) -> str:
    """`plan`'s table: one line per tensor (rule, mode, bytes per target), then the totals."""
    by_name: dict[str, dict] = {}
    for d, target, nbytes in _rows(plan):
        by_name.setdefault(d.name, {"d": d})[target] = nbytes
    lines = [f"{'tensor':<58} {'rule':<38} {'mode':<8}" + "".join(f" {t + ' bytes':>14}" for t in plan.targets)]
    for row in by_name.values():
        d = row["d"]
        mode = d.mode if d.action == "quantize" else "keep"
        lines.append(f"{d.name:<58} {d.rule_label[:38]:<38} {mode:<8}"
                     + "".join(f" {row[t]:>14,}" for t in plan.targets))
    lines.append(f"{len(plan.quantized)} tensors quantized, {len(plan.kept)} kept")
    for t in plan.targets:
        s = summarize_bytes(plan, t)
        lines.append(f"{t}: {s['tensor_bytes']:,} bytes; quantized linears {s['quantized_bytes']:,} bytes at "
                     f"{s['bits_per_weight']:.3f} bits/weight; kept {s['kept_bytes']:,} bytes")
    return "\n".join(lines)
