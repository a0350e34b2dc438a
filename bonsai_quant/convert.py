"""plan -> quantize -> pack -> write, one tensor at a time, into every target at once.

Each source tensor is read once, quantized once, and packed for each target; memory follows the largest
tensor, never the model. Output is built in a temporary folder and renamed into place when complete.

Calibrated solvers (act-aware, gptq) are the exception: their statistics come from running the full-precision
model over a calibration set, so the model is loaded whole (float32 below 10^9 parameters, else bf16: klein 4B
takes 7.75 GB) and statistics are gathered one transformer block at a time, just before that block's tensors
are streamed (`stats.BlockStats`: at most one block's H at once: 2.1 GB in float64 for a klein double block).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .checkpoint import Checkpoint
from .errors import BonsaiError
from .figures import figure, mean, size_text
from .output import atomic_output, check_free_space
from .packing.config import FORMAT_VERSION, PackConfig
from .packing.formats import MODE_BITS as BITS
from .packing.formats import dtype_name
from .packing.packset import PackSet, Slot
from .plan import Decision, Plan, make_plan, summarize_bytes
from .quantizers import check_finite, quantize
from .quantizers.objective import objective_rel_error
from .readers.bfl import open_checkpoint
from .recipe import Recipe

DEFAULT_SHARD_BYTES = 2 * 10**9


def default_model() -> Path:
    """The built-in model: flux2-tiny-digits, a FLUX.2 transformer trained on 8x8 digits, shipped with the package."""
    from .digits import model_dir

    return model_dir()


def quantization_config(plan: Plan, shard_bytes: int) -> dict:
    """The pack description's JSON object; "format" and "weights" are its only per-target fields
    (`PackConfig.for_target` fills them in)."""
    recipe = plan.recipe
    modes = sorted({d.mode for d in plan.quantized})
    return {
        "format_version": FORMAT_VERSION,
        "format": None,
        "tool": {"name": "bonsai-quant", "version": __version__},
        "mode": modes[0] if len(modes) == 1 else "mixed",
        "bits": BITS[recipe.mode],
        "group_size": recipe.group_size,
        "scale_dtype": recipe.scale_dtype,
        "weights": None,
        "shard_bytes": shard_bytes,
        "quantized": {d.module: {"mode": d.mode, "bits": BITS[d.mode], "solver": d.solver, "role": d.spec.role,
                                 "shape": list(d.spec.shape), "rule": d.rule_label} for d in plan.quantized},
        "kept": {d.name: {"dtype": dtype_name(d.kept_dtype), "role": d.spec.role,
                          "shape": list(d.spec.shape), "rule": d.rule_label} for d in plan.kept},
        "skip_patterns": [r.pattern for r in recipe.rules if r.action == "keep"],
        "recipe": recipe.to_dict(),
        "recipe_yaml": recipe.text,
        "recipe_sha256": hashlib.sha256(recipe.text.encode()).hexdigest(),
    }


def planned_bytes(plan: Plan) -> int:
    """Bytes of tensor data the plan's packs will hold (headers and JSON files are a rounding error)."""
    return sum(summarize_bytes(plan, t)["tensor_bytes"] for t in plan.targets)


def cast_kept(tensor: torch.Tensor, decision: Decision) -> tuple[torch.Tensor, str | None]:
    """Cast a kept tensor to its output dtype; returns a warning when values do not survive the cast."""
    dtype = decision.kept_dtype
    if tensor.dtype == dtype:
        return tensor, None
    out = tensor.to(dtype)
    if torch.isinf(out).any() and not torch.isinf(tensor).any():
        raise BonsaiError(f"{decision.name}: values overflow {dtype} (max |w| = {tensor.abs().max().item():.4g}); "
                          "valid: kept_dtype source or bfloat16")
    changed = out.to(tensor.dtype) != tensor
    if changed.any():
        return out, (f"{decision.name}: {int(changed.sum())} of {tensor.numel()} values change in the cast to "
                     f"{dtype} (flushed or rounded)")
    return out, None


def convert(model: Path, recipe: Recipe, out: Path, targets: tuple[str, ...] | None = None, force: bool = False,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, verbose: bool = True, calib=None,
            calib_device: str = "cpu") -> dict:
    """Quantize `model` under `recipe` into `out/<target>/` for each target, atomically; returns the report.

    `calib`: a calibration set folder for calibrated solvers (default: the recipe's `calibration:`)."""
    start = time.perf_counter()
    checkpoint = open_checkpoint(model)
    plan = make_plan(checkpoint, recipe, targets)
    check_free_space(Path(out).parent, planned_bytes(plan), f"converting to {', '.join(plan.targets)}")
    with atomic_output(Path(out), force=force, sources=(model, calib or plan.recipe.calibration_path())) as tmp:
        report = convert_into(tmp, checkpoint, plan, max_shard_bytes, verbose, calib, calib_device)
    report["seconds"] = round(time.perf_counter() - start, 3)
    return report


def convert_into(folder: Path, checkpoint: Checkpoint, plan: Plan, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 verbose: bool = False, calib=None, calib_device: str = "cpu", extra_config: dict | None = None,
                 folder_names: dict[str, str] | None = None) -> dict:
    """The work of `convert` inside an existing (temporary) folder: packs and report.json.

    `extra_config`: more top-level keys for quantization_config.json (distill records its training there).
    `folder_names`: target -> the name of its pack folder (default: the target's name)."""
    names = {t: (folder_names or {}).get(t, t) for t in plan.targets}
    echo = (lambda msg: tqdm.write(msg, file=sys.stderr)) if verbose else (lambda msg: None)
    records, warnings = [], []
    stats, calibration = _calibration_stats(checkpoint, plan, calib, calib_device, echo)
    qconfig = quantization_config(plan, max_shard_bytes)
    if calibration is not None:
        qconfig["calibration"] = calibration  # only for calibrated packs: data-free packs stay byte-identical
    qconfig.update(extra_config or {})
    slots = [d.slot for d in plan.decisions]
    config = PackConfig.from_dict(qconfig, "quantization_config", require_format=False)
    with PackSet({t: folder / names[t] for t in plan.targets}, checkpoint.config_bytes, config,
                 slots) as packs:
        total = sum(d.source_nbytes for d in plan.decisions)
        with tqdm(total=total, unit="B", unit_scale=True, desc="convert", file=sys.stderr,
                  disable=not (verbose and sys.stderr.isatty())) as bar, ThreadPoolExecutor(max_workers=1) as writer:
            # Packing and writing one tensor overlaps reading and quantizing the next: those run on every core
            # but leave gaps (reads, per-chunk Python), and the packers' passes fill them. One tensor at most is
            # in the writer, so memory holds two layers' codes, not the model.
            pending = None
            for d, slot in zip(plan.decisions, slots):
                try:
                    record, warning, write = _convert_one(checkpoint, plan, d, slot, packs, stats)
                finally:
                    if pending is not None:
                        pending.result()  # the earlier tensor's error first, as a sequential run raises it
                pending = writer.submit(write)
                records.append(record)
                if warning:
                    warnings.append(warning)
                    echo(f"warning: {warning}")
                echo(_log_line(d, record))
                bar.update(d.source_nbytes)
            if pending is not None:
                pending.result()
    report = _report(checkpoint, plan, records, warnings, folder, names)
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _calibration_stats(checkpoint: Checkpoint, plan: Plan, calib, device: str, echo):
    """(a BlockStats provider, the pack's record of the calibration set), or (None, None) when every solver
    of the plan is data-free."""
    from .quantizers import statistics_needed

    wanted = statistics_needed(plan.quantized)
    if not wanted:
        return None, None
    from .calibration import default_model_dtype, resolve_calibration
    from .dense import load_dense
    from .stats import BlockStats

    calib = resolve_calibration(calib, plan.recipe, wanted, checkpoint.config, str(checkpoint.path))
    dtype = default_model_dtype(checkpoint)
    echo(f"calibration: {calib.path} ({calib.trajectories} trajectories, {calib.calls} transformer calls); "
         f"loading the full-precision model ({str(dtype).removeprefix('torch.')} on {device})")
    model = load_dense(checkpoint, dtype=dtype, device=device)
    return BlockStats(model, calib, wanted, log=echo), calibration_record(calib, wanted, dtype)


def calibration_record(calib, wanted: dict, dtype: torch.dtype) -> dict:
    """What a calibrated pack records of its set: its folder name and content hash, not its path, so the same
    inputs give the same pack bytes anywhere."""
    needs = list(wanted.values())
    return {"set": calib.path.name, "fingerprint": calib.fingerprint(), "trajectories": calib.trajectories,
            "transformer_calls": calib.calls, "model_dtype": str(dtype).removeprefix("torch."),
            "tensors": {need: needs.count(need) for need in sorted(set(needs))}}


def _convert_one(checkpoint: Checkpoint, plan: Plan, d: Decision, slot: Slot, packs: PackSet,
                 stats=None) -> tuple[dict, str | None, Callable[[], None]]:
    """Read and quantize one tensor: (its report record, a warning or None, the call that packs and writes it)."""
    tensor = checkpoint.load(d.name)
    record = {"name": d.name, "action": d.action, "rule": d.rule_label, "role": d.spec.role,
              "shape": list(d.spec.shape), "source_dtype": str(d.source_dtype).removeprefix("torch.")}
    if d.action == "keep":
        if tensor.is_floating_point():
            check_finite(tensor, d.name)
        kept, warning = cast_kept(tensor, d)
        record["dtype"] = str(kept.dtype).removeprefix("torch.")
        return record, warning, lambda: packs.kept(slot, kept)
    q = quantize(tensor, d.mode, plan.recipe.group_size, plan.scale_dtype, d.solver, name=d.name,
                 stats=stats.get(d.name) if stats is not None else None)
    record.update(mode=d.mode, solver=d.solver, rel_error=figure(q.rel_error))
    objective = objective_rel_error(tensor, q.codes, q.scales, plan.recipe.group_size, d.solver,
                                    stats.get(d.name) if stats is not None else None)
    if objective is not None:
        record["objective_rel_error"] = figure(objective)
    return record, None, lambda: packs.quantized(slot, q.codes, q.scales)


def _log_line(d: Decision, record: dict) -> str:
    src = record["source_dtype"].replace("bfloat16", "bf16").replace("float16", "f16").replace("float32", "f32")
    if d.action == "keep":
        what = f"keep {record['dtype']}"
        tail = ""
    else:
        what = f"{d.mode} ({d.solver})"
        tail = f", rel_err = {record['rel_error']:.4f}"
        if "objective_rel_error" in record:
            tail += f", output rel_err = {record['objective_rel_error']:.4f}"
    return f"{d.name:<58} {src} --> {what:<20} shape = {record['shape']}{tail}"


def _report(checkpoint: Checkpoint, plan: Plan, records: list[dict], warnings: list[str], folder: Path,
            names: dict[str, str]) -> dict:
    quantized = [r for r in records if r["action"] == "quantize"]
    numel = {d.name: d.spec.numel for d in plan.decisions}
    weights = sum(numel[r["name"]] for r in quantized)
    targets = {}
    for target in plan.targets:
        sizes = summarize_bytes(plan, target)
        sizes["files_bytes"] = sum(p.stat().st_size for p in (folder / names[target]).iterdir() if p.is_file())
        targets[target] = sizes
    return {
        "tool": {"name": "bonsai-quant", "version": __version__},
        "source": {"name": checkpoint.path.name, "bytes": checkpoint.source_bytes,
                   "tensors": len(checkpoint.tensors)},
        "recipe": plan.recipe.to_dict(),
        "tensors_quantized": len(quantized),
        "tensors_kept": len(records) - len(quantized),
        "quantized_weights": weights,
        "mean_rel_error": figure(mean([r["rel_error"] for r in quantized])),
        "weighted_rel_error": figure(mean([r["rel_error"] for r in quantized], [numel[r["name"]] for r in quantized])),
        **_objective_summary(quantized, numel),
        "targets": targets,
        "warnings": warnings,
        "tensors": records,
    }


def _objective_summary(quantized: list[dict], numel: dict) -> dict:
    """Over the layers of calibrated solvers: the mean of what they minimise (relative output error on the
    calibration inputs), to read beside the plain weight error they do not minimise."""
    calibrated = [r for r in quantized if "objective_rel_error" in r]
    if not calibrated:
        return {}
    errors = [r["objective_rel_error"] for r in calibrated]
    return {"objective": {"what": "relative output error on the calibration inputs (what act-aware and gptq "
                                  "minimise)", "tensors": len(calibrated),
                          "mean_rel_error": figure(mean(errors)),
                          "weighted_rel_error": figure(mean(errors, [numel[r["name"]] for r in calibrated]))}}


def format_summary(report: dict, out: Path) -> str:
    lines = [f"wrote {out}",
             f"  tensors: {report['tensors_quantized']} quantized ({report['quantized_weights']:,} weights), "
             f"{report['tensors_kept']} kept; source {size_text(report['source']['bytes'])}",
             f"  mean relative error {report['mean_rel_error']:.4f} "
             f"(weighted by size {report['weighted_rel_error']:.4f})"]
    if "objective" in report:
        o = report["objective"]
        lines.append(f"  output error on the calibration inputs (what the calibrated solvers minimise; "
                     f"{o['tensors']} layers): mean {o['mean_rel_error']:.4f} (weighted by size "
                     f"{o['weighted_rel_error']:.4f})")
    for target, t in report["targets"].items():
        lines.append(f"  {target:<8} {size_text(t['files_bytes'])} on disk; quantized linears "
                     f"{size_text(t['quantized_bytes'])} at {t['bits_per_weight']:.3f} bits/weight, kept "
                     f"{size_text(t['kept_bytes'])}")
    if report["warnings"]:
        lines.append(f"  {len(report['warnings'])} warning(s): see report.json")
    lines.append(f"  {report['seconds']:.1f} s")
    return "\n".join(lines)
