"""CUDA runtime for packs: Triton kernels that read the packed 1-/2-bit codes (or bonsai trits) directly.

Importing this package needs no GPU and no triton; the kernels load on first use."""

from .backend import BACKENDS, apply_backend, choose_backend, cuda_unavailable_reason, default_backend, use_cuda

__all__ = ["BACKENDS", "apply_backend", "choose_backend", "cuda_unavailable_reason", "default_backend", "use_cuda"]
