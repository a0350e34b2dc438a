#!/usr/bin/env python3
"""The CUDA backend on one GPU, everything in one bounded run: quality gate, kernel checks, per-layer speed, the step.

Sections, in this order (`--sections`), each given the time left minus what the later ones reserve, the JSON
rewritten after each point:

1. quality: the digits benchmark through our backend against the reference runtime (`tools/cuda_quality.py`).
2. check: each compiled kernel against its oracle (the e4m3 quantizer bit for bit against `emulate`, the codes
   read from every packed layout, every small-M tile the tuner can pick against fp32 x @ (codes * s)^T).
3. layers: the five klein shapes x M x {binary, ternary}: bf16 cuBLAS (F.linear), gemlite, humming-kernels and
   ours (the small-M kernels, tuned once per shape and M; expand + torch._scaled_mm, with its parts timed
   alone); weights rotated through enough copies to exceed the L2 (>= 200 MB per sweep), each sweep captured in
   a CUDA graph and replayed. Every per-call cost is inside the timing (activation quantization, code
   expansion). The most telling points first: M = 1, 16 (the >= 4x target), then 4096, 1024, then 256. The
   measured crossover table is written as crossover.json and installed for the rest of the run.
4. step: a klein-4b-size transformer with random weights built on the GPU, quantized there (binary: absmean,
   ternary: threshold), at 1024 and 4096 image tokens + 512 text tokens: dense bf16, gemlite and ours, eager and
   as a CUDA graph of the whole forward; peak memory, resident weight bytes, the relative error against the
   same quantized weights in fp32 (the reference runtime's arithmetic); and, where the quality gate moved
   layer kinds to bf16 activations, ours with those kinds moved.

Compiling is most of a cold run's time, so it happens first and in parallel: worker processes run every
launch the layers section will time once (our tiles, gemlite's autotuning -- its chosen configs come back as
files -- and humming's JIT), filling the on-disk kernel caches while the main process runs the quality gate
and the checks. Every measurement is wrapped: a failure is recorded in the JSON and the run goes on.

    python tools/bench_cuda.py --out OUT_DIR [--deadline-s 480] [--sections quality,check,layers,step]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

SHAPES = {"attn (3072x3072)": (3072, 3072), "ff in (3072x18432)": (18432, 3072), "ff out (9216x3072)": (3072, 9216),
          "single in (3072x27648)": (27648, 3072), "single out (12288x3072)": (3072, 12288)}  # name: (N, K)
MS = (1, 16, 256, 1024, 4096)
TIERS = ((1, 16), (4096, 1024), (256,))  # the order the sweep visits M in: small M first, then large
# The step's other row counts (text tokens; image + text in the single blocks) that gemlite tunes apart (it
# buckets M up to powers of two, and 4608 rows share 4096's bucket).
STEP_MS = {(3072, 3072): (512,), (18432, 3072): (512,), (3072, 9216): (512,), (27648, 3072): (1536,),
           (3072, 12288): (1536,)}
ENCODING = {"binary": "bits1", "ternary": "bits2"}
ROTATE_BYTES = 200 * 2**20
SECTIONS = ("quality", "check", "layers", "step")
RESERVE_S = {"quality": 45.0, "check": 15.0, "layers": 120.0, "step": 100.0}  # kept for a section by earlier ones
# main-process humming set-up (its JIT builds run in the workers), and the time the sweep may wait for them
HUMMING = {"spent_s": 0.0, "budget_s": 60.0, "waited_s": 0.0, "wait_budget_s": 40.0}
CLOCK = {"start": time.perf_counter(), "deadline_s": float("inf"), "section_end_s": float("inf")}


def now() -> float:
    return time.perf_counter() - CLOCK["start"]


def time_left() -> float:
    """Seconds left to the current section: the run's deadline less what the later sections reserve."""
    return min(CLOCK["deadline_s"], CLOCK["section_end_s"]) - now()


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def random_weights(n: int, k: int, mode: str, seed: int):
    from bonsai_quant.runtime.cuda import layout

    g = torch.Generator(device="cuda").manual_seed(seed)
    if mode == "binary":
        codes = (torch.randint(0, 2, (n, k), generator=g, device="cuda", dtype=torch.int8) * 2 - 1)
    else:
        codes = torch.randint(-1, 2, (n, k), generator=g, device="cuda", dtype=torch.int8)
    scales = ((torch.rand(n, k // 128, generator=g, device="cuda") + 0.5) * k ** -0.5).to(torch.bfloat16)
    return codes, scales, layout.from_codes(codes, scales, ENCODING[mode], 128)


def gemlite_setup(autotune: str) -> None:
    import gemlite

    gemlite.set_packing_bitwidth(8)
    gemlite.set_autotune(autotune)


def gemlite_layer(w, mode: str):
    """GemLiteLinearTriton loaded from our resident layout (its W_q is the same bytes for 1-/2-bit codes)."""
    from gemlite.core import DType, GemLiteLinearTriton

    from bonsai_quant.packing import gemlite as gp

    bits = 1 if mode == "binary" else 2
    layer = GemLiteLinearTriton(bits, 128, w.in_features, w.out_features, DType.BF16, DType.BF16)
    s = w.scales
    state = {"W_q": w.codes, "scales": s * 2 if mode == "binary" else s,
             "zeros": -s if mode == "binary" else torch.tensor(1, dtype=torch.int32),
             "metadata": torch.tensor(gp.meta_args(mode, 128, torch.bfloat16), dtype=torch.int32),
             "orig_shape": torch.tensor([w.out_features, w.in_features], dtype=torch.int32),
             "meta_scale": torch.tensor(0.0)}
    layer.load_state_dict({k: v.cuda() for k, v in state.items()})
    return layer


def humming_layer(dense: torch.Tensor, mode: str):
    from humming.layer import HummingLayer

    n, k = dense.shape
    tries = ([{"dtype": "uint1", "group_size": 128, "has_zero_point": True}, {"dtype": "uint1", "group_size": 128}]
             if mode == "binary" else
             [{"dtype": "int2", "group_size": 128}, {"dtype": "uint2", "group_size": 128, "has_zero_point": True}])
    errors = []
    for cfg in tries:
        try:
            layer = HummingLayer(shape_n=n, shape_k=k, weight_config=dict(cfg), torch_dtype=torch.bfloat16).cuda()
            layer.load_from_unquantized(dense)
            layer.transform()
            layer(torch.zeros(16, k, dtype=torch.bfloat16, device="cuda"))
            return layer, cfg
        except Exception as e:
            errors.append(f"{cfg}: {type(e).__name__}: {str(e)[:300]}")
    raise RuntimeError("; ".join(errors))


def time_calls(calls: list, reps: int = 20) -> tuple[float, str]:
    """ms per call of a sweep over `calls` (one per weight copy), replayed as a CUDA graph (else eager)."""
    for c in calls[:2]:
        c()
    torch.cuda.synchronize()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls[:2]:
                c()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / (reps * len(calls))
        del graph
        return ms, "cuda graph"
    except Exception:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(max(1, reps // 4)):
            for c in calls:
                c()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / (max(1, reps // 4) * len(calls)), "eager"


def copies(nbytes: int, cap: int = 128) -> int:
    return max(1, min(cap, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


# ---------------------------------------------------------------- compiling ahead, in worker processes

_WORKER: dict = {}


def _worker_init(gemlite_autotune: str, config_dir: str) -> None:
    os.setpgrp()  # its own process group, so that ending it also ends the compilers it started (nvcc)
    torch.set_num_threads(1)
    _WORKER.update(gemlite_autotune=gemlite_autotune, config_dir=config_dir, weights={})


def _worker_weights(n: int, k: int, mode: str):
    key = (n, k, mode)
    if key not in _WORKER["weights"]:
        from bonsai_quant.runtime.cuda import layout

        _WORKER["weights"].clear()  # one layer at a time: bounded memory
        _, _, w = random_weights(n, k, mode, 2)
        _WORKER["weights"][key] = (w, layout.dense_of(w).to(torch.bfloat16))
    return _WORKER["weights"][key]


def _shorten_autotune_benchmarks(warmup_ms: float = 3, rep_ms: float = 10) -> int:
    """gemlite's Triton autotuners time each config for 25 + 100 ms by default (Triton's); a tenth of that still
    ranks configs (median of the runs) and keeps the ~1000 candidate timings of a sweep to seconds."""
    import importlib

    import triton.testing
    from triton.runtime.autotuner import Autotuner

    def bench(kernel_call, quantiles):
        return triton.testing.do_bench(kernel_call, warmup=warmup_ms, rep=rep_ms, quantiles=quantiles)

    count = 0
    for name in ("gemm_kernels", "gemm_splitK_kernels", "gemm_splitK_persistent_kernels", "gemv_kernels",
                 "gemv_splitK_kernels", "gemv_revsplitK_kernels"):
        module = importlib.import_module(f"gemlite.triton_kernels.{name}")
        for value in vars(module).values():
            if isinstance(value, Autotuner):
                value._do_bench = bench
                value.__dict__.pop("do_bench", None)  # a cached_property, if it was read already
                count += 1
    return count


def precompile(job: dict) -> dict:
    """In a worker: every launch the main process will make for `job` (one library at one layer and M), run
    once so that its kernels are compiled into the on-disk caches; gemlite's autotuned configs are written to
    this worker's config file for the main process to load."""
    t = time.perf_counter()
    if job["lib"] == "distill":  # not a compile: the quality section's distilled pack, trained meanwhile
        try:
            import cuda_quality

            return {"job": job_name(job), **cuda_quality.distill_pack(job["mode"], Path(job["out"]), job["steps"])}
        except Exception as e:
            return {"job": job_name(job), "seconds": time.perf_counter() - t, "error": f"{type(e).__name__}: {e}"[:500]}
    lib, n, k, mode, m = job["lib"], job["n"], job["k"], job["mode"], job.get("m", 1)
    if "context_lost" in _WORKER:
        return {"job": job_name(job), "seconds": 0.0, "error": f"not run: {_WORKER['context_lost']}"}
    try:
        from bonsai_quant.runtime.cuda import ops

        w, dense16 = _worker_weights(n, k, mode)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        failed = []
        if lib == "check":  # the check section's own launches (fp32 outputs), on their weights
            from bonsai_quant.runtime.cuda import layout

            codes, scales, _ = random_weights(n, k, mode, 1)
            cw = layout.from_codes(codes, scales, job["encoding"], 128)
            if job["encoding"] != "trits":
                failed += [f"{tile}: {r}" for tile, r in check_tiles(cw, m).items() if isinstance(r, str)]
            for mm in (1, 16, 300):
                check_products(cw, codes, scales, mm, False)
        elif lib == "ours":
            launches = []
            if m <= ops.SMALL_M:
                y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
                launches += [(cfg["kind"], lambda cfg=cfg: ops.small_m_matmul(x, w, y, **cfg))
                             for cfg in ops._small_m_candidates(m, k // 128, n)]
            launches.append(("scaled_mm", lambda: ops.scaled_mm_matmul(x, w, torch.bfloat16)))
            if job.get("tiled"):
                launches.append(("tiled", lambda: ops.packed_matmul(x, w)))
            for what, launch in launches:  # one tile that fails must not keep the others from compiling
                try:
                    launch()
                    torch.cuda.synchronize()  # a fault shows here, on the launch that made it
                except Exception as e:
                    failed.append(f"{what}: {type(e).__name__}: {e}"[:200])
                    _raise_if_context_lost(what)
        elif lib == "gemlite":
            import gemlite

            if "gemlite" not in _WORKER:
                gemlite_setup(_WORKER["gemlite_autotune"])
                _shorten_autotune_benchmarks()
                _WORKER["gemlite"] = True
            layer = gemlite_layer(w, mode)
            for mm in job["ms"]:  # one kernel family, compiled once; autotuned per row bucket
                layer(torch.randn(mm, k, device="cuda", dtype=torch.bfloat16))
            gemlite.cache_config(str(Path(_WORKER["config_dir"]) / f"gemlite_{os.getpid()}.json"))
        elif lib == "humming":
            layer, _ = humming_layer(dense16, mode)
            layer(x)
            del layer
        torch.cuda.synchronize()
        out = {"job": job_name(job), "seconds": time.perf_counter() - t}
        if failed:
            out["error"] = "; ".join(failed)
        return out
    except ContextLost as e:  # this worker is done for; the main process must not launch that kind
        _WORKER["context_lost"] = str(e)
        return {"job": job_name(job), "seconds": time.perf_counter() - t, "error": str(e)[:500],
                "context_lost_after": e.kind}
    except Exception as e:
        return {"job": job_name(job), "seconds": time.perf_counter() - t, "error": f"{type(e).__name__}: {e}"[:500]}


def job_name(job: dict) -> str:
    if job["lib"] == "distill":
        return f"distill {job['mode']}"
    rows = "/".join(map(str, job["ms"])) if "ms" in job else job["m"]
    return f"{job['lib']} {job['n']}x{job['k']} {job.get('encoding', job['mode'])} M={rows}"


def layer_points(shapes, modes, ms) -> list[tuple]:
    """(shape name, mode, M) in the order the sweep measures them."""
    tiers = [[m for m in tier if m in ms] for tier in TIERS] + [[m for m in ms if not any(m in t for t in TIERS)]]
    return [(name, mode, m) for tier in tiers for name in shapes for mode in modes for m in tier]


class Precompiler:
    """Pools of worker processes running `precompile` jobs in the background: "fast" (ours and gemlite, whose
    autotuning times kernels on the GPU, so it must be over before the main process times anything) and
    "humming" (nvcc builds: CPU only, it may go on while the main process times). The main process waits for
    a point's jobs before timing it, and ends the pools before the step."""

    def __init__(self, groups: dict, gemlite_autotune: str, distill_dir: str | None = None):
        self.config_dir = tempfile.mkdtemp(prefix="bench_cuda_")
        self.distill_dir = distill_dir
        self.pools, self.futures, self.group_of, self.point_of = {}, {}, {}, {}
        for group, (jobs, workers) in groups.items():
            if not jobs or workers < 1:
                continue
            pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_worker_init, initargs=(gemlite_autotune, self.config_dir))
            self.pools[group] = pool
            for job in jobs:
                self.futures[job_name(job)] = pool.submit(precompile, job)
                self.group_of[job_name(job)] = group
                for m in job.get("ms", [job.get("m")]):
                    self.point_of[(job["lib"], job.get("n"), job.get("k"), job["mode"], m)] = job_name(job)
        self.started = now()

    def job_for(self, lib: str, n: int, k: int, mode: str, m: int) -> str | None:
        """The name of the job that compiles `lib` at this layer and M (None: there is none)."""
        return self.point_of.get((lib, n, k, mode, m))

    def names(self, group: str) -> list[str]:
        return [n for n, g in self.group_of.items() if g == group]

    def wait(self, names, timeout: float) -> dict:
        """{job: its result, or None if it did not finish within `timeout` s (or was cancelled); a job whose worker
        died (a broken pool) gives an error result, so that the main process does that work itself}."""
        futures = [self.futures[n] for n in names if n in self.futures]
        cf.wait(futures, timeout=max(0.0, timeout))
        out = {}
        for n in names:
            f = self.futures.get(n)
            if f is None:
                continue
            if not f.done() or f.cancelled():
                out[n] = None
                continue
            try:
                out[n] = f.result()
            except Exception as e:
                out[n] = {"job": n, "seconds": 0.0, "error": f"worker lost: {type(e).__name__}: {e}"[:300]}
        return out

    def disable_faulting_kinds(self, names) -> list[str]:
        """Keep the main process from launching a small-M kernel kind that made a worker lose its CUDA context
        (the main process would lose its own, and the rest of the run with it)."""
        from bonsai_quant.runtime.cuda import ops

        kinds = {r["context_lost_after"] for r in self.wait(names, 0).values() if r and "context_lost_after" in r}
        ops.DISABLED_KINDS.update(k for k in kinds if k in ops.SMALL_M_KINDS and k != "tiled")
        return sorted(kinds)

    def load_gemlite_configs(self) -> int:
        """Merge every worker's autotuned gemlite configs into this process's gemlite cache."""
        import gemlite

        files = sorted(Path(self.config_dir).glob("gemlite_*.json"))
        for f in files:
            gemlite.load_config(str(f))
        return len(files)

    def summary(self) -> dict:
        out = {}
        for group in dict.fromkeys(self.group_of.values()):
            results = [r for r in self.wait(self.names(group), 0).values() if r is not None]
            out[group] = {"jobs": len(self.names(group)), "finished": len(results),
                          "failed": [r for r in results if "error" in r][:40],
                          "worker_seconds": round(sum(r["seconds"] for r in results), 1)}
        out["since_start_s"] = round(now() - self.started, 1)
        return out

    def close(self, group: str | None = None) -> None:
        for g in [group] if group else list(self.pools):
            pool = self.pools.get(g)
            if pool is None:
                continue
            workers = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for p in workers:  # our own workers, some still compiling, and what they started
                if p.is_alive():
                    try:
                        os.killpg(p.pid, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        p.terminate()
            for p in workers:
                p.join(timeout=10)
            del self.pools[g]
        if group is None:  # the run is over: its temporary folders go too
            shutil.rmtree(self.config_dir, ignore_errors=True)
            if self.distill_dir:
                shutil.rmtree(self.distill_dir, ignore_errors=True)


def precompile_jobs(shapes, modes, ms, humming: bool, gemlite: bool, tiled_ms=()) -> dict:
    """{"fast": jobs, "humming": jobs}: the quality gate's, the check's and ours first (the main process needs
    them soonest), ours in the sweep's order, then gemlite (also at the step's other row counts); humming's
    nvcc builds apart."""
    import cuda_quality

    # the quality gate's kernels first (it runs first): the tiny model's layers at the benchmark's row count
    fast = [{"lib": "ours", "n": n, "k": k, "mode": mode, "m": cuda_quality.TINY_ROWS, "tiled": True}
            for n, k in cuda_quality.TINY_SHAPES for mode in modes]
    fast += [{"lib": "check", "n": 3072, "k": 3072, "mode": mode, "m": m, "encoding": enc}
             for mode, enc in CHECK_ENCODINGS for m in ((1, 16) if enc != "trits" else (1,))]
    points = layer_points(shapes, modes, ms)
    fast += [{"lib": "ours", "n": SHAPES[nm][0], "k": SHAPES[nm][1], "mode": mode, "m": m, "tiled": m in tiled_ms}
             for nm, mode, m in points]
    if gemlite:  # one job per kernel family gemlite picks by M (GEMV, split-K GEMM, GEMM): compiled once
        for family in ((1, 4), (5, 63), (64, None)):
            for nm in shapes:
                for mode in modes:
                    rows = [m for m in list(ms) + list(STEP_MS[SHAPES[nm]]) if family[0] <= m and
                            (family[1] is None or m <= family[1])]
                    if rows:
                        fast.append({"lib": "gemlite", "n": SHAPES[nm][0], "k": SHAPES[nm][1], "mode": mode,
                                     "ms": sorted(set(rows), key=rows.index)})
    slow = ([{"lib": "humming", "n": SHAPES[nm][0], "k": SHAPES[nm][1], "mode": mode, "m": m}
             for nm, mode, m in points] if humming else [])
    return {"fast": fast, "humming": slow}


# ---------------------------------------------------------------- sections

def section_quality(results: dict, save, modes, samples: int, pre: Precompiler | None) -> None:
    import cuda_quality

    out = results.setdefault("quality", {})

    def distilled(mode):  # the pack a worker distilled meanwhile, if it is done while 60 s of the section remain
        name = f"distill {mode}"
        r = pre.wait([name], time_left() - 60).get(name)
        out.setdefault("distill", {})[mode] = r or "not finished in time"
        return Path(pre.distill_dir) / mode if r and "error" not in r else None

    with tempfile.TemporaryDirectory() as tmp:
        cuda_quality.run(out, save, Path(tmp), modes, samples=samples, time_left=time_left,
                         distilled=distilled if pre is not None and pre.names("distill") else None)


CHECK_ENCODINGS = (("binary", "bits1"), ("ternary", "bits2"), ("ternary", "trits"))


def check_tiles(w, m: int, g=None) -> dict:
    """Every small-M tile the tuner can pick at M rows, fp32 output, against fp32 x @ (codes * s)^T (only the
    summation order is left); {tile: relative error, or the error message}."""
    from bonsai_quant.runtime.cuda import layout, ops

    xm = torch.randn(m, w.in_features, generator=g, device="cuda").bfloat16()
    ref = xm.float() @ layout.dense_of(w).t()
    tiles = {}
    for cfg in ops._small_m_candidates(m, w.in_features // 128, w.out_features):
        name = (f"M={m} {cfg['kind']} n{cfg['BLOCK_N']} split{cfg['SPLIT']} w{cfg['num_warps']}"
                + (" last-reduces" if cfg.get("LAST_REDUCES") else ""))
        try:
            y = torch.full((m, w.out_features), float("nan"), device="cuda")
            ops.small_m_matmul(xm, w, y, **cfg)
            tiles[name] = rel(y, ref)
        except Exception as e:
            tiles[name] = f"{type(e).__name__}: {e}"[:300]
            _raise_if_context_lost(cfg["kind"])
    return tiles


class ContextLost(RuntimeError):
    """A kernel left the CUDA context unusable (an illegal address: every later launch fails too)."""

    def __init__(self, kind: str, error: str):
        super().__init__(f"CUDA context lost after a {kind} launch: {error}")
        self.kind = kind


def _raise_if_context_lost(kind: str) -> None:
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").item()
    except Exception as e:
        raise ContextLost(kind, f"{type(e).__name__}: {e}"[:200]) from e


def check_products(w, codes, scales, m: int, fused_fp8: bool, g=None) -> dict:
    """At M rows: the bf16 path (M > 64: the tiled kernel; smaller M is `check_tiles`'), the e4m3 emulation and
    the expanded codes through torch._scaled_mm, against fp32 and the emulation."""
    from bonsai_quant.runtime.cuda import emulate, layout, ops

    xm = torch.randn(m, w.in_features, generator=g, device="cuda")
    ref = xm @ layout.dense_of(w).t()
    emu = emulate.fp8_matmul(xm, codes, scales)
    r = {"emulation_vs_fp32": rel(emu, ref)}
    if m > ops.SMALL_M:  # below, packed_matmul would tune here, while the workers still use the GPU
        r["bf16_vs_fp32"] = rel(ops.packed_matmul(xm.bfloat16(), w), ref)
    if fused_fp8:  # each of these tunes its own tiles
        r["fp32_kernel_vs_fp32"] = rel(ops.packed_matmul(xm, w), ref)
        r["fp8_vs_emulation"] = rel(ops.packed_fp8_matmul(xm, w, torch.float32), emu)
    try:
        r["scaled_mm_vs_emulation"] = rel(ops.scaled_mm_matmul(xm, w, torch.float32), emu)
    except Exception as e:
        r["scaled_mm_error"] = f"{type(e).__name__}: {e}"[:400]
    return r


def section_check(results: dict, save, fused_fp8: bool, pre: Precompiler | None) -> None:
    from bonsai_quant.runtime.cuda import emulate, layout, ops

    out = results.setdefault("check", {})
    if pre is not None:  # the workers ran these launches first: a kind that broke their context is not run here
        checks = [n for n in pre.names("fast") if n.startswith("check ")]
        pre.wait(checks, min(60.0, time_left() - 10))
        out["disabled_kinds"] = pre.disable_faulting_kinds(checks)
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 3072, generator=g, device="cuda") * torch.logspace(-20, 20, 300, base=2,
                                                                              device="cuda")[:, None]
    q, sx = ops.quantize_e4m3(x)
    q2, sx2 = emulate.quantize_e4m3(x)
    out["quantize_bit_exact"] = bool(torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
                                     and torch.equal(sx, sx2))
    for mode, enc in CHECK_ENCODINGS:
        if time_left() < 5:
            results.setdefault("skipped", []).append(f"check {enc}: deadline")
            continue
        codes, scales, _ = random_weights(3072, 3072, mode, 1)
        w = layout.from_codes(codes, scales, enc, 128)
        row = out.setdefault(enc, {})
        row["decode_bit_exact"] = bool(torch.equal(layout.codes_of(w), codes))
        e, s32 = ops.expand_e4m3(w)
        row["expand_bit_exact"] = bool(torch.equal(e.float(), codes.float()) and torch.equal(s32, scales.t().float()))
        row["expand_kernel"] = dict(ops.EXPAND)
        if enc != "trits":  # bonsai trits straddle the groups: they keep the tiled kernel
            row["small_m_tiles_vs_fp32"] = {**check_tiles(w, 1, g), **check_tiles(w, 16, g)}
        for m in (1, 16, 300):
            row[f"M={m}"] = check_products(w, codes, scales, m, fused_fp8, g)
        print(f"check {enc}: {json.dumps(row)[:1500]}", flush=True)
        save()


def _layer_setup(name: str, mode: str, gemlite: bool, humming: bool, results: dict) -> dict:
    from bonsai_quant.runtime.cuda import layout

    n, k = SHAPES[name]
    codes, scales, w = random_weights(n, k, mode, 2)
    dense16 = layout.dense_of(w).to(torch.bfloat16)
    nb = {"bf16": dense16.numel() * 2, "ours": w.nbytes}
    setup = {"n": n, "k": k, "w": w, "dense32": layout.dense_of(w),
             "dense": [dense16] + [dense16.clone() for _ in range(copies(nb["bf16"], 8) - 1)],
             "ours": [w] + [layout.PackedWeights(w.encoding, w.codes.clone(), w.scales.clone(), k, n, 128)
                            for _ in range(copies(nb["ours"]) - 1)], "gemlite": None, "humming": None}
    if gemlite:
        try:
            setup["gemlite"] = [gemlite_layer(c, mode) for c in setup["ours"]]
        except Exception as e:
            results.setdefault("errors", []).append(f"gemlite {mode} {name}: {type(e).__name__}: {e}"[:500])
    if humming and HUMMING["spent_s"] < HUMMING["budget_s"]:
        t = time.perf_counter()
        try:
            h0, hcfg = humming_layer(dense16, mode)
            results.setdefault("humming_config", {})[mode] = hcfg
            try:
                setup["humming"] = [h0] + [copy.deepcopy(h0) for _ in range(min(len(setup["ours"]), 32) - 1)]
            except Exception:
                setup["humming"] = [h0]
        except Exception as e:
            results.setdefault("errors", []).append(f"humming {mode} {name}: {type(e).__name__}: {e}"[:800])
        HUMMING["spent_s"] += time.perf_counter() - t
    elif humming:
        results["humming_skipped"] = f"humming set-up exceeded its {HUMMING['budget_s']} s share of the run"
    return setup


def _scaled_mm_parts(x, setup, m: int) -> dict:
    """ms of the expanded-fp8 path's three launches alone: activation quantizer, code expansion, GEMM."""
    from bonsai_quant.runtime.cuda import ops

    ws = setup["ours"][:2] if m >= 1024 else setup["ours"]
    q, sx = ops.quantize_e4m3(x, column_major_scales=True)
    expanded = []
    for c in ws[:2]:
        e, s = ops.expand_e4m3(c)
        expanded.append((e.clone(), s.clone()))
    scale_b = (lambda s: s) if ops._SCALED_MM_LAYOUT.get("b", 0) == 0 else (lambda s: s.t().contiguous().t())
    parts = {"quantize": time_calls([lambda: ops.quantize_e4m3(x, column_major_scales=True)])[0],
             "expand": time_calls([lambda c=c: ops.expand_e4m3(c) for c in ws])[0],
             "gemm": time_calls([lambda e=e, s=s: torch._scaled_mm(q, e.t(), scale_a=sx, scale_b=scale_b(s),
                                                                   out_dtype=torch.bfloat16)
                                 for e, s in expanded])[0]}
    return parts


def _measure_point(setup: dict, name: str, mode: str, m: int, all_kernels: bool) -> dict:
    from bonsai_quant.runtime.cuda import ops

    n, k, w = setup["n"], setup["k"], setup["w"]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = x.float() @ setup["dense32"].t()
    row = {"mode": mode, "layer": name, "N": n, "K": k, "M": m, "ms": {}, "rel_error": {}, "copies": {},
           "timing": {}}
    methods = {"bf16_cublas": ([lambda d=d: F.linear(x, d) for d in setup["dense"]], None)}
    if m <= ops.SMALL_M or all_kernels:  # the 16-bit tiled kernel lost to scaled_mm at every M >= 256 so far
        methods["ours_bf16"] = ([lambda c=c: ops.packed_matmul(x, c) for c in setup["ours"]],
                                lambda: ops.packed_matmul(x, w))
    if all_kernels:  # the in-loop fp8 kernel: 0.2-0.6x bf16 in the first run at every shape
        methods["ours_fp8"] = ([lambda c=c: ops.packed_fp8_matmul(x, c, torch.bfloat16) for c in setup["ours"]],
                               lambda: ops.packed_fp8_matmul(x, w, torch.bfloat16))
    methods["ours_fp8_scaled_mm"] = ([lambda c=c: ops.scaled_mm_matmul(x, c, torch.bfloat16) for c in setup["ours"]],
                                     lambda: ops.scaled_mm_matmul(x, w, torch.bfloat16))
    if setup["gemlite"] is not None:
        methods["gemlite"] = ([lambda L=L: L(x) for L in setup["gemlite"]], lambda: setup["gemlite"][0](x))
    if setup["humming"] is not None:
        methods["humming"] = ([lambda L=L: L(x) for L in setup["humming"]], lambda: setup["humming"][0](x))
    for method, (calls, once) in methods.items():
        if m >= 1024:  # compute-bound: rotation changes nothing, and sweeps get long
            calls = calls[:2]
        try:
            row["rel_error"][method] = rel(once() if once is not None else calls[0](), ref)
            ms_, how = time_calls(calls)
            row["ms"][method], row["copies"][method], row["timing"][method] = ms_, len(calls), how
        except Exception as e:
            row["ms"][method] = None
            row.setdefault("failed", {})[method] = f"{type(e).__name__}: {e}"[:400]
    if "ours_bf16" in row["ms"] and m <= ops.SMALL_M:
        key = ("small", n, k, ops.m_bucket(m), {"binary": 1, "ternary": 2}[mode], torch.bfloat16)
        row["tile"] = ops._BEST.get(key)
        row["tuning_ms"] = [[round(t, 5), cfg] for t, cfg in sorted(ops.TUNED.get(key, []), key=lambda t: t[0])]
    if m >= 256:
        try:
            row["scaled_mm_parts_ms"] = _scaled_mm_parts(x, setup, m)
        except Exception as e:
            row.setdefault("failed", {})["scaled_mm_parts"] = f"{type(e).__name__}: {e}"[:400]
    ours = {kk: row["ms"].get(f"ours_{kk}") for kk in ("bf16", "fp8", "fp8_scaled_mm")}
    ok = {kk: v for kk, v in ours.items() if v is not None}
    if ok:
        best = min(ok, key=ok.get)
        row["ours_best"], row["ours_ms"] = best, ok[best]
        if row["ms"].get("bf16_cublas"):
            row["speedup_vs_bf16"] = row["ms"]["bf16_cublas"] / ok[best]
    row["kernel_ms"] = ok
    return row


def section_layers(results: dict, save, modes, shapes, ms, pre: Precompiler | None, all_kernels: bool,
                   gemlite: bool, humming: bool) -> None:
    from bonsai_quant.runtime.cuda import dispatch

    rows = results.setdefault("layers", [])
    table = {"device": torch.cuda.get_device_name(), "measured": f"tools/bench_cuda.py, {results['date']}",
             "shapes": {}, "default": dispatch.FALLBACK}
    results["crossover"] = table
    timings = results.setdefault("_timings", {})
    fast_done: dict = {}
    if pre is not None:  # ours and gemlite first: nothing may compile or autotune while the main process times
        fast_done = pre.wait(pre.names("fast"), time_left() - 90)
        results["disabled_kinds"] = pre.disable_faulting_kinds(pre.names("fast"))
        pending = [n for n, r in fast_done.items() if r is None]
        results["precompile_at_layers"] = {**pre.summary(), "ended_unfinished": pending[:60]}
        pre.close("fast")
        if gemlite:
            results["gemlite_config_files"] = pre.load_gemlite_configs()
    setups: dict = {}
    for name, mode, m in layer_points(shapes, modes, ms):
        if time_left() < 8:
            results.setdefault("skipped", []).append(f"layers {mode} {name} M={m}: deadline")
            continue
        n, k = SHAPES[name]
        job = {"n": n, "k": k, "mode": mode, "m": m}
        gl_job = pre.job_for("gemlite", n, k, mode, m) if pre is not None else None
        unfinished = ["gemlite"] if gl_job is not None and fast_done.get(gl_job, 1) is None else []
        if pre is not None:  # humming's builds may still run: wait for this point's, within a budget
            t_wait = time.perf_counter()
            wanted = [job_name(dict(job, lib="humming"))] + (
                [job_name(dict(job, m=16, lib="humming"))] if (name, mode) not in setups else [])
            waited = pre.wait(wanted, min(HUMMING["wait_budget_s"] - HUMMING["waited_s"], time_left() - 8))
            HUMMING["waited_s"] += time.perf_counter() - t_wait
            if waited.get(job_name(dict(job, lib="humming")), 1) is None:
                unfinished.append("humming")
        if (name, mode) not in setups:
            # humming's set-up runs it at M = 16: only once that build is done, or it would compile here
            first = job_name(dict(job, m=16, lib="humming"))
            built = pre is None or first not in pre.futures or pre.wait([first], 0).get(first) is not None
            setups[(name, mode)] = _layer_setup(name, mode, gemlite, humming and built, results)
            if humming and not built:
                results.setdefault("skipped", []).append(f"humming {mode} {name}: its build did not finish")
        setup = dict(setups[(name, mode)])
        for lib in ("gemlite", "humming"):  # not tuned or built in time: measuring it now would compile here
            if lib in unfinished:
                setup[lib] = None
                results.setdefault("skipped", []).append(f"{lib} {mode} {name} M={m}: its compile did not finish")
        try:
            row = _measure_point(setup, name, mode, m, all_kernels)
        except Exception as e:
            results.setdefault("errors", []).append(f"layers {mode} {name} M={m}: {type(e).__name__}: {e}"[:600])
            continue
        rows.append(row)
        timings.setdefault(f"{n},{k},{mode}", {})[str(m)] = row["kernel_ms"]
        b = row["ms"].get("bf16_cublas")
        print(f"{mode:8s} {name:24s} M={m:5d} " + " ".join(
            f"{kk}={v * 1e3:.1f}us" if v else f"{kk}=fail" for kk, v in row["ms"].items())
            + (f"  ours/bf16 {b / row['ours_ms']:.2f}x ({row['ours_best']}"
               + (f" {row['tile']['kind']}" if row.get("tile") and row["ours_best"] == "bf16" else "") + ")"
               if b and "ours_ms" in row else ""), flush=True)
        _update_crossover(table, timings, ms)
        save()
    try:
        dispatch.install(table)
        results["crossover_installed"] = True
    except ValueError as e:
        results.setdefault("errors", []).append(f"crossover table: {e}")


def _update_crossover(table: dict, timings: dict, ms) -> None:
    """Rows for every (shape, mode) whose sweep reached its largest M (a partial sweep would extend a small-M
    winner to every M); the default row from the shapes measured at every M."""
    from bonsai_quant.runtime.cuda import dispatch

    top = str(max(ms))
    for key, per_m in timings.items():
        n, k, mode = key.split(",")
        if top in per_m:
            table["shapes"].setdefault(f"{n},{k}", {})[mode] = dispatch.crossover_rows(
                {int(mm): t for mm, t in per_m.items()})
    table["default"] = default_rows(timings)


def default_rows(all_timings: dict) -> list:
    """The crossover for unmeasured shapes: per M, the kernel with the least summed time over the measured
    (shape, mode) pairs that timed every kernel at that M."""
    from bonsai_quant.runtime.cuda import dispatch

    per_m: dict = {}
    for timings in all_timings.values():
        for m, t in timings.items():
            per_m.setdefault(int(m), []).append(t)
    summed = {}
    for m, ts in per_m.items():
        common = set.intersection(*(set(t) for t in ts))
        if common:
            summed[m] = {kk: sum(t[kk] for t in ts) for kk in common}
    try:
        return dispatch.crossover_rows(summed)
    except ValueError:
        return dispatch.FALLBACK


def build_dense(config: dict):
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel

    from bonsai_quant.flux2 import model_kwargs

    with init_empty_weights():
        model = Flux2Transformer2DModel(**model_kwargs(config))
    model = model.to_empty(device="cuda").to(torch.bfloat16)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g, device="cuda"))
            else:
                p.copy_(torch.randn(p.shape, generator=g, device="cuda") * p.shape[1] ** -0.5)
    return model.eval()


def quantize_linear(weight: torch.Tensor, mode: str):
    from bonsai_quant.quantizers import binary, ternary

    n, k = weight.shape
    groups = weight.float().reshape(-1, 128)
    c, s = (binary.quantize_groups(groups, "absmean") if mode == "binary"
            else ternary.quantize_groups(groups, "threshold"))
    return c.reshape(n, k).to(torch.int8), s.reshape(n, k // 128).to(torch.bfloat16)


def step_inputs(config, image_tokens, text_tokens, dtype):
    from gpu_check import inputs

    return inputs(config, image_tokens, text_tokens, dtype)


def resident_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@torch.no_grad()
def time_step(model, kw, graphs: bool, reps: int = 2, replays: int = 10) -> dict:
    out = {}
    model(**kw)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(reps):
        y = model(**kw)[0]
    torch.cuda.synchronize()
    out["eager_ms"] = (time.perf_counter() - t) / reps * 1e3
    out["step_transient_peak_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
    out["output"] = y
    if graphs:
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                model(**kw)
            torch.cuda.current_stream().wait_stream(s)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                gy = model(**kw)[0]
            graph.replay()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(replays):
                graph.replay()
            torch.cuda.synchronize()
            out["graph_ms"] = (time.perf_counter() - t) / replays * 1e3
            out["graph_matches_eager"] = rel(gy, y)
            del graph
        except Exception as e:
            out["graph_error"] = f"{type(e).__name__}: {e}"[:400]
    torch.cuda.empty_cache()
    return out


def section_step(results: dict, save, modes, image_tokens, text_tokens, graphs: bool, bf16act: bool) -> None:
    import cuda_quality

    from bonsai_quant.flux2 import preset_config
    from bonsai_quant.runtime.cuda import layout
    from bonsai_quant.runtime.cuda.linear import CudaPackedLinear

    step = results.setdefault("step", {"text_tokens": text_tokens, "method": "one forward (denoising step), "
                                       "eager and as one CUDA graph of the whole forward; SDPA attention as "
                                       "diffusers calls it; no torch.compile"})
    config = preset_config("klein-4b")
    t0 = time.perf_counter()
    dense = build_dense(config)
    step["dense_build_s"] = time.perf_counter() - t0
    step["dense_resident_bytes"] = resident_bytes(dense)
    names = [name for name, _ in _quantized_names(dense)]
    step["dense_quantizable_linear_bytes"] = sum(resident_bytes(dense.get_submodule(n)) for n in names)
    kws = {tok: step_inputs(config, tok, text_tokens, torch.bfloat16) for tok in image_tokens}

    def timed(key, tok, model, extra=None, ref=None):
        if time_left() < 12:
            results.setdefault("skipped", []).append(f"step {tok} {key}: deadline")
            return
        try:
            r = time_step(model, kws[tok], graphs)
            y = r.pop("output")
            if extra is not None:
                r.update(extra(model))
            if ref is not None:
                r["rel_error_vs_fp32_reference"] = rel(y, ref)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {e}"[:400], "trace": traceback.format_exc()[-800:]}
        step.setdefault(str(tok), {})[key] = r
        print(f"step {tok}: {key} {json.dumps(r)[:500]}", flush=True)
        save()

    for tok in image_tokens:
        timed("dense_bf16", tok, dense)
    for mode in modes:
        if time_left() < 40:
            results.setdefault("skipped", []).append(f"step {mode}: deadline")
            continue
        t0 = time.perf_counter()
        packed = {}
        for name in names:
            c, s = quantize_linear(dense.get_submodule(name).weight, mode)
            packed[name] = layout.from_codes(c, s, ENCODING[mode], 128)
        step[f"{mode}_quantize_s"] = time.perf_counter() - t0
        # The fp32 reference: the same quantized weights dense in fp32 (x @ (codes * s)^T), other weights fp32.
        ref = copy.deepcopy(dense).float()
        for name, w in packed.items():
            ref.get_submodule(name).weight.data = layout.dense_of(w)
        ref_out = {}
        for tok in image_tokens:
            try:
                with torch.no_grad():
                    ref_out[tok] = ref(**step_inputs(config, tok, text_tokens, torch.float32))[0]
            except Exception as e:
                results.setdefault("errors", []).append(f"fp32 reference {mode} {tok}: {e}"[:400])
        del ref
        torch.cuda.empty_cache()
        ours = copy.deepcopy(dense)
        for name, w in packed.items():
            ours.set_submodule(name, CudaPackedLinear(w))
        variants = {"ours": ours}
        try:
            gl = copy.deepcopy(dense)
            for name, w in packed.items():
                gl.set_submodule(name, gemlite_layer(w, mode))
            variants["gemlite"] = gl
        except Exception as e:
            results.setdefault("errors", []).append(f"gemlite step {mode}: {type(e).__name__}: {e}"[:400])

        for vname, model in variants.items():
            for tok in image_tokens:
                timed(f"{vname}_{mode}", tok, model, lambda mdl, v=vname: _sizes(mdl, names, v == "ours"),
                      ref_out.get(tok))
        # The layer kinds the quality gate moved to bf16 activations (and, on request, all of them): their cost.
        kinds = results.get("quality", {}).get(mode, {}).get("bf16_activation_kinds") or []
        moves = ([("bf16_" + "+".join(kinds), set(kinds))] if kinds else []) + (
            [("bf16act", {k for k, _ in cuda_quality.KINDS})] if bf16act else [])
        for label, moved in moves:
            for name in names:
                ours.get_submodule(name).activations = "bf16" if cuda_quality.layer_kind(name) in moved else "auto"
            for tok in image_tokens:
                timed(f"ours_{label}_{mode}", tok, ours, lambda mdl: _sizes(mdl, names, True), ref_out.get(tok))
        del variants, ours, packed
        torch.cuda.empty_cache()


def _sizes(model, quantized: list, ours: bool) -> dict:
    from bonsai_quant.runtime.cuda.ops import Scratch

    r = {"resident_bytes": resident_bytes(model),
         "quantized_linear_bytes": sum(resident_bytes(model.get_submodule(nm)) for nm in quantized)}
    if ours:  # the shared e4m3 scratch buffer our expanded-fp8 path writes the codes into
        r["scratch_bytes"] = Scratch.nbytes()
    return r


def _quantized_names(model):
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".attn." in name or ".ff" in name) and (
                name.startswith("transformer_blocks.") or name.startswith("single_transformer_blocks.")):
            if "norm" not in name:
                yield name, mod


# ---------------------------------------------------------------- tables

def markdown_tables(results: dict) -> str:
    """The per-layer, small-M kernel, whole-step and quality tables of a results JSON, as the notes print them."""
    def us(v):
        return f"{v * 1e3:.1f}" if v else "-"

    lines = ["| layer (K x N) | mode | M | bf16 cuBLAS µs | ours µs (kernel) | ours / bf16 | gemlite µs | humming µs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    layers = sorted(results.get("layers", []), key=lambda r: (list(SHAPES).index(r["layer"]), r["mode"], r["M"]))
    for r in layers:
        ms = r["ms"]
        kernel = r.get("ours_best", "-")
        if kernel == "bf16" and r.get("tile"):
            kernel = f"{r['tile']['kind']} n{r['tile']['BLOCK_N']} split{r['tile']['SPLIT']}"
        ratio = f"{r['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in r else "-"
        lines.append(f"| {r['K']} x {r['N']} | {r['mode']} | {r['M']} | {us(ms.get('bf16_cublas'))} | "
                     f"{us(r.get('ours_ms'))} ({kernel}) | {ratio} | {us(ms.get('gemlite'))} | "
                     f"{us(ms.get('humming'))} |")
    kinds = ("gemv", "dot", "dot_xsplit", "dot_t", "tiled")
    tuned = [r for r in layers if r.get("tuning_ms")]
    if tuned:
        lines += ["", "Small-M kernels while tuning (fastest tile of each kind, µs, cold L2, triton's do_bench):", "",
                  "| layer (K x N) | mode | M | " + " | ".join(kinds) + " |",
                  "| --- | --- | --- |" + " --- |" * len(kinds)]
    for r in tuned:
        best = {}
        for t, cfg in r["tuning_ms"]:
            best.setdefault(cfg["kind"], t)
        lines.append(f"| {r['K']} x {r['N']} | {r['mode']} | {r['M']} | "
                     + " | ".join(us(best.get(kd)) for kd in kinds) + " |")
    step = results.get("step", {})
    lines += ["", "| image + text tokens | model | eager ms | CUDA graph ms | dense ÷ this (graph) | transient peak GB "
              "| resident bytes | quantized-linear bytes | rel. error vs fp32 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tok, variants in step.items():
        if not isinstance(variants, dict) or "dense_bf16" not in variants:
            continue
        dense_ms = variants["dense_bf16"].get("graph_ms")
        for name, r in variants.items():
            if "error" in r:
                lines.append(f"| {tok} + {step.get('text_tokens')} | {name} | failed: {r['error'][:80]} |")
                continue
            g = r.get("graph_ms")
            lines.append(f"| {tok} + {step.get('text_tokens')} | {name} | {r.get('eager_ms', 0):.1f} | "
                         f"{g:.1f} | {dense_ms / g:.2f}x | {r.get('step_transient_peak_gb', 0):.2f} | "
                         f"{r.get('resident_bytes', step.get('dense_resident_bytes', 0)):,} | "
                         f"{r.get('quantized_linear_bytes', step.get('dense_quantizable_linear_bytes', 0)):,} | "
                         f"{r.get('rel_error_vs_fp32_reference', float('nan')):.2e} |"
                         if g and dense_ms else f"| {tok} | {name} | {r.get('eager_ms', 0):.1f} | - | - | | | | |")
    quality = results.get("quality", {})
    if quality.get("packs"):
        lines += ["", f"Quality gate: {quality.get('rule', '')}", "",
                  "| pack | variant | accuracy | Fréchet distance | vs reference | gate |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for label, q in quality["packs"].items():
            for name, r in q.get("variants", {}).items():
                g = q.get("gates", {}).get(name, {})
                vs = (f"{g['accuracy_delta_samples']:+d} samples, FD {100 * (g['frechet_ratio'] - 1):+.1f} %"
                      if "frechet_ratio" in g else "")
                g16 = q.get("gates_vs_bf16", {}).get(name, {})
                if "frechet_ratio" in g16:
                    vs += (f" (vs bf16 reference: {g16['accuracy_delta_samples']:+d}, "
                           f"{100 * (g16['frechet_ratio'] - 1):+.1f} %)")
                verdict = "-" if name == "reference" else (
                    "pass" if g.get("pass") else f"fail: {g.get('reason', r.get('error', ''))[:120]}")
                fd = r.get("frechet_distance")
                lines.append(f"| {label} | {name} | {r.get('accuracy', float('nan')):.4f} | "
                             f"{fd if fd is not None else float('nan'):.4f} | {vs} | {verdict} |")
            lines.append(f"| {label} | judged: {q.get('judged')}; pass: {q.get('pass')}; e4m3 judged against "
                         f"{q.get('e4m3_judged_against')}: {q.get('pass_e4m3')}; formats identical (mlx, gemlite, "
                         f"bonsai): {q.get('formats', {}).get('identical')}; bf16-activation kinds: "
                         f"{q.get('bf16_activation_kinds')} | | | | |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tables-from", type=Path, help="print the markdown tables of a results JSON and exit")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {', '.join(SECTIONS)}, in this order")
    parser.add_argument("--modes", default="binary,ternary")
    parser.add_argument("--shapes", default="0,1,2,3,4", help="indices into SHAPES")
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--deadline-s", type=float, default=float("inf"),
                        help="seconds after start past which remaining measurements are skipped (recorded); each "
                             "section also leaves the later ones their reserve")
    parser.add_argument("--workers", type=int, default=max(1, min(14, (os.cpu_count() or 4) - 2)),
                        help="processes compiling ahead (0: none, everything compiles in the main process)")
    parser.add_argument("--humming-budget-s", type=float, default=HUMMING["budget_s"])
    parser.add_argument("--no-humming", action="store_true")
    parser.add_argument("--no-gemlite", action="store_true")
    parser.add_argument("--gemlite-autotune", default="fast", choices=("fast", "default", "max"),
                        help="gemlite's autotuning, run in the workers (fast: gemlite's own default)")
    parser.add_argument("--all-kernels", action="store_true", help="also time the in-loop fp8 kernel, and the "
                        "16-bit kernel at M > 64")
    parser.add_argument("--quality-samples", type=int, default=100, help="per digit, as bonsai-quant eval")
    parser.add_argument("--quality-distill-steps", type=int, default=200,
                        help="also gate packs distilled this many steps, trained by a worker meanwhile (0: not)")
    parser.add_argument("--image-tokens", default="1024,4096")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--bf16act", action="store_true", help="also time the step with every layer on the "
                        "16-bit-activation kernel")
    args = parser.parse_args()
    if args.tables_from:
        print(markdown_tables(json.loads(args.tables_from.read_text())), end="")
        return 0
    sections = args.sections.split(",")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")

    import triton

    CLOCK["deadline_s"] = args.deadline_s
    HUMMING["budget_s"] = args.humming_budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "date": args.date, "command": " ".join(sys.argv), "gemlite_autotune": args.gemlite_autotune}
    path = args.out / f"bench_cuda_{args.date}_h200.json"

    def save():
        from bonsai_quant.runtime.cuda import ops

        results["tuned"] = {repr(k): v for k, v in ops._BEST.items()}
        results["scaled_mm_refused"] = {repr(k): v for k, v in ops.SCALED_MM_REFUSED.items()}
        results["rejected_while_tuning"] = [repr(r) for r in ops.REJECTED]
        results["elapsed_s"] = round(now(), 1)
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        if results.get("crossover", {}).get("shapes"):
            (args.out / "crossover.json").write_text(json.dumps(results["crossover"], indent=1) + "\n")

    modes = args.modes.split(",")
    names = list(SHAPES)
    shapes = [names[int(i)] for i in args.shapes.split(",")]
    ms = [int(m) for m in args.ms.split(",") if m]
    gemlite_on, humming_on = not args.no_gemlite, not args.no_humming
    if gemlite_on:
        try:
            gemlite_setup("default")  # anything the workers did not tune runs gemlite's default configs here
        except Exception as e:
            results.setdefault("errors", []).append(f"gemlite: {type(e).__name__}: {e}"[:400])
            gemlite_on = False
    pre = None
    if args.workers > 0 and ("layers" in sections or "quality" in sections):
        jobs = (precompile_jobs(shapes, modes, ms, humming_on, gemlite_on, tiled_ms=ms if args.all_kernels else ())
                if "layers" in sections else {"fast": [], "humming": []})
        distill_dir = tempfile.mkdtemp(prefix="bench_cuda_distill_")
        distill = ([{"lib": "distill", "mode": mode, "out": str(Path(distill_dir) / mode),
                     "steps": args.quality_distill_steps} for mode in modes]
                   if "quality" in sections and args.quality_distill_steps > 0 else [])
        slow = max(1, args.workers // 4) if jobs["humming"] else 0
        pre = Precompiler({"distill": (distill, len(distill)),
                           "fast": (jobs["fast"], max(1, args.workers - slow - len(distill))),
                           "humming": (jobs["humming"], slow)}, args.gemlite_autotune, distill_dir)
    try:
        for i, sec in enumerate(sections):
            CLOCK["section_end_s"] = CLOCK["deadline_s"] - sum(RESERVE_S[s] for s in sections[i + 1:])
            t = time.perf_counter()
            if time_left() < 5:
                results.setdefault("skipped", []).append(f"section {sec}: deadline")
                continue
            if sec == "step" and pre is not None:  # the workers' GPU contexts and CPU off the step's timings
                results["precompile"] = pre.summary()
                pre.close()
                pre = None
            try:
                if sec == "quality":
                    section_quality(results, save, modes, args.quality_samples, pre)
                elif sec == "check":
                    section_check(results, save, args.all_kernels, pre)
                elif sec == "layers":
                    section_layers(results, save, modes, shapes, ms, pre, args.all_kernels, gemlite_on, humming_on)
                elif sec == "step":
                    section_step(results, save, modes, [int(t) for t in args.image_tokens.split(",")],
                                 args.text_tokens, not args.no_graphs, args.bf16act)
            except Exception as e:
                results.setdefault("errors", []).append(f"section {sec}: {type(e).__name__}: {e}\n"
                                                        f"{traceback.format_exc()[-1500:]}")
                print(traceback.format_exc(), flush=True)
            results.setdefault("section_seconds", {})[sec] = round(time.perf_counter() - t, 1)
            save()
    finally:
        if pre is not None:
            results["precompile"] = pre.summary()
            pre.close()
        save()
    try:
        (args.out / f"bench_cuda_{args.date}_h200_tables.md").write_text(markdown_tables(results))
    except Exception as e:
        print(f"tables: {type(e).__name__}: {e}", flush=True)
    for err in results.get("errors", []):
        print("ERROR:", err[:600], flush=True)
    print(f"done in {now():.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
