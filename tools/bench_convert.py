#!/usr/bin/env python3
"""Benchmark: convert the full-size klein-4b random checkpoint on this machine.

Prints the time to merely read the checkpoint, then for each mode the wall time and peak RSS of
`bonsai-quant convert` to both targets (each in a fresh process, so peaks don't mix), and the pack sizes
against the published Bonsai Image 4B packs. Targets: under 3 minutes and 3 GB peak RSS per mode.

    python tools/bench_convert.py --work /tmp/bench          # makes the checkpoint first if missing

With --bfl, the same weights are also written as a BFL single file (`flux-2-klein-4b.safetensors`: BFL names,
fused q/k/v, diffusers' mapping inverted) and each mode is converted from both layouts: wall time and peak RSS
of each, and whether every pack file is byte-identical. --json writes the figures.

    python tools/bench_convert.py --work /tmp/bench --bfl --json docs/measurements/convert_bfl.json
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

PUBLISHED_GB = {("binary", "mlx"): 0.97, ("binary", "gemlite"): 1.08,
                ("ternary", "mlx"): 1.43, ("ternary", "gemlite"): 1.54}


def child_peak(cmd: list[str]) -> tuple[float, float]:
    wrapper = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
               "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
               "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True, capture_output=True, text=True).stdout
    wall, kb = out.split()
    return float(wall), int(kb) * 1024 / 1e9


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bonsai-bench"))
    parser.add_argument("--modes", default="binary,ternary")
    parser.add_argument("--preset", default="klein-4b")
    parser.add_argument("--bfl", action="store_true", help="also convert the same weights from a BFL single file")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    ckpt = args.work / args.preset
    if args.bfl:
        return bench_bfl(args, ckpt)
    if not ckpt.exists():
        print(f"writing {ckpt} ...", flush=True)
        wall, peak = child_peak([sys.executable, str(Path(__file__).parent / "make_checkpoint.py"),
                                 "--preset", args.preset, "--out", str(ckpt)])
        print(f"make_checkpoint: {wall:.1f} s, peak RSS {peak:.2f} GB")

    read = ("import sys, time; from bonsai_quant.checkpoint import Checkpoint; t = time.perf_counter(); "
            "c = Checkpoint(sys.argv[1]); c.validate(); n = sum(c.load(k).numel() for k in c.tensors); "
            "print(time.perf_counter() - t)")
    wall, peak = child_peak([sys.executable, "-c", read, str(ckpt)])
    print(f"read only (validate + stream every tensor): {wall:.1f} s, peak RSS {peak:.2f} GB")

    print(f"{'mode':<8} {'wall s':>7} {'peak GB':>8}   {'target':<8} {'GB':>6} {'published':>9} {'bpw':>6}")
    for mode in args.modes.split(","):
        out = args.work / f"{args.preset}-{mode}"
        wall, peak = child_peak(["bonsai-quant", "convert", "--model", str(ckpt), "--mode", mode, "--out", str(out),
                                 "--force", "--quiet"])
        report = json.loads((out / "report.json").read_text())
        for target, t in report["targets"].items():
            print(f"{mode:<8} {wall:>7.1f} {peak:>8.2f}   {target:<8} {t['files_bytes'] / 1e9:>6.3f} "
                  f"{PUBLISHED_GB[mode, target]:>9.2f} {t['bits_per_weight']:>6.3f}")
    return 0


def same_packs(a: Path, b: Path) -> list[str]:
    """Files of two convert outputs' packs that differ or exist on one side only (report.json names its source)."""
    problems = []
    for target in sorted(p.name for p in a.iterdir() if p.is_dir()):
        cmp = filecmp.dircmp(a / target, b / target)
        _, mismatch, errors = filecmp.cmpfiles(a / target, b / target, cmp.common_files, shallow=False)
        problems += [f"{target}/{n}" for n in cmp.left_only + cmp.right_only + mismatch + errors]
    return problems


def bench_bfl(args, ckpt: Path) -> int:
    bfl = args.work / f"flux-2-{args.preset}.safetensors"
    figures = {"preset": args.preset,
               "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    # config.json as diffusers' save_pretrained writes it (every argument), which is what the BFL reader
    # produces for a file that carries none: only then can the packs be byte-identical.
    make = ("import sys; from pathlib import Path; from bonsai_quant.flux2 import PRESETS; "
            "from bonsai_quant.readers.bfl import diffusers_config; "
            "from bonsai_quant.synthetic import write_checkpoint; "
            "write_checkpoint(diffusers_config(PRESETS[sys.argv[1]]), Path(sys.argv[2]), force=True)")
    ckpt = args.work / f"{args.preset}-diffusers"
    if not ckpt.exists():
        wall, peak = child_peak([sys.executable, "-c", make, args.preset, str(ckpt)])
        print(f"write diffusers checkpoint {ckpt.name}: {wall:.1f} s, peak RSS {peak:.2f} GB", flush=True)
    if not bfl.exists():
        write = ("import sys; from bonsai_quant.checkpoint import Checkpoint; "
                 "from bonsai_quant.readers.bfl import write_bfl_file; "
                 "write_bfl_file(Checkpoint(sys.argv[1]), sys.argv[2])")
        wall, peak = child_peak([sys.executable, "-c", write, str(ckpt), str(bfl)])
        figures["write_bfl"] = {"seconds": round(wall, 1), "peak_rss_gb": round(peak, 2)}
        print(f"write BFL file {bfl.name} ({bfl.stat().st_size / 1e9:.2f} GB): {wall:.1f} s, peak RSS {peak:.2f} GB",
              flush=True)
    figures["bfl_bytes"] = bfl.stat().st_size
    print(f"{'mode':<8} {'layout':<10} {'wall s':>7} {'peak GB':>8}")
    for mode in args.modes.split(","):
        row = {}
        outs = {}
        for layout, model in (("diffusers", ckpt), ("bfl", bfl)):
            out = outs[layout] = args.work / f"{args.preset}-{mode}-from-{layout}"
            wall, peak = child_peak([sys.executable, "-m", "bonsai_quant.cli", "convert", "--model", str(model),
                                     "--mode", mode, "--out", str(out), "--force", "--quiet"])
            row[layout] = {"seconds": round(wall, 1), "peak_rss_gb": round(peak, 2)}
            print(f"{mode:<8} {layout:<10} {wall:>7.1f} {peak:>8.2f}", flush=True)
        differ = same_packs(outs["diffusers"], outs["bfl"])
        row["packs_identical"] = not differ
        row["time_ratio_bfl_to_diffusers"] = round(row["bfl"]["seconds"] / row["diffusers"]["seconds"], 3)
        print(f"{mode:<8} packs byte-identical: {not differ}" + (f" (differ: {differ})" if differ else "")
              + f"; BFL/diffusers time {row['time_ratio_bfl_to_diffusers']:.2f}x")
        figures[mode] = row
        shutil.rmtree(outs["bfl"])
        if args.json:  # after every mode, so that a long run's figures survive an interruption
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if all(figures[m]["packs_identical"] for m in args.modes.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
