"""How much image quality each quantization choice keeps, judged on the shipped flux2-tiny-digits.

    python tools/bench_quality.py                      # 4 steps, 100 samples per digit, every row
    python tools/bench_quality.py --steps 4 8 --grids out/grids --json bench.json

Rows: full precision, then for each default recipe (binary, ternary) the fake-quantized model (the dense
reference: weights replaced by their exact quantized values) and the packs that `convert` writes, run through
the reference runtime (bonsai_quant.runtime); then the calibrated solvers (act-aware, gptq: the default recipe
with that solver and the shipped calibration set calibration/flux2-tiny-digits, whose noise seeds are disjoint
from the benchmark's), the keep set `bonsai-quant sensitivity` chooses at the published set's byte budget (with
the data-free solver, then with gptq), the gptq MLX pack, and the MLX packs `bonsai-quant distill` writes (default
settings, initialised from the default recipe's data-free solver, then from gptq). Columns: the judge's accuracy
(prompt following, the GenEval analog), the Fréchet distance of the judge's features to the real digits (fidelity;
lower is better) and
retention = accuracy / full-precision accuracy, the figure the Bonsai release quotes (~88% binary, ~95% ternary
of klein 4B). A new quantization method is a new entry in `rows()`.

    python tools/bench_quality.py --benchmark compose --device cuda --json bench.json   # the Table II analog

`--benchmark compose` judges the shipped flux2-tiny-compose instead (bonsai_quant.compose): GenEval's six
categories and their mean (`compose_rows()`: full precision, default binary and ternary, their packs, gptq, and
distilled binary and ternary), each with its retention against full precision. Its calibration set (for gptq
and distill) is sampled from the full-precision model first (`bonsai-quant calibrate`, compose prompts).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bonsai_quant.cpu_settings import prepare as prepare_cpu  # noqa: E402

prepare_cpu()  # before the imports below load torch

from bonsai_quant.convert import convert  # noqa: E402
from bonsai_quant.digits import TextEncoder, model_dir  # noqa: E402
from bonsai_quant.digits_judge import Judge  # noqa: E402
from bonsai_quant.eval_models import LoadedModel, load_for_eval  # noqa: E402
from bonsai_quant.evaluate import evaluate, save_grid  # noqa: E402
from bonsai_quant.plan import TARGETS  # noqa: E402
from bonsai_quant.recipe import DEFAULT_SOLVERS, default_recipe, load_recipe  # noqa: E402

CALIBRATION = ROOT / "calibration" / "flux2-tiny-digits"
DISTILL_OVERRIDES: dict = {}


@dataclass
class Context:
    model: Path
    encoder: TextEncoder
    workdir: Path
    _converted: dict
    calib: Path = CALIBRATION
    check: Callable | None = None  # the benchmark's config check for load_for_eval (None: digits)
    distill_settings: dict | None = None

    def load(self, path: Path, **kw) -> LoadedModel:
        return load_for_eval(path, self.encoder, check=self.check, **kw)

    def pack(self, mode: str, target: str) -> Path:
        """The `target` pack of the default `mode` recipe, written once per run. One target per convert: a target
        that cannot hold the recipe (mflux: binary only at group 64) skips its own row, not every pack row."""
        if (mode, target) not in self._converted:
            out = self.workdir / f"{mode}-{target}"
            convert(self.model, default_recipe(mode), out, targets=(target,), verbose=False)
            self._converted[mode, target] = out
        return self._converted[mode, target]

    def recipe(self, mode: str, solver: str) -> Path:
        """The default `mode` recipe with `solver` and the shipped calibration set, as a file eval can load."""
        text = default_recipe(mode).text.replace(f"\nmode: {mode}\n", f"\nmode: {mode}\nsolver: {solver}\n"
                                                 f"calibration: {self.calib}\n", 1)
        path = self.workdir / f"{mode}-{solver}.yaml"
        path.write_text(text)
        load_recipe(path)  # a broken edit fails here, naming the file
        return path

    def sensitivity_recipe(self, mode: str, solver: str) -> Path:
        """The recipe `bonsai-quant sensitivity` writes (published budget, ranked with `solver`)."""
        from bonsai_quant.sensitivity import sensitivity

        path = self.workdir / f"sensitivity-{mode}-{solver}.yaml"
        p = sensitivity(self.model, self.calib, mode, solver=solver, out=path)["published"]
        print(f"  sensitivity {mode}/{solver}: same keep set as published: {p['same']}; published only: "
              f"{', '.join(p['only_published']) or '-'}; ranking only: {', '.join(p['only_ranking']) or '-'}",
              file=sys.stderr)
        return path

    def calibrated_pack(self, mode: str) -> Path:
        out = self.workdir / f"{mode}-gptq"
        convert(self.model, load_recipe(self.recipe(mode, "gptq")), out, targets=("mlx",), verbose=False)
        return out


    def distilled_pack(self, mode: str, solver: str) -> Path:
        """`bonsai-quant distill` with the default `mode` recipe (or its `solver` variant) and default settings."""
        from bonsai_quant.distill import DistillOptions, DistillSettings, distill

        recipe = default_recipe(mode) if solver == DEFAULT_SOLVERS[mode] else load_recipe(self.recipe(mode, solver))
        out = self.workdir / f"{mode}-{solver}-distilled"
        start = time.perf_counter()
        settings = DistillSettings().updated(**(self.distill_settings or {}))
        record = distill(DistillOptions(self.model, recipe, out, settings, calib=self.calib,
                                        targets=("mlx",), verbose=False))["distill"]
        print(f"  distill {mode} from {solver}: loss {record['loss']['first']:.4g} -> {record['loss']['last']:.4g} "
              f"in {record['settings']['steps']} steps, {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return out


def file_stem(name: str) -> str:
    """A row's name as a portable file name: 'ternary distilled (mlx pack)' -> 'ternary-distilled-mlx-pack'."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-")


@dataclass
class Row:
    name: str
    load: Callable[[Context], LoadedModel]


def rows() -> list[Row]:
    """Every configuration the benchmark scores, in table order. Add solvers, recipes, distillation here."""
    out = [Row("full precision", lambda c: load_for_eval(c.model, c.encoder))]
    for mode in ("binary", "ternary"):
        out.append(Row(f"{mode} fake-quant", lambda c, m=mode: load_for_eval(c.model, c.encoder, fake_quant=m)))
        for target in TARGETS:
            out.append(Row(f"{mode} {target} pack", lambda c, m=mode, t=target: load_for_eval(c.pack(m, t), c.encoder,
                                                                                             target=t)))
        for solver in ("act-aware", "gptq"):
            out.append(Row(f"{mode} {solver}", lambda c, m=mode, s=solver: load_for_eval(
                c.model, c.encoder, recipe_path=c.recipe(m, s))))
        for solver in (DEFAULT_SOLVERS[mode], "gptq"):
            out.append(Row(f"{mode} sensitivity keep set ({solver})", lambda c, m=mode, s=solver: load_for_eval(
                c.model, c.encoder, recipe_path=c.sensitivity_recipe(m, s))))
        out.append(Row(f"{mode} gptq mlx pack", lambda c, m=mode: load_for_eval(c.calibrated_pack(m), c.encoder,
                                                                                target="mlx")))
        for solver in (DEFAULT_SOLVERS[mode], "gptq"):
            out.append(Row(f"{mode} distilled from {solver} (mlx pack)", lambda c, m=mode, s=solver: load_for_eval(
                c.distilled_pack(m, s), c.encoder, target="mlx")))
    return out


def compose_rows() -> list[Row]:
    """The compose benchmark's rows: the release's Table II (full precision, binary and ternary as converted,
    calibrated and distilled from the mode's data-free solver), plus each pack target of the default recipes."""
    out = [Row("full precision", lambda c: c.load(c.model))]
    for mode in ("binary", "ternary"):
        out.append(Row(f"{mode} default (fake-quant)", lambda c, m=mode: c.load(c.model, fake_quant=m)))
        for target in TARGETS:
            out.append(Row(f"{mode} {target} pack", lambda c, m=mode, t=target: c.load(c.pack(m, t), target=t)))
        out.append(Row(f"{mode} gptq", lambda c, m=mode: c.load(c.model, recipe_path=c.recipe(m, "gptq"))))
        out.append(Row(f"{mode} distilled (mlx pack)", lambda c, m=mode: c.load(
            c.distilled_pack(m, DEFAULT_SOLVERS[m]), target="mlx")))
    return out


def compose_main(args) -> int:
    from bonsai_quant.calibration import calibrate
    from bonsai_quant.compose import benchmark as cb
    from bonsai_quant.compose.grammar import CATEGORIES
    from bonsai_quant.compose.judge import Judge as ComposeJudge
    from bonsai_quant.compose.model import TextEncoder as ComposeEncoder
    from bonsai_quant.compose.model import check_compatible
    from bonsai_quant.compose.model import model_dir as compose_dir

    model = args.model or compose_dir()
    encoder, judge = ComposeEncoder.load(), ComposeJudge.load()
    judge.net.to(args.device)
    samples = args.samples or cb.DEFAULT_SAMPLES
    distill_settings = {k: v for k, v in (("steps", args.distill_steps), ("batch_size", args.distill_batch))
                        if v is not None}
    selected = [r for r in compose_rows() if not args.only or any(s in r.name for s in args.only)]
    results = []

    def write_json():
        if args.json:
            args.json.write_text(json.dumps({"benchmark": "compose", "model": str(model), "samples_per_prompt":
                                             samples, "seed": args.seed, "results": results}, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        calib = Path(tmp) / "calibration"
        start = time.perf_counter()
        calibrate(model, calib, device=args.device)
        print(f"  calibration set: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        ctx = Context(model, encoder, Path(tmp), {}, calib=calib, check=check_compatible,
                      distill_settings=distill_settings)
        for row in selected:
            start = time.perf_counter()
            try:
                loaded = row.load(ctx)
            except Exception as e:  # a row that cannot run yet (e.g. a runtime missing) is reported, not fatal
                print(f"{row.name}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            load_s = time.perf_counter() - start
            for steps in args.steps:
                # packs run where they were loaded (the reference runtime decodes on the CPU it loaded on)
                report, images = cb.evaluate(loaded, samples, steps, args.seed, encoder=encoder, judge=judge,
                                             device=None if loaded.kind == "pack" else args.device)
                if args.grids:
                    cb.save_grid(images, args.grids / f"{file_stem(row.name)}-{steps}-steps.png")
                results.append({"row": row.name, "steps": steps, "overall": report["overall"],
                                "categories": report["categories"], "held_out": report["held_out"],
                                "frechet_distance": report["frechet_distance"],
                                "seconds": round(load_s + report["generate_seconds"], 2)})
                print(f"  {row.name} @ {steps} steps: overall {report['overall']:.4f}, "
                      f"FD {report['frechet_distance']:.3f}", file=sys.stderr, flush=True)
            loaded.model.cpu()
            base = {r["steps"]: r for r in results if r["row"] == "full precision"}
            for r in results:
                b = base.get(r["steps"])
                r["retention"] = r["overall"] / b["overall"] if b and b["overall"] else None
                r["category_retention"] = ({c: (r["categories"][c] / b["categories"][c] if b["categories"][c]
                                                else None) for c in CATEGORIES} if b else None)
            write_json()  # after every row: a run cut short keeps what it measured
    short = {"single_object": "single", "two_object": "two obj.", "counting": "counting", "colors": "colors",
             "position": "position", "color_attr": "color attr."}
    print(f"\nflux2-tiny-compose, compose benchmark (GenEval analog): 48 prompts per category x {samples} samples, "
          f"seed {args.seed}; judge worst held-out category {min(judge.info['held_out_accuracy'].values()):.4f}\n")
    print(f"| {'model':<38} | steps | " + " | ".join(f"{short[c]:>11}" for c in CATEGORIES)
          + " | overall | retention | FD |")
    print(f"| {'-' * 38} | ----: | " + " | ".join("-" * 10 + ":" for _ in CATEGORIES) + " | ------: | --------: | -: |")
    for r in results:
        ret = f"{100 * r['retention']:.1f}%" if r["retention"] is not None else "-"
        print(f"| {r['row']:<38} | {r['steps']:>5} | " + " | ".join(f"{r['categories'][c]:>11.3f}" for c in CATEGORIES)
              + f" | {r['overall']:>7.3f} | {ret:>9} | {r['frechet_distance']:.1f} |")
    write_json()
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--benchmark", choices=("digits", "compose"), default="digits")
    ap.add_argument("--model", type=Path, help="full-precision model (default: the shipped one of the benchmark)")
    ap.add_argument("--samples", type=int, help="per digit (default 100) or, compose, per prompt (default 4)")
    ap.add_argument("--device", default="cpu", help="compose: where models run (default cpu)")
    ap.add_argument("--distill-steps", type=int, help="distill steps (default: DistillSettings')")
    ap.add_argument("--distill-batch", type=int, help="distill batch size (default: DistillSettings')")
    ap.add_argument("--steps", type=int, nargs="+", default=[4], help="Euler step counts (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", metavar="SUBSTRING", help="rows whose name contains one of these")
    ap.add_argument("--grids", type=Path, help="write one PNG grid per row and step count into this folder")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()
    if args.benchmark == "compose":
        return compose_main(args)
    args.model = args.model or model_dir()
    args.samples = args.samples or 100
    if args.distill_steps or args.distill_batch:
        DISTILL_OVERRIDES.update({k: v for k, v in (("steps", args.distill_steps), ("batch_size", args.distill_batch))
                                  if v is not None})

    encoder, judge = TextEncoder.load(), Judge.load()
    selected = [r for r in rows() if not args.only or any(s in r.name for s in args.only)]
    results = []
    # The table goes out row by row as each is measured (a full run takes an hour on 2 cores); retention is
    # against the full-precision row, which comes first.
    print(f"flux2-tiny-digits quality, {args.samples} samples per digit, seed {args.seed}; judge held-out accuracy "
          f"{judge.info['held_out_accuracy']:.4f}; real held-out digits score FD "
          f"{judge.info['frechet_distance_real_held_out']:.3f}\n")
    print(f"| {'model':<44} | steps | accuracy | Fréchet distance | retention | seconds |")
    print(f"| {'-' * 44} | ----: | -------: | ---------------: | --------: | ------: |", flush=True)
    base = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        ctx = Context(args.model, encoder, Path(tmp), {}, distill_settings=DISTILL_OVERRIDES)
        bar = tqdm(selected, desc="bench", unit="row", file=sys.stderr, disable=not sys.stderr.isatty())
        for row in bar:
            bar.set_postfix_str(row.name)
            tqdm.write(f"{row.name}: preparing", file=sys.stderr)
            start = time.perf_counter()
            try:
                loaded = row.load(ctx)
            except Exception as e:  # a row that cannot run yet (e.g. a runtime missing) is reported, not fatal
                tqdm.write(f"{row.name}: skipped ({type(e).__name__}: {e})", file=sys.stderr)
                continue
            load_s = time.perf_counter() - start
            for steps in args.steps:
                report, images = evaluate(loaded, args.samples, steps, args.seed, encoder=encoder, judge=judge)
                if args.grids:
                    save_grid(images, args.grids / f"{file_stem(row.name)}-{steps}-steps.png")
                r = {"row": row.name, "steps": steps, "accuracy": report["accuracy"],
                     "frechet_distance": report["frechet_distance"],
                     "per_digit_accuracy": report["per_digit_accuracy"],
                     "seconds": round(load_s + report["generate_seconds"], 2)}
                if row.name == "full precision":
                    base[steps] = r["accuracy"]
                r["retention"] = r["accuracy"] / base[steps] if base.get(steps) else None
                results.append(r)
                ret = f"{100 * r['retention']:.1f}%" if r["retention"] is not None else "-"
                tqdm.write(f"| {r['row']:<44} | {r['steps']:>5} | {r['accuracy']:>8.4f} | "
                           f"{r['frechet_distance']:>16.3f} | {ret:>9} | {r['seconds']:>7.1f} |", file=sys.stdout)
                sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps({"samples": args.samples, "seed": args.seed, "results": results}, indent=2)
                             + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
