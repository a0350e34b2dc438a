"""`bonsai-quant eval`: how well a FLUX.2 digits model, fake-quantized model or pack draws the digit it is asked for.

N samples per digit are drawn with klein's FlowMatch-Euler sampler from fixed seeds and scored by the shipped
judge: prompt following is the judge's accuracy on them (the GenEval analog), fidelity the Fréchet distance
between the judge's features of the samples and of the 1,797 real digits (the FID analog; it shrinks as N
grows, so compare it at equal N). The same arguments give the same numbers, run after run.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .cli_args import positive_int as _positive
from .errors import BonsaiError
from .eval_models import LoadedModel, load_for_eval
from .packing.targets import NAMES as TARGETS

if TYPE_CHECKING:  # torch and the digits modules load on use, so that `bonsai-quant --help` stays fast
    import torch

    from .digits import TextEncoder
    from .digits_judge import Judge

DEFAULT_SAMPLES = 100
DEFAULT_STEPS = 4
DEFAULT_SEED = 0
CHUNK = 250  # samples per forward: bounds memory; fixed so that results do not depend on N's factorisation
GRID_SCALE, GRID_GAP = 4, 2
SHIFT = 3.0  # == digits.SHIFT, klein's sampler shift (checked by the tests)
IMAGE_SIZE = 8  # == digits.IMAGE_SIZE


# ---------------------------------------------------------------- generate and score

def noise_for(digit: int, samples: int, seed: int) -> torch.Tensor:
    """Sample k of a digit depends only on (seed, digit, k): a larger N extends a smaller one."""
    import torch

    from .digits import CHANNELS, GRID

    g = torch.Generator().manual_seed(seed * 10 + digit)
    return torch.randn(samples, GRID * GRID, CHANNELS, generator=g)


def generate_digits(model, encoder: TextEncoder, samples: int, steps: int, seed: int = DEFAULT_SEED,
                    shift: float = SHIFT, progress: bool = False) -> torch.Tensor:
    """Images [10, samples, 8, 8] in [0, 1]; row d answers the prompt 'a handwritten digit d'.

    `progress`: a bar over the samples on stderr on a terminal, else a line per chunk of CHUNK samples."""
    import torch
    from tqdm import tqdm

    from .digits import generate

    if samples < 1:
        raise BonsaiError(f"--samples must be at least 1, got {samples}")
    digits = [d for d in range(10) for _ in range(samples)]
    noise = torch.cat([noise_for(d, samples, seed) for d in range(10)])
    out = []
    bar_on = progress and sys.stderr.isatty()
    start = time.perf_counter()
    with tqdm(total=len(digits), desc=f"eval ({steps} steps)", unit="sample", file=sys.stderr,
              disable=not bar_on) as bar:
        for i in range(0, len(digits), CHUNK):
            out.append(generate(model, encoder, digits[i:i + CHUNK], noise[i:i + CHUNK], steps, shift))
            bar.update(len(out[-1]))
            if progress and not bar_on:  # a log file or pipe gets lines, not a bar's carriage returns
                print(f"  {min(i + CHUNK, len(digits))}/{len(digits)} samples, {time.perf_counter() - start:.1f} s",
                      file=sys.stderr, flush=True)
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
             judge: Judge | None = None, progress: bool = False) -> tuple[dict, torch.Tensor]:
    from .digits import TextEncoder
    from .digits_judge import Judge

    encoder = encoder or TextEncoder.load()
    judge = judge or Judge.load()
    start = time.perf_counter()
    images = generate_digits(loaded.model, encoder, samples, steps, seed, shift, progress)
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
    """Both benchmarks: the model is loaded here by the same rules (eval_models), each with its own config check,
    default model, sample count and grid width; the compose package itself loads nothing."""
    from .compose import benchmark as compose

    start = time.perf_counter()
    if args.benchmark == "compose" or (args.benchmark is None and compose.wants_compose(args.model)):
        from .compose import model as compose_model

        encoder = compose_model.TextEncoder.load()
        loaded = load_for_eval(args.model, encoder, args.fake_quant, args.recipe, args.target,
                               check=compose_model.check_compatible, default=compose_model.model_dir())
        run, samples, columns, report_text = (compose.evaluate, compose.DEFAULT_SAMPLES, compose.DEFAULT_SAMPLES,
                                              compose.format_report)
        grid = compose.save_grid
        n = args.samples or samples
        what = f"{n} images per prompt ({args.steps} steps)"
    else:
        from .digits import TextEncoder

        encoder = TextEncoder.load()
        loaded = load_for_eval(args.model, encoder, args.fake_quant, args.recipe, args.target)
        run = functools.partial(evaluate, progress=not args.quiet)
        run, samples, columns, report_text, grid = run, DEFAULT_SAMPLES, 10, format_report, save_grid
        n = args.samples or samples
        what = f"{10 * n} digits ({n} per digit, {args.steps} steps)"
    if not args.quiet:  # sampling takes a minute or two on 2 cores: say what runs before it does
        print(f"sampling {what} with {loaded.source} [{loaded.kind}]", file=sys.stderr, flush=True)
    report, images = run(loaded, args.samples or samples, args.steps, args.seed, args.shift, encoder=encoder)
    if args.grid:
        report["grid"] = str(args.grid)
        grid(images, args.grid, columns=args.grid_columns or columns)
    report["seconds"] = round(time.perf_counter() - start, 3)
    print(json.dumps(report, indent=2) if args.json else report_text(report))
    if args.grid and not args.json:
        print(f"grid: {args.grid}", file=sys.stderr)
    return 0


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval", help="generate images with a FLUX.2 digits or compose model or pack and score them with the "
                     "shipped judge",
        description="Generate N samples per digit (prompt 'a handwritten digit d') with a FlowMatch-Euler sampler and "
                    "report the judge's accuracy (prompt following) and the Fréchet distance of its features to "
                    "the real digits (fidelity). With --benchmark compose: N samples per prompt of GenEval's six "
                    "categories on compose scenes, scored per category and overall.")
    p.add_argument("model", type=Path, nargs="?",
                   help="diffusers checkpoint folder, a pack folder, or a convert output (default: the shipped "
                        "flux2-tiny-digits)")
    p.add_argument("--benchmark", choices=("digits", "compose"),
                   help="digits: 'a handwritten digit d' (default for digits models); compose: GenEval's six "
                        "categories on compose scenes (default for models whose config.json says compose; without "
                        "a model, the shipped flux2-tiny-compose)")
    p.add_argument("--samples", type=_positive,
                   help=f"per digit (default {DEFAULT_SAMPLES}) or, with compose, per prompt (default 4)")
    p.add_argument("--steps", type=_positive, default=DEFAULT_STEPS, help=f"Euler steps (default {DEFAULT_STEPS})")
    p.add_argument("--shift", type=float, default=SHIFT, help=f"sigma shift (default {SHIFT:g}, as klein)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--fake-quant", choices=("binary", "ternary"),
                   help="quantize a full-precision model in memory with the default recipe of this mode")
    p.add_argument("--recipe", type=Path, help="fake-quantize with this recipe YAML")
    p.add_argument("--target", choices=TARGETS,
                   help="which pack of a convert output (default: the runtime's preference, mlx first)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress line or bar on stderr")
    p.add_argument("--grid", type=Path, help="write a PNG of samples: one row per digit")
    p.add_argument("--grid-columns", type=_positive,
                   help="samples per row in the grid (default 10; compose: the samples per prompt)")
    p.set_defaults(func=cmd_eval)
    return p
