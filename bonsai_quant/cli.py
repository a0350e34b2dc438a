"""`bonsai-quant` command line: argument parsing only; the work is in the library."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from . import __version__
from .cli_args import add_model_args, add_targets_arg, model_from_args, recipe_from_args
from .cpu_settings import prepare as prepare_cpu
from .errors import BonsaiError
from .packing.targets import NAMES, RUNTIME_NAMES


def cmd_convert(args) -> int:
    from .convert import convert, format_summary

    recipe = recipe_from_args(args)
    out = args.out or Path(f"{args.model.name if args.model else 'flux2-tiny-digits'}-{recipe.mode}")
    report = convert(model_from_args(args), recipe, out, targets=args.target, force=args.force,
                     max_shard_bytes=args.shard_bytes, verbose=not args.quiet, calib=args.calib,
                     calib_device=args.calib_device)
    print(format_summary(report, out))
    return 0


def cmd_calibrate(args) -> int:
    import torch

    from .calibration import calibrate

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.model_dtype)
    calib = calibrate(args.model, args.out, prompts_path=args.prompts, text_encoder=args.text_encoder,
                      synthetic_text=args.synthetic_text, samples_per_prompt=args.samples_per_prompt,
                      steps=args.steps, shift=args.shift, seed=args.seed, image_size=args.image_size,
                      max_text_tokens=args.max_text_tokens, device=args.device, dtype=dtype,
                      store_dtype=args.store_dtype, batch_size=args.batch_size, force=args.force,
                      log=lambda m: print(m, file=sys.stderr))
    m = calib.meta
    print(f"wrote {calib.path}: {m['trajectories']} trajectories x {m['steps']} steps = {m['transformer_calls']} "
          f"transformer calls ({m['image_tokens']} image + {m['text_tokens']} text tokens each; text: "
          f"{m['text_encoder']}; stored {m['store_dtype']}), {m['seconds']:.1f} s")
    return 0


def cmd_sensitivity(args) -> int:
    from tqdm import tqdm

    from .sensitivity import format_report, sensitivity

    out = args.out or Path(f"sensitivity-{args.mode}.yaml")
    # Each layer's row as soon as it is measured (a full-size run takes many minutes), above the progress bar.
    log = (lambda m: None) if args.quiet else (lambda m: tqdm.write(m, file=sys.stderr))
    report = sensitivity(args.model, args.calib, args.mode, solver=args.solver, budget_bytes=args.budget_bytes,
                         out=out, max_calls=args.max_calls, device=args.device, log=log, progress=not args.quiet)
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "recipe_text"}, indent=2))
    else:
        print(format_report(report))
    return 0


def cmd_plan(args) -> int:
    from .plan import format_plan, make_plan, plan_record
    from .readers.bfl import open_checkpoint

    recipe = recipe_from_args(args)
    plan = make_plan(open_checkpoint(model_from_args(args)), recipe, args.target)
    print(json.dumps(plan_record(plan), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_inspect(args) -> int:
    from .describe import describe, format_description

    info = describe(args.pack)
    print(json.dumps(info, indent=2) if args.json else format_description(info))
    return 0


def cmd_repack(args) -> int:
    from .repack import repack

    result = repack(args.src, args.target, args.out, force=args.force, verbose=True)
    from .figures import size_text

    print(f"wrote {result['out']}: {result['target']} pack, {size_text(result['files_bytes'])}, "
          f"{result['tensors']} tensors, {result['seconds']:.1f} s")
    if "lossless" in result:  # from a published pack
        print(f"  {result['scale_dtype']} scales; " + ("lossless: every layer decodes to the published levels"
              if result["lossless"] else f"{len(result['lossy_tensors'])} layer(s) not lossless:"))
        for t in result["lossy_tensors"]:
            print(f"  {t['tensor']}: levels move by up to {t['levels_moved_max']:.3g} ({t['levels_moved_max_rel']:.2g} "
                  f"of s), 16-bit s rounds by up to {t['scale_rounding_max_rel']:.2g} relative")
    return 0


def cmd_release(args) -> int:
    from .release import check_release, plan_release, release

    if args.check is not None:
        result = check_release(args.check)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            from .verify import format_report

            for problem in result["manifest"]:
                print(f"manifest: {problem}")
            if result["packs"]:
                print(format_report(result))
            print("release check: " + ("PASS" if result["ok"] else "FAIL"))
        return 0 if result["ok"] else 1
    if args.model is None or args.out is None:
        raise BonsaiError("release needs --model and --out (or --check FOLDER); see bonsai-quant release --help")
    recipe = recipe_from_args(args)
    targets = args.targets  # None: release's default set for the recipe
    if args.dry_run:
        from .figures import size_text

        info = plan_release(args.model, recipe, targets)
        print(f"{args.out} would hold {info['quantized']} quantized and {info['kept']} kept tensors per pack:")
        for t, s in info["targets"].items():
            print(f"  {t:<8} {size_text(s['tensor_bytes'])} ({s['bits_per_weight']:.3f} bits/weight), "
                  f"{info['source_bytes'] / s['tensor_bytes']:.1f}x smaller than the source")
        return 0
    result = release(args.model, recipe, args.out, targets=targets, force=args.force,
                     run_verify=not args.no_verify, base_model=args.base_model, license=args.license,
                     verbose=not args.quiet, base_pipeline=args.base_pipeline)
    from .convert import format_summary

    print(format_summary(result["report"], args.out))
    if result["verify"] is not None:
        print("verify: " + ("PASS" if result["verify"]["ok"] else "FAIL (see verify.json)"))
        return 0 if result["verify"]["ok"] else 1
    return 0


def cmd_verify(args) -> int:
    from .verify import format_report, verify

    if args.calib is not None and args.source is None:
        raise BonsaiError("--calib re-runs calibrated solvers for the comparison with --source; valid: give "
                          "--source MODEL too")
    report = verify(args.pack, source=args.source, image_tokens=args.image_tokens, text_tokens=args.text_tokens,
                    calib=args.calib)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["ok"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bonsai-quant", description="FLUX.2 transformers to binary/ternary packs.")
    parser.add_argument("--version", action="version", version=f"bonsai-quant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p):
        add_model_args(p)

    p = sub.add_parser("convert", help="quantize a checkpoint and write runtime packs",
                       description="Quantize the block linears of a FLUX.2 transformer under a recipe and write one "
                                   "pack per target (MLX, gemlite, compact bonsai) plus report.json, streaming one "
                                   "tensor at a time into a temporary folder that becomes --out when complete.")
    model_args(p)
    p.add_argument("--out", type=Path, help="output folder (default: ./<model>-<mode>)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--shard-bytes", type=int, default=2 * 10**9, help="largest weight shard in bytes (default 2e9)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-tensor lines")
    p.add_argument("--calib", type=Path, metavar="SET",
                   help="calibration set folder for calibrated solvers (act-aware, gptq); default: the recipe's "
                        "calibration key")
    p.add_argument("--calib-device", default="cpu",
                   help="where the calibration forwards and gptq run, e.g. cuda (default cpu)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("calibrate", help="sample a calibration set: transformer inputs along real trajectories",
                       description="Run the FlowMatch-Euler sampler with the full-precision transformer and store "
                                   "its inputs at every step (latents, timesteps, text conditioning, ids) as a "
                                   "datasets folder. The digits model uses its own text embedding and prompts; "
                                   "other models need --prompts and --text-encoder (Qwen3).")
    p.add_argument("--model", type=Path, help="diffusers FLUX.2 transformer folder (default: flux2-tiny-digits)")
    p.add_argument("--out", type=Path, required=True, help="calibration set folder to write")
    p.add_argument("--prompts", type=Path, help="prompt file, one per line (default for digits: its 10 prompts)")
    p.add_argument("--text-encoder", type=Path, help="Qwen3 text encoder: a klein pipeline folder or a Qwen3 folder")
    p.add_argument("--synthetic-text", action="store_true",
                   help="random text conditioning instead of an encoder: timing runs on random weights only")
    p.add_argument("--samples-per-prompt", type=int, help="trajectories per prompt (default: 16 digits, 1 klein)")
    p.add_argument("--steps", type=int, default=4, help="sampler steps (default 4, as klein)")
    p.add_argument("--shift", type=float, default=3.0, help="sigma shift (default 3.0, as klein)")
    p.add_argument("--seed", type=int, default=1234, help="noise seed (default 1234)")
    p.add_argument("--image-size", type=int, default=512, help="klein image side in pixels (default 512: 1024 tokens)")
    p.add_argument("--max-text-tokens", type=int, default=512, help="text tokens per prompt (default 512, as klein)")
    p.add_argument("--device", default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--model-dtype", choices=("float32", "bfloat16"),
                   help="dtype of the sampling model (default: float32 digits, bfloat16 otherwise)")
    p.add_argument("--store-dtype", choices=("float32", "float16"),
                   help="dtype of the stored tensors (default: float32 digits, float16 otherwise)")
    p.add_argument("--batch-size", type=int, help="trajectories sampled together (default: 64 digits, 4 klein)")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("sensitivity", help="rank layers by output change when only that one is quantized; "
                                           "write a recipe keeping the most sensitive 16-bit within a byte budget",
                       description="Quantize one linear at a time, measure how much the transformer's output moves "
                                   "on the calibration set's inputs, rank the layers, and write a recipe that keeps "
                                   "the most sensitive ones 16-bit within --budget-bytes.")
    p.add_argument("--model", type=Path, help="diffusers FLUX.2 transformer folder (default: flux2-tiny-digits)")
    p.add_argument("--calib", type=Path, metavar="SET", required=True, help="calibration set folder")
    p.add_argument("--mode", choices=("binary", "ternary"), default="ternary", help="default ternary")
    p.add_argument("--solver", help="quantizer for the measurement (default: the mode's data-free default)")
    p.add_argument("--budget-bytes", type=int,
                   help="16-bit bytes of Linear weights to keep (default: what the published keep set spends)")
    p.add_argument("--out", type=Path, help="recipe to write (default ./sensitivity-<mode>.yaml)")
    p.add_argument("--max-calls", type=int, help="use only the first N calibration calls")
    p.add_argument("--device", default="cpu", help="where the model runs (default cpu)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-tensor rows on stderr")
    p.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)  # rows are printed by default now
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser("plan", help="print tensor -> rule -> mode -> bytes without writing anything",
                       description="Show, for every tensor of the model, the recipe rule that decides it, its mode "
                                   "(or keep) and its bytes in each target, then the totals; reads headers only.")
    model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("inspect", help="describe a pack folder",
                       description="Describe a pack (or every pack of a convert output or release): format, mode, "
                                   "bits, group size, tensor counts, bytes and bits per weight, from its headers.")
    p.add_argument("pack", type=Path)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("repack", help="turn a compact bonsai pack into an MLX or gemlite pack, losslessly; or a "
                                      "published Bonsai pack into any bonsai-quant pack",
                       description="Rebuild an MLX or gemlite pack from a compact bonsai pack, byte-identical to "
                                   "what convert writes for that target; or convert a published Bonsai snapshot.")
    p.add_argument("src", type=Path, help="a bonsai pack folder (or a folder holding bonsai/), or a published "
                                          "Bonsai snapshot (transformer-packed-mflux/ or transformer-gemlite-int*/)")
    p.add_argument("--target", choices=NAMES, required=True,
                   help=f"a bonsai pack repacks to {' or '.join(RUNTIME_NAMES)}; a published snapshot to any")
    p.add_argument("--out", type=Path, required=True, help="the runtime pack folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_repack)

    p = sub.add_parser("release", help="build a publishable folder (packs, model card, manifest) or --check one",
                       description="Convert into every target, verify the packs, and write a model card, the "
                                   "recipe, reports and a manifest of every file's sha256; or, with --check, "
                                   "re-verify a downloaded release.")
    p.add_argument("--model", type=Path, help="diffusers FLUX.2 transformer folder")
    p.add_argument("--recipe", type=Path, help="recipe YAML (default: recipes/<mode>.yaml)")
    p.add_argument("--mode", choices=("binary", "ternary"), help="override the recipe's mode")
    p.add_argument("--out", type=Path, help="release folder to write")
    add_targets_arg(p, "bonsai,mlx,gemlite, and mflux where mflux reads the recipe", dest="targets")
    p.add_argument("--base-pipeline", type=Path, metavar="DIR",
                   help="a diffusers klein pipeline folder: copy its text encoder, tokenizer, VAE, scheduler and "
                        "model_index.json in, so the release runs end to end")
    p.add_argument("--dry-run", action="store_true", help="print what would be written, write nothing")
    p.add_argument("--check", type=Path, metavar="FOLDER", help="re-verify a downloaded release folder")
    p.add_argument("--no-verify", action="store_true", help="skip running verify on the new packs")
    p.add_argument("--base-model", metavar="HUB_ID",
                   help="the model card's base_model, e.g. black-forest-labs/FLUX.2-klein-4B (default: what the "
                        "source says, from a hub-cache path or its config; else none is named)")
    p.add_argument("--license", default="apache-2.0", help="license id for the model card front matter")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true", help="with --check: a JSON report")
    p.set_defaults(func=cmd_release, target=None)

    p = sub.add_parser("verify", help="check a pack: integrity, exactness, real runtimes, end-to-end forwards",
                       description="Check a pack (or each pack of a folder): file and tensor sha256, decoded codes "
                                   "and scales (against re-quantization with --source), the real MLX and gemlite "
                                   "runtimes where they run, and whole-transformer forwards against diffusers.")
    p.add_argument("pack", type=Path, help="a pack folder or a convert output folder")
    p.add_argument("--source", type=Path, help="the checkpoint it was converted from: check against re-quantization")
    p.add_argument("--calib", type=Path, metavar="SET",
                   help="with --source: the calibration set a calibrated (act-aware, gptq) pack was made with")
    p.add_argument("--image-tokens", type=int, default=64, help="image tokens of the end-to-end forward (default 64)")
    p.add_argument("--text-tokens", type=int, default=32, help="text tokens of the end-to-end forward (default 32)")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_verify)

    from .distill.cli import add_distill_parser
    from .evaluate import add_eval_parser
    from .generate import add_generate_parser

    add_distill_parser(sub)
    add_eval_parser(sub)
    add_generate_parser(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every `with atomic_output` cleans up as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    prepare_cpu()  # before anything imports torch
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.func(args)
    except BonsaiError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly; point stdout at nothing so the exit flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:  # disk full, permission denied, name too long ... on a path of the user's
        where = e.filename if e.filename is not None else "I/O"
        print(f"error: {where}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; no output was left behind", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated; no output was left behind", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())
