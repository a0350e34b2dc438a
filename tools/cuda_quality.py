#!/usr/bin/env python3
"""The CUDA backend's image-quality gate: the digits benchmark through our kernels against the reference runtime.

The shipped flux2-tiny-digits is converted (default recipe, MLX, gemlite and bonsai targets) per mode, and also
distilled (`bonsai-quant distill`, DISTILL_STEPS steps, the shipped calibration set): the data-free binary pack
draws noise (its accuracy is chance), a distilled one draws digits. Each pack is scored by the digits benchmark
(`bonsai-quant eval`'s: 100 samples per digit, 4 steps, seed 0) on the GPU, loaded with
`load_transformer(device="cuda", backend=...)`:

- reference: the reference runtime in float32, as `bonsai-quant eval` runs a pack -- the baseline;
- reference_bf16: the reference runtime in bfloat16 (what bf16 alone does to the scores);
- ours: our backend in bfloat16, each layer's kernel picked by M (the e4m3-activation path at the benchmark's
  thousands of rows) -- the path the gate decides on;
- ours_bf16act: our backend with every layer on the bf16-activation kernel, the fallback for layers whose
  e4m3 activations fail.

The gate (`gate`): accuracy equal to the reference's (the issue's words; the difference is reported in samples)
and a Fréchet distance within 5 % of it, judged on the packs whose reference accuracy is at least 0.5 (reported
for all). "pass" is the issue's verdict, ours against the fp32 reference. What the e4m3 activations alone do
("pass_e4m3") is judged against the fp32 reference too, unless the bf16 reference itself fails the gate (bf16
rounding flips samples at this strictness), then against the bf16 reference (the same bf16 model, no e4m3).
Where that fails on a judged pack, layer kinds (attention in/out, feed-forward in/out,
single-block in/out) are moved to the bf16-activation kernel one at a time, then cumulatively, until it passes;
the kinds that had to move are reported and `bench_cuda.py` times the whole step with them on that path. The
MLX, gemlite and bonsai packs of a mode must give bit-identical outputs through our backend (they hold the
same codes and scales).

    python tools/cuda_quality.py --out OUT_DIR [--modes binary,ternary] [--samples 100] [--distill-steps 200]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FD_TOLERANCE = 0.05  # the issue's: Fréchet distance within 5 % of the reference runtime's
ACCURACY_TOLERANCE = 0.0  # "the same accuracy"
JUDGED_ACCURACY = 0.5  # a pack whose reference scores below this draws noise (data-free binary: 0.11, chance 0.1)
DISTILL_STEPS = 200  # half `distill`'s default: enough for a binary pack that draws digits, in seconds on a GPU
CALIBRATION = ROOT / "calibration" / "flux2-tiny-digits"
TARGETS = ("mlx", "gemlite", "bonsai")
# flux2-tiny-digits' quantized linears (out, in) and the rows the benchmark runs them at (250 samples per
# forward: 16 image tokens, 8 text tokens, 24 in the single blocks); bench_cuda.py compiles for them ahead.
TINY_SHAPES = ((256, 256), (1536, 256), (256, 768), (2304, 256), (256, 1024))
TINY_ROWS = 4000
# The quantized linears of a FLUX.2 transformer by what they do; names as diffusers' Flux2Transformer2DModel.
KINDS = (("single_in", r"^single_transformer_blocks\.\d+\.attn\.to_qkv_mlp_proj$"),
         ("single_out", r"^single_transformer_blocks\.\d+\.attn\.to_out$"),
         ("attn_in", r"^transformer_blocks\.\d+\.attn\.(to_[qkv]|add_[qkv]_proj)$"),
         ("attn_out", r"^transformer_blocks\.\d+\.attn\.(to_out\.0|to_add_out)$"),
         ("ff_in", r"^transformer_blocks\.\d+\.ff(_context)?\.linear_in$"),
         ("ff_out", r"^transformer_blocks\.\d+\.ff(_context)?\.linear_out$"))


def layer_kind(name: str) -> str:
    for kind, pattern in KINDS:
        if re.match(pattern, name):
            return kind
    raise ValueError(f"{name}: not a quantized linear of a FLUX.2 transformer block; kinds: "
                     f"{', '.join(k for k, _ in KINDS)}")


def gate(reference: dict, candidate: dict, fd_tolerance: float = FD_TOLERANCE,
         accuracy_tolerance: float = ACCURACY_TOLERANCE) -> dict:
    """Pass when the candidate's accuracy is the reference's (within `accuracy_tolerance`) and its Fréchet
    distance within `fd_tolerance` (relative) of the reference's. Fails closed: a missing or non-finite
    figure fails."""
    samples = 10 * reference["samples_per_digit"]
    acc_r, acc_c = reference.get("accuracy"), candidate.get("accuracy")
    fd_r, fd_c = reference.get("frechet_distance"), candidate.get("frechet_distance")
    figures = (acc_r, acc_c, fd_r, fd_c)
    if any(v is None or not math.isfinite(v) for v in figures) or fd_r <= 0:
        return {"pass": False, "reason": f"missing or non-finite figures: accuracy {acc_r} / {acc_c}, "
                                         f"Fréchet distance {fd_r} / {fd_c}"}
    out = {"accuracy_delta": acc_c - acc_r, "accuracy_delta_samples": round((acc_c - acc_r) * samples),
           "frechet_ratio": fd_c / fd_r}
    reasons = []
    if abs(acc_c - acc_r) > accuracy_tolerance + 1e-12:
        reasons.append(f"accuracy {acc_c:.4f} vs {acc_r:.4f} ({out['accuracy_delta_samples']:+d} of {samples} "
                       f"samples; tolerance {accuracy_tolerance:g})")
    if abs(fd_c / fd_r - 1) > fd_tolerance + 1e-9:  # "within 5 %" includes 5 % (in decimal, not binary)
        reasons.append(f"Fréchet distance {fd_c:.4f} vs {fd_r:.4f} ({100 * (fd_c / fd_r - 1):+.1f} %; "
                       f"tolerance {100 * fd_tolerance:g} %)")
    out["pass"] = not reasons
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out


def convert_packs(workdir: Path, modes) -> dict:
    """The shipped digits model converted per mode with the default recipe into workdir/<mode>/<target>."""
    from bonsai_quant.convert import convert
    from bonsai_quant.digits import model_dir
    from bonsai_quant.recipe import default_recipe

    return {mode: convert(model_dir(), default_recipe(mode), workdir / mode, targets=TARGETS, verbose=False)
            for mode in modes}


def load(folder: Path, encoder, backend: str, dtype, bf16_kinds=(), device: str = "cuda"):
    """The pack as `bonsai-quant eval` loads it, on `device` with `backend`; with `bf16_kinds`, our layers of
    those kinds keep bf16 activations at every M."""
    from bonsai_quant.eval_models import load_for_eval
    from bonsai_quant.runtime.cuda.linear import CudaPackedLinear

    loaded = load_for_eval(folder, encoder, device=device, backend=backend, dtype=dtype)
    moved = 0
    for name, module in loaded.model.named_modules():
        if isinstance(module, CudaPackedLinear) and layer_kind(name) in bf16_kinds:
            module.activations = "bf16"
            moved += 1
    if bf16_kinds and not moved:
        raise ValueError(f"{folder}: no layer of kinds {sorted(bf16_kinds)} runs on the cuda backend")
    return loaded


def formats_identical(packs: Path, encoder, device: str = "cuda") -> dict:
    """One batch of digits through our backend from each target's pack: the largest difference to the MLX
    pack's output (0 when the three decode to the same codes and scales, as they must)."""
    import torch

    from bonsai_quant.digits import img_ids, prompt, txt_ids
    from bonsai_quant.evaluate import noise_for

    text = encoder.encode([prompt(d) for d in range(10) for _ in range(25)]).to(device, torch.bfloat16)
    x = torch.cat([noise_for(d, 25, 0) for d in range(10)]).to(device, torch.bfloat16)
    outs = {}
    for target in TARGETS:
        model = load(packs / target, encoder, "cuda", torch.bfloat16, device=device).model
        with torch.no_grad():
            outs[target] = model(hidden_states=x, encoder_hidden_states=text,
                                 timestep=torch.full((x.shape[0],), 0.5, device=device, dtype=torch.bfloat16),
                                 img_ids=img_ids().to(device), txt_ids=txt_ids(text.shape[1]).to(device),
                                 return_dict=False)[0].float()
        del model
    diffs = {t: float((outs[t] - outs["mlx"]).abs().max()) for t in TARGETS[1:]}
    return {"max_abs_difference_vs_mlx": diffs, "identical": all(d == 0 for d in diffs.values())}


def _score(ctx: dict, out: dict, label: str, pack: Path, name: str, backend: str, dtype, kinds=()):
    """One variant's benchmark report into out["variants"][name] and its gate against the reference."""
    from bonsai_quant.evaluate import evaluate

    if ctx["time_left"]() < 10:
        out.setdefault("skipped", []).append(f"{name}: deadline")
        return None
    t0 = time.perf_counter()
    try:
        loaded = load(pack, ctx["encoder"], backend, dtype, kinds, ctx["device"])
        report, _ = evaluate(loaded, ctx["samples"], ctx["steps"], ctx["seed"], encoder=ctx["encoder"],
                             judge=ctx["judge"])
        del loaded
    except Exception as e:
        report = {"error": f"{type(e).__name__}: {e}"[:600]}
    report["seconds"] = time.perf_counter() - t0
    report["bf16_activation_kinds"] = sorted(kinds)
    out["variants"][name] = report
    for gates, baseline in (("gates", "reference"), ("gates_vs_bf16", "reference_bf16")):
        base = out["variants"].get(baseline, {"error": "not run"})
        if name not in ("reference", baseline) and "error" not in base and "error" not in report:
            out.setdefault(gates, {})[name] = gate(base, report)
    print(f"quality {label} {name}: accuracy {report.get('accuracy')} FD {report.get('frechet_distance')} "
          f"{json.dumps(out['gates'].get(name, {}))} ({report['seconds']:.1f} s)", flush=True)
    ctx["save"]()
    return report


def _bf16_kinds(ctx: dict, out: dict, label: str, pack: Path, gates: str):
    """The layer kinds that must keep bf16 activations for "ours" to pass (by out[gates]): one kind alone if
    that suffices, else the kinds closest to passing alone, added one at a time; all of them if only that
    passes; None if nothing passes (or the deadline came first)."""
    import torch

    alone = {}
    for kind, _ in KINDS:
        if _score(ctx, out, label, pack, f"ours_bf16_{kind}", "cuda", torch.bfloat16, {kind}) is None:
            return None
        alone[kind] = out[gates].get(f"ours_bf16_{kind}", {})
        if alone[kind].get("pass"):
            return [kind]
    order = sorted(alone, key=lambda k: abs(alone[k].get("frechet_ratio", math.inf) - 1))
    for n in range(2, len(order)):
        name = "ours_bf16_" + "+".join(order[:n])
        if _score(ctx, out, label, pack, name, "cuda", torch.bfloat16, set(order[:n])) is None:
            return None
        if out[gates].get(name, {}).get("pass"):
            return order[:n]
    return [k for k, _ in KINDS] if out[gates].get("ours_bf16act", {}).get("pass") else None


def distill_pack(mode: str, out: Path, steps: int) -> dict:
    """`bonsai-quant distill` of the shipped digits model (default `mode` recipe, the shipped calibration set,
    `steps` optimizer steps, the three targets) into `out`: a pack that draws digits, which the data-free
    binary pack does not (its reference accuracy is chance)."""
    from bonsai_quant.digits import model_dir
    from bonsai_quant.distill import DistillOptions, DistillSettings, distill
    from bonsai_quant.recipe import default_recipe

    t = time.perf_counter()
    record = distill(DistillOptions(model_dir(), default_recipe(mode), out, DistillSettings().updated(steps=steps),
                                    calib=CALIBRATION, targets=TARGETS, verbose=False))["distill"]
    return {"steps": steps, "loss": record.get("loss"), "seconds": time.perf_counter() - t}


def _gate_pack(ctx: dict, out: dict, label: str, folder: Path) -> None:
    """The four variants of one pack (folder/<target>), the formats check, and, where "ours" fails a pack the
    gate can judge, the layer kinds that must keep bf16 activations."""
    import torch

    pack = folder / "mlx"
    if _score(ctx, out, label, pack, "reference", "reference", torch.float32) is None or \
            "error" in out["variants"]["reference"]:
        out["pass"] = False
        return
    # A pack whose reference scores near chance draws noise: its accuracy is decided by noise too.
    out["judged"] = out["variants"]["reference"]["accuracy"] >= JUDGED_ACCURACY
    _score(ctx, out, label, pack, "reference_bf16", "reference", torch.bfloat16)
    _score(ctx, out, label, pack, "ours", "cuda", torch.bfloat16)
    _score(ctx, out, label, pack, "ours_bf16act", "cuda", torch.bfloat16, {k for k, _ in KINDS})
    try:
        out["formats"] = formats_identical(folder, ctx["encoder"], ctx["device"])
    except Exception as e:
        out["formats"] = {"error": f"{type(e).__name__}: {e}"[:400], "identical": False}
    passed = bool(out["gates"].get("ours", {}).get("pass"))
    # What e4m3 activations do is judged against the model it changes: where the bf16 reference itself moves
    # the scores past the gate, against that bf16 reference (same bf16 model, no e4m3), else the fp32 one.
    out["e4m3_judged_against"] = ("reference" if out["gates"].get("reference_bf16", {}).get("pass")
                                  else "reference_bf16")
    gates = "gates" if out["e4m3_judged_against"] == "reference" else "gates_vs_bf16"
    e4m3_ok = bool(out.get(gates, {}).get("ours", {}).get("pass"))
    # the search moves kinds off e4m3 activations where "ours" ran and failed; an error is no quality verdict
    out["bf16_activation_kinds"] = [] if e4m3_ok else (
        _bf16_kinds(ctx, out, label, pack, gates) if out["judged"] and "ours" in out.get(gates, {}) else None)
    out["pass"] = passed and bool(out["formats"].get("identical"))
    out["pass_e4m3"] = e4m3_ok and bool(out["formats"].get("identical"))
    out["pass_with_bf16_kinds"] = out["bf16_activation_kinds"] is not None and bool(out["formats"].get("identical"))
    ctx["save"]()


def run(results: dict, save, workdir: Path, modes, samples: int = 100, steps: int = 4, seed: int = 0,
        time_left=lambda: float("inf"), device: str = "cuda", distilled=None) -> None:
    """Gate each mode's data-free pack and, where `distilled(mode)` gives one (a folder, or None), its distilled
    pack: results["packs"][f"{mode} {kind}"] holds each variant's report, gate, formats check and the layer
    kinds moved to bf16 activations; results[mode] the verdict over the packs the gate can judge (pass, and the
    union of those kinds). `save()` after each variant."""
    from bonsai_quant.digits import TextEncoder
    from bonsai_quant.digits_judge import Judge

    ctx = {"encoder": TextEncoder.load(), "judge": Judge.load(), "samples": samples, "steps": steps, "seed": seed,
           "save": save, "time_left": time_left, "device": device}
    t = time.perf_counter()
    convert_packs(workdir, modes)
    results["convert_s"] = time.perf_counter() - t
    results["rule"] = (f"accuracy equal (tolerance {ACCURACY_TOLERANCE:g}) and Fréchet distance within "
                       f"{100 * FD_TOLERANCE:g} % of the float32 reference runtime's; {samples} samples per digit, "
                       f"{steps} steps, seed {seed}; judged where the reference's accuracy is at least "
                       f"{JUDGED_ACCURACY:g}")
    packs = results.setdefault("packs", {})
    folders = [(f"{mode} data-free", workdir / mode) for mode in modes]
    for mode in modes:
        folder = distilled(mode) if distilled is not None else None
        if folder is not None:
            folders.append((f"{mode} distilled", Path(folder)))
        elif distilled is not None:
            results.setdefault("skipped", []).append(f"{mode} distilled: no pack in time")
    for label, folder in folders:
        if time_left() < 15:
            results.setdefault("skipped", []).append(f"{label}: deadline")
            continue
        _gate_pack(ctx, packs.setdefault(label, {"variants": {}, "gates": {}, "folder": str(folder)}), label, folder)
    for mode in modes:
        labels = [lb for lb, p in packs.items() if lb.startswith(f"{mode} ") and p.get("judged")]
        judged = [packs[lb] for lb in labels]
        kinds = [p.get("bf16_activation_kinds") for p in judged]
        results[mode] = {"judged_packs": labels, "pass": bool(judged) and all(p.get("pass") for p in judged),
                         "pass_e4m3": bool(judged) and all(p.get("pass_e4m3") for p in judged),
                         "bf16_activation_kinds": (sorted(set().union(*kinds)) if judged and None not in kinds
                                                   else None)}
    save()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--modes", default="binary,ternary")
    parser.add_argument("--samples", type=int, default=100, help="per digit (default 100, as bonsai-quant eval)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distill-steps", type=int, default=DISTILL_STEPS,
                        help=f"also gate distilled packs trained this many steps (default {DISTILL_STEPS}; 0: not)")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    path = args.out / f"cuda_quality_{args.date}.json"
    modes = args.modes.split(",")

    def save():
        path.write_text(json.dumps(results, indent=1, default=str) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        def distilled(mode):
            folder = Path(tmp) / f"{mode}-distilled"
            results.setdefault("distill", {})[mode] = distill_pack(mode, folder, args.distill_steps)
            return folder

        run(results, save, Path(tmp), modes, args.samples, args.steps, args.seed,
            distilled=distilled if args.distill_steps > 0 else None)
    save()
    return 0 if all(results.get(m, {}).get("pass") for m in modes) else 1


if __name__ == "__main__":
    sys.exit(main())
