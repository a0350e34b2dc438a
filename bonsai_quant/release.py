"""`release`: a folder ready to publish — packs, model card, recipe, verify results, manifest — and `--check`.

Everything written is a function of (checkpoint, recipe, options): no dates, timings or absolute paths, so two
runs give byte-identical folders and a published manifest can be re-derived by anyone.

The folder is laid out as the published Bonsai Image MLX snapshots, so the Mac applications load it as they
load those: the MLX pack is `transformer-packed-mflux/` (mlx-vlm's Bonsai loader), the mflux pack is
`transformer/` (mflux, and mlx-vlm's FLUX.2 loader). `--base-pipeline` adds the rest of a klein pipeline (text
encoder, tokenizer, VAE, scheduler, model_index.json) so that the folder runs end to end.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from . import __version__
from .checkpoint import Checkpoint
from .convert import DEFAULT_SHARD_BYTES, convert_into, planned_bytes
from .errors import BonsaiError
from .figures import size_text
from .manifest import check_manifest, listed_digests, write_manifest
from .output import atomic_output, check_free_space
from .packing.formats import MODE_BITS as BITS
from .packing.targets import NAMES, TARGETS
from .plan import make_plan, summarize_bytes
from .recipe import Recipe
from .verify import verify

# Distribution packs first, then the runtime packs in the registry's order: bonsai, mlx, gemlite, mflux.
ALL_TARGETS = tuple(sorted(NAMES, key=lambda name: TARGETS[name].runtime))
# target -> its folder in a release: the published snapshot's names where a consumer looks for them.
FOLDERS = {name: TARGETS[name].folder for name in ALL_TARGETS}
# What --base-pipeline copies from a diffusers klein pipeline folder (never its transformer/): required, then
# taken when present (a published Bonsai snapshot also has the 4-bit MLX text encoder its loader reads).
PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "vae")
OPTIONAL_PIPELINE_PARTS = ("text_encoder-mlx-4bit",)


def default_targets(recipe: Recipe) -> tuple[str, ...]:
    """Every target the recipe can be written to: those whose consumers read the recipe's layers (mflux: not
    binary at group sizes other than 64)."""
    modes = sorted({recipe.mode, *(r.mode for r in recipe.rules if r.mode)})

    def readable(name: str) -> bool:
        try:
            for mode in modes:
                TARGETS[name].check_readable(mode, recipe.group_size)
        except BonsaiError:
            return False
        return True

    return tuple(t for t in ALL_TARGETS if readable(t))


def check_base_pipeline(folder: Path) -> list[str]:
    """The parts of a klein pipeline folder that --base-pipeline copies; an error naming what is missing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BonsaiError(f"--base-pipeline {folder}: not a folder; valid: a diffusers FLUX.2 klein pipeline "
                          f"folder holding {', '.join(PIPELINE_PARTS)}")
    missing = [p for p in PIPELINE_PARTS if not (folder / p).exists()]
    if missing:
        raise BonsaiError(f"--base-pipeline {folder}: no {', '.join(missing)}; valid: a diffusers FLUX.2 klein "
                          f"pipeline folder holding {', '.join(PIPELINE_PARTS)} (its transformer/ is not used)")
    return [*PIPELINE_PARTS, *(p for p in OPTIONAL_PIPELINE_PARTS if (folder / p).exists())]


def _copy_part(source: Path, dest: Path) -> None:
    if source.is_dir():
        shutil.copytree(source, dest, symlinks=False)  # a Hugging Face snapshot links into blobs/: copy content
    else:
        shutil.copyfile(source, dest)


def plan_release(model: Path, recipe: Recipe, targets: tuple[str, ...] | None = None) -> dict:
    """What a release would hold, from headers alone (the --dry-run)."""
    targets = targets or default_targets(recipe)
    checkpoint = Checkpoint(model)
    plan = make_plan(checkpoint, recipe, targets)
    return {"source_bytes": checkpoint.source_bytes, "quantized": len(plan.quantized), "kept": len(plan.kept),
            "targets": {t: summarize_bytes(plan, t) for t in targets}}


def release(model: Path, recipe: Recipe, out: Path, targets: tuple[str, ...] | None = None, force: bool = False,
            run_verify: bool = True, evaluation: dict | None = None, grid: Path | None = None,
            base_model: str | None = None, license: str = "apache-2.0",
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, verbose: bool = False,
            base_pipeline: Path | None = None) -> dict:
    """`base_model` (the model card's Hugging Face id) defaults to what the source says (`source_model_id`);
    when it says nothing, the card names no base model rather than a wrong one. `base_pipeline`: a klein
    pipeline folder whose text encoder, tokenizer, VAE, scheduler and model_index.json are copied in beside the
    packs."""
    start = time.perf_counter()
    targets = targets or default_targets(recipe)
    parts = check_base_pipeline(base_pipeline) if base_pipeline is not None else []
    checkpoint = Checkpoint(model)
    base_model = base_model or source_model_id(checkpoint.path)
    plan = make_plan(checkpoint, recipe, targets)
    if "mlx" in targets and summarize_bytes(plan, "mlx")["tensor_bytes"] > max_shard_bytes:
        raise BonsaiError(f"the MLX pack holds {summarize_bytes(plan, 'mlx')['tensor_bytes']:,} bytes, more than "
                          f"the shard limit {max_shard_bytes:,}: the Bonsai layout (transformer-packed-mflux/) is "
                          "one diffusion_pytorch_model.safetensors; valid: a larger shard limit")
    check_free_space(Path(out).parent, planned_bytes(plan), "the release")
    with atomic_output(Path(out), force=force, sources=(model, *([base_pipeline] if parts else []))) as tmp:
        report = convert_into(tmp, checkpoint, plan, max_shard_bytes, verbose, folder_names=FOLDERS)
        for part in parts:
            _copy_part(Path(base_pipeline) / part, tmp / part)
        (tmp / "recipe.yaml").write_text(recipe.text)
        # Against the source as well: each pack's every stored bit equals re-quantizing it (one source read and
        # one re-quantization per tensor for all the packs).
        checks = (verify(tmp, source=checkpoint.path, calib=plan.recipe.calibration_path(), reproducible=True)
                  if run_verify else None)
        if checks is not None:
            for pack in checks["packs"]:
                pack["folder"] = Path(pack["folder"]).name
                for step in pack["steps"]:
                    step.pop("seconds", None)
            (tmp / "verify.json").write_text(json.dumps(checks, indent=2) + "\n")
        if evaluation is not None:
            (tmp / "eval.json").write_text(json.dumps(evaluation, indent=2) + "\n")
        if grid is not None:
            shutil.copyfile(grid, tmp / "samples.png")
        (tmp / "README.md").write_text(model_card(report, recipe, checks, evaluation, grid is not None,
                                                  base_model, license, parts))
        # A pack that passed integrity had every byte hashed against its own manifest moments ago: the
        # release's manifest takes those digests rather than reading the packs once more.
        known = {}
        for pack in (checks or {}).get("packs", []):
            if pack["steps"] and pack["steps"][0]["name"] == "integrity" and pack["steps"][0]["status"] == "pass":
                known.update(listed_digests(tmp / pack["folder"], pack["folder"]))
        write_manifest(tmp, known)
    report["seconds"] = round(time.perf_counter() - start, 3)  # after writing: the folder has no timings
    return {"report": report, "verify": checks}


# What a release folder holds besides its pack folders (FOLDERS) and the parts of a base pipeline.
RELEASE_FILES = ("README.md", "recipe.yaml", "report.json", "verify.json", "eval.json", "samples.png", "manifest.json")


def check_release(folder: Path) -> dict:
    """Re-verify a downloaded release: its manifest first, then every pack."""
    folder = Path(folder)
    files = (*RELEASE_FILES, "model_index.json")
    folders = (*FOLDERS.values(), *(p for p in (*PIPELINE_PARTS, *OPTIONAL_PIPELINE_PARTS) if p not in files))
    problems = [f"{p}: not part of a release folder (it holds {', '.join(files)}, the pack folders "
                f"{', '.join(FOLDERS.values())}/ and a base pipeline's parts)" for p in sorted(folder.iterdir())
                if not (p.name in files and p.is_file() or p.name in folders and p.is_dir())]
    problems += check_manifest(folder)
    if problems:
        return {"ok": False, "manifest": problems, "packs": []}
    result = verify(folder)
    return {"ok": result["ok"], "manifest": [], "packs": result["packs"]}


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def source_model_id(path: Path) -> str | None:
    """The Hugging Face id of a source checkpoint when it tells: a hub-cache snapshot path
    (`models--ORG--NAME/snapshots/...`) or a hub id in its config's `_name_or_path`; else None."""
    for part in Path(path).resolve().parts:
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part.split("--")[1:3])
    config = Path(path) / "config.json"
    try:
        name = json.loads(config.read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return name if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists() else None


def model_card(report: dict, recipe: Recipe, checks: dict | None, evaluation: dict | None, has_grid: bool,
               base_model: str | None, license: str, pipeline_parts: list[str] = ()) -> str:
    mode = recipe.mode
    front = ["---", f"license: {license}", *([f"base_model: {base_model}", "base_model_relation: quantized"]
                                             if base_model else []),
             "library_name: diffusers", "pipeline_tag: text-to-image", "tags:", "- flux2", "- quantized",
             f"- {mode}", "- bonsai-quant", *[f"- {t}" for t in report["targets"]], "---", ""]
    name = base_model.split("/")[-1] if base_model else report["source"]["name"]
    source = f"[{base_model}](https://huggingface.co/{base_model})" if base_model else f"`{name}`"
    lines = [f"# {name} — {mode} ({recipe.name})", "",
             f"The transformer of {source} with its "
             f"{report['tensors_quantized']} matmul-heavy linear layers ({report['quantized_weights']:,} weights) "
             f"stored as {'{-1,+1}' if mode == 'binary' else '{-1,0,+1}'} codes times one {recipe.scale_dtype} scale "
             f"per group of {recipe.group_size}, and the {report['tensors_kept']} precision-sensitive tensors "
             f"(embedders, modulation, output projection, norms) kept in 16-bit. Made with bonsai-quant "
             f"{__version__} from the recipe in `recipe.yaml`; mean relative weight error "
             f"{report['mean_rel_error']:.4f}.", "", "## Footprint", "",
             "| pack | for | size | bits/weight (quantized layers) | reduction |", "| --- | --- | --- | --- | --- |",
             f"| source (`{report['source']['name']}`) | 16-bit | {size_text(report['source']['bytes'])} | 16 | 1.0x |"]
    for target, t in report["targets"].items():
        lines.append(f"| `{FOLDERS[target]}/` | {TARGETS[target].role} | {size_text(t['files_bytes'])} | "
                     f"{t['bits_per_weight']:.3f} | {report['source']['bytes'] / t['files_bytes']:.1f}x |")
    lines += ["", "Sizes are decimal units (1 MB = 10^6 bytes) of the files in each folder; every file's size and "
              "sha256 is in `manifest.json`.", ""]
    keep = [f"`{r.pattern}`" for r in recipe.rules if r.action == "keep"]
    lines += ["## Kept in 16-bit", "", ", ".join(keep) or "(the default: every tensor outside the block linears)", ""]
    if checks is not None:
        lines += ["## Verification", "", "`bonsai-quant verify` on each pack:", "",
                  "| pack | " + " | ".join(s["name"] for s in checks["packs"][0]["steps"]) + " |",
                  "| --- |" + " --- |" * len(checks["packs"][0]["steps"])]
        for pack in checks["packs"]:
            lines.append(f"| `{pack['folder']}/` | " + " | ".join(_step_cell(s) for s in pack["steps"]) + " |")
        lines += ["", "Details in `verify.json`.", ""]
    if evaluation is not None:
        lines += ["## Quality", "", "| model | accuracy | Fréchet distance | retention |", "| --- | --- | --- | --- |"]
        for row in evaluation.get("rows", []):
            lines.append(f"| {row['name']} | {row['accuracy']:.3f} | {row['frechet']:.2f} | "
                         f"{row.get('retention', 1.0):.1%} |")
        lines.append("")
        if has_grid:
            lines += ["![samples](samples.png)", ""]
    lines += ["## Use", "", "```python", "import torch", "from bonsai_quant import load_transformer",
              "transformer = load_transformer(\"path/to/this/folder\")  # CUDA kernels on a GPU, else the "
              "reference runtime", "```", ""]
    lines += _mac_use(report, recipe, pipeline_parts, base_model)
    lines += ["`bonsai-quant repack bonsai --target mlx|gemlite|mflux --out PACK` rebuilds a runtime pack from the "
              "compact one, byte for byte.", "", "Check a download with `bonsai-quant release --check <folder>`.", ""]
    return "\n".join(front + lines)


def _mac_use(report: dict, recipe: Recipe, parts: list[str], base_model: str) -> list[str]:
    """How the Mac applications load this folder, and what a user must add for those that need more."""
    from .consumers import CONSUMERS

    targets = report["targets"]
    lines = ["On a Mac (the packages and versions these packs are tested with):", ""]
    if "mlx" in targets:
        lines.append(f"- mlx-vlm {CONSUMERS['mlx-vlm-bonsai'].tested} Bonsai (`mlx_vlm.models.bonsai`) reads "
                     "`transformer-packed-mflux/` as in the published Bonsai Image snapshots "
                     f"(bits {BITS[recipe.mode]}, group {recipe.group_size}, {recipe.scale_dtype} scales); "
                     "it also needs `text_encoder-mlx-4bit/model.safetensors` (klein's Qwen3 text encoder "
                     "quantized by MLX to 4 bits, group 64), `tokenizer/` and `vae/`"
                     + (" (here)" if "text_encoder-mlx-4bit" in parts else
                        ": copy `text_encoder-mlx-4bit/` from a published Bonsai Image MLX snapshot"
                        + ("" if parts else " and the rest from the base model (`--base-pipeline`)")) + ".")
    if "mflux" in targets:
        lines.append(f"- mflux {CONSUMERS['mflux'].tested} and mlx-vlm's FLUX.2 loader read `transformer/` (mflux's "
                     "saved format): this folder is an mflux model folder"
                     + (" and runs as it is." if parts else
                        f" once `{'/`, `'.join(PIPELINE_PARTS[2:])}/` of {base_model} "
                        "are added (`bonsai-quant release --base-pipeline` copies them)."))
    elif "mlx" in targets:
        lines.append("- mflux reads 1-bit layers only at group size 64: no `transformer/` here; the recipe "
                     "`binary-mflux.yaml` makes one.")
    lines.append("")
    return lines


def _step_cell(step: dict) -> str:
    if step["status"] == "skip":
        return "skipped"
    err = step.get("data", {}).get("rel_error", step.get("data", {}).get("max_rel_error"))
    return step["status"] + (f" ({err:.1e})" if err is not None else "")
