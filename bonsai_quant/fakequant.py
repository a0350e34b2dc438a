"""Fake quantization: replace a model's quantized Linear weights in place by their exact quantized values.

This is the dense reference a pack must reproduce: the same recipe decisions and the same quantizers as
`convert`, applied to an in-memory diffusers model. In a float32 model the weights are exactly codes * s;
in a 16-bit model they are rounded once more to that dtype.
"""

from __future__ import annotations

import torch

from .flux2 import inventory
from .plan import SCALE_DTYPES, decide_all
from .quantizers import dequantize, quantize
from .recipe import Recipe


@torch.no_grad()
def fake_quantize_model(model: torch.nn.Module, recipe: Recipe) -> dict[str, float]:
    """Quantize-dequantize every tensor the recipe quantizes; returns {tensor name: relative error}."""
    specs = inventory(dict(model.config))
    params = dict(model.named_parameters())
    recipe.check_matches(specs)
    errors = {}
    for d in decide_all(specs, {n: params[n].dtype for n in specs}, recipe):
        if d.action != "quantize":
            continue
        weight = params[d.name]
        q = quantize(weight.detach().cpu(), d.mode, recipe.group_size, SCALE_DTYPES[recipe.scale_dtype], d.solver,
                     name=d.name)
        weight.copy_(dequantize(q.codes, q.scales, recipe.group_size).to(weight.dtype))
        errors[d.name] = q.rel_error
    return errors
