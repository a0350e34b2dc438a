"""The `distill` subcommand's arguments; the work is in `trainer.py`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..cli_args import add_targets_arg, model_from_args, recipe_from_args
from ..cli_args import positive_int as _positive


def cmd_distill(args) -> int:
    from .settings import DistillSettings
    from .trainer import DistillOptions, distill

    recipe = recipe_from_args(args)
    settings = DistillSettings().updated(**(recipe.distill or {})).updated(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, scale_lr=args.scale_lr, kept_lr=args.kept_lr,
        train_kept=False if args.freeze_kept else None, data_loss=args.data_loss, seed=args.seed,
        inputs=args.inputs, warmup_steps=args.warmup_steps)
    opts = DistillOptions(model=Path(model_from_args(args)), recipe=recipe, out=args.out, settings=settings,
                          calib=args.calib,
                          targets=args.target, force=args.force, resume=args.resume, state_dir=args.state_dir,
                          checkpoint_every=args.checkpoint_every, eval_every=args.eval_every or 0,
                          eval_samples=args.eval_samples, gradient_checkpointing=args.gradient_checkpointing,
                          mixed_precision=args.mixed_precision, cpu=args.cpu, save_checkpoint=args.save_checkpoint,
                          keep_state=args.keep_state, verbose=not args.quiet)
    report = distill(opts)
    if report:  # the main process
        record = report["distill"]
        if args.json:
            print(json.dumps(record, indent=2))
        else:
            loss = record["loss"]
            print(f"distilled {record['teacher']} ({recipe.mode}, {settings.steps} steps, "
                  f"{record['processes']} process(es)): loss {loss['first']:.5g} -> {loss['last']:.5g}")
            if "quality" in record:
                q = record["quality"]
                print(f"quality of the exported packs (step {q['step']}, {q['samples_per_digit']} samples per "
                      f"digit, 4 steps): accuracy {q['accuracy']:.3f}, FD {q['frechet_distance']:.1f}")
            for target, sizes in report["targets"].items():
                print(f"  {args.out / target}: {sizes['files_bytes']:,} bytes")
    return 0


def add_distill_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "distill", help="quantization-aware distillation from the full-precision model, then packs",
        description="Train the recipe's binary/ternary student (straight-through codes, trainable group scales, "
                    "initialised by the recipe's solver) to match the full-precision teacher's velocity on its own "
                    "sampling trajectories (a calibration set), then write packs as convert does. Runs under "
                    "`accelerate launch` on several processes or GPUs unchanged. Training settings come from the "
                    "recipe's `distill:` section; the options below override them.")
    p.add_argument("--model", type=Path, help="diffusers FLUX.2 transformer folder (default: flux2-tiny-digits)")
    p.add_argument("--mode", choices=("binary", "ternary"),
                   help="quantization mode (default: the recipe's; ternary without a recipe)")
    p.add_argument("--recipe", type=Path, help="recipe YAML (default: recipes/<mode>.yaml)")
    add_targets_arg(p, "the recipe's")
    p.add_argument("--out", type=Path, required=True, help="output folder (packs, report.json, distill.json)")
    p.add_argument("--calib", type=Path, metavar="SET",
                   help="calibration set: the trajectories to train on (default: the recipe's calibration key)")
    p.add_argument("--steps", type=_positive, help="optimizer steps (default 400)")
    p.add_argument("--batch-size", type=_positive, help="transformer calls per step over all processes (default 32)")
    p.add_argument("--lr", type=float, help="learning rate of the latent weights (default 2e-4)")
    p.add_argument("--scale-lr", type=float, help="learning rate of the group scales (default 1e-3)")
    p.add_argument("--kept-lr", type=float, help="learning rate of the 16-bit tensors (default 5e-5)")
    p.add_argument("--freeze-kept", action="store_true", help="keep the 16-bit tensors at the teacher's values")
    p.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 20)")
    p.add_argument("--inputs", choices=("continuous", "schedule"),
                   help="continuous: any point of the teacher's Euler paths (default); schedule: stored steps only")
    p.add_argument("--data-loss", type=float, help="weight of a flow-matching loss on real digits (digits model)")
    p.add_argument("--seed", type=int, help="batch sampling seed (default 0)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in the state folder")
    p.add_argument("--state-dir", type=Path, help="checkpoint folder (default: <out>.distill-state)")
    p.add_argument("--keep-state", action="store_true",
                   help="keep the state folder after a successful run (default: removed once the packs exist)")
    p.add_argument("--checkpoint-every", type=_positive, default=50, help="steps between checkpoints (default 50)")
    p.add_argument("--eval-every", type=_positive,
                   help="run the digits quality benchmark every N steps (digits models)")
    p.add_argument("--eval-samples", type=_positive, default=20, help="samples per digit for --eval-every (default 20)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                   help="autocast (default: accelerate's config, else no)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even where a GPU exists")
    p.add_argument("--save-checkpoint", action="store_true",
                   help="also write the student as a diffusers checkpoint (out/checkpoint) for verify --source")
    p.add_argument("--force", action="store_true", help="replace an existing output folder and start over")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("--json", action="store_true", help="print the training record as JSON")
    p.set_defaults(func=cmd_distill)
    return p

