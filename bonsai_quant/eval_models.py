"""The model an eval scores: a full-precision checkpoint, that checkpoint fake-quantized in memory, or a pack.

Shared by the digits benchmark (`evaluate.py`) and the compose benchmark (`compose/benchmark.py`); each passes
its own config check and default model, so this module knows neither benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import BonsaiError

if TYPE_CHECKING:  # torch loads on use, so that `bonsai-quant --help` stays fast
    import torch

# check(config, encoder, source) raises a BonsaiError naming `source` when the benchmark cannot run the config
ConfigCheck = Callable[[dict, object, str], None]


@dataclass
class LoadedModel:
    model: torch.nn.Module
    source: str
    kind: str  # "full-precision" | "fake-quant" | "pack"
    mode: str | None = None
    target: str | None = None
    recipe: str | None = None
    quant_errors: dict = field(default_factory=dict)


def _digits_check() -> ConfigCheck:
    from .digits import check_compatible

    return check_compatible


def load_full_precision(path: Path, encoder, check: ConfigCheck | None = None) -> torch.nn.Module:
    """A diffusers FLUX.2 checkpoint folder as a float32 Flux2Transformer2DModel, validated tensor by tensor.
    `check` refuses configs the benchmark cannot run (default: the digits model's)."""
    import torch

    from .dense import load_dense
    from .readers.bfl import open_checkpoint

    ckpt = open_checkpoint(path)  # a diffusers folder or a BFL single file
    (check or _digits_check())(ckpt.config, encoder, ckpt.config_source)
    return load_dense(ckpt, dtype=torch.float32)


def is_pack(path: Path) -> bool:
    """A pack folder (quantization_config.json) or a convert output holding pack folders."""
    from .packing.folders import CONFIG_NAME

    return (path / CONFIG_NAME).exists() or any(path.glob(f"*/{CONFIG_NAME}"))


def load_pack(path: Path, encoder, target: str | None = None, check: ConfigCheck | None = None,
              device: str = "cpu", backend: str | None = None,
              dtype: torch.dtype | None = None) -> tuple[torch.nn.Module, Path]:
    """A pack, or the `target` pack of a convert output (default: the runtime's preference), as a model in
    `dtype` (default float32) on `device`, its low-bit layers run by `backend` (`load_transformer`'s)."""
    import torch

    from .digits import read_json
    from .runtime import load_transformer, resolve_pack

    folder = resolve_pack(path, target)
    (check or _digits_check())(read_json(folder / "config.json"), encoder, str(folder / "config.json"))
    model = load_transformer(folder, dtype=dtype or torch.float32, device=device, backend=backend)
    return model.eval(), folder


def load_for_eval(path: Path | None, encoder, fake_quant: str | None = None, recipe_path: Path | None = None,
                  target: str | None = None, check: ConfigCheck | None = None,
                  default: Path | None = None, device: str = "cpu", backend: str | None = None,
                  dtype: torch.dtype | None = None) -> LoadedModel:
    """`check`: the benchmark's config check (default: the digits model's); `default`: the model without `path`
    (default: the shipped flux2-tiny-digits). `device`, `backend`, `dtype`: where and how a pack runs
    (`load_transformer`'s; the GPU benchmarks compare runtimes with them), for packs only."""
    if path is not None:
        path = Path(path)
    elif default is not None:
        path = Path(default)
    else:
        from .digits import model_dir

        path = model_dir()
    if not path.exists():
        raise BonsaiError(f"{path}: no such model or pack folder")
    if not path.is_dir():
        raise BonsaiError(f"{path}: expected a folder (a diffusers checkpoint or a bonsai-quant pack), got a file")
    if is_pack(path):
        if fake_quant or recipe_path:
            raise BonsaiError(f"{path}: is already a quantized pack; --fake-quant and --recipe apply to "
                              "full-precision models")
        model, folder = load_pack(path, encoder, target, check, device, backend, dtype)
        from .packing.config import PackConfig
        from .readers.published import find_published, open_published

        if find_published(folder):
            pub = open_published(folder)
            return LoadedModel(model, str(folder), "pack", pub.mode, pub.format, None)
        qc = PackConfig.load(folder)
        return LoadedModel(model, str(folder), "pack", qc.mode, qc.format, qc.recipe_name)
    if target is not None:
        raise BonsaiError(f"{path}: --target picks a pack of a convert output, but this is no pack")
    if (device, backend, dtype) != ("cpu", None, None):
        raise BonsaiError(f"{path}: device, backend and dtype choose how a pack runs, but this is no pack "
                          "(full-precision models load in float32 on the CPU)")
    model = load_full_precision(path, encoder, check)
    if not (fake_quant or recipe_path):
        return LoadedModel(model, str(path), "full-precision")
    from .fakequant import fake_quantize_model
    from .recipe import default_recipe, load_recipe

    recipe = load_recipe(recipe_path) if recipe_path else default_recipe(fake_quant)
    if fake_quant and recipe.mode != fake_quant:
        recipe = recipe.with_mode(fake_quant)
    errors = fake_quantize_model(model, recipe)
    return LoadedModel(model, str(path), "fake-quant", recipe.mode, None, recipe.name, errors)
