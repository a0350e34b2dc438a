"""bonsai-quant: FLUX.2 [klein] transformers to binary and ternary packs for MLX and gemlite."""

__version__ = "0.1.0"


def load_transformer(path, dtype=None, device=None):
    """A pack or release folder as a diffusers `Flux2Transformer2DModel`, on the best runtime here.

    On a CUDA machine with gemlite installed, a gemlite pack runs on gemlite's kernels; otherwise the reference
    runtime computes from whichever pack is present (MLX layout preferred on CPU).
    """
    import torch

    from .runtime import load_transformer as load_reference
    from .runtime.gemlite_backend import gemlite_available, use_gemlite
    from .runtime.loader import resolve_pack

    if gemlite_available():
        try:
            folder = resolve_pack(path, "gemlite")
        except Exception:
            folder = None
        if folder is not None:
            model = load_reference(folder, dtype=dtype or torch.bfloat16, device=device or "cuda")
            use_gemlite(model)
            return model
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_reference(path, dtype=dtype or (torch.bfloat16 if device != "cpu" else torch.float32), device=device)
