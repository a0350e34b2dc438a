"""`verify` of a published Bonsai pack: the steps of bonsai-quant's own verify, with the published rounding.

1 integrity    the structure against config.json (every tensor there, dtypes and shapes of the layout, gemlite
               metadata, skip_patterns); the pickle read with weights_only. The release ships no sha256
               manifest, so bytes are not compared with one.
2 exactness    every layer decodes to codes of its mode times s, its centre level within TOLERANCE; kept tensors
               finite. With --source (a diffusers folder or BFL file): codes equal re-quantizing the source with
               the mode's data-free default solver, s within one bf16 ulp of the re-quantized s (both are 16-bit
               roundings of one value), kept tensors equal the source cast to the pack's dtype.
3 runtimes     MLX: `mx.dequantize` of the stored tensors within TOLERANCE of codes * s, and `QuantizedLinear`
               against x @ W^T; gemlite: `GemLiteLinearTriton` loaded from the stored buffers on a CUDA GPU.
4 end-to-end   the reference runtime's forward from the stored buffers against diffusers with the stored levels.
5 mlx-e2e      MLX's whole forward from the published MLX tensors against the same reference.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from .dense import lazy_dense_model
from .errors import BonsaiError
from .figures import figure, fixed_threads
from .readers.published import TOLERANCE, bf16_ulp, open_published
from .verify_pack import (
    E2E_BOUND,
    GEMLITE_LAYER_BOUND,
    MLX_E2E_BOUND,
    MLX_LAYER_BOUND,
    PackVerifier,
    Step,
    _bits,
    _Fail,
    _fail,
    _gate,
    _gemlite_missing,
    _mlx_layer_error,
)


class PublishedVerifier:
    def __init__(self, folder: Path, source, image_tokens: int, text_tokens: int, seed: int,
                 reproducible: bool = False):
        self.folder, self.source, self.seed, self.reproducible = Path(folder), source, seed, reproducible
        self.image_tokens, self.text_tokens = image_tokens, text_tokens
        self.pack = None

    def integrity(self, step: Step) -> None:
        self.pack = p = open_published(self.folder)
        step.detail = (f"{p.format} {p.mode}: {len(p.quantized)} quantized layers and {len(p.kept)} kept tensors "
                       f"match config.json ({str(p.side_dtype).removeprefix('torch.')} scales, group "
                       f"{p.group_size}); the release ships no sha256 manifest to compare bytes with")

    def exactness(self, step: Step) -> None:
        p, symmetric, worst = self.pack, 0, 0.0
        for module in p.quantized:
            d = p.decode(module)
            symmetric += d.symmetric
            worst = max(worst, d.worst()[1])
        for name in p.kept:
            t = p.get(name)
            if not bool(torch.isfinite(t).all()):
                idx = (~torch.isfinite(t)).nonzero()[0].tolist()
                _fail(f"kept tensor {name!r} holds {t[tuple(idx)].item()} at {idx}; valid: finite values")
        step.data.update(exactly_symmetric_layers=symmetric, max_centre_offset_rel=worst)
        step.detail = (f"{len(p.quantized)} layers decode to codes times s, {symmetric} exactly symmetric, the rest "
                       f"within tolerance (max centre offset {worst:.2g} of s; tolerance: {TOLERANCE})")
        if self.source is None:
            step.detail += "; no --source, so not compared with a re-quantization"
            return
        self._against_source(step)

    def _against_source(self, step: Step) -> None:
        from .packing.formats import SCALE_DTYPES
        from .plan import decide_all
        from .quantizers import quantize
        from .readers.bfl import open_checkpoint
        from .recipe import default_recipe

        p = self.pack
        ckpt = open_checkpoint(self.source)
        specs = ckpt.validate()
        if set(specs) != set(p.specs) or any(specs[n].shape != p.specs[n].shape for n in specs):
            _fail(f"--source {self.source}: its architecture differs from the pack's config.json")
        recipe = default_recipe(p.mode)
        decisions = decide_all(specs, {n: t.dtype for n, t in ckpt.tensors.items()}, recipe)
        worst = 0.0
        for d in decisions:
            if d.action == "keep":
                if d.name not in p.kept:
                    _fail(f"{d.name}: the {p.mode} default recipe keeps it, the pack quantizes it")
                got, want = p.get(d.name), ckpt.load(d.name).to(p.kept[d.name])
                if not torch.equal(_bits(got), _bits(want)):
                    idx = (_bits(got) != _bits(want)).nonzero()[0].tolist()
                    _fail(f"kept tensor {d.name!r} differs from the source at {idx}: {got[tuple(idx)].item()} in "
                          f"the pack, {want[tuple(idx)].item()} in the source")
                continue
            if d.module not in p.quantized:
                _fail(f"{d.name}: the {p.mode} default recipe quantizes it, the pack keeps it")
            requant = quantize(ckpt.load(d.name), d.mode, p.group_size, SCALE_DTYPES["bfloat16"], d.solver,
                               name=d.name)
            got = p.decode(d.module)
            if not torch.equal(got.codes, requant.codes):
                idx = (got.codes != requant.codes).nonzero()[0].tolist()
                _fail(f"{d.module}: code at {idx} is {int(got.codes[tuple(idx)])}, re-quantizing the source gives "
                      f"{int(requant.codes[tuple(idx)])}")
            ref = requant.scales.float()
            off = (got.s - ref).abs()
            bad = off > bf16_ulp(ref)
            if bool(bad.any()):
                idx = bad.nonzero()[0].tolist()
                _fail(f"{d.module}: s at [out, group] {idx} is {got.s[tuple(idx)].item():.6g}, re-quantizing the "
                      f"source gives {ref[tuple(idx)].item():.6g} (tolerance: one bf16 ulp)")
            worst = max(worst, float((off / ref.clamp(min=torch.finfo(torch.float32).tiny)).max()))
        step.data["max_scale_difference_rel"] = worst
        step.detail += (f"; codes equal re-quantizing {self.source} ({p.mode} default recipe), s within one bf16 ulp "
                        f"(max {worst:.2g} relative), kept tensors equal")

    def runtime(self, step: Step) -> None:
        if self.pack.layout == "mlx":
            self._mlx(step)
        else:
            self._gemlite(step)

    def _mlx(self, step: Step) -> None:
        from . import mlx_cpu

        mlx_cpu.enable()  # before mlx.core is first imported
        import mlx.core as mx
        import mlx.nn as mnn

        p, g, worst, worst_deq = self.pack, self.pack.group_size, 0.0, 0.0
        arrays = mx.load(str(self.folder / "diffusion_pytorch_model.safetensors"))
        rng = np.random.default_rng(self.seed)
        for module, (out_f, in_f) in p.quantized.items():
            d = p.decode(module)
            sym = (d.codes.view(out_f, -1, g).float() * d.s.unsqueeze(-1)).view(out_f, in_f)
            w, s, b = (arrays[f"{module}.{k}"] for k in ("weight", "scales", "biases"))
            got = torch.from_numpy(np.array(mx.dequantize(w, s, b, group_size=g, bits=p.bits).astype(mx.float32)))
            ulp = bf16_ulp(d.s).repeat_interleave(g, dim=1)
            far = ((got - sym).abs() / ulp)
            if bool((far > 1).any()):
                idx = (far > 1).nonzero()[0].tolist()
                _fail(f"{module}: mlx.core.dequantize gives {got[tuple(idx)].item()} at {idx}, codes * s is "
                      f"{sym[tuple(idx)].item()} (more than one bf16 ulp apart)")
            worst_deq = max(worst_deq, float(far.max()))
            # float32 scales and biases (exact copies) so that MLX's float32 kernel runs, not its bf16 CPU path
            layer = mnn.QuantizedLinear(in_f, out_f, bias=False, group_size=g, bits=p.bits)
            layer.weight, layer.scales, layer.biases = w, s.astype(mx.float32), b.astype(mx.float32)
            worst = max(worst, _mlx_layer_error(layer, got.numpy(), rng, module))
        step.data.update(max_rel_error=worst, max_dequantize_offset_ulp=worst_deq)
        step.detail = (f"mlx {mx.__version__}: dequantize within {worst_deq:.2g} bf16 ulp of codes * s on "
                       f"{len(p.quantized)} layers; QuantizedLinear max rel error {worst:.1e} "
                       f"(bound {MLX_LAYER_BOUND})")

    def _gemlite(self, step: Step) -> None:
        missing = _gemlite_missing()
        if missing is not None:
            step.status, step.detail = "skip", missing
            return
        import gemlite
        from gemlite.core import DType, GemLiteLinearTriton

        gemlite.set_packing_bitwidth(8)
        p, worst = self.pack, 0.0
        gen = torch.Generator(device="cuda").manual_seed(self.seed)
        for module, (out_f, in_f) in p.quantized.items():
            layer = GemLiteLinearTriton(p.bits, p.group_size, in_f, out_f, DType.FP16, DType.FP16)
            layer.load_state_dict({k: v.cuda() for k, v in p.buffers(module).items()})
            x = torch.randn(16, in_f, generator=gen, device="cuda")
            ref = x @ p.levels(module).cuda().t()
            err = float((layer(x.half()).float() - ref).norm() / ref.norm())
            _gate(err, GEMLITE_LAYER_BOUND, f"{module}: gemlite output differs from x @ W^T")
            worst = max(worst, err)
        step.data["max_rel_error"] = worst
        step.detail = f"gemlite ran {len(p.quantized)} layers; max rel error {worst:.1e} (bound {GEMLITE_LAYER_BOUND})"

    @torch.no_grad()
    def reference(self, inputs: dict) -> torch.Tensor:
        p = self.pack
        kept = {n: p.get(n).float() for n in p.kept}
        fetch = {m: (lambda m=m: p.levels(m)) for m in p.quantized}
        return lazy_dense_model(p.config, kept, fetch)(**inputs, return_dict=False)[0]

    @torch.no_grad()
    def end_to_end(self, step: Step, inputs: dict, reference: torch.Tensor) -> None:
        from .runtime.published import load_published_transformer

        out = load_published_transformer(self.folder)(**inputs, return_dict=False)[0]
        err = float((out - reference).norm() / reference.norm())
        step.data.update(rel_error=err, bound=E2E_BOUND)
        _gate(err, E2E_BOUND, "reference runtime forward differs from diffusers with the stored levels")
        step.detail = (f"reference runtime from the stored buffers vs diffusers with the stored levels (fp32): rel "
                       f"error {err:.1e} (bound {E2E_BOUND})")

    def mlx_end_to_end(self, step: Step, inputs: dict, reference: torch.Tensor) -> None:
        if self.pack.layout != "mlx":
            step.status, step.detail = "skip", "not an MLX pack"
            return
        import mlx.core as mx

        from .runtime.mlx_flux2 import MLXFlux2, mlx_forward_numpy, relative_error

        p = self.pack
        model = MLXFlux2(p.config, mx.float32)
        model.quantize_modules({m: p.bits for m in p.quantized}, p.group_size)
        arrays = mx.load(str(self.folder / "diffusion_pytorch_model.safetensors"))
        # float32 copies (exact) of the bf16 tensors: the forward is compared in float32
        arrays = {k: v if v.dtype == mx.uint32 else v.astype(mx.float32) for k, v in arrays.items()}
        model.load(arrays, str(self.folder))
        err = relative_error(mlx_forward_numpy(model, {k: v.numpy() for k, v in inputs.items()}), reference)
        step.data.update(rel_error=err, bound=MLX_E2E_BOUND)
        _gate(err, MLX_E2E_BOUND, "MLX transformer forward differs from the torch reference")
        step.detail = (f"MLX forward from the published tensors vs torch fp32 reference: rel error {err:.1e} "
                       f"(bound {MLX_E2E_BOUND})")

    def run(self) -> list[Step]:
        steps, cache = [], {}

        def prepared():
            if "inputs" not in cache:
                helper = PackVerifier(self.folder, None, self.image_tokens, self.text_tokens, self.seed)
                helper.config = self.pack.config
                cache["inputs"] = helper.inputs()
                cache["reference"] = self.reference(cache["inputs"])
            return cache["inputs"], cache["reference"]

        for name, fn in (("integrity", self.integrity), ("exactness", self.exactness), ("runtime", self.runtime),
                         ("end-to-end", lambda s: self.end_to_end(s, *prepared())),
                         ("mlx-end-to-end", lambda s: self.mlx_end_to_end(s, *prepared()))):
            step = Step(name)
            start = time.perf_counter()
            try:
                with fixed_threads(1) if self.reproducible else contextlib.nullcontext():
                    fn(step)
            except (_Fail, BonsaiError) as e:
                step.status, step.detail = "fail", str(e)
            step.data = {k: figure(v, 3) if isinstance(v, float) else v for k, v in step.data.items()}
            step.seconds = round(time.perf_counter() - start, 2)
            steps.append(step)
            if step.status == "fail" and name in ("integrity", "exactness"):
                break
        return steps


def verify_published(folders: list[Path], source=None, image_tokens: int = 64, text_tokens: int = 32, seed: int = 0,
                     reproducible: bool = False) -> dict:
    packs = []
    for folder in folders:
        steps = PublishedVerifier(folder, source, image_tokens, text_tokens, seed, reproducible).run()
        packs.append({"folder": str(folder), "steps": [asdict(s) for s in steps]})
    return {"ok": all(s["status"] != "fail" for p in packs for s in p["steps"]), "packs": packs}
