#!/usr/bin/env python3
"""Benchmark: convert the full-size klein-4b random checkpoint on this machine.

Prints the time to merely read the checkpoint, then for each mode the wall time and peak RSS of
`bonsai-quant convert` to both targets (each in a fresh process, so peaks don't mix), and the pack sizes
against the published Bonsai Image 4B packs. Targets: under 3 minutes and 3 GB peak RSS per mode.

    python tools/bench_convert.py --work /tmp/bench          # makes the checkpoint first if missing
"""

from __future__ import annotations

import argparse
import json
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
    args = parser.parse_args()
    ckpt = args.work / args.preset
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


if __name__ == "__main__":
    sys.exit(main())
