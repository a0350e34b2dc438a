"""Choosing the runtime of a loaded pack: "reference" (torch, any device), "gemlite", or "cuda" (ours)."""

from __future__ import annotations

import torch

from ...errors import BonsaiError
from ..packed_linear import PackedLinear
from .layout import from_buffers

BACKENDS = ("reference", "gemlite", "cuda")


def cuda_unavailable_reason(device: torch.device | str | None = None) -> str | None:
    """Why the CUDA backend cannot run on `device` (None: it can)."""
    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return f"the cuda backend runs on a CUDA device, and the model is on {dev}"
    if not torch.cuda.is_available():
        return "the cuda backend needs a CUDA GPU, and torch sees none"
    try:
        import triton  # noqa: F401
    except Exception as e:
        return f"the cuda backend needs triton, which does not import here ({e})"
    if torch.cuda.get_device_capability(dev) < (8, 0):
        return "the cuda backend needs compute capability 8.0 or newer (bf16 tensor cores)"
    return None


def default_backend(device: torch.device | str) -> str:
    return "cuda" if cuda_unavailable_reason(device) is None else "reference"


def use_cuda(model: torch.nn.Module, activations: str = "auto") -> int:
    """Replace every PackedLinear (any layout) by a CudaPackedLinear sharing its buffers; returns the count."""
    from .kernels import GROUP
    from .linear import CudaPackedLinear

    swapped = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, PackedLinear):
            continue
        reason = cuda_unavailable_reason(next(module.buffers()).device)
        if reason is not None:
            raise BonsaiError(reason)
        if module.group_size != GROUP:
            raise BonsaiError(f"{name}: the cuda backend runs group size {GROUP}, this pack has "
                              f"{module.group_size}; use backend='reference'")
        buffers = {n: getattr(module, n) for n in module._names}
        weights = from_buffers(module.layout, buffers, module.in_features, module.out_features, module.bits,
                               module.group_size)
        model.set_submodule(name, CudaPackedLinear(weights, activations))
        swapped += 1
    return swapped


def choose_backend(backend: str | None, device) -> str:
    """The backend to load with (None: "cuda" where it runs on `device`, else "reference"), checked before
    anything is read: an unknown name, or "cuda" where it cannot run, is a clear error."""
    if backend is None:
        return default_backend(device)
    if backend not in BACKENDS:
        raise BonsaiError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend == "cuda":
        reason = cuda_unavailable_reason(device)
        if reason is not None:
            raise BonsaiError(f"{reason}; use backend='reference' (any device) or load with device='cuda'")
    return backend


def apply_backend(model: torch.nn.Module, folder, backend: str) -> torch.nn.Module:
    """`load_transformer`'s last step: put the chosen runtime's layers in place of the reference ones."""
    if backend == "cuda":
        use_cuda(model)
    elif backend == "gemlite":
        from ..gemlite_backend import use_gemlite

        layouts = {m.layout for m in model.modules() if isinstance(m, PackedLinear)}
        if layouts - {"gemlite"}:
            raise BonsaiError(f"backend 'gemlite' runs gemlite-layout packs, and {folder} is "
                              f"{', '.join(sorted(layouts))}; use backend='cuda' or 'reference'")
        use_gemlite(model)
    return model
