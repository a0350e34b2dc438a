#!/usr/bin/env python3
"""GPU job: load every quantized layer of a full-size gemlite pack into real gemlite and compare its output.

For each mode: writes the klein-4b random checkpoint (unless given), converts it to a gemlite pack with
bonsai-quant, then for each of the 100 quantized linears builds `GemLiteLinearTriton`, `load_state_dict`s our
buffers, runs it on random activations and compares with x @ (codes * s)^T computed in fp32 from our own
unpack. Prints the largest relative error per mode and writes everything to $OUT/gemlite_check.json.

    PYTHONPATH=.vendor/gemlite-0.6.0.post2 python tools/gpu_gemlite_check.py --work /tmp/w --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def layer_tensors(pack_dir: Path, module: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    index = pack_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out = {}
    for f in files:
        with safe_open(str(pack_dir / f), "pt") as h:
            for key in h.keys():
                if key.startswith(module + ".") and "." not in key[len(module) + 1:]:
                    out[key[len(module) + 1:]] = h.get_tensor(key)
    return out


def check_pack(pack_dir: Path, tokens: int, act_dtype: torch.dtype) -> list[dict]:
    import gemlite
    from gemlite.core import DType, GemLiteLinearTriton

    from bonsai_quant.packing import gemlite as ours
    from bonsai_quant.quantizers import dequantize

    gemlite.set_packing_bitwidth(8)
    config = json.loads((pack_dir / "quantization_config.json").read_text())
    group = config["group_size"]
    dtype = {"float16": DType.FP16, "bfloat16": DType.BF16}[config["scale_dtype"]]
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for module, q in config["quantized"].items():
        out_f, in_f = q["shape"]
        tensors = layer_tensors(pack_dir, module)
        codes, scales = ours.unpack({k: v.clone() for k, v in tensors.items()}, q["mode"], group)
        layer = GemLiteLinearTriton(q["bits"], group, in_f, out_f, dtype, dtype)
        layer.load_state_dict({k: v.cuda() for k, v in tensors.items()})
        x = torch.randn(tokens, in_f, generator=gen, device="cuda", dtype=torch.float32)
        ref = x @ dequantize(codes.cuda(), scales.cuda(), group).t()
        got = layer(x.to(act_dtype)).float()
        torch.cuda.synchronize()
        rel = float((got - ref).norm() / ref.norm())
        rows.append({"layer": module, "mode": q["mode"], "shape": [out_f, in_f], "rel_error": rel})
        del layer, tensors
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="klein-4b")
    parser.add_argument("--modes", default="binary,ternary")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--bound", type=float, default=1e-2, help="largest relative error accepted (fp16 activations)")
    args = parser.parse_args()

    from bonsai_quant.convert import convert
    from bonsai_quant.flux2 import preset_config
    from bonsai_quant.recipe import default_recipe
    from bonsai_quant.synthetic import write_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.work / args.preset
    if not ckpt.exists():
        t = time.perf_counter()
        write_checkpoint(preset_config(args.preset), ckpt, seed=0)
        print(f"checkpoint written in {time.perf_counter() - t:.1f} s", flush=True)
    results, ok = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}, True
    for mode in args.modes.split(","):
        pack = args.work / f"{args.preset}-{mode}"
        t = time.perf_counter()
        report = convert(ckpt, default_recipe(mode), pack, targets=("gemlite",), force=True, verbose=False)
        convert_s = time.perf_counter() - t
        t = time.perf_counter()
        rows = check_pack(pack / "gemlite", args.tokens, torch.float16)
        worst = max(rows, key=lambda r: r["rel_error"])
        ok &= worst["rel_error"] <= args.bound
        results[mode] = {"convert_seconds": round(convert_s, 1), "check_seconds": round(time.perf_counter() - t, 1),
                         "pack_bytes": report["targets"]["gemlite"]["files_bytes"], "layers": len(rows),
                         "max_rel_error": worst["rel_error"], "worst_layer": worst["layer"],
                         "mean_rel_error": sum(r["rel_error"] for r in rows) / len(rows), "rows": rows}
        print(f"{mode}: {len(rows)} layers through gemlite, pack {results[mode]['pack_bytes'] / 1e9:.3f} GB, "
              f"max rel error {worst['rel_error']:.2e} ({worst['layer']}), mean "
              f"{results[mode]['mean_rel_error']:.2e}", flush=True)
    (args.out / "gemlite_check.json").write_text(json.dumps(results, indent=2) + "\n")
    print("PASS" if ok else f"FAIL: an error above {args.bound}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
