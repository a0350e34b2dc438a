"""The compose judge: reads a scene cell by cell and answers each category's question about it.

A small CNN (trained by `tools/train_compose.py` on cells of real scenes drawn from the `train` glyphs) looks at
each 16x16 cell and predicts its digit, or empty, and its colour. The objects it finds, with their cells, answer
every GenEval-style question (`answer`): which digits, how many, which colours, where. Its penultimate
features, concatenated over the four cells, give the Fréchet distance to real scenes (stored statistics of
real scenes for the benchmark's prompts). Everything eval needs ships in `assets/compose-judge/`: weights and
real-feature statistics in `judge.safetensors`, per-category accuracy on held-out real scenes in `judge.json`.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import BonsaiError
from .grammar import CATEGORIES, Prompt, all_benchmark_prompts, scene_for
from .model import judge_dir
from .world import CELL, CELLS, CELLS_PER_SIDE, COLOURS, Obj, place, render

WEIGHTS = "judge.safetensors"
INFO = "judge.json"
FEATURES = 64  # per cell; the Fréchet distance uses all four cells' (256)
EMPTY = 10  # digit class of an empty cell


class CellJudge(nn.Module):
    """conv3x3(32) - conv3x3(64) - maxpool2 - conv3x3(64) - maxpool2 - fc(64) [features] - fc(11) digit or empty,
    fc(6) colour; input [N, 3, 16, 16] in [0, 1]."""

    def __init__(self, features: int = FEATURES, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64 * (CELL // 4) ** 2, features)
        self.digit = nn.Linear(features, 11)
        self.colour = nn.Linear(features, len(COLOURS))
        self.drop = nn.Dropout(dropout)

    def features(self, cells: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(cells.float()))
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
        x = torch.max_pool2d(torch.relu(self.conv3(x)), 2)
        return torch.relu(self.fc1(self.drop(x.flatten(1))))

    def forward(self, cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.drop(self.features(cells))
        return self.digit(f), self.colour(f)


def to_cells(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, 32, 32] -> [B * 4, 3, 16, 16], cells row-major within each image."""
    b = images.shape[0]
    x = images.reshape(b, 3, CELLS_PER_SIDE, CELL, CELLS_PER_SIDE, CELL).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b * CELLS, 3, CELL, CELL)


class Judge:
    """The shipped judge with its real-scene feature statistics."""

    def __init__(self, net: CellJudge, real_mean: np.ndarray, real_cov: np.ndarray, info: dict):
        self.net = net.eval()
        self.real_mean, self.real_cov, self.info = real_mean, real_cov, info

    @classmethod
    def load(cls, folder: Path | None = None) -> Judge:
        from safetensors.torch import load_file

        from ..digits import read_json

        folder = Path(folder or judge_dir())
        path = folder / WEIGHTS
        if not path.exists():
            raise BonsaiError(f"{path}: the compose judge is missing; run tools/train_compose.py or reinstall")
        tensors = load_file(str(path))
        info = read_json(folder / INFO)
        net = CellJudge(features=int(info["features"]))
        net.load_state_dict({k: v for k, v in tensors.items() if not k.startswith("real_")})
        return cls(net, tensors["real_mean"].double().numpy(), tensors["real_cov"].double().numpy(), info)

    @torch.no_grad()
    def read(self, images: torch.Tensor, chunk: int = 1024) -> tuple[list[tuple[Obj, ...]], torch.Tensor]:
        """(objects found in each image, features [B, 4 * F]) for images [B, 3, 32, 32]."""
        device = next(self.net.parameters()).device
        digits, colours, feats = [], [], []
        for i in range(0, images.shape[0], chunk):
            cells = to_cells(images[i:i + chunk].float().to(device))
            f = self.net.features(cells)
            digits.append(self.net.digit(f).argmax(1).cpu())
            colours.append(self.net.colour(f).argmax(1).cpu())
            feats.append(f.cpu().reshape(-1, CELLS * f.shape[1]))
        digit = torch.cat(digits).reshape(-1, CELLS).tolist()
        colour = torch.cat(colours).reshape(-1, CELLS).tolist()
        found = [tuple(Obj(d, COLOURS[c], k) for k, (d, c) in enumerate(zip(ds, cs)) if d != EMPTY)
                 for ds, cs in zip(digit, colour)]
        return found, torch.cat(feats)

    def frechet_to_real(self, feats: torch.Tensor) -> float:
        from ..digits_judge import feature_stats, frechet_distance

        return frechet_distance(*feature_stats(feats), self.real_mean, self.real_cov)


def _holds(relation: str, a: Obj, b: Obj) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col,
            "above": a.row < b.row, "below": a.row > b.row}[relation]


def answer(p: Prompt, objects: tuple[Obj, ...]) -> bool:
    """Whether a scene holding `objects` shows what `p` asks for, by GenEval's rules: the named objects are
    present (counting: exactly that many), with the named colours, in the named relation; other objects are
    allowed except in counting's class."""
    def matches(o: Obj, digit: int, colour: str | None) -> bool:
        return o.digit == digit and (colour is None or o.colour == colour)

    (d0, c0) = p.objects[0]
    if p.category == "counting":
        return sum(o.digit == d0 for o in objects) == p.count
    if len(p.objects) == 1:
        return any(matches(o, d0, c0) for o in objects)
    (d1, c1) = p.objects[1]
    for a in objects:
        for b in objects:
            if a is not b and matches(a, d0, c0) and matches(b, d1, c1) and (
                    p.relation is None or _holds(p.relation, a, b)):
                return True
    return False


def real_scenes(prompts: list[Prompt], per_prompt: int, split: str, seed: int) -> torch.Tensor:
    """[len(prompts) * per_prompt, 3, 32, 32] real scenes answering each prompt (prompt-major), glyphs of `split`."""
    rng = random.Random(f"real:{seed}:{split}")
    scenes = []
    for p in prompts:
        for _ in range(per_prompt):
            objects = scene_for(p, rng)
            scenes.append((objects, place(objects, rng, split)))
    return render(scenes)


def accuracy_on_real(judge: Judge, per_prompt: int = 4, split: str = "held_out", seed: int = 0) -> dict[str, float]:
    """Per category, how often the judge says a real scene answering a benchmark prompt answers it."""
    out = {}
    for category, prompts in all_benchmark_prompts().items():
        found, _ = judge.read(real_scenes(prompts, per_prompt, split, seed))
        ok = [answer(prompts[i // per_prompt], objs) for i, objs in enumerate(found)]
        out[category] = sum(ok) / len(ok)
    return {c: out[c] for c in CATEGORIES}
