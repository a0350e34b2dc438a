"""Recipe x checkpoint -> one decision per tensor, and the exact bytes each target will hold.

Everything here is decided from headers alone, before any weight is read: a bad rule or an impossible
combination fails the run before the first tensor is quantized.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint, Entry
from .errors import RecipeError
from .flux2 import TensorSpec
from .recipe import Recipe, Rule

TARGETS = ("mlx", "gemlite", "bonsai", "mflux")
# Roles whose linears are quantized when no rule names them: the matmul-heavy block projections. Everything
# else (embedders, modulation, output, norms) stays 16-bit unless a rule asks, as in the published release.
DEFAULT_QUANTIZED_ROLES = ("attention", "mlp", "fused_projection")
BITS = {"binary": 1, "ternary": 2}
KEPT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def packer(target: str):
    if target not in TARGETS:
        raise RecipeError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    return importlib.import_module(f".packing.{target}", __package__)


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
        from .packset import Slot, slot_entries

        return [(d, slot_entries(Slot(d.name, d.spec.shape, d.action, d.mode, d.kept_dtype), target,
                                 self.recipe.group_size, self.scale_dtype)) for d in self.decisions]

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
        packer(t)
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
                          "a Linear weight and cannot be quantized; valid: Linear weights only, add a keep rule before it")
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
