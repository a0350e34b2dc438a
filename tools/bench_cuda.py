#!/usr/bin/env python3
"""The CUDA backend on one GPU: correctness of the compiled kernels, per-layer speed, the whole step.

1. check: each compiled kernel against its oracle (the e4m3 quantizer bit for bit against `emulate`, the
   fp8 paths against the emulation, the 16-bit path against fp32 x @ (codes * s)^T).
2. layers: the five klein shapes x M x {binary, ternary}: bf16 cuBLAS (F.linear), gemlite, humming-kernels,
   and ours (16-bit kernel, fused fp8 kernel, expand + torch._scaled_mm); weights rotated through enough
   copies to exceed the L2 (>= 200 MB per sweep), each sweep captured in a CUDA graph and replayed. Every
   per-call cost is inside the timing (activation quantization, code expansion). Per-layer error of each
   path against the fp32 product, and the measured crossover table (written as crossover.json).
3. step: a klein-4b-size transformer with random weights built on the GPU, quantized there (binary:
   absmean, ternary: threshold), run at 1024 and 4096 image tokens + 512 text tokens: dense bf16, gemlite
   and ours, eager and as a CUDA graph of the whole forward; peak memory, resident weight bytes, and the
   relative error against the same quantized weights in fp32 (the reference runtime's arithmetic).

Every measurement is wrapped: a failure is recorded in the JSON (written after each section) and the run goes
on.

    python tools/bench_cuda.py --out OUT_DIR [--sections check,layers,step] [--date YYYY-MM-DD]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = {"attn (3072x3072)": (3072, 3072), "ff in (3072x18432)": (18432, 3072), "ff out (9216x3072)": (3072, 9216),
          "single in (3072x27648)": (27648, 3072), "single out (12288x3072)": (3072, 12288)}  # name: (N, K)
MS = (1, 16, 256, 1024, 4096)
ENCODING = {"binary": "bits1", "ternary": "bits2"}
ROTATE_BYTES = 200 * 2**20
HUMMING = {"spent_s": 0.0, "budget_s": 90.0}  # its JIT compiles per layer; bounded so the run fits its slot
CLOCK = {"start": time.perf_counter(), "deadline_s": float("inf")}  # --deadline-s: stop cleanly before a limit


def time_left() -> float:
    return CLOCK["deadline_s"] - (time.perf_counter() - CLOCK["start"])


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


def gemlite_layer(w, mode: str):
    """GemLiteLinearTriton loaded from our resident layout (its W_q is the same bytes for 1-/2-bit codes)."""
    import gemlite
    from gemlite.core import DType, GemLiteLinearTriton

    from bonsai_quant.packing import gemlite as gp

    gemlite.set_packing_bitwidth(8)
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


def section_check(results: dict, save, fused_fp8: bool) -> None:
    from bonsai_quant.runtime.cuda import emulate, layout, ops

    out = results.setdefault("check", {})
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 3072, generator=g, device="cuda") * torch.logspace(-20, 20, 300, base=2,
                                                                              device="cuda")[:, None]
    q, sx = ops.quantize_e4m3(x)
    q2, sx2 = emulate.quantize_e4m3(x)
    out["quantize_bit_exact"] = bool(torch.equal(q.view(torch.uint8), q2.view(torch.uint8))
                                     and torch.equal(sx, sx2))
    for mode, enc in (("binary", "bits1"), ("ternary", "bits2"), ("ternary", "trits")):
        codes, scales, _ = random_weights(3072, 3072, mode, 1)
        w = layout.from_codes(codes, scales, enc, 128)
        row = out.setdefault(enc, {})
        row["decode_bit_exact"] = bool(torch.equal(layout.codes_of(w), codes))
        e, s32 = ops.expand_e4m3(w)
        row["expand_bit_exact"] = bool(torch.equal(e.float(), codes.float()) and torch.equal(s32, scales.t().float()))
        row["expand_kernel"] = dict(ops.EXPAND)
        dense = layout.dense_of(w)
        if enc != "trits":  # every byte-once tile compiled and checked (fp32 output: only summation order left)
            tiles = row.setdefault("small_m_tiles_vs_fp32", {})
            for m in (1, 16):
                xm = torch.randn(m, 3072, generator=g, device="cuda").bfloat16()
                ref = xm.float() @ dense.t()
                for cfg in ops._small_m_candidates(m, 24):
                    name = (f"M={m} {cfg['kind']} n{cfg['BLOCK_N']} split{cfg['SPLIT']} w{cfg['num_warps']}"
                            + (" last-reduces" if cfg.get("LAST_REDUCES") else ""))
                    try:
                        y = torch.full((m, 3072), float("nan"), device="cuda")
                        ops.small_m_matmul(xm, w, y, **cfg)
                        tiles[name] = rel(y, ref)
                    except Exception as e:
                        tiles[name] = f"{type(e).__name__}: {e}"[:300]
        for m in (1, 16, 300):
            xm = torch.randn(m, 3072, generator=g, device="cuda")
            ref = xm @ dense.t()
            emu = emulate.fp8_matmul(xm, codes, scales)
            r = {"bf16_vs_fp32": rel(ops.packed_matmul(xm.bfloat16(), w), ref),
                 "emulation_vs_fp32": rel(emu, ref)}
            if fused_fp8:  # each of these tunes its own tiles: compile time the per-layer sweep needs more
                r["fp32_kernel_vs_fp32"] = rel(ops.packed_matmul(xm, w), ref)
                r["fp8_vs_emulation"] = rel(ops.packed_fp8_matmul(xm, w, torch.float32), emu)
                r["fp8_vs_fp32"] = rel(ops.packed_fp8_matmul(xm.bfloat16(), w, torch.bfloat16), ref)
            try:
                r["scaled_mm_vs_emulation"] = rel(ops.scaled_mm_matmul(xm, w, torch.float32), emu)
            except Exception as e:
                r["scaled_mm_error"] = f"{type(e).__name__}: {e}"[:400]
            row[f"M={m}"] = r
        print(f"check {enc}: {json.dumps(row)}", flush=True)
    save()


def section_layers(results: dict, save, modes, shapes, ms, fused_fp8: bool) -> None:
    from bonsai_quant.runtime.cuda import dispatch, layout, ops

    rows = results.setdefault("layers", [])
    table = results.get("crossover") or {"device": torch.cuda.get_device_name(), "source": "tools/bench_cuda.py",
                                         "shapes": {}, "default": dispatch.FALLBACK}
    results["crossover"] = table  # saved after every shape, so a cut-off run keeps what it measured
    all_timings = results.setdefault("_timings", {})
    for name, mode in [(nm, md) for nm in shapes for md in modes]:
        if time_left() < 25:
            results.setdefault("skipped", []).append(f"layers {mode} {name} M={ms}: deadline")
            continue
        n, k = SHAPES[name]
        codes, scales, w = random_weights(n, k, mode, 2)
        dense16 = layout.dense_of(w).to(torch.bfloat16)
        dense32 = layout.dense_of(w)
        nb = {"bf16": dense16.numel() * 2, "ours": w.nbytes}
        dense_copies = [dense16] + [dense16.clone() for _ in range(copies(nb["bf16"], 8) - 1)]
        ours_copies = [w] + [layout.PackedWeights(w.encoding, w.codes.clone(), w.scales.clone(), k, n, 128)
                             for _ in range(copies(nb["ours"]) - 1)]
        gl = hm = None
        try:
            gl = [gemlite_layer(c, mode) for c in ours_copies]
        except Exception as e:
            results.setdefault("errors", []).append(f"gemlite {mode} {name}: {type(e).__name__}: {e}"[:500])
        if HUMMING["spent_s"] < HUMMING["budget_s"]:
            t_h = time.perf_counter()
            try:
                h0, hcfg = humming_layer(dense16, mode)
                results.setdefault("humming_config", {})[mode] = hcfg
                try:
                    hm = [h0] + [copy.deepcopy(h0) for _ in range(min(len(ours_copies), 32) - 1)]
                except Exception:
                    hm = [h0]
            except Exception as e:
                results.setdefault("errors", []).append(f"humming {mode} {name}: {type(e).__name__}: {e}"[:800])
            HUMMING["spent_s"] += time.perf_counter() - t_h
        else:
            results["humming_skipped"] = f"humming setup exceeded its {HUMMING['budget_s']} s share of the run"
        timings = all_timings.setdefault(f"{n},{k},{mode}", {})
        for m in ms:
            if time_left() < 10:
                results.setdefault("skipped", []).append(f"layers {mode} {name} M={m}: deadline")
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ dense32.t()
            row = {"mode": mode, "layer": name, "N": n, "K": k, "M": m, "ms": {}, "rel_error": {},
                   "copies": {}, "timing": {}}
            methods = {
                "bf16_cublas": ([lambda d=d: F.linear(x, d) for d in dense_copies], None),
                "ours_bf16": ([lambda c=c: ops.packed_matmul(x, c) for c in ours_copies],
                              lambda: ops.packed_matmul(x, w)),
                "ours_fp8": ([lambda c=c: ops.packed_fp8_matmul(x, c, torch.bfloat16) for c in ours_copies],
                             lambda: ops.packed_fp8_matmul(x, w, torch.bfloat16)),
                "ours_fp8_scaled_mm": ([lambda c=c: ops.scaled_mm_matmul(x, c, torch.bfloat16)
                                        for c in ours_copies],
                                       lambda: ops.scaled_mm_matmul(x, w, torch.bfloat16)),
            }
            if gl is not None:
                methods["gemlite"] = ([lambda L=L: L(x) for L in gl], lambda: gl[0](x))
            if hm is not None:
                methods["humming"] = ([lambda L=L: L(x) for L in hm], lambda: hm[0](x))
            if not fused_fp8:  # 0.2-0.6x bf16 in the first run at every shape: its tuning time goes elsewhere
                methods.pop("ours_fp8")
            if m >= 1024 and not fused_fp8:  # the 16-bit tiled kernel lost to scaled_mm at every M >= 1024
                methods.pop("ours_bf16")
            for method, (calls, once) in methods.items():
                if m >= 1024:  # compute-bound: rotation changes nothing, and sweeps get long
                    calls = calls[:2]
                try:
                    if once is not None:
                        row["rel_error"][method] = rel(once(), ref)
                    else:
                        row["rel_error"][method] = rel(calls[0](), ref)
                    ms_, how = time_calls(calls)
                    row["ms"][method] = ms_
                    row["copies"][method] = len(calls)
                    row["timing"][method] = how
                except Exception as e:
                    row["ms"][method] = None
                    row.setdefault("failed", {})[method] = f"{type(e).__name__}: {e}"[:400]
            ours = {kk: row["ms"].get(f"ours_{kk}") for kk in ("bf16", "fp8", "fp8_scaled_mm")}
            ok = {kk: v for kk, v in ours.items() if v is not None}
            if ok:
                best = min(ok, key=ok.get)
                row["ours_best"] = best
                row["ours_ms"] = ok[best]
                if row["ms"].get("bf16_cublas"):
                    row["speedup_vs_bf16"] = row["ms"]["bf16_cublas"] / ok[best]
            timings[m] = {kk: v for kk, v in ours.items() if v is not None}
            rows.append(row)
            b = row["ms"].get("bf16_cublas")
            print(f"{mode:8s} {name:24s} M={m:5d} " + " ".join(
                f"{kk}={v * 1e3:.1f}us" if v else f"{kk}=fail" for kk, v in row["ms"].items())
                + (f"  ours/bf16 {b / row['ours_ms']:.2f}x ({row['ours_best']})" if b and "ours_ms" in row
                   else ""), flush=True)
        try:
            table["shapes"].setdefault(f"{n},{k}", {})[mode] = dispatch.crossover_rows(
                {int(mm): t for mm, t in timings.items()})
        except ValueError as e:
            results.setdefault("errors", []).append(f"crossover {mode} {name}: {e}")
        dense_copies = ours_copies = gl = hm = None
        table["default"] = default_rows(all_timings)
        torch.cuda.empty_cache()
        save()


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
    sys.path.insert(0, str(Path(__file__).parent))
    from gpu_check import inputs

    return inputs(config, image_tokens, text_tokens, dtype)


def resident_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


@torch.no_grad()
def time_step(model, kw, graphs: bool) -> dict:
    out = {}
    model(**kw)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    reps = 3
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
            for _ in range(10):
                graph.replay()
            torch.cuda.synchronize()
            out["graph_ms"] = (time.perf_counter() - t) / 10 * 1e3
            out["graph_matches_eager"] = rel(gy, y)
            del graph
        except Exception as e:
            out["graph_error"] = f"{type(e).__name__}: {e}"[:400]
    torch.cuda.empty_cache()
    return out


def section_step(results: dict, save, modes, image_tokens, text_tokens, graphs: bool,
                 bf16act: bool) -> None:
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
    step["dense_quantizable_linear_bytes"] = sum(resident_bytes(m) for _, m in _quantized_names(dense))
    quantized = {}
    for name, q in _quantized_names(dense):
        quantized[name] = q
    kws = {tok: step_inputs(config, tok, text_tokens, torch.bfloat16) for tok in image_tokens}
    for tok in image_tokens:
        if time_left() < 30:
            results.setdefault("skipped", []).append(f"step {tok} dense: deadline")
            continue
        try:
            r = time_step(dense, kws[tok], graphs)
            r.pop("output")
            step.setdefault(str(tok), {})["dense_bf16"] = r
            print(f"step {tok}: dense bf16 {json.dumps(r)}", flush=True)
        except Exception as e:
            step.setdefault(str(tok), {})["dense_bf16"] = {"error": f"{type(e).__name__}: {e}"[:400]}
        save()
    for mode in modes:
        if time_left() < 60:
            results.setdefault("skipped", []).append(f"step {mode}: deadline")
            continue
        t0 = time.perf_counter()
        packed = {}
        for name in quantized:
            c, s = quantize_linear(dense.get_submodule(name).weight, mode)
            packed[name] = layout.from_codes(c, s, ENCODING[mode], 128)
        step[f"{mode}_quantize_s"] = time.perf_counter() - t0
        # The fp32 reference: the same quantized weights dense in fp32 (x @ (codes * s)^T), other weights fp32.
        ref = copy.deepcopy(dense).float()
        for name, w in packed.items():
            ref.get_submodule(name).weight.data = layout.dense_of(w)
        ours = copy.deepcopy(dense)
        for name, w in packed.items():
            ours.set_submodule(name, CudaPackedLinear(w))
        ref_out = {}
        for tok in image_tokens:
            try:
                kw32 = step_inputs(config, tok, text_tokens, torch.float32)
                with torch.no_grad():
                    ref_out[tok] = ref(**kw32)[0]
            except Exception as e:
                results.setdefault("errors", []).append(f"fp32 reference {mode} {tok}: {e}"[:400])
        del ref
        torch.cuda.empty_cache()
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
                if time_left() < 30:
                    results.setdefault("skipped", []).append(f"step {tok} {vname} {mode}: deadline")
                    continue
                try:
                    r = time_step(model, kws[tok], graphs)
                    y = r.pop("output")
                    r["resident_bytes"] = resident_bytes(model)
                    r["quantized_linear_bytes"] = sum(
                        resident_bytes(model.get_submodule(nm)) for nm in packed)
                    if tok in ref_out:
                        r["rel_error_vs_fp32_reference"] = rel(y, ref_out[tok])
                    if vname == "ours":
                        from bonsai_quant.runtime.cuda.ops import Scratch

                        r["scratch_bytes"] = Scratch.nbytes()
                except Exception as e:
                    r = {"error": f"{type(e).__name__}: {e}"[:400], "trace": traceback.format_exc()[-800:]}
                step.setdefault(str(tok), {})[f"{vname}_{mode}"] = r
                print(f"step {tok}: {vname} {mode} {json.dumps(r)[:600]}", flush=True)
                save()
        # The 16-bit-activation path everywhere: what keeping all layers off fp8 costs, and its error.
        if not bf16act:
            del variants, ours, packed
            torch.cuda.empty_cache()
            continue
        for mod in ours.modules():
            if isinstance(mod, CudaPackedLinear):
                mod.forced = "bf16"
        for tok in image_tokens:
            try:
                r = time_step(ours, kws[tok], graphs)
                y = r.pop("output")
                if tok in ref_out:
                    r["rel_error_vs_fp32_reference"] = rel(y, ref_out[tok])
            except Exception as e:
                r = {"error": f"{type(e).__name__}: {e}"[:400]}
            step.setdefault(str(tok), {})[f"ours_bf16act_{mode}"] = r
            print(f"step {tok}: ours bf16-activation {mode} {json.dumps(r)[:400]}", flush=True)
            save()
        del variants, ours, packed
        torch.cuda.empty_cache()


def _quantized_names(model):
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and (".attn." in name or ".ff" in name) and (
                name.startswith("transformer_blocks.") or name.startswith("single_transformer_blocks.")):
            if "norm" not in name:
                yield name, mod


def markdown_tables(results: dict) -> str:
    """The per-layer and whole-step tables of a results JSON, as the measurement notes print them."""
    lines = ["| layer (K x N) | mode | M | bf16 cuBLAS µs | ours µs (kernel) | ours / bf16 | gemlite µs | humming µs |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(results.get("layers", []), key=lambda r: (list(SHAPES).index(r["layer"]), r["mode"], r["M"])):
        ms = r["ms"]

        def us(v):
            return f"{v * 1e3:.1f}" if v else "-"

        ratio = f"{r['speedup_vs_bf16']:.2f}x" if "speedup_vs_bf16" in r else "-"
        ours = f"{us(r.get('ours_ms'))} ({r.get('ours_best', '-')})"
        lines.append(f"| {r['K']} x {r['N']} | {r['mode']} | {r['M']} | {us(ms.get('bf16_cublas'))} | {ours} | "
                     f"{ratio} | {us(ms.get('gemlite'))} | {us(ms.get('humming'))} |")
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
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tables-from", type=Path, help="print the markdown tables of a results JSON and exit")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    parser.add_argument("--sections", default="check,step,layers,layers_late",
                        help="layers_late: the --ms-late sizes after everything else")
    parser.add_argument("--modes", default="binary,ternary")
    parser.add_argument("--shapes", default="0,1,2,3,4", help="indices into SHAPES")
    parser.add_argument("--ms", default="1,16,1024,4096")
    parser.add_argument("--ms-late", default="256")
    parser.add_argument("--deadline-s", type=float, default=float("inf"),
                        help="seconds after start past which remaining measurements are skipped (recorded)")
    parser.add_argument("--humming-budget-s", type=float, default=90.0)
    parser.add_argument("--fused-fp8", action="store_true", help="also time the in-loop fp8 kernel, and the "
                        "16-bit kernel at M >= 1024")
    parser.add_argument("--image-tokens", default="1024,4096")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--no-graphs", action="store_true")
    parser.add_argument("--bf16act", action="store_true", help="also time the step with every layer on the "
                        "16-bit-activation kernel")
    args = parser.parse_args()
    if args.tables_from:
        print(markdown_tables(json.loads(args.tables_from.read_text())), end="")
        return 0

    import triton

    CLOCK["deadline_s"] = args.deadline_s
    HUMMING["budget_s"] = args.humming_budget_s
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "date": args.date, "command": " ".join(sys.argv)}
    path = args.out / f"bench_cuda_{args.date}_h200.json"

    def save():
        from bonsai_quant.runtime.cuda import ops

        results["tuned"] = {repr(k): v for k, v in ops._BEST.items()}
        results["rejected_while_tuning"] = [repr(r) for r in ops.REJECTED]
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")
        if "crossover" in results:
            (args.out / "crossover.json").write_text(json.dumps(results["crossover"], indent=1) + "\n")

    modes = args.modes.split(",")
    names = list(SHAPES)
    shapes = [names[int(i)] for i in args.shapes.split(",")]
    sections = args.sections.split(",")
    for sec in sections:
        t = time.perf_counter()
        if time_left() < 20:
            results.setdefault("skipped", []).append(f"section {sec}: deadline")
            continue
        try:
            if sec == "check":
                section_check(results, save, args.fused_fp8)
            elif sec in ("layers", "layers_late"):
                ms = args.ms if sec == "layers" else args.ms_late
                section_layers(results, save, modes, shapes, [int(m) for m in ms.split(",") if m], args.fused_fp8)
            elif sec == "step":
                section_step(results, save, modes, [int(t) for t in args.image_tokens.split(",")],
                             args.text_tokens, not args.no_graphs, args.bf16act)
        except Exception as e:
            results.setdefault("errors", []).append(f"section {sec}: {type(e).__name__}: {e}\n"
                                                    f"{traceback.format_exc()[-1500:]}")
            print(traceback.format_exc(), flush=True)
        results.setdefault("section_seconds", {})[sec] = time.perf_counter() - t
        save()
    try:
        (args.out / f"bench_cuda_{args.date}_h200_tables.md").write_text(markdown_tables(results))
    except Exception as e:
        print(f"tables: {type(e).__name__}: {e}", flush=True)
    for err in results.get("errors", []):
        print("ERROR:", err[:600], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
