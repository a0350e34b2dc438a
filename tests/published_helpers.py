"""Imitations of the published Bonsai Image snapshot folders, built from bonsai-quant's own packs.

The real files cannot be downloaded here, so these follow the published layouts (REFERENCE §2 and §6):
MLX repos `transformer-packed-mflux/` (bf16 scales and biases, kept tensors bf16, quantization_config.json
{bits, group_size, skip_patterns}) beside text_encoder-mlx-4bit/, tokenizer/, vae/, scheduler/ and
model_index.json; CUDA repos `transformer-gemlite-int{1,2}/` with a torch.save pickle `state_dict.pt` of gemlite
buffers (fp32 scales and zeros [K/128, N], metadata int32[12], orig_shape, no meta_scale), config.json,
quantization_config.json and gemlite_autotune.json.

`rounding=True` gives binary layers the published rounding: scales = 2s and biases (zeros) = -s rounded each on
its own from an s carrying more precision than the stored dtype, so in some groups the two levels are not
exactly -l and +l (within half a bf16 ulp).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from bonsai_quant.packing import bonsai, gemlite
from bonsai_quant.runtime.loader import PackReader

SKIP_PATTERNS = ["x_embedder", "context_embedder", "proj_out", "norm_out.linear",
                 "time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
                 "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
                 "single_stream_modulation.linear"]


def _ours(bonsai_pack: Path):
    qc = json.loads((bonsai_pack / "quantization_config.json").read_text())
    reader = PackReader(bonsai_pack)
    return qc, reader


def _layers(qc, reader):
    for module, info in qc["quantized"].items():
        codes, s = bonsai.unpack({k: reader.get(f"{module}.{k}") for k in bonsai.SUFFIXES}, info["mode"],
                                 qc["group_size"])
        yield module, info, codes, s


def _ulp(s: torch.Tensor) -> torch.Tensor:
    from bonsai_quant.readers.published import bf16_ulp

    return bf16_ulp(s)


def _wiggle(s: torch.Tensor, seed: int) -> torch.Tensor:
    """s (float32) with extra low bits, within half a bf16 ulp (so it rounds back to s), as a trained fp32
    scale carries."""
    g = torch.Generator().manual_seed(seed)
    return s.float() + (torch.rand(s.shape, generator=g) - 0.5) * 0.99 * _ulp(s)


def _nearby(s32: torch.Tensor, seed: int) -> torch.Tensor:
    """A second value agreeing with s32 to bf16 precision (less than half an ulp away): rounded on its own,
    it lands on s32's bf16 neighbour in some groups."""
    g = torch.Generator().manual_seed(seed)
    return s32 + torch.rand(s32.shape, generator=g) * 0.49 * _ulp(s32)


def _snapshot_files(root: Path) -> None:
    for sub, file, text in (("text_encoder-mlx-4bit", "config.json", "{}\n"), ("tokenizer", "tokenizer.json", "{}\n"),
                            ("vae", "config.json", "{}\n"), ("scheduler", "scheduler_config.json", "{}\n")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / file).write_text(text)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline"}) + "\n")


def mlx_snapshot(bonsai_pack: Path, root: Path, rounding: bool = False) -> Path:
    """An MLX repo snapshot: root/transformer-packed-mflux/ and the pipeline's other folders."""
    qc, reader = _ours(bonsai_pack)
    folder = root / "transformer-packed-mflux"
    folder.mkdir(parents=True)
    tensors = {}
    for i, (module, info, codes, s) in enumerate(_layers(qc, reader)):
        bits = info["bits"]
        q = (codes.view(torch.uint8) + 1) >> (1 if bits == 1 else 0)  # binary 0/1, ternary 0/1/2
        from bonsai_quant.packing.bits import bytes_to_words, pack_bytes

        tensors[f"{module}.weight"] = bytes_to_words(pack_bytes(q.contiguous(), bits))
        if bits == 1 and rounding:
            s32 = _wiggle(s, 2 * i)
            tensors[f"{module}.scales"] = (2 * s32).to(torch.bfloat16)
            tensors[f"{module}.biases"] = (-_nearby(s32, 2 * i + 1)).to(torch.bfloat16)
        else:
            s16 = s.to(torch.bfloat16)
            tensors[f"{module}.scales"] = s16 * 2 if bits == 1 else s16.clone()
            tensors[f"{module}.biases"] = -s16
    for name in qc["kept"]:
        tensors[name] = reader.get(name).to(torch.bfloat16)
    save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "mlx"})
    (folder / "quantization_config.json").write_text(json.dumps(
        {"bits": qc["bits"], "group_size": qc["group_size"], "skip_patterns": SKIP_PATTERNS}, indent=2) + "\n")
    shutil.copyfile(bonsai_pack / "config.json", folder / "config.json")
    _snapshot_files(root)
    return root


def gemlite_snapshot(bonsai_pack: Path, root: Path, rounding: bool = False, extra: dict | None = None) -> Path:
    """A CUDA repo snapshot: root/transformer-gemlite-int{1,2}/ with the pickled gemlite state dict."""
    qc, reader = _ours(bonsai_pack)
    bits, mode = qc["bits"], qc["mode"]
    folder = root / f"transformer-gemlite-int{bits}"
    folder.mkdir(parents=True)
    state = {}
    for i, (module, info, codes, s) in enumerate(_layers(qc, reader)):
        ours = gemlite.pack(codes, s.to(torch.bfloat16), mode, qc["group_size"])
        state[f"{module}.W_q"] = ours["W_q"]
        s32 = (_wiggle(s, i) if rounding else s.to(torch.bfloat16).float()).t().contiguous()
        if mode == "binary":
            state[f"{module}.scales"] = 2 * s32
            # "about -scales/2": where rounding, the premultiplied zero point computed apart from the scale
            state[f"{module}.zeros"] = -_nearby(s32, 1000 + i) if rounding else -s32
        else:
            state[f"{module}.scales"] = s32
            state[f"{module}.zeros"] = -s32
        # FP16 activations, FP32 accumulation and FP32 meta (scales) dtype, fma group mode with a zeros tensor.
        state[f"{module}.metadata"] = torch.tensor([0, bits, qc["group_size"], (1 << bits) - 1, 8 // bits, 1, 1, 0,
                                                    0, 0, 4, 1], dtype=torch.int32)
        state[f"{module}.orig_shape"] = torch.tensor(info["shape"], dtype=torch.int32)
    for name in qc["kept"]:
        state[name] = reader.get(name).to(torch.bfloat16)
    state.update(extra or {})
    torch.save(state, folder / "state_dict.pt")
    (folder / "quantization_config.json").write_text(json.dumps(
        {"format": f"gemlite-int{bits}-{mode}-g{qc['group_size']}", "bits": bits, "group_size": qc["group_size"],
         "packing_bitwidth": 8, "quantized_count": len(qc["quantized"]), "skipped_count": 9, "pack_seconds": 1.5},
        indent=2) + "\n")
    shutil.copyfile(bonsai_pack / "config.json", folder / "config.json")
    (folder / "gemlite_autotune.json").write_text("{}\n")
    return root
