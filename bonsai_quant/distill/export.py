"""A trained student -> packs, through the same plan -> quantize -> pack -> write path as `convert`.

The student's weights are laid out as a checkpoint in memory: each quantized tensor as codes * scale in float32
(exactly on its grid), each kept tensor in the dtype the plan keeps it in. Converting that with the `grid`
solver recovers the student's codes and scales bit for bit (and refuses anything off the grid), so the packs
are what the student computed in training, and `verify` and `release` treat them like any other pack.
`--save-checkpoint` writes the same tensors as a diffusers checkpoint: `verify --source` re-derives the packs
from it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from ..checkpoint import Entry, MemoryCheckpoint, write_weights
from ..convert import DEFAULT_SHARD_BYTES, convert_into
from ..plan import Plan, make_plan
from ..recipe import Recipe, parse_recipe
from .student import quantized_weight


def grid_recipe(recipe: Recipe) -> Recipe:
    """The recipe with every quantizing solver replaced by `grid` (same keep set, modes, group size, dtypes),
    as YAML text of its own: the packs record it, so `verify --source` re-runs exactly this."""
    data = recipe.to_dict()
    data["solver"] = "grid"
    data["rules"] = [{**r, "solver": "grid"} if "quantize" in r else r for r in data["rules"]]
    data.pop("calibration", None)  # grid needs no statistics
    data.pop("distill", None)      # the training settings are recorded under `distill`
    text = ("# Written by `bonsai-quant distill`: the packs hold the trained codes and scales, which the grid solver\n"
            "# reads back exactly from the student's weights. The recipe it was trained from is in "
            "distill.recipe_yaml.\n"
            + yaml.safe_dump(data, sort_keys=False))
    return parse_recipe(text, f"{recipe.name} (distilled)")


def student_tensors(state: dict[str, torch.Tensor], plan: Plan) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, from the student's full state dict (latent weights and `.scales` of each
    quantized linear, the rest as trained): quantized ones on their grid (float32), kept ones in the dtype the
    plan keeps them in. A state dict rather than the module, so an FSDP-sharded student exports the same way."""
    out = {}
    for d in plan.decisions:
        if d.action == "quantize":
            w, _, _ = quantized_weight(state[d.name].detach().cpu().float(),
                                       state[f"{d.module}.scales"].detach().cpu().float(), d.mode,
                                       plan.recipe.group_size, plan.scale_dtype)
            out[d.name] = w
        else:
            out[d.name] = state[d.name].detach().cpu().to(d.kept_dtype)
    return out


def export(state: dict[str, torch.Tensor], source_path: Path, source_plan: Plan, folder: Path, record: dict,
           save_checkpoint: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES, verbose: bool = False) -> dict:
    """Write the packs (one folder per target), report.json, recipe.yaml (the grid recipe: with checkpoint/ it
    re-makes the packs, e.g. `bonsai-quant release --model checkpoint --recipe recipe.yaml`) and, if asked,
    checkpoint/ into `folder`."""
    tensors = student_tensors(state, source_plan)
    source = MemoryCheckpoint(Path(source_path), tensors)
    recipe = grid_recipe(source_plan.recipe)
    plan = make_plan(source, recipe, source_plan.targets)
    (folder / "recipe.yaml").write_text(recipe.text)
    report = convert_into(folder, source, plan, max_shard_bytes, verbose, extra_config={"distill": record})
    if save_checkpoint:
        write_checkpoint(folder / "checkpoint", Path(source_path) / "config.json", tensors, max_shard_bytes)
    return report


def write_checkpoint(folder: Path, config: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int) -> None:
    folder.mkdir()
    (folder / "config.json").write_bytes(Path(config).read_bytes())
    write_weights(folder, [Entry(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()], tensors.__getitem__,
                  max_shard_bytes)
    (folder / "README.md").write_text(
        "# distilled weights on their grid\n\nThe student's weights as a diffusers checkpoint: quantized tensors "
        "as codes x scale in float32, kept tensors in their pack dtype. `bonsai-quant verify PACK --source "
        "checkpoint` re-derives the packs from it (solver `grid`).\n")
