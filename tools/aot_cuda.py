#!/usr/bin/env python3
"""Compile the CUDA backend's kernels for a GPU on a machine without one (Triton's ahead-of-time path).

The launchers in `runtime/cuda/ops.py` run unchanged on meta tensors while Triton's active driver is replaced by
one that names the target (sm_90 by default) and every launch is turned into a compile-only warmup, so each
kernel is specialised exactly as it would be on the device (argument types, 16-byte alignment, divisibility)
and compiled down to a cubin with the ptxas that ships with Triton. What it catches before a GPU run: a kernel
or tile that does not compile for the target, one whose shared memory exceeds the device's, and (with --sass)
the instruction mix of each kernel's K loop.

    python tools/aot_cuda.py [--arch 90] [--shapes klein|tiny|all] [--ms 1,16] [--sass]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda import SHAPES  # noqa: E402
from cuda_quality import TINY_SHAPES  # noqa: E402

KLEIN = list(SHAPES.values())  # (N, K)
TINY = list(TINY_SHAPES)
ENCODINGS = ("bits1", "bits2")
MAX_SHARED = {90: 232448, 89: 101376, 80: 166912}  # opt-in shared memory per block, bytes


class _TargetDriver:
    """Enough of a Triton driver for compiling: a device, a stream and the target; nothing is loaded."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def compiling_for(arch: int):
    """Within: every Triton launch compiles for `arch` and returns; the compiled kernels are yielded as a list
    of (kernel name, compiled kernel) in launch order."""
    import triton.runtime.jit as jit
    from triton.runtime import driver

    compiled: list = []
    touched: set = set()
    run = jit.JITFunction.run

    def warm(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.append((self.fn.__name__, kernel))
        touched.add(self)
        return kernel

    active = driver._active  # restored as it was: on a machine without a GPU there is no default driver
    driver.set_active(_TargetDriver(arch))
    jit.JITFunction.run = warm
    try:
        yield compiled
    finally:
        jit.JITFunction.run = run
        driver._active = active
        for fn in touched:  # their binders were built for the stand-in target
            fn.device_caches.clear()


def _meta_weights(n: int, k: int, encoding: str):
    from bonsai_quant.runtime.cuda.layout import CODES_PER_BYTE, PackedWeights

    codes = torch.empty(-(-k // CODES_PER_BYTE[encoding]), n, dtype=torch.uint8, device="meta")
    scales = torch.empty(k // 128, n, dtype=torch.bfloat16, device="meta")
    return PackedWeights(encoding, codes, scales, k, n, 128)


def small_m_variants(shapes, ms, encodings=ENCODINGS, kinds=None):
    """(label, thunk) for every tile `ops.packed_matmul` tunes at these shapes and row counts."""
    from bonsai_quant.runtime.cuda import ops

    out = []
    for n, k in shapes:
        for enc in encodings:
            w = _meta_weights(n, k, enc)
            for m in ms:
                x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
                y = torch.empty(m, n, dtype=torch.bfloat16, device="meta")
                for cfg in ops._small_m_candidates(m, k // 128, n):
                    if kinds is not None and cfg["kind"] not in kinds:
                        continue
                    label = (f"{n}x{k} {enc} M={m} {cfg['kind']} n{cfg['BLOCK_N']} split{cfg['SPLIT']} "
                             f"w{cfg['num_warps']}")
                    out.append((label, lambda x=x, w=w, y=y, cfg=cfg: ops.small_m_matmul(x, w, y, **cfg)))
    return out


def large_m_variants(shapes, ms, encodings=ENCODINGS):
    """The fp8 path's own kernels (activation quantizer, word expansion of the codes) at these shapes."""
    from bonsai_quant.runtime.cuda import ops

    out = []
    for n, k in shapes:
        for m in ms:
            x = torch.empty(m, k, dtype=torch.bfloat16, device="meta")
            out.append((f"{n}x{k} M={m} quantize_e4m3", lambda x=x: ops.quantize_e4m3(x, column_major_scales=True)))
        for enc in encodings:
            w = _meta_weights(n, k, enc)
            out.append((f"{n}x{k} {enc} expand_words", lambda w=w: ops.expand_e4m3(w)))
    return out


def _tool(name: str) -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def loop_stats(cubin: bytes, workdir: Path) -> list[dict]:
    """Per backward branch (a loop) of the SASS: its instruction count and most frequent opcodes."""
    path = workdir / "kernel.cubin"
    path.write_bytes(cubin)
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True).stdout
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    loops = []
    for addr, text in ins:
        m = re.search(r"BRA 0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            lo = int(m.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            ops = Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for t in body)
            loops.append({"instructions": len(body), "top": dict(ops.most_common(8))})
    return loops


def compile_all(variants, arch: int = 90, sass: bool = False, workdir: Path | None = None) -> list[dict]:
    """Compile each (label, thunk); one row per compiled kernel: label, kernel, seconds, shared bytes, whether it
    fits the target's shared memory, error (a compile failure, recorded; the others go on)."""
    from bonsai_quant.runtime.cuda import ops

    rows = []
    workdir = workdir or Path("/tmp")
    ops.EXPAND["words"] = True  # a failing word expansion must surface here, not fall back to the slow kernel
    for label, thunk in variants:
        t = time.perf_counter()
        with compiling_for(arch) as compiled:
            try:
                thunk()
                error = None
            except Exception as e:
                error = f"{type(e).__name__}: {str(e)[:600]}"
        if error is not None:
            rows.append({"label": label, "error": error, "seconds": time.perf_counter() - t})
            continue
        for name, kernel in compiled:
            shared = int(kernel.metadata.shared)
            row = {"label": label, "kernel": name, "seconds": time.perf_counter() - t, "shared_bytes": shared,
                   "fits_shared_memory": shared <= MAX_SHARED.get(arch, MAX_SHARED[90])}
            if sass:
                row["loops"] = loop_stats(kernel.asm["cubin"], workdir)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: Hopper)")
    parser.add_argument("--shapes", default="all",
                        help="klein (its five layers), tiny (flux2-tiny-digits'), all, or NxK[,NxK...] (out x in)")
    parser.add_argument("--ms", default="1,16", help="row counts of the small-M tiles")
    parser.add_argument("--large-ms", default="1024", help="row counts of the activation quantizer")
    parser.add_argument("--kinds", help="only these small-M kernel kinds (comma separated)")
    parser.add_argument("--sass", action="store_true", help="also print each kernel's K-loop instruction mix")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    named = {"klein": KLEIN, "tiny": TINY, "all": KLEIN + TINY}
    try:
        shapes = named.get(args.shapes) or [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes {args.shapes!r}: expected klein, tiny, all or NxK[,NxK...]")
    bad_k = [f"{n}x{k}" for n, k in shapes if k % 128]
    if bad_k:
        parser.error(f"--shapes: in features must be multiples of 128 (the group): {', '.join(bad_k)}")
    kinds = set(args.kinds.split(",")) if args.kinds else None
    variants = small_m_variants(shapes, [int(m) for m in args.ms.split(",")], kinds=kinds)
    if kinds is None:
        variants += large_m_variants(shapes, [int(m) for m in args.large_ms.split(",")])
    rows = compile_all(variants, args.arch, args.sass)
    for r in rows:
        if "error" in r:
            print(f"FAIL {r['label']}: {r['error']}", flush=True)
            continue
        loops = "; ".join(f"loop {lp['instructions']} instrs {lp['top']}" for lp in r.get("loops", []))
        print(f"ok   {r['label']} [{r['kernel']}] {r['seconds']:.1f}s shared {r['shared_bytes']}"
              + ("" if r["fits_shared_memory"] else " EXCEEDS SHARED MEMORY") + (f"  {loops}" if loops else ""),
              flush=True)
    bad = [r for r in rows if "error" in r or not r["fits_shared_memory"]]
    print(f"{len(rows)} kernels compiled for sm_{args.arch}, {len(bad)} failed or too large", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
