"""Quantization-aware distillation (`bonsai-quant distill`): settings, student, inputs, trainer, export."""

from .settings import DistillSettings
from .trainer import DistillOptions, distill

__all__ = ["DistillOptions", "DistillSettings", "distill"]
