#!/usr/bin/env python3
"""Benchmark: `bonsai-quant distill` steps on the full-size klein-4b random checkpoint: step time and peak GPU
memory, with and without gradient checkpointing, then the export to packs.

    python tools/bench_distill_klein.py --work /tmp/dk --json $OUT/distill_klein.json     # one H100

Through the library's own trainer (`bonsai_quant.distill.trainer.Trainer`: teacher in bf16, fp32 latent
student with straight-through codes, fused AdamW, bf16 autocast): make the checkpoint (tools/make_checkpoint.py)
and a small calibration set of synthetic-text trajectories (random weights: there is no real text model to
match), load, then time `--steps` optimizer steps per configuration after one warm-up step. A configuration that
runs out of GPU memory is reported as such. Prints a table and the memory a full run needs per GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bonsai_quant.calibration import calibrate, read_prompts  # noqa: E402
from bonsai_quant.distill import DistillOptions, DistillSettings  # noqa: E402
from bonsai_quant.distill.inputs import process_slice  # noqa: E402
from bonsai_quant.distill.trainer import Trainer  # noqa: E402
from bonsai_quant.recipe import default_recipe  # noqa: E402

GB = 1e9
CUDA = torch.cuda.is_available()  # without one (a smoke run of the script: --preset tiny) memory reads as 0


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_gb() -> float:
    return round(torch.cuda.max_memory_allocated() / GB, 2) if CUDA else 0.0


def run_steps(trainer: Trainer, batch: int, checkpointing: bool, steps: int) -> dict:
    student = trainer.acc.unwrap_model(trainer.student)
    if checkpointing:
        student.enable_gradient_checkpointing()
    else:
        student.disable_gradient_checkpointing()
    trainer.settings = dataclasses.replace(trainer.settings, batch_size=batch)
    trainer.part = process_slice(batch, 0, 1)
    row = {"batch": batch, "gradient_checkpointing": checkpointing}
    sync()
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    try:
        for step in range(steps + 1):
            start = time.perf_counter()
            loss = trainer.loss(step)
            trainer.acc.backward(loss)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            sync()
            if step:  # the first step allocates the optimizer state and warms the kernels
                times.append(time.perf_counter() - start)
        row.update(step_seconds=round(sum(times) / len(times), 3), losses=[round(x, 5) for x in losses],
                   peak_gb=peak_gb())
    except torch.OutOfMemoryError as e:
        trainer.optimizer.zero_grad(set_to_none=True)
        row.update(out_of_memory=True, peak_gb=peak_gb(), error=str(e).splitlines()[0][:200])
    if CUDA:
        torch.cuda.empty_cache()
    print(f"  {row}", file=sys.stderr, flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="folder for the checkpoint, set and packs")
    ap.add_argument("--model", type=Path, help="klein-4b checkpoint (default: made in --work)")
    ap.add_argument("--preset", default="klein-4b", choices=("klein-4b", "tiny"), help="tiny: a smoke run")
    ap.add_argument("--mode", choices=("binary", "ternary"), default="binary")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (default 3)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="batch sizes (default 1 4)")
    ap.add_argument("--image-size", type=int, default=512, help="default 512: 1024 image tokens")
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--no-export", action="store_true", help="skip writing the packs at the end")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": torch.cuda.get_device_name() if CUDA else "cpu", "torch": torch.__version__,
                     "mode": args.mode,
                     "image_tokens": (args.image_size // 16) ** 2, "text_tokens": args.text_tokens, "phases": {}}

    def phase(name: str, start: float) -> None:
        results["phases"][name] = round(time.perf_counter() - start, 1)
        print(f"{name}: {results['phases'][name]} s", file=sys.stderr, flush=True)

    model = args.model or args.work / args.preset
    t = time.perf_counter()
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), "--preset", args.preset,
                        "--out", str(model)], check=True)
    phase("make checkpoint", t)
    prompts = args.work / "prompts.txt"
    prompts.write_text("\n".join(read_prompts(ROOT / "calibration" / "klein-prompts.txt")[:4]) + "\n")
    t = time.perf_counter()
    calib = calibrate(model, args.work / "calib", prompts_path=prompts, synthetic_text=True, steps=4,
                      image_size=args.image_size, max_text_tokens=args.text_tokens, device="cuda" if CUDA else "cpu",
                      dtype=torch.bfloat16, batch_size=4, force=True)
    phase("calibration set", t)
    results["calibration_calls"] = calib.calls

    t = time.perf_counter()
    recipe = default_recipe(args.mode)
    opts = DistillOptions(model=model, recipe=recipe, out=args.work / "distilled", force=True,
                          settings=DistillSettings(steps=args.steps + 1, batch_size=1), calib=args.work / "calib",
                          targets=("mlx", "gemlite"), mixed_precision="bf16", verbose=True)
    trainer = Trainer(opts)
    trainer.check_paths()
    trainer.load(None)
    sync()
    phase("load teacher + student", t)
    results["resident_gb_before_steps"] = round(torch.cuda.memory_allocated() / GB, 2) if CUDA else 0.0
    params = sum(p.numel() for p in trainer.student.parameters())
    trainable = sum(p.numel() for p in trainer.student.parameters() if p.requires_grad)
    results["student_parameters"], results["trainable_parameters"] = params, trainable

    rows = []
    for batch in args.batches:
        for checkpointing in (False, True):
            rows.append(run_steps(trainer, batch, checkpointing, args.steps))
    results["configurations"] = rows

    if not args.no_export:
        t = time.perf_counter()
        trainer.settings = dataclasses.replace(trainer.settings, batch_size=1)
        report = trainer.finish([{"step": 1, "loss": rows[0].get("losses", [0.0])[-1]}], 0, 0.0)
        phase("export (mlx + gemlite packs)", t)
        results["packs_bytes"] = {k: v["files_bytes"] for k, v in report["targets"].items()}

    # What a full run needs per GPU: fp32 latent weights + fp32 grads + two AdamW moments, plus the bf16 teacher;
    # with FSDP the first three shard over the GPUs, the teacher (frozen) can be sharded or replicated.
    state_gb = trainable * (4 + 4 + 8) / GB
    teacher_gb = params * 2 / GB
    results["full_run_memory_gb"] = {
        "weights_grads_adam": round(state_gb, 1), "teacher_bf16": round(teacher_gb, 1),
        "per_gpu_fsdp": {n: round(state_gb / n + teacher_gb, 1) for n in (1, 2, 4, 8)}}

    print(f"\nklein-4b random checkpoint, {args.mode}, {results['image_tokens']} image + {args.text_tokens} text "
          f"tokens per sample, bf16 autocast, on {results['device']}\n")
    print("| batch | gradient checkpointing | step seconds | peak GPU GB |")
    print("| ----: | ---------------------- | -----------: | ----------: |")
    for r in rows:
        sec = "out of memory" if r.get("out_of_memory") else f"{r['step_seconds']:.3f}"
        print(f"| {r['batch']:>5} | {'yes' if r['gradient_checkpointing'] else 'no':<22} | {sec:>12} | "
              f"{r['peak_gb']:>11} |")
    print(f"\nphases (s): {results['phases']}")
    print(f"full run memory (GB): {results['full_run_memory_gb']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
