"""bonsai-quant: FLUX.2 [klein] transformers to binary and ternary packs for MLX and gemlite."""

__version__ = "0.1.0"


def load_transformer(path, dtype=None, device=None, backend=None):
    """A pack or release folder as a diffusers `Flux2Transformer2DModel`, on the best runtime here.

    On a CUDA GPU the packs run on bonsai-quant's own CUDA kernels (`runtime/cuda`, measured faster than gemlite
    on the whole step); `backend="gemlite"` or `"reference"` chooses another. On the CPU the reference runtime
    computes from whichever pack is present (MLX layout preferred).
    """
    import torch

    from .runtime import load_transformer as load_runtime

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if str(device) != "cpu" else torch.float32)
    target = "gemlite" if backend == "gemlite" else None  # gemlite runs only its own layout
    return load_runtime(path, dtype=dtype, device=device, target=target, backend=backend)
