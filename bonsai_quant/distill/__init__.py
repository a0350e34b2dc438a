"""Quantization-aware distillation (`bonsai-quant distill`): settings, student, inputs, trainer, export."""

from .settings import DistillSettings

__all__ = ["DistillOptions", "DistillSettings", "distill"]


def __getattr__(name: str):
    # The trainer (torch, accelerate) loads on first use: the command line imports `distill.cli` to build its
    # parser, and `bonsai-quant --help` should not wait for torch.
    if name in ("DistillOptions", "distill"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
