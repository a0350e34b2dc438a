"""Calibration sets of the compose model: its own training prompts, text embedding and sampler.

`bonsai-quant calibrate --model <compose model>` uses these (no prompt file or text encoder is needed), so that
calibrated solvers (act-aware, gptq), `sensitivity` and `distill` work on the compose model as on the digits
model. The prompts are combinations the generator was trained on, never the benchmark's held-out ones, and the
noise seeds are calibrate's own (disjoint from the benchmark's).
"""

from __future__ import annotations

import random
from pathlib import Path

from .grammar import CATEGORIES, _draw
from .model import (
    CHANNELS,
    GRID,
    MAX_TOKENS,
    TEXT_EMBEDDINGS,
    TextEncoder,
    is_compose_config,
)

PROMPTS_PER_CATEGORY = 16
SAMPLES_PER_PROMPT = 2
SEED = "calibration"


def prompts(per_category: int = PROMPTS_PER_CATEGORY) -> list[str]:
    """Distinct seen-combination prompts, `per_category` of each category (fewer for single objects, which has
    only ten), in a fixed order."""
    rng = random.Random(SEED)
    out: list[str] = []
    for category in CATEGORIES:
        texts: list[str] = []
        for _ in range(50 * per_category):
            text = _draw(category, rng, held_out=False).text
            if text not in texts:
                texts.append(text)
            if len(texts) == per_category:
                break
        out += texts
    return out


def text_encoder_for(model_path: Path, config: dict) -> TextEncoder | None:
    """The compose text embedding (the model folder's own table, else the shipped one) for a compose config,
    None otherwise."""
    if not is_compose_config(config) or config.get("in_channels") != CHANNELS:
        return None
    own = Path(model_path) / TEXT_EMBEDDINGS
    encoder = TextEncoder.load(model_path if own.exists() else None)
    return encoder if encoder.dim == config.get("joint_attention_dim") else None


GRID_SHAPE = (GRID, GRID)
TEXT_TOKENS = MAX_TOKENS
