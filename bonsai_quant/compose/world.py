"""The compose world: 32x32 RGB scenes of one to four coloured digit glyphs, drawn by code from a seed.

The canvas is split into a 2x2 grid of 16x16 cells; each object fills one cell with a 12x12 glyph (one of the
shipped 8x8 handwritten digits, `assets/digits-data`, upscaled bilinearly) tinted with one palette colour, at an
offset of 1-3 pixels inside its cell. Two objects never share a cell, so "left of" (lower column) and "above"
(lower row) are unambiguous, and a judge can read a scene cell by cell. Background is black (0); pixel values
are in [0, 1].

The 1,797 glyphs are split once, per digit and seeded: 80% `train` (the generator and the judge learn from them),
20% `held_out` (the judge's accuracy is measured on scenes drawn from them only).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ..errors import BonsaiError

CANVAS = 32
CELL = 16
CELLS_PER_SIDE = CANVAS // CELL  # 2x2 cells
CELLS = CELLS_PER_SIDE ** 2
GLYPH = 12
OFFSETS = (1, 2, 3)  # glyph offset inside its cell, per axis: the glyph never touches the cell's border
MAX_OBJECTS = CELLS
# Six colours at corners of the RGB cube (or close): any two differ by >= 0.6 in some channel.
PALETTE = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.1, 0.85, 0.15),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.9, 0.1),
    "pink": (1.0, 0.3, 0.9),
    "white": (0.95, 0.95, 0.95),
}
COLOURS = tuple(PALETTE)
DIGITS = tuple(range(10))
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.2
SPLITS = ("train", "held_out", "all")


@dataclass(frozen=True)
class Obj:
    digit: int
    colour: str
    cell: int  # 0..3, row-major: row = cell // 2, column = cell % 2

    @property
    def row(self) -> int:
        return self.cell // CELLS_PER_SIDE

    @property
    def col(self) -> int:
        return self.cell % CELLS_PER_SIDE


def cell_of(row: int, col: int) -> int:
    return row * CELLS_PER_SIDE + col


@lru_cache(maxsize=1)
def _bank() -> tuple[torch.Tensor, torch.Tensor]:
    """(glyphs [1797, 12, 12] in [0, 1], labels [1797]) from the shipped digits."""
    from safetensors.torch import load_file

    from ..digits import assets_dir

    path = assets_dir() / "digits-data" / "digits.safetensors"
    if not path.exists():
        raise BonsaiError(f"{path}: the shipped digits are missing; reinstall bonsai-quant")
    data = load_file(str(path))
    small = data["images"].float()[:, None] / 16
    big = torch.nn.functional.interpolate(small, size=(GLYPH, GLYPH), mode="bilinear", align_corners=False)
    return big[:, 0].clamp(0, 1).contiguous(), data["labels"].long()


@lru_cache(maxsize=3)
def glyph_index(split: str) -> tuple[tuple[int, ...], ...]:
    """Per digit, the bank indices of its glyphs in `split` (sorted)."""
    if split not in SPLITS:
        raise BonsaiError(f"glyph split {split!r}; valid: {', '.join(SPLITS)}")
    _, labels = _bank()
    g = torch.Generator().manual_seed(SPLIT_SEED)
    out = []
    for d in DIGITS:
        idx = torch.nonzero(labels == d).flatten()
        perm = idx[torch.randperm(len(idx), generator=g)]
        n_held = round(len(idx) * HELD_OUT_FRACTION)
        chosen = {"train": perm[n_held:], "held_out": perm[:n_held], "all": perm}[split]
        out.append(tuple(sorted(chosen.tolist())))
    return tuple(out)


def glyphs() -> torch.Tensor:
    return _bank()[0]


@dataclass(frozen=True)
class Placement:
    """How a scene's objects are drawn: which glyph of the bank and which offset inside the cell."""
    glyph: int
    dy: int
    dx: int


def place(objects: tuple[Obj, ...], rng, split: str = "train") -> tuple[Placement, ...]:
    """A glyph of the object's digit from `split` and an offset for each object (`rng`: random.Random)."""
    index = glyph_index(split)
    return tuple(Placement(rng.choice(index[o.digit]), rng.choice(OFFSETS), rng.choice(OFFSETS)) for o in objects)


def check_objects(objects: tuple[Obj, ...]) -> None:
    cells = [o.cell for o in objects]
    if not 1 <= len(objects) <= MAX_OBJECTS or len(set(cells)) != len(cells):
        raise BonsaiError(f"a scene holds 1..{MAX_OBJECTS} objects in distinct cells, got cells {cells}")
    for o in objects:
        if o.digit not in DIGITS or o.colour not in PALETTE or not 0 <= o.cell < CELLS:
            raise BonsaiError(f"bad object {o}: digit 0-9, colour one of {', '.join(COLOURS)}, cell 0-3")


def render(scenes: list[tuple[tuple[Obj, ...], tuple[Placement, ...]]]) -> torch.Tensor:
    """Images [B, 3, 32, 32] in [0, 1] of (objects, placements) pairs."""
    bank = glyphs()
    out = torch.zeros(len(scenes), CANVAS, CANVAS, 3)
    colours = {name: torch.tensor(rgb) for name, rgb in PALETTE.items()}
    for b, (objects, placements) in enumerate(scenes):
        check_objects(objects)
        for o, p in zip(objects, placements):
            y, x = o.row * CELL + p.dy, o.col * CELL + p.dx
            out[b, y:y + GLYPH, x:x + GLYPH] = bank[p.glyph][..., None] * colours[o.colour]
    return out.permute(0, 3, 1, 2).contiguous()


def render_batch(digit: torch.Tensor, colour: torch.Tensor, cell: torch.Tensor, glyph: torch.Tensor,
                 dy: torch.Tensor, dx: torch.Tensor, present: torch.Tensor, device="cpu") -> torch.Tensor:
    """Vectorised `render` for training: every argument [B, 4] (one slot per object; `present` False for an
    unused slot; colour an index into COLOURS). Same pixels as `render`."""
    bank = glyphs().to(device)
    palette = torch.tensor([PALETTE[c] for c in COLOURS], device=device)
    b = digit.shape[0]
    out = torch.zeros(b, CANVAS, CANVAS, 3, device=device)
    ar = torch.arange(GLYPH, device=device)
    bi = torch.arange(b, device=device)[:, None, None]
    for k in range(digit.shape[1]):
        y0 = (cell[:, k] // CELLS_PER_SIDE) * CELL + dy[:, k]
        x0 = (cell[:, k] % CELLS_PER_SIDE) * CELL + dx[:, k]
        ys, xs = (y0[:, None] + ar)[:, :, None], (x0[:, None] + ar)[:, None, :]
        tile = bank[glyph[:, k]][..., None] * palette[colour[:, k]][:, None, None, :]
        tile = tile * present[:, k, None, None, None]
        out[bi, ys, xs] = out[bi, ys, xs] + tile  # objects sit in distinct cells: tiles never overlap
    return out.permute(0, 3, 1, 2).contiguous()
