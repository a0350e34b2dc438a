#!/usr/bin/env python3
"""Benchmark: every step a release pipeline runs, on the full-size klein-4b random checkpoint.

Each step runs in a fresh process (so peak RSS is its own) and is reported in seconds and as a ratio to the
read floor measured in the same run: validating the checkpoint and streaming every tensor to float32, the least
any step that looks at every weight must do. Targets (2 cores): convert <= 3x the floor and <= 1.5 GB;
verify --source of one pack <= 3x; a verified ternary release (its default packs) <= 10x and <= 3 GB.

    python tools/bench_pipeline.py --work /tmp/bonsai-bench            # makes the checkpoint first if missing
    python tools/bench_pipeline.py --steps read,convert --modes ternary   # a subset
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

STEPS = ("read", "convert", "verify", "release", "repack")
READ = ("import sys, time; from bonsai_quant.checkpoint import Checkpoint; t = time.perf_counter(); "
        "c = Checkpoint(sys.argv[1]); c.validate(); n = sum(c.load(k).float().numel() for k in c.tensors); "
        "print(time.perf_counter() - t)")
_WRAP = ("import json, resource, subprocess, sys, time; t = time.perf_counter(); "
         "p = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True); "
         "print(json.dumps({'rc': p.returncode, 'seconds': time.perf_counter() - t, "
         "'peak_rss_bytes': (r := resource.getrusage(resource.RUSAGE_CHILDREN)).ru_maxrss * 1024, "
         "'cpu_seconds': r.ru_utime + r.ru_stime, "
         "'stdout': p.stdout[-20000:], 'stderr': p.stderr[-4000:]}))")


def measured(cmd: list[str]) -> dict:
    """Wall seconds, CPU seconds (user + system, every thread) and peak RSS of one command in its own process."""
    result = json.loads(subprocess.run([sys.executable, "-c", _WRAP, *cmd], check=True, capture_output=True,
                                       text=True).stdout)
    if result["rc"] != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({result['rc']}):\n{result['stderr']}")
    return result


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bonsai_quant.cli", *args]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bonsai-bench"))
    parser.add_argument("--preset", default="klein-4b")
    parser.add_argument("--modes", default="binary,ternary")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"subset of {','.join(STEPS)}")
    parser.add_argument("--verify-targets", default="mlx,gemlite,bonsai", help="the packs `verify` is timed on")
    parser.add_argument("--json", type=Path, help="where to write the figures "
                        "(default docs/measurements/bench_pipeline_<date>.json)")
    args = parser.parse_args()
    steps = args.steps.split(",")
    modes = args.modes.split(",")
    ckpt = args.work / args.preset
    if not ckpt.exists():
        print(f"writing {ckpt} ...", flush=True)
        measured([sys.executable, str(Path(__file__).parent / "make_checkpoint.py"), "--preset", args.preset,
                  "--out", str(ckpt)])
    rows: list[dict] = []
    today = datetime.date.today().isoformat()
    path = args.json or Path(__file__).resolve().parents[1] / "docs" / "measurements" / f"bench_pipeline_{today}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every step, so an interrupted run keeps what it measured
        path.write_text(json.dumps({"preset": args.preset, "date": today, "cpu_count": os.cpu_count(),
                                    "machine": platform.machine(), "python": platform.python_version(),
                                    "load_average_at_start": load_at_start, "steps": rows}, indent=2) + "\n")

    def record(step: str, what: str, result: dict, **extra) -> dict:
        row = {"step": step, "what": what, "seconds": round(result["seconds"], 2),
               "cpu_seconds": round(result["cpu_seconds"], 2),
               "peak_rss_gb": round(result["peak_rss_bytes"] / 1e9, 3), **extra}
        rows.append(row)
        floor = next((r["seconds"] for r in rows if r["step"] == "read"), None)
        row["x_read_floor"] = round(row["seconds"] / floor, 2) if floor else None
        save()
        print(f"{step:<8} {what:<34} {row['seconds']:>8.1f} s {row['x_read_floor'] or 0:>6.2f}x "
              f"{row['cpu_seconds']:>8.1f} s {row['peak_rss_gb']:>6.2f} GB", flush=True)
        return row

    # The floor is a warm read, as every later step reads the checkpoint from the page cache: a cold first
    # read measures the disk instead (57 s here against ~20 s warm) and would flatter every ratio.
    for file in sorted(ckpt.glob("*.safetensors")):
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    print(f"load average {load_at_start} (figures are only comparable on a quiet machine)")
    print(f"{'step':<8} {'what':<34} {'seconds':>10} {'x read':>7} {'cpu':>10} {'peak':>9}")
    if "read" in steps:
        record("read", "validate + every tensor to float32", measured([sys.executable, "-c", READ, str(ckpt)]))
    for mode in modes:
        out = args.work / f"{args.preset}-{mode}"
        if "convert" in steps:
            record("convert", f"{mode} -> mlx,gemlite,bonsai",
                   measured(cli("convert", "--model", str(ckpt), "--mode", mode, "--out", str(out), "--force",
                                "--quiet", "--target", "mlx,gemlite,bonsai")))
        if "verify" in steps:
            for target in args.verify_targets.split(","):
                result = measured(cli("verify", str(out / target), "--source", str(ckpt), "--json"))
                report = json.loads(result["stdout"])
                parts = {s["name"]: s["seconds"] for s in report["packs"][0]["steps"]}
                record("verify", f"{mode} {target} --source", result, ok=report["ok"], step_seconds=parts)
        if "repack" in steps and (out / "bonsai").exists():
            record("repack", f"{mode} bonsai -> mlx",
                   measured(cli("repack", str(out / "bonsai"), "--target", "mlx", "--out",
                                str(args.work / f"repack-{mode}"), "--force")))
    if "release" in steps:
        record("release", "ternary, its default packs, verified",
               measured(cli("release", "--model", str(ckpt), "--mode", "ternary", "--out",
                            str(args.work / "release-ternary"), "--force", "--quiet")))
    save()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
