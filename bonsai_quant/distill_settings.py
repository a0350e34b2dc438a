"""Distillation settings: defaults, the recipe's `distill:` section, and command-line overrides, in that order.

Beside `recipe.py`, which validates the `distill:` section against it; `distill/` trains with it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

INPUTS = ("continuous", "schedule")


@dataclass(frozen=True)
class DistillSettings:
    steps: int = 400            # optimizer steps
    batch_size: int = 32        # transformer calls per step, over all processes
    lr: float = 2e-4            # AdamW on the latent weights of quantized linears
    scale_lr: float = 1e-3      # AdamW on the per-group scales (relative moves matter, scales are small)
    kept_lr: float = 5e-5       # AdamW on the 16-bit tensors, when train_kept
    train_kept: bool = True     # train the tensors the recipe keeps 16-bit (False: frozen at the teacher's)
    warmup_steps: int = 20      # linear warm-up, then cosine decay to 0
    inputs: str = "continuous"  # continuous: any point on the teacher's Euler paths; schedule: the stored steps
    data_loss: float = 0.0      # weight of a flow-matching loss on real data (the digits model only)
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def updated(self, **overrides) -> DistillSettings:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def problems(self) -> list[tuple[str, str, str]]:
        """(key, what is wrong, what is valid) for each out-of-range value."""
        out = []
        for key in ("steps", "batch_size"):
            if getattr(self, key) < 1:
                out.append((key, f"must be at least 1, got {getattr(self, key)}", "a positive integer"))
        for key in ("lr", "scale_lr", "kept_lr", "data_loss"):
            if getattr(self, key) < 0:
                out.append((key, f"must not be negative, got {getattr(self, key)}", "a number >= 0"))
        if self.warmup_steps < 0:
            out.append(("warmup_steps", f"must not be negative, got {self.warmup_steps}", "an integer >= 0"))
        if self.inputs not in INPUTS:
            out.append(("inputs", f"unknown input kind {self.inputs!r}", ", ".join(INPUTS)))
        return out


KEYS = {f.name: f.type for f in fields(DistillSettings)}
