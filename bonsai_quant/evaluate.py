"""`bonsai-quant eval`: how well a FLUX.2 digits model, fake-quantized model or pack draws the digit it is asked for.

N samples per digit are drawn with klein's FlowMatch-Euler sampler from fixed seeds and scored by the shipped
judge: prompt following is the judge's accuracy on them (the GenEval analog), fidelity the Fréchet distance
between the judge's features of the samples and of the 1,797 real digits (the FID analog; it shrinks as N
grows, so compare it at equal N). The same arguments give the same numbers, run after run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import BonsaiError

if TYPE_CHECKING:  # torch and the digits modules load on use, so that `bonsai-quant --help` stays fast
    import torch

    from .digits import TextEncoder
    from .digits_judge import Judge

DEFAULT_SAMPLES = 100
DEFAULT_STEPS = 4
DEFAULT_SEED = 0
CHUNK = 250  # samples per forward: bounds memory; fixed so that results do not depend on N's factorisation
GRID_SCALE, GRID_GAP = 4, 2
TARGETS = ("mlx", "gemlite", "bonsai", "mflux")  # == plan.TARGETS
SHIFT = 3.0  # == digits.SHIFT, klein's sampler shift (checked by the tests)
IMAGE_SIZE = 8  # == digits.IMAGE_SIZE


@dataclass
class LoadedModel:
    model: torch.nn.Module
    source: str
    kind: str  # "full-precision" | "fake-quant" | "pack"
    mode: str | None = None
    target: str | None = None
    recipe: str | None = None
    quant_errors: dict = field(default_factory=dict)


# ---------------------------------------------------------------- loading

def load_full_precision(path: Path, encoder: TextEncoder) -> torch.nn.Module:
    """A diffusers FLUX.2 checkpoint folder as a float32 Flux2Transformer2DModel, validated tensor by tensor."""
    from .checkpoint import Checkpoint
    from .digits import check_compatible
    from .flux2 import build_model

    ckpt = Checkpoint(path)
    check_compatible(ckpt.config, encoder, str(ckpt.path / "config.json"))
    ckpt.validate()
    model = build_model(ckpt.config)  # float32 parameters, as nn.Linear creates them
    model.load_state_dict({name: ckpt.load(name).float() for name in ckpt.tensors}, strict=True)
    return model.eval()


def is_pack(path: Path) -> bool:
    """A pack folder (quantization_config.json) or a convert output holding pack folders."""
    from .describe import CONFIG_NAME

    return (path / CONFIG_NAME).exists() or any(path.glob(f"*/{CONFIG_NAME}"))


def load_pack(path: Path, encoder: TextEncoder, target: str | None = None) -> tuple[torch.nn.Module, Path]:
    """A pack, or the `target` pack of a convert output (default: the runtime's preference), as a float32 model."""
    import torch

    from .digits import check_compatible, read_json
    from .runtime import load_transformer, resolve_pack

    folder = resolve_pack(path, target)
    check_compatible(read_json(folder / "config.json"), encoder, str(folder / "config.json"))
    return load_transformer(folder, dtype=torch.float32).eval(), folder


def load_for_eval(path: Path | None, encoder: TextEncoder, fake_quant: str | None = None,
                  recipe_path: Path | None = None, target: str | None = None) -> LoadedModel:
    from .digits import model_dir, read_json

    path = Path(path) if path is not None else model_dir()
    if not path.exists():
        raise BonsaiError(f"{path}: no such model or pack folder")
    if not path.is_dir():
        raise BonsaiError(f"{path}: expected a folder (a diffusers checkpoint or a bonsai-quant pack), got a file")
    if is_pack(path):
        if fake_quant or recipe_path:
            raise BonsaiError(f"{path}: is already a quantized pack; --fake-quant and --recipe apply to "
                              "full-precision models")
        model, folder = load_pack(path, encoder, target)
        qc = read_json(folder / "quantization_config.json")
        return LoadedModel(model, str(folder), "pack", qc.get("mode"), qc.get("format"),
                           (qc.get("recipe") or {}).get("name"))
    if target is not None:
        raise BonsaiError(f"{path}: --target picks a pack of a convert output, but this is no pack")
    model = load_full_precision(path, encoder)
    if not (fake_quant or recipe_path):
        return LoadedModel(model, str(path), "full-precision")
    from .fakequant import fake_quantize_model
    from .recipe import default_recipe, load_recipe

    recipe = load_recipe(recipe_path) if recipe_path else default_recipe(fake_quant)
    if fake_quant and recipe.mode != fake_quant:
        recipe = recipe.with_mode(fake_quant)
    errors = fake_quantize_model(model, recipe)
    return LoadedModel(model, str(path), "fake-quant", recipe.mode, None, recipe.name, errors)


# ---------------------------------------------------------------- generate and score

def noise_for(digit: int, samples: int, seed: int) -> torch.Tensor:
    """Sample k of a digit depends only on (seed, digit, k): a larger N extends a smaller one."""
    import torch

    from .digits import CHANNELS, GRID

    g = torch.Generator().manual_seed(seed * 10 + digit)
    return torch.randn(samples, GRID * GRID, CHANNELS, generator=g)


def generate_digits(model, encoder: TextEncoder, samples: int, steps: int, seed: int = DEFAULT_SEED,
                    shift: float = SHIFT) -> torch.Tensor:
    """Images [10, samples, 8, 8] in [0, 1]; row d answers the prompt 'a handwritten digit d'."""
    import torch

    from .digits import generate

    if samples < 1:
        raise BonsaiError(f"--samples must be at least 1, got {samples}")
    digits = [d for d in range(10) for _ in range(samples)]
    noise = torch.cat([noise_for(d, samples, seed) for d in range(10)])
    out = [generate(model, encoder, digits[i:i + CHUNK], noise[i:i + CHUNK], steps, shift)
           for i in range(0, len(digits), CHUNK)]
    return torch.cat(out).reshape(10, samples, IMAGE_SIZE, IMAGE_SIZE)


def score(images: torch.Tensor, judge: Judge) -> dict:
    """Judge accuracy (overall and per digit) and Fréchet distance to the real digits for [10, N, 8, 8]."""
    import torch

    n = images.shape[1]
    pred, feats = judge.classify(images.reshape(-1, IMAGE_SIZE, IMAGE_SIZE))
    correct = (pred.reshape(10, n) == torch.arange(10)[:, None]).double()
    return {"accuracy": float(correct.mean()),
            "per_digit_accuracy": [round(float(c), 4) for c in correct.mean(1)],
            "frechet_distance": judge.frechet_to_real(feats) if images.numel() // IMAGE_SIZE ** 2 >= 2 else None}


def evaluate(loaded: LoadedModel, samples: int = DEFAULT_SAMPLES, steps: int = DEFAULT_STEPS,
             seed: int = DEFAULT_SEED, shift: float = SHIFT, encoder: TextEncoder | None = None,
             judge: Judge | None = None) -> tuple[dict, torch.Tensor]:
    from .digits import TextEncoder
    from .digits_judge import Judge

    encoder = encoder or TextEncoder.load()
    judge = judge or Judge.load()
    start = time.perf_counter()
    images = generate_digits(loaded.model, encoder, samples, steps, seed, shift)
    report = {"model": loaded.source, "kind": loaded.kind, "mode": loaded.mode, "target": loaded.target,
              "recipe": loaded.recipe, "steps": steps, "shift": shift, "samples_per_digit": samples, "seed": seed,
              **score(images, judge),
              "judge": {"held_out_accuracy": judge.info.get("held_out_accuracy"),
                        "frechet_distance_real_held_out": judge.info.get("frechet_distance_real_held_out")},
              "generate_seconds": round(time.perf_counter() - start, 3)}
    return report, images


# ---------------------------------------------------------------- grid

def grid_size(rows: int, columns: int, scale: int = GRID_SCALE, gap: int = GRID_GAP) -> tuple[int, int]:
    """(width, height) of a grid PNG: a label column, then `columns` samples, `rows` digits."""
    cell = IMAGE_SIZE * scale
    return (columns + 1) * cell + (columns + 2) * gap, rows * cell + (rows + 1) * gap


def save_grid(images: torch.Tensor, path: Path, columns: int = 10, scale: int = GRID_SCALE,
              gap: int = GRID_GAP) -> tuple[int, int]:
    """Write [10, N, 8, 8] as a PNG: one row per digit (its label first), the first `columns` samples, ink dark."""
    import torch
    from PIL import Image, ImageDraw

    rows, columns = images.shape[0], min(columns, images.shape[1])
    size = grid_size(rows, columns, scale, gap)
    cell = IMAGE_SIZE * scale
    canvas = Image.new("L", size, 128)
    draw = ImageDraw.Draw(canvas)
    pixels = (255 * (1 - images[:, :columns])).round().clamp(0, 255).to(torch.uint8)
    for r in range(rows):
        y = gap + r * (cell + gap)
        draw.rectangle([gap, y, gap + cell - 1, y + cell - 1], fill=255)
        draw.text((gap + cell // 2, y + cell // 2), str(r), fill=0, anchor="mm")
        for c in range(columns):
            tile = Image.fromarray(pixels[r, c].numpy(), "L").resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (gap + (c + 1) * (cell + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return size


# ---------------------------------------------------------------- CLI

def format_report(r: dict) -> str:
    what = r["kind"] + (f" {r['mode']}" if r["mode"] else "") + (f" ({r['target']})" if r["target"] else "")
    lines = [f"model: {r['model']} [{what}]",
             f"sampler: FlowMatch-Euler, {r['steps']} steps, shift {r['shift']:g}; {r['samples_per_digit']} samples "
             f"per digit, seed {r['seed']}",
             f"prompt following (judge accuracy): {r['accuracy']:.4f}",
             "per digit: " + " ".join(f"{d}:{a:.2f}" for d, a in enumerate(r["per_digit_accuracy"]))]
    if r["frechet_distance"] is not None:
        lines.append(f"fidelity (Fréchet distance to real digits, judge features): {r['frechet_distance']:.3f}")
    lines.append(f"judge: held-out accuracy {r['judge']['held_out_accuracy']:.4f}; real held-out digits score "
                 f"FD {r['judge']['frechet_distance_real_held_out']:.3f}")
    return "\n".join(lines)


def cmd_eval(args) -> int:
    from .digits import TextEncoder

    start = time.perf_counter()
    encoder = TextEncoder.load()
    loaded = load_for_eval(args.model, encoder, args.fake_quant, args.recipe, args.target)
    report, images = evaluate(loaded, args.samples, args.steps, args.seed, args.shift, encoder=encoder)
    if args.grid:
        report["grid"] = str(args.grid)
        save_grid(images, args.grid, columns=args.grid_columns)
    report["seconds"] = round(time.perf_counter() - start, 3)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.grid and not args.json:
        print(f"grid: {args.grid}", file=sys.stderr)
    return 0


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value}: expected a positive integer")
    return n


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="generate digits with a FLUX.2 digits model or pack and score them with the shipped judge",
        description="Generate N samples per digit (prompt 'a handwritten digit d') with a FlowMatch-Euler sampler and "
                    "report the judge's accuracy (prompt following) and the Fréchet distance of its features to "
                    "the real digits (fidelity).")
    p.add_argument("model", type=Path, nargs="?",
                   help="diffusers checkpoint folder, a pack folder, or a convert output (default: the shipped "
                        "flux2-tiny-digits)")
    p.add_argument("--samples", type=_positive, default=DEFAULT_SAMPLES, help=f"per digit (default {DEFAULT_SAMPLES})")
    p.add_argument("--steps", type=_positive, default=DEFAULT_STEPS, help=f"Euler steps (default {DEFAULT_STEPS})")
    p.add_argument("--shift", type=float, default=SHIFT, help=f"sigma shift (default {SHIFT:g}, as klein)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--fake-quant", choices=("binary", "ternary"),
                   help="quantize a full-precision model in memory with the default recipe of this mode")
    p.add_argument("--recipe", type=Path, help="fake-quantize with this recipe YAML")
    p.add_argument("--target", choices=TARGETS,
                   help="which pack of a convert output (default: the runtime's preference, mlx first)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--grid", type=Path, help="write a PNG of samples: one row per digit")
    p.add_argument("--grid-columns", type=_positive, default=10, help="samples per row in the grid (default 10)")
    p.set_defaults(func=cmd_eval)
    return p
