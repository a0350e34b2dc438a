"""The distillation settings, by their place in `distill/`: they live in `bonsai_quant.distill_settings`, low
enough for `recipe.py` to validate a recipe's `distill:` section without importing this package."""

from ..distill_settings import INPUTS, KEYS, DistillSettings

__all__ = ["INPUTS", "KEYS", "DistillSettings"]
