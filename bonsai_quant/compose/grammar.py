"""Prompts of the compose world in GenEval's six categories, the scenes that answer them, and what is held out.

    single_object  "a 3"                     one object
    two_object     "a 3 and a 7"             two objects of different digits
    counting       "three 5s"                exactly two, three or four objects of one digit
    colors         "a blue 2"                one object of a colour
    position       "a 4 left of a 9"         two objects side by side (left of / right of) or stacked (above / below)
    color_attr     "a red 1 and a green 8"   two objects, each of its colour

Digits are written as numerals; count words (two, three, four) never name a digit. A prompt that names no
colour gets objects of random colours.

Held out from the generator's training, so that the benchmark also measures generalisation (GenEval's prompts
are new combinations of seen concepts, too):
- one colour per digit (`HELD_OUT_COLOUR[d]`): no training scene shows digit d in that colour, whatever its prompt;
- five digit pairs (`HELD_OUT_PAIRS`, a + b = 9): no training scene shows both digits.
The benchmark's prompts are drawn from all combinations, a third of them from held-out ones where the category
has any (colors, color_attr, two_object, position).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import BonsaiError
from .world import CELLS, CELLS_PER_SIDE, COLOURS, DIGITS, Obj, cell_of

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
HELD_OUT_COLOUR = {d: COLOURS[(d * 7 + 3) % len(COLOURS)] for d in DIGITS}
HELD_OUT_PAIRS = frozenset(frozenset((a, 9 - a)) for a in range(5))
PROMPTS_PER_CATEGORY = 48
HELD_OUT_SHARE = 1 / 3
BENCHMARK_SEED = 16


@dataclass(frozen=True)
class Prompt:
    category: str
    text: str
    objects: tuple[tuple[int, str | None], ...]  # (digit, colour or None), in the order the prompt names them
    count: int | None = None      # counting: how many of objects[0]
    relation: str | None = None   # position: objects[0] <relation> objects[1]

    @property
    def held_out(self) -> bool:
        return uses_held_out(self)


def text_of(category: str, objects, count=None, relation=None) -> str:
    def noun(digit, colour):
        return f"a {colour} {digit}" if colour else f"a {digit}"

    if category == "counting":
        return f"{COUNT_WORDS[count]} {objects[0][0]}s"
    if category == "position":
        return f"{noun(*objects[0])} {relation} {noun(*objects[1])}"
    return " and ".join(noun(*o) for o in objects)


def make_prompt(category: str, objects, count: int | None = None, relation: str | None = None) -> Prompt:
    if category not in CATEGORIES:
        raise BonsaiError(f"unknown category {category!r}; valid: {', '.join(CATEGORIES)}")
    objects = tuple((int(d), c) for d, c in objects)
    return Prompt(category, text_of(category, objects, count, relation), objects, count, relation)


def colour_allowed(digit: int, colour: str) -> bool:
    return HELD_OUT_COLOUR[digit] != colour


def pair_allowed(a: int, b: int) -> bool:
    return frozenset((a, b)) not in HELD_OUT_PAIRS


def uses_held_out(p: Prompt) -> bool:
    digits = [d for d, _ in p.objects]
    if any(c is not None and not colour_allowed(d, c) for d, c in p.objects):
        return True
    return len(digits) == 2 and not pair_allowed(*digits)


def scene_allowed(objects: tuple[Obj, ...]) -> bool:
    """Whether the generator may be trained on this scene: no held-out colour or pair anywhere in it."""
    if any(not colour_allowed(o.digit, o.colour) for o in objects):
        return False
    digits = sorted({o.digit for o in objects})
    return all(pair_allowed(a, b) for i, a in enumerate(digits) for b in digits[i + 1:])


# ---------------------------------------------------------------- prompts -> scenes

def relation_cells(relation: str, rng: random.Random) -> tuple[int, int]:
    """Cells of (first, second) object for `first <relation> second`: same row or same column, unambiguous."""
    line = rng.randrange(CELLS_PER_SIDE)
    if relation in ("left of", "right of"):
        a, b = cell_of(line, 0), cell_of(line, 1)
    else:
        a, b = cell_of(0, line), cell_of(1, line)
    return (a, b) if relation in ("left of", "above") else (b, a)


def scene_for(p: Prompt, rng: random.Random, allowed_only: bool = False) -> tuple[Obj, ...]:
    """A scene answering `p`: named colours kept, unnamed ones random (from the allowed colours of the digit
    when `allowed_only`, as the generator's training data)."""
    def colour(digit, named):
        if named is not None:
            return named
        choices = [c for c in COLOURS if not allowed_only or colour_allowed(digit, c)]
        return rng.choice(choices)

    if p.category == "position":
        cells = relation_cells(p.relation, rng)
    else:
        n = p.count if p.category == "counting" else len(p.objects)
        cells = rng.sample(range(CELLS), n)
    if p.category == "counting":
        digit = p.objects[0][0]
        return tuple(Obj(digit, colour(digit, None), c) for c in cells)
    return tuple(Obj(d, colour(d, c), cell) for (d, c), cell in zip(p.objects, cells))


# ---------------------------------------------------------------- drawing prompts

def _draw(category: str, rng: random.Random, held_out: bool | None) -> Prompt:
    """A random prompt of `category`; held_out True/False asks for a held-out / seen combination, None for any."""
    for _ in range(10_000):
        if category == "single_object":
            p = make_prompt(category, [(rng.choice(DIGITS), None)])
        elif category == "counting":
            p = make_prompt(category, [(rng.choice(DIGITS), None)], count=rng.choice(tuple(COUNT_WORDS)))
        elif category == "colors":
            p = make_prompt(category, [(rng.choice(DIGITS), rng.choice(COLOURS))])
        else:
            a, b = rng.sample(DIGITS, 2)
            if category == "two_object":
                p = make_prompt(category, [(a, None), (b, None)])
            elif category == "position":
                p = make_prompt(category, [(a, None), (b, None)], relation=rng.choice(RELATIONS))
            else:
                p = make_prompt(category, [(a, rng.choice(COLOURS)), (b, rng.choice(COLOURS))])
        if held_out is None or p.held_out == held_out:
            return p
    raise BonsaiError(f"no {'held-out' if held_out else 'seen'} prompt in category {category}")


def training_prompt(rng: random.Random) -> Prompt:
    """A training prompt: a random category, then a combination the generator may see."""
    return _draw(rng.choice(CATEGORIES), rng, held_out=False)


def training_example(rng: random.Random) -> tuple[Prompt, tuple[Obj, ...]]:
    p = training_prompt(rng)
    return p, scene_for(p, rng, allowed_only=True)


def has_held_out(category: str) -> bool:
    return category in ("two_object", "colors", "position", "color_attr")


def benchmark_prompts(category: str, count: int = PROMPTS_PER_CATEGORY) -> list[Prompt]:
    """The benchmark's fixed prompts of a category: the same list on every machine. Single objects and counting
    cycle through every digit (and count); the others draw distinct prompts (repeating only where a kind runs
    out), every third one a held-out combination."""
    if category not in CATEGORIES:
        raise BonsaiError(f"unknown category {category!r}; valid: {', '.join(CATEGORIES)}")
    rng = random.Random(f"{BENCHMARK_SEED}:{category}")
    if category == "single_object":
        return [make_prompt(category, [(k % 10, None)]) for k in range(count)]
    if category == "counting":  # every count equally often, every digit at least once per count
        per_count = {n: [] for n in COUNT_WORDS}
        for n in COUNT_WORDS:
            while len(per_count[n]) < -(-count // len(COUNT_WORDS)):
                per_count[n] += rng.sample(DIGITS, len(DIGITS))
        combos = [(per_count[n][k // len(COUNT_WORDS)], n)
                  for k, n in zip(range(count), [*COUNT_WORDS] * count)]
        return [make_prompt(category, [(d, None)], count=n) for d, n in combos]
    held = round(count * HELD_OUT_SHARE) if has_held_out(category) else 0
    out, seen = [], set()
    for k in range(count):
        want = k % 3 == 0 if held else False
        for _ in range(200):  # distinct while there are enough (colors has only 10 held-out combinations)
            p = _draw(category, rng, want)
            if p.text not in seen:
                break
        seen.add(p.text)
        out.append(p)
    return out


def all_benchmark_prompts(count: int = PROMPTS_PER_CATEGORY) -> dict[str, list[Prompt]]:
    return {c: benchmark_prompts(c, count) for c in CATEGORIES}
