"""`bonsai-quant eval --benchmark compose`: GenEval's six scores for a FLUX.2 compose model, fake-quantized model
or pack.

For each category the benchmark has a fixed list of prompts (`grammar.benchmark_prompts`, 48 each, a third of
the combinable ones held out from training); each prompt is sampled N times (default 4, as GenEval) with klein's
FlowMatch-Euler sampler from noise that depends only on (seed, category, prompt, sample), and the shipped judge
says whether each image shows what its prompt asks. A category's score is the fraction of its images that do;
the overall score is the mean of the six, as GenEval's. Fidelity is the Fréchet distance between the judge's
features of all images and those of real scenes for the same prompts (lower is better; it shrinks as N grows,
so compare at equal N). The same arguments give the same numbers, run after run.

The command itself (loading the model to score) lives in `evaluate.py`, beside the digits benchmark: the
compose package loads nothing, so `calibration.py` can use it without an import circle.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..errors import BonsaiError
from ..flux2 import KLEIN_SHIFT
from .grammar import CATEGORIES, PROMPTS_PER_CATEGORY, Prompt, all_benchmark_prompts
from .judge import Judge, answer
from .model import (
    BENCHMARK,
    CHANNELS,
    GRID,
    MODEL_NAME,
    TextEncoder,
    generate,
    is_compose_config,
)
from .world import CANVAS

DEFAULT_SAMPLES = 4  # per prompt, as GenEval
DEFAULT_STEPS = 4
DEFAULT_SEED = 0
SHIFT = KLEIN_SHIFT
CHUNK = 288  # samples per forward: bounds memory; fixed so that results do not depend on N's factorisation
GRID_SCALE, GRID_GAP, LABEL_WIDTH = 2, 2, 150
GRID_PROMPTS = 3  # rows per category in the grid


def wants_compose(path: Path | None) -> bool:
    """Whether `path` (a checkpoint, a pack or a convert output) says it is a compose model."""
    from ..digits import read_json

    if path is None or not Path(path).is_dir():
        return False
    for config in [Path(path) / "config.json", *sorted(Path(path).glob("*/config.json"))]:
        if config.is_file():
            try:
                if is_compose_config(read_json(config)):
                    return True
            except BonsaiError:
                return False
    return False


def noise_for(category: str, prompt_index: int, samples: int, seed: int) -> torch.Tensor:
    """Sample k of a prompt depends only on (seed, category, prompt, k): a larger N extends a smaller one."""
    g = torch.Generator().manual_seed(((seed * len(CATEGORIES) + CATEGORIES.index(category)) * 1000
                                       + prompt_index) * 7919 + 12345)
    return torch.randn(samples, GRID * GRID, CHANNELS, generator=g)


def generate_all(model, encoder: TextEncoder, prompts: dict[str, list[Prompt]], samples: int, steps: int,
                 seed: int = DEFAULT_SEED, shift: float = SHIFT) -> dict[str, torch.Tensor]:
    """Per category, images [P, samples, 3, 32, 32]; row i answers prompts[category][i]."""
    if samples < 1:
        raise BonsaiError(f"--samples must be at least 1, got {samples}")
    jobs = [(c, i, p.text) for c in CATEGORIES for i, p in enumerate(prompts[c]) for _ in range(samples)]
    noise = torch.cat([noise_for(c, i, samples, seed) for c in CATEGORIES for i in range(len(prompts[c]))])
    out = torch.cat([generate(model, encoder, [t for _, _, t in jobs[k:k + CHUNK]], noise[k:k + CHUNK], steps, shift)
                     for k in range(0, len(jobs), CHUNK)])
    images, start = {}, 0
    for c in CATEGORIES:
        n = len(prompts[c]) * samples
        images[c] = out[start:start + n].reshape(len(prompts[c]), samples, 3, CANVAS, CANVAS)
        start += n
    return images


def score(images: dict[str, torch.Tensor], prompts: dict[str, list[Prompt]], judge: Judge) -> dict:
    """Per-category scores (all prompts, seen and held-out combinations), overall (mean of the six), FD."""
    categories, seen, held, feats = {}, {}, {}, []
    for c in CATEGORIES:
        p_count, n = images[c].shape[:2]
        found, f = judge.read(images[c].reshape(-1, 3, CANVAS, CANVAS))
        feats.append(f)
        ok = torch.tensor([answer(prompts[c][k // n], objs) for k, objs in enumerate(found)], dtype=torch.float64)
        ok = ok.reshape(p_count, n).mean(1)
        mask = torch.tensor([p.held_out for p in prompts[c]])
        categories[c] = round(float(ok.mean()), 4)
        seen[c] = round(float(ok[~mask].mean()), 4) if (~mask).any() else None
        held[c] = round(float(ok[mask].mean()), 4) if mask.any() else None
    feats = torch.cat(feats)
    return {"categories": categories, "overall": round(sum(categories.values()) / len(CATEGORIES), 4),
            "seen": seen, "held_out": held,
            "frechet_distance": judge.frechet_to_real(feats) if feats.shape[0] >= 2 else None}


def evaluate(loaded, samples: int = DEFAULT_SAMPLES, steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED,
             shift: float = SHIFT, encoder: TextEncoder | None = None, judge: Judge | None = None,
             prompts_per_category: int = PROMPTS_PER_CATEGORY, device: str | None = None
             ) -> tuple[dict, dict[str, torch.Tensor]]:
    """The compose benchmark on a `eval_models.LoadedModel`; `device` moves the model there first."""
    encoder = encoder or TextEncoder.load()
    judge = judge or Judge.load()
    if device is not None:
        loaded.model.to(device)
    prompts = all_benchmark_prompts(prompts_per_category)
    start = time.perf_counter()
    images = generate_all(loaded.model, encoder, prompts, samples, steps, seed, shift)
    report = {"benchmark": BENCHMARK, "model": loaded.source, "kind": loaded.kind, "mode": loaded.mode,
              "target": loaded.target, "recipe": loaded.recipe, "steps": steps, "shift": shift,
              "prompts_per_category": prompts_per_category, "samples_per_prompt": samples, "seed": seed,
              **score(images, prompts, judge),
              "judge": {"held_out_accuracy": judge.info.get("held_out_accuracy"),
                        "frechet_distance_real": judge.info.get("frechet_distance_real_held_out")},
              "generate_seconds": round(time.perf_counter() - start, 3)}
    return report, images


# ---------------------------------------------------------------- grid

def grid_size(rows: int, columns: int, scale: int = GRID_SCALE, gap: int = GRID_GAP) -> tuple[int, int]:
    """(width, height) of a grid PNG: a prompt column, then `columns` samples, `rows` prompts."""
    cell = CANVAS * scale
    return LABEL_WIDTH + columns * (cell + gap) + gap, rows * (cell + gap) + gap


def save_grid(images: dict[str, torch.Tensor], path: Path, columns: int = DEFAULT_SAMPLES,
              prompts_per_category: int = PROMPTS_PER_CATEGORY, rows_per_category: int = GRID_PROMPTS,
              scale: int = GRID_SCALE, gap: int = GRID_GAP) -> tuple[int, int]:
    """Write a PNG: for each category its first prompts, one row each (the prompt's text, then its samples)."""
    from PIL import Image, ImageDraw

    prompts = all_benchmark_prompts(prompts_per_category)
    rows = [(c, i) for c in CATEGORIES for i in range(min(rows_per_category, images[c].shape[0]))]
    columns = min(columns, images[CATEGORIES[0]].shape[1])
    size = grid_size(len(rows), columns, scale, gap)
    cell = CANVAS * scale
    canvas = Image.new("RGB", size, (128, 128, 128))
    draw = ImageDraw.Draw(canvas)
    for r, (c, i) in enumerate(rows):
        y = gap + r * (cell + gap)
        draw.rectangle([gap, y, LABEL_WIDTH - gap, y + cell - 1], fill=(255, 255, 255))
        draw.text((2 * gap, y + 4), c, fill=(90, 90, 90))
        draw.text((2 * gap, y + cell // 2), prompts[c][i].text, fill=(0, 0, 0))
        pixels = (255 * images[c][i, :columns]).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        for k in range(columns):
            tile = Image.fromarray(pixels[k].numpy(), "RGB").resize((cell, cell), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + k * (cell + gap), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return size


# ---------------------------------------------------------------- CLI

def format_report(r: dict) -> str:
    what = r["kind"] + (f" {r['mode']}" if r["mode"] else "") + (f" ({r['target']})" if r["target"] else "")
    lines = [f"model: {r['model']} [{what}]",
             (f"benchmark: compose; sampler FlowMatch-Euler, {r['steps']} steps, shift {r['shift']:g}; "
             f"{r['prompts_per_category']} prompts per category x {r['samples_per_prompt']} samples, seed {r['seed']}"),
             f"overall (mean of six): {r['overall']:.4f}"]
    for c in CATEGORIES:
        extra = ""
        if r["held_out"][c] is not None:
            extra = f"   (seen {r['seen'][c]:.3f}, held-out combinations {r['held_out'][c]:.3f})"
        lines.append(f"  {c:<14} {r['categories'][c]:.4f}{extra}")
    if r["frechet_distance"] is not None:
        lines.append(f"fidelity (Fréchet distance to real scenes, judge features): {r['frechet_distance']:.3f}")
    lines.append(f"judge: held-out real scenes, worst category {min(r['judge']['held_out_accuracy'].values()):.4f}")
    return "\n".join(lines)


__all__ = ["MODEL_NAME", "evaluate", "format_report", "generate_all", "noise_for", "save_grid", "score",
           "wants_compose"]
