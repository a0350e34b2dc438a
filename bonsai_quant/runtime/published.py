"""Published Bonsai packs (`readers/published.py`) as diffusers models on the reference runtime."""

from __future__ import annotations

from pathlib import Path

import torch

from ..flux2 import model_kwargs
from ..readers.published import open_published
from .packed_linear import LAYOUT_BUFFERS, PackedLinear


def load_published_transformer(folder: Path, dtype: torch.dtype = torch.float32, device="cpu"):
    """The published pack as a diffusers Flux2Transformer2DModel whose quantized Linears run from the stored
    buffers as they are (bonsai-quant's reference runtime, `PackedLinear`): the pack's own levels, rounding
    included."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    pack = open_published(folder)
    with init_empty_weights():
        model = Flux2Transformer2DModel(**model_kwargs(pack.config))
    for module, (out, inn) in pack.quantized.items():
        pack.decode(module)  # the same checks as every other reader of the pack
        buffers = {s: pack.get(f"{module}.{s}").to(device) for s in LAYOUT_BUFFERS[pack.layout]}
        model.set_submodule(module, PackedLinear(pack.layout, inn, out, pack.bits, pack.group_size, buffers))
    kept = {name: pack.get(name).to(device=device, dtype=dtype) for name in pack.kept}
    model.load_state_dict(kept, strict=False, assign=True)
    model.register_to_config(_name_or_path=str(folder))
    return model.eval()
