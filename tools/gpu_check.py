#!/usr/bin/env python3
"""The GPU job: full-size klein-4b packs through real gemlite, layer by layer and as a whole transformer.

1. Writes the klein-4b random checkpoint (unless present) and converts it to gemlite packs, both modes.
2. Layers: each of the 100 quantized linears is built as `GemLiteLinearTriton`, loaded with our buffers via
   `load_state_dict`, run on random fp16 activations and compared with x @ (codes * s)^T in fp32.
3. Transformer: the whole model at 1024 and 4096 image tokens (512x512 and 1024x1024) with 512 text tokens,
   from the gemlite pack (a) through gemlite in bf16, (b) through the reference runtime in fp32 (the judge),
   and times one denoising step (one forward) against the bf16 diffusers model and the bf16 reference runtime.
Results go to stdout and $OUT/gpu_check.json.

    PYTHONPATH=.vendor/gemlite-0.6.0.post2:. python tools/gpu_check.py --work /tmp/w --out $OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def layer_check(pack_dir: Path, tokens: int) -> list[dict]:
    import gemlite
    from gemlite.core import DType, GemLiteLinearTriton

    from bonsai_quant.packing import gemlite as ours
    from bonsai_quant.quantizers import dequantize
    from bonsai_quant.runtime.loader import PackReader

    gemlite.set_packing_bitwidth(8)
    config = json.loads((pack_dir / "quantization_config.json").read_text())
    group = config["group_size"]
    dtype = {"float16": DType.FP16, "bfloat16": DType.BF16}[config["scale_dtype"]]
    act = {"float16": torch.float16, "bfloat16": torch.bfloat16}[config["scale_dtype"]]
    reader = PackReader(pack_dir)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for module, q in config["quantized"].items():
        out_f, in_f = q["shape"]
        tensors = {s: reader.get(f"{module}.{s}") for s in ours.SUFFIXES}
        codes, scales = ours.unpack({k: v.clone() for k, v in tensors.items()}, q["mode"], group)
        layer = GemLiteLinearTriton(q["bits"], group, in_f, out_f, dtype, dtype)
        layer.load_state_dict({k: v.cuda() for k, v in tensors.items()})
        x = torch.randn(tokens, in_f, generator=gen, device="cuda")
        ref = x @ dequantize(codes.cuda(), scales.cuda(), group).t()
        got = layer(x.to(act)).float()
        rows.append({"layer": module, "shape": [out_f, in_f], "rel_error": float((got - ref).norm() / ref.norm())})
    return rows


def inputs(config: dict, image_tokens: int, text_tokens: int, dtype: torch.dtype) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(1)
    side = int(image_tokens**0.5)
    h, w = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(h), h, w, torch.zeros_like(h)], -1).reshape(-1, 4)
    txt_ids = torch.stack([torch.zeros(text_tokens), torch.zeros(text_tokens), torch.zeros(text_tokens),
                           torch.arange(text_tokens)], -1)
    return {
        "hidden_states": torch.randn(1, image_tokens, config["in_channels"], generator=gen, device="cuda").to(dtype),
        "encoder_hidden_states": torch.randn(1, text_tokens, config["joint_attention_dim"], generator=gen,
                                             device="cuda").to(dtype),
        "timestep": torch.tensor([0.5], device="cuda", dtype=dtype),
        "img_ids": img_ids.float().cuda(), "txt_ids": txt_ids.float().cuda(), "return_dict": False,
    }


@torch.no_grad()
def step_time(model, kwargs: dict, repeats: int = 3) -> tuple[torch.Tensor, float]:
    out = model(**kwargs)[0]
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        out = model(**kwargs)[0]
    torch.cuda.synchronize()
    return out, (time.perf_counter() - start) / repeats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--preset", default="klein-4b")
    parser.add_argument("--modes", default="binary,ternary")
    parser.add_argument("--layer-tokens", type=int, default=256)
    parser.add_argument("--image-tokens", default="1024,4096")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--skip-layers", action="store_true")
    args = parser.parse_args()

    from diffusers import Flux2Transformer2DModel

    from bonsai_quant.convert import convert
    from bonsai_quant.flux2 import preset_config
    from bonsai_quant.recipe import default_recipe
    from bonsai_quant.runtime import load_transformer
    from bonsai_quant.runtime.gemlite_backend import use_gemlite
    from bonsai_quant.synthetic import write_checkpoint

    args.out.mkdir(parents=True, exist_ok=True)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save():
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")

    ckpt = args.work / args.preset
    if not ckpt.exists():
        t = time.perf_counter()
        write_checkpoint(preset_config(args.preset), ckpt, seed=0)
        print(f"checkpoint written in {time.perf_counter() - t:.1f} s", flush=True)
    modes = args.modes.split(",")
    for mode in modes:
        t = time.perf_counter()
        report = convert(ckpt, default_recipe(mode), args.work / f"{args.preset}-{mode}", targets=("gemlite",),
                         force=True, verbose=False)
        results[mode] = {"convert_seconds": round(time.perf_counter() - t, 1),
                         "pack_bytes": report["targets"]["gemlite"]["files_bytes"]}
        if not args.skip_layers:
            t = time.perf_counter()
            rows = layer_check(args.work / f"{args.preset}-{mode}" / "gemlite", args.layer_tokens)
            worst = max(rows, key=lambda r: r["rel_error"])
            results[mode].update(layers=len(rows), layer_check_seconds=round(time.perf_counter() - t, 1),
                                 layer_max_rel_error=worst["rel_error"], layer_worst=worst["layer"],
                                 layer_mean_rel_error=sum(r["rel_error"] for r in rows) / len(rows))
            print(f"{mode}: {len(rows)} layers through gemlite (fp16 activations, {args.layer_tokens} tokens): max "
                  f"rel error {worst['rel_error']:.2e} ({worst['layer']}), mean "
                  f"{results[mode]['layer_mean_rel_error']:.2e}; pack {results[mode]['pack_bytes'] / 1e9:.3f} GB",
                  flush=True)
        save()

    config = json.loads((ckpt / "config.json").read_text())
    dense = Flux2Transformer2DModel.from_pretrained(ckpt, torch_dtype=torch.bfloat16).cuda().eval()
    for tokens in (int(t) for t in args.image_tokens.split(",")):
        kw16 = inputs(config, tokens, args.text_tokens, torch.bfloat16)
        kw32 = inputs(config, tokens, args.text_tokens, torch.float32)
        _, dense_s = step_time(dense, kw16)
        row = {"dense_bf16_step_s": dense_s}
        print(f"{tokens} image + {args.text_tokens} text tokens: dense bf16 diffusers step {dense_s * 1e3:.1f} ms",
              flush=True)
        for mode in modes:
            pack = args.work / f"{args.preset}-{mode}" / "gemlite"
            ref32 = load_transformer(pack, dtype=torch.float32, device="cuda", backend="reference")
            ref_out, ref32_s = step_time(ref32, kw32, repeats=1)
            del ref32
            ref16 = load_transformer(pack, dtype=torch.bfloat16, device="cuda", backend="reference")
            ref16_out, ref16_s = step_time(ref16, kw16)
            swapped = use_gemlite(ref16)
            gl_out, gl_s = step_time(ref16, kw16)
            del ref16
            torch.cuda.empty_cache()
            row[mode] = {"gemlite_layers": swapped, "gemlite_bf16_step_s": gl_s, "reference_bf16_step_s": ref16_s,
                         "reference_fp32_step_s": ref32_s, "gemlite_vs_reference_fp32": rel(gl_out, ref_out),
                         "reference_bf16_vs_fp32": rel(ref16_out, ref_out)}
            print(f"  {mode}: gemlite step {gl_s * 1e3:.1f} ms, reference bf16 {ref16_s * 1e3:.1f} ms, "
                  f"reference fp32 {ref32_s * 1e3:.1f} ms; gemlite vs fp32 reference rel error "
                  f"{row[mode]['gemlite_vs_reference_fp32']:.2e} (bf16 reference: "
                  f"{row[mode]['reference_bf16_vs_fp32']:.2e})", flush=True)
        results[f"transformer_{tokens}"] = row
        save()
    results["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
