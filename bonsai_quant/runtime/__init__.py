"""Reference low-bit runtime: run packs directly in torch, on CPU or CUDA, without gemlite or MLX."""

from .loader import load_transformer, resolve_pack
from .packed_linear import PackedLinear

__all__ = ["load_transformer", "resolve_pack", "PackedLinear"]
