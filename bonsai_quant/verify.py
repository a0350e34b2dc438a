"""`bonsai-quant verify`: is this pack what the recipe meant, on the runtimes people use?

Steps, in order, each naming the first thing that fails:
1 integrity    manifest sha256 of every file and tensor; config and quantization_config consistent; every
               expected tensor present with the right dtype and shape.
2 exactness    every quantized layer decodes to {-s,+s} / {-s,0,+s} per group; with a source, equals the
               re-quantization of the source under the recorded recipe, and kept tensors equal the source.
3 runtimes     MLX: real `mx.dequantize` gives the decoded weights exactly and `QuantizedLinear` reproduces
               x @ W^T; gemlite: real GemLiteLinearTriton on a CUDA GPU, else skipped with the reason.
3b cuda-runtime every layer of any pack format through the CUDA backend (runtime/cuda): codes read bit-exact,
               the 16-bit and fp8 kernels within their own bounds; skipped with the reason without a GPU.
4 end-to-end   the transformer forward from the pack through the reference runtime against diffusers with
               the decoded (fake-quantized) weights, in float32.
5 mlx-e2e      the whole transformer forward in MLX from an MLX pack against the same float32 reference.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .packing.folders import pack_folders
from .readers.published import find_published
from .verify_pack import PackVerifier, verify_folders  # noqa: F401  (PackVerifier: imported from here)
from .verify_published import verify_published


def verify(path: Path, source: Path | None = None, image_tokens: int = 64, text_tokens: int = 32,
           seed: int = 0, calib: Path | None = None, reproducible: bool = False) -> dict:
    """`reproducible`: figures that do not depend on the thread count (slower forwards), for release folders."""
    published = find_published(Path(path))
    if published:  # a published Bonsai snapshot: read loosely, its tolerance stated
        return verify_published(published, source, image_tokens, text_tokens, seed, reproducible)
    folders = pack_folders(Path(path))
    results = verify_folders(folders, source, image_tokens, text_tokens, seed, calib, reproducible)
    packs = [{"folder": str(folder), "steps": [asdict(s) for s in steps]} for folder, steps in zip(folders, results)]
    ok = all(s["status"] != "fail" for p in packs for s in p["steps"])
    return {"ok": ok, "packs": packs}


def format_report(report: dict) -> str:
    lines = []
    for pack in report["packs"]:
        lines.append(pack["folder"])
        for s in pack["steps"]:
            lines.append(f"  {s['name']:<15} {s['status'].upper():<5} {s['seconds']:>7.2f}s  {s['detail']}")
    lines.append("verify: " + ("PASS" if report["ok"] else "FAIL"))
    return "\n".join(lines)
