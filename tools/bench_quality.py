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
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bonsai_quant.convert import convert  # noqa: E402
from bonsai_quant.digits import TextEncoder, model_dir  # noqa: E402
from bonsai_quant.digits_judge import Judge  # noqa: E402
from bonsai_quant.evaluate import LoadedModel, evaluate, load_for_eval, save_grid  # noqa: E402
from bonsai_quant.plan import TARGETS  # noqa: E402
from bonsai_quant.recipe import DEFAULT_SOLVERS, default_recipe, load_recipe  # noqa: E402

CALIBRATION = ROOT / "calibration" / "flux2-tiny-digits"


@dataclass
class Context:
    model: Path
    encoder: TextEncoder
    workdir: Path
    _converted: dict

    def pack(self, mode: str) -> Path:
        """The convert output of the default `mode` recipe (all its targets), written once per run."""
        if mode not in self._converted:
            out = self.workdir / f"{mode}"
            convert(self.model, default_recipe(mode), out, targets=TARGETS, verbose=False)
            self._converted[mode] = out
        return self._converted[mode]

    def recipe(self, mode: str, solver: str) -> Path:
        """The default `mode` recipe with `solver` and the shipped calibration set, as a file eval can load."""
        text = default_recipe(mode).text.replace(f"\nmode: {mode}\n", f"\nmode: {mode}\nsolver: {solver}\n"
                                                 f"calibration: {CALIBRATION}\n", 1)
        path = self.workdir / f"{mode}-{solver}.yaml"
        path.write_text(text)
        load_recipe(path)  # a broken edit fails here, naming the file
        return path

    def sensitivity_recipe(self, mode: str, solver: str) -> Path:
        """The recipe `bonsai-quant sensitivity` writes (published budget, ranked with `solver`)."""
        from bonsai_quant.sensitivity import sensitivity

        path = self.workdir / f"sensitivity-{mode}-{solver}.yaml"
        p = sensitivity(self.model, CALIBRATION, mode, solver=solver, out=path)["published"]
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
        record = distill(DistillOptions(self.model, recipe, out, DistillSettings(), calib=CALIBRATION,
                                        targets=("mlx",), verbose=False))["distill"]
        print(f"  distill {mode} from {solver}: loss {record['loss']['first']:.4g} -> {record['loss']['last']:.4g} "
              f"in {record['settings']['steps']} steps, {time.perf_counter() - start:.0f} s", file=sys.stderr)
        return out


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
            out.append(Row(f"{mode} {target} pack", lambda c, m=mode, t=target: load_for_eval(c.pack(m), c.encoder,
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=model_dir(), help="full-precision digits model (default: shipped)")
    ap.add_argument("--samples", type=int, default=100, help="per digit (default 100)")
    ap.add_argument("--steps", type=int, nargs="+", default=[4], help="Euler step counts (default 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", metavar="SUBSTRING", help="rows whose name contains one of these")
    ap.add_argument("--grids", type=Path, help="write one PNG grid per row and step count into this folder")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    args = ap.parse_args()

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
        ctx = Context(args.model, encoder, Path(tmp), {})
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
                    save_grid(images, args.grids / f"{row.name.replace(' ', '-')}-{steps}-steps.png")
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
