"""bonsai-quant: FLUX.2 [klein] transformers to binary and ternary packs for MLX and gemlite."""

__version__ = "0.1.0"
