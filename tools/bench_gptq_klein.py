#!/usr/bin/env python3
"""Benchmark: calibration + gptq on the full-size klein-4b random checkpoint: time and peak memory per phase.

    python tools/bench_gptq_klein.py --device cuda --work /tmp/gq                   # one H100: all 100 linears
    python tools/bench_gptq_klein.py --device cpu --layers 4 --prompt-count 2 \\
        --image-size 256 --text-tokens 128 --model /path/to/klein-4b --work /tmp/gq  # a CPU subset

Phases, each through the library code `bonsai-quant calibrate` and `convert` use:
1. calibrate: load the bf16 transformer, sample `--prompt-count` prompts of calibration/klein-prompts.txt with
   FlowMatch-Euler (`--steps`), store the inputs as a calibration set (text conditioning from `--text-encoder`
   if given, else synthetic: the checkpoint has random weights, so there is no real text model to match);
2. statistics: H = E[x x^T] per linear over the whole set, gathered one transformer block at a time
   (`stats.BlockStats`, as convert does);
3. gptq: each of the first `--layers` quantized linears (plan order; default all 100) in both modes, on the
   device of H, with its H-weighted error against the data-free solver's.

Prints a table and writes `--json`. Peak memory: host RSS (getrusage, whole process so far) after each phase
and CUDA peak allocated per phase. Without `--model` the checkpoint is made in `--work` first
(tools/make_checkpoint.py --preset klein-4b, 7.75 GB on disk).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bonsai_quant.calibration import calibrate, load_model, read_prompts  # noqa: E402
from bonsai_quant.checkpoint import Checkpoint  # noqa: E402
from bonsai_quant.flux2 import inventory  # noqa: E402
from bonsai_quant.plan import decide_all  # noqa: E402
from bonsai_quant.quantizers import dequantize, quantize  # noqa: E402
from bonsai_quant.recipe import default_recipe  # noqa: E402
from bonsai_quant.stats import BlockStats  # noqa: E402

DATA_FREE = {"binary": "absmean", "ternary": "optimal"}


def host_peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


class Phase:
    """Wall time, host peak RSS after, and CUDA peak allocated during a phase."""

    def __init__(self, name: str, device: str, results: dict):
        self.name, self.cuda, self.results = name, device.startswith("cuda"), results

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.results[self.name] = {
            "seconds": round(time.perf_counter() - self.start, 2),
            "host_peak_gb": round(host_peak_gb(), 2),
            "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if self.cuda else None,
        }
        print(f"{self.name}: {self.results[self.name]}", file=sys.stderr, flush=True)


def h_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    e = (w - q).to(h.device, torch.float64)
    return float(((e @ h) * e).sum())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="klein-4b checkpoint folder (default: make one in --work)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the checkpoint and the calibration set")
    ap.add_argument("--device", default="cuda", help="cuda (one H100) or cpu")
    ap.add_argument("--layers", type=int, help="quantize only the first N linears (default: all)")
    ap.add_argument("--modes", nargs="+", default=["binary", "ternary"], choices=["binary", "ternary"])
    ap.add_argument("--prompts", type=Path, default=ROOT / "calibration" / "klein-prompts.txt")
    ap.add_argument("--prompt-count", type=int, default=32, help="prompts of the file to use (default 32)")
    ap.add_argument("--text-encoder", type=Path, help="Qwen3 text encoder (default: synthetic text)")
    ap.add_argument("--image-size", type=int, default=512, help="pixels per side (default 512: 1024 tokens)")
    ap.add_argument("--text-tokens", type=int, default=512, help="text tokens (default 512, as the pipeline)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=4, help="trajectories sampled together (default 4)")
    ap.add_argument("--stats-batch", type=int, default=8, help="calls per statistics forward (default 8)")
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--no-compare", action="store_true",
                    help="skip the H-weighted error against the data-free solver (saves its CPU time)")
    ap.add_argument("--json", type=Path, help="also write the results here (rewritten after every layer)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    model_path = args.model or args.work / "klein-4b"
    if not (model_path / "config.json").exists():
        print(f"making the klein-4b random checkpoint in {model_path}", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_checkpoint.py"), "--preset", "klein-4b",
                        "--out", str(model_path)], check=True)

    prompts = read_prompts(args.prompts)[:args.prompt_count]
    prompt_file = args.work / f"prompts-{len(prompts)}.txt"
    prompt_file.write_text("\n".join(prompts) + "\n")
    results: dict = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else
                     f"cpu ({torch.get_num_threads()} threads)", "torch": torch.__version__,
                     "prompts": len(prompts), "steps": args.steps, "image_tokens": (args.image_size // 16) ** 2,
                     "text_tokens": args.text_tokens, "phases": {}}
    phases = results["phases"]

    with Phase("calibrate", args.device, phases):
        calib = calibrate(model_path, args.work / "calib-set", prompts_path=prompt_file,
                          text_encoder=args.text_encoder, synthetic_text=args.text_encoder is None,
                          steps=args.steps, image_size=args.image_size, max_text_tokens=args.text_tokens,
                          device=args.device, dtype=torch.bfloat16, batch_size=args.batch_size, force=True,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    results["calibration_calls"] = calib.calls
    results["calibration_set_bytes"] = sum(f.stat().st_size for f in calib.path.iterdir())

    with Phase("load model", args.device, phases):
        model = load_model(model_path, dtype=torch.bfloat16, device=args.device)
    specs = inventory(Checkpoint(model_path).config)
    params = dict(model.named_parameters())
    names = [d.name for d in decide_all(specs, {n: p.dtype for n, p in params.items()}, default_recipe("ternary"))
             if d.action == "quantize"][:args.layers]
    blocks = BlockStats(model, calib, {n: "hessian" for n in names}, batch_size=args.stats_batch)

    layers, stats_s, gptq_s = [], 0.0, {m: 0.0 for m in args.modes}
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for name in names:
        t = time.perf_counter()
        stats = blocks.get(name)
        if cuda:
            torch.cuda.synchronize()
        stats_s += time.perf_counter() - t
        weight = params[name].detach().float().cpu()
        row = {"name": name, "shape": list(weight.shape)}
        for mode in args.modes:
            t = time.perf_counter()
            q = quantize(weight, mode, 128, torch.float16, "gptq", name=name, stats=stats)
            if cuda:
                torch.cuda.synchronize()
            row[f"{mode}_seconds"] = round(time.perf_counter() - t, 2)
            gptq_s[mode] += row[f"{mode}_seconds"]
            if args.no_compare:
                continue
            base = quantize(weight, mode, 128, torch.float16, DATA_FREE[mode])
            row[f"{mode}_h_error_vs_data_free"] = round(
                h_error(weight, dequantize(q.codes, q.scales, 128), stats.hessian)
                / h_error(weight, dequantize(base.codes, base.scales, 128), stats.hessian), 4)
        layers.append(row)
        print(f"  {name} {row}", file=sys.stderr, flush=True)
        if args.json:  # a run cut short still leaves its figures so far
            results["layers"] = layers
            results["partial"] = {"layers_done": len(layers), "statistics_seconds": round(stats_s, 2),
                                  "gptq_seconds": {m: round(v, 2) for m, v in gptq_s.items()},
                                  "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None}
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    phases["statistics"] = {"seconds": round(stats_s, 2), "passes": blocks.passes}
    for mode in args.modes:
        phases[f"gptq {mode}"] = {"seconds": round(gptq_s[mode], 2)}
    results["stats_and_gptq"] = {"seconds": round(time.perf_counter() - start, 2),
                                 "host_peak_gb": round(host_peak_gb(), 2),
                                 "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2) if cuda else None}
    results["layers"] = layers

    print(f"\nklein-4b random checkpoint on {results['device']}: {len(prompts)} prompts x {args.steps} steps = "
          f"{calib.calls} calls of {results['image_tokens']} image + {args.text_tokens} text tokens; "
          f"{len(names)} linears\n")
    print(f"| {'phase':<16} | seconds | host peak GB | CUDA peak GB |")
    print(f"| {'-' * 16} | ------: | -----------: | -----------: |")
    for name, p in phases.items():
        print(f"| {name:<16} | {p['seconds']:>7.1f} | {p.get('host_peak_gb') or '-':>12} | "
              f"{p.get('cuda_peak_gb') or '-':>12} |")
    s = results["stats_and_gptq"]
    print(f"| {'stats + gptq':<16} | {s['seconds']:>7.1f} | {s['host_peak_gb']:>12} | {s['cuda_peak_gb'] or '-':>12} |")
    for mode in args.modes if not args.no_compare else ():
        ratios = [r[f"{mode}_h_error_vs_data_free"] for r in layers]
        print(f"{mode}: gptq H-weighted error / data-free, mean over layers {sum(ratios) / len(ratios):.3f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
