"""mflux pack: the transformer folder of a model saved by mflux 0.24 (`mflux-save`), holding our codes.

mflux loads a quantized FLUX.2 transformer only from its own saved format; anything else it reads as a Hugging
Face checkpoint, casting every tensor to bf16 (the uint32 codes too) and dropping the scales. Its saved format is:

- the tensors of MLX's affine quantization (`weight` uint32, `scales`, `biases`: w = scales * q + biases), packed
  exactly as the MLX pack (`packing/mlx.py`), so the codes and scales are the same bytes;
- mflux's module names, which differ from diffusers' in two places (`NAME_CHANGES`);
- `quantization_level` (the bits, as a string) and `mflux_version` in the safetensors metadata: mflux takes a
  folder as its own saved format only when one of them is there;
- the folder `transformer/` of an mflux model folder (beside `vae/`, `text_encoder/`, `tokenizer/`).

mflux recovers each layer's bits and group size from the tensor shapes, but only for bits in {2, 3, 4, 5, 6, 8};
for any other width (our 1-bit binary) it builds the layer with `quantization_level` bits and its default group
size, 64. So a ternary pack loads at any group size, and a binary one only at group_size 64 (the recipe
`binary-mflux.yaml`); `layout` refuses binary at other group sizes rather than write a pack mflux misreads.
"""

from __future__ import annotations

import re

import torch

from bonsai_quant.errors import PackError
from bonsai_quant.packing import mlx

SUFFIXES: tuple[str, ...] = mlx.SUFFIXES
BUFFERS: tuple[str, ...] = mlx.BUFFERS
# The format written: what mflux 0.24.0's `ModelSaver` writes and its `WeightLoader` reads back.
MFLUX_VERSION = "0.24.0"
# The only group size at which mflux builds a 1-bit layer (it cannot infer bits = 1 from the shapes).
BINARY_GROUP_SIZE = 64
# diffusers name -> mflux name; the single blocks' `attn.to_out` is already one Linear in both.
NAME_CHANGES = ((re.compile(r"^time_guidance_embed\.timestep_embedder\."), "time_guidance_embed."),
                (re.compile(r"^(transformer_blocks\.\d+\.attn\.to_out)\.0\."), r"\1."))
_BACK = ((re.compile(r"^time_guidance_embed\.(linear_[12]\.)"), r"time_guidance_embed.timestep_embedder.\1"),
         (re.compile(r"^(transformer_blocks\.\d+\.attn\.to_out)\.(?!0\.)"), r"\1.0."))


def stored_name(name: str) -> str:
    """The name mflux gives the tensor that diffusers calls `name`."""
    for pattern, replacement in NAME_CHANGES:
        name = pattern.sub(replacement, name)
    return name


def source_name(stored: str) -> str:
    """Inverse of `stored_name`: the diffusers name of a tensor of an mflux pack."""
    for pattern, replacement in _BACK:
        stored = pattern.sub(replacement, stored)
    return stored


def quantization_level(modes) -> str:
    """`quantization_level` of a pack whose layers use `modes`: the bits mflux falls back to for layers whose
    bits it cannot infer, so 1 whenever a binary layer is present."""
    modes = set(modes)
    return "1" if "binary" in modes else "2"


def extra_metadata(modes) -> dict[str, str]:
    """The safetensors metadata by which mflux takes a file as its own saved format."""
    return {"quantization_level": quantization_level(modes), "mflux_version": MFLUX_VERSION}


def check_readable(mode: str, group_size: int) -> None:
    if mode == "binary" and group_size != BINARY_GROUP_SIZE:
        raise PackError(f"mflux reads 1-bit layers only at group_size {BINARY_GROUP_SIZE} (it infers bits in "
                        f"2..8 from the shapes and builds any other layer at group {BINARY_GROUP_SIZE}), got "
                        f"group_size {group_size}; valid: ternary, or binary with group_size {BINARY_GROUP_SIZE} "
                        "(recipes/binary-mflux.yaml)")


def layout(out_features: int, in_features: int, mode: str, group_size: int,
           scale_dtype: torch.dtype) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    check_readable(mode, group_size)
    return mlx.layout(out_features, in_features, mode, group_size, scale_dtype)


def pack(codes: torch.Tensor, scales: torch.Tensor, mode: str, group_size: int) -> dict[str, torch.Tensor]:
    check_readable(mode, group_size)
    return mlx.pack(codes, scales, mode, group_size)


def unpack(tensors: dict[str, torch.Tensor], mode: str, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        return mlx.unpack(tensors, mode, group_size)
    except PackError as e:
        raise PackError(str(e).replace("MLX", "mflux", 1)) from None



decode_rows = mlx.decode_rows  # the same buffers as MLX's, so the same decoder
