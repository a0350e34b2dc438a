"""Fake quantization: replace a model's quantized Linear weights in place by their exact quantized values.

This is the dense reference a pack must reproduce: the same recipe decisions and the same quantizers as
`convert`, applied to an in-memory diffusers model. In a float32 model the weights are exactly codes * s;
in a 16-bit model they are rounded once more to that dtype.

Calibrated solvers get the statistics of the full-precision model's own linear inputs over the calibration set,
all gathered before the first weight changes (as `convert` does from the unmodified checkpoint), so fake
quantization and packs agree. All H of the model are held at once: fine for small models; a klein-sized model
goes through `convert`, which gathers them one block at a time.
"""

from __future__ import annotations

import torch

from .flux2 import inventory
from .packing.formats import SCALE_DTYPES
from .plan import decide_all
from .quantizers import dequantize, quantize, statistics_needed
from .recipe import Recipe


@torch.no_grad()
def fake_quantize_model(model: torch.nn.Module, recipe: Recipe, calib=None) -> dict[str, float]:
    """Quantize-dequantize every tensor the recipe quantizes; returns {tensor name: relative error}.

    `calib`: a calibration set (folder or `CalibrationSet`) for calibrated solvers; default: the recipe's
    `calibration:` folder."""
    specs = inventory(dict(model.config))
    params = dict(model.named_parameters())
    recipe.check_matches(specs)
    decisions = decide_all(specs, {n: params[n].dtype for n in specs}, recipe)
    stats = {}
    wanted = statistics_needed(decisions)
    if wanted:
        from .calibration import resolve_calibration
        from .stats import collect_stats

        calib = resolve_calibration(calib, recipe, wanted, dict(model.config), "the model")
        stats = collect_stats(model, calib, wanted)
    errors = {}
    for d in decisions:
        if d.action != "quantize":
            continue
        weight = params[d.name]
        q = quantize(weight.detach().cpu(), d.mode, recipe.group_size, SCALE_DTYPES[recipe.scale_dtype], d.solver,
                     name=d.name, stats=stats.get(d.name))
        weight.copy_(dequantize(q.codes, q.scales, recipe.group_size).to(weight.dtype))
        errors[d.name] = q.rel_error
    return errors
