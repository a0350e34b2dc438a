"""Argument types and shared options of the command line, for `cli.py`, `distill/cli.py` and `evaluate.py`.

Low in the package (it imports only what a parsed argument turns into), so every command module can use it
without importing another command module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .packing.formats import MODES
from .packing.targets import NAMES


def positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return n


def targets_arg(value: str) -> tuple[str, ...]:
    targets = tuple(t.strip() for t in value.split(",") if t.strip())
    bad = [t for t in targets if t not in NAMES]
    if bad or not targets or len(set(targets)) != len(targets):
        raise argparse.ArgumentTypeError(f"{value!r}: expected a comma-separated subset of {','.join(NAMES)}")
    return targets


def add_targets_arg(p: argparse.ArgumentParser, default: str, dest: str = "target") -> None:
    """--target, with --targets as its alias (one option in every command, whichever spelling a user types)."""
    p.add_argument("--target", "--targets", dest=dest, type=targets_arg,
                   help=f"packs to write, comma-separated from {','.join(NAMES)} (default: {default})")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """--model, --mode, --recipe, --target: what to quantize, how, and into which packs."""
    p.add_argument("--model", type=Path, help="diffusers FLUX.2 transformer folder, or a BFL single-file "
                   "checkpoint (flux-2-klein-4b.safetensors) (default: built-in tiny model)")
    p.add_argument("--mode", choices=MODES, help="quantization mode (default: the recipe's; ternary without a recipe)")
    p.add_argument("--recipe", type=Path, help="recipe YAML (default: recipes/<mode>.yaml, the published keep set)")
    add_targets_arg(p, "the recipe's targets")


def recipe_from_args(args):
    """--recipe (default: the published recipe of --mode, ternary without one), with --mode applied."""
    from .recipe import default_recipe, load_recipe

    if args.recipe is None:
        return default_recipe(args.mode or "ternary")
    recipe = load_recipe(args.recipe)
    return recipe.with_mode(args.mode) if args.mode and args.mode != recipe.mode else recipe


def model_from_args(args) -> Path:
    """--model, or the built-in digits model (said on stderr)."""
    if args.model is not None:
        return args.model
    from .digits import model_dir

    print("no --model given: using the built-in flux2-tiny-digits model", file=sys.stderr)
    return model_dir()
