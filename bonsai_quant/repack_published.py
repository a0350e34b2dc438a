"""`repack` from a published Bonsai pack into a bonsai-quant pack (bonsai, mlx or gemlite; safetensors).

Each layer is read loosely (`PublishedPack.decode`): codes, s and the centre offset. bonsai-quant's packs hold
w = s * code with one 16-bit s per group, so a layer converts losslessly when its offset is 0 and its s is a
16-bit number. The scale dtype is chosen for the whole pack: bfloat16 when every s is a bf16 number, else
float16 when every s is an fp16 number, else the one that rounds fewer layers. Every layer that does not convert
losslessly is named, with how far its levels move, in the result and in quantization_config.json (`source`).
Two passes over the layers (choose, then write) keep memory at one layer, never the model.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .errors import PackError
from .figures import figure
from .output import atomic_output, check_free_space
from .packing.config import FORMAT_VERSION, PackConfig
from .packing.formats import MODE_BITS as BITS
from .packing.formats import dtype_name
from .packing.packset import PackSet, Slot, pack_entries
from .packing.targets import NAMES as TARGETS
from .readers.published import TOLERANCE, open_published, published_folder

SHARD_BYTES = 2 * 10**9
_CANDIDATES = (torch.bfloat16, torch.float16)


def _rounding(s: torch.Tensor, dtype: torch.dtype) -> float:
    """Largest relative change of s when stored in `dtype` (inf where it overflows)."""
    stored = s.to(dtype).float()
    if not bool(torch.isfinite(stored).all()):
        return float("inf")
    change = (stored - s).abs()
    return float(torch.where(s > 0, change / s.clamp(min=torch.finfo(torch.float32).tiny), change).max())


def survey(pack) -> dict[str, dict]:
    """Per layer: how far its levels sit from symmetric, and what storing s in each 16-bit dtype changes."""
    layers = {}
    for module in pack.quantized:
        d = pack.decode(module)
        moved, moved_rel = d.worst()
        layers[module] = {"levels_moved": moved, "levels_moved_rel": moved_rel,
                          **{dtype_name(t): _rounding(d.s, t) for t in _CANDIDATES}}
    return layers


def choose_scale_dtype(layers: dict[str, dict]) -> torch.dtype:
    lossy = {t: sum(1 for v in layers.values() if v[dtype_name(t)] > 0) for t in _CANDIDATES}
    return min(_CANDIDATES, key=lambda t: (lossy[t], _CANDIDATES.index(t)))


def lossy_tensors(layers: dict[str, dict], dtype: torch.dtype) -> list[dict]:
    out = []
    for module, v in layers.items():
        if v["levels_moved"] > 0 or v[dtype_name(dtype)] > 0:
            out.append({"tensor": module, "levels_moved_max": figure(v["levels_moved"], 3),
                        "levels_moved_max_rel": figure(v["levels_moved_rel"], 3),
                        "scale_rounding_max_rel": figure(v[dtype_name(dtype)], 3)})
    return out


def converted_qconfig(pack, dtype: torch.dtype, lossy: list[dict]) -> dict:
    """quantization_config.json of the converted pack: bonsai-quant's fields, and where it came from."""
    from .flux2 import role_of

    return {
        "format_version": FORMAT_VERSION, "format": None, "tool": {"name": "bonsai-quant", "version": __version__},
        "mode": pack.mode, "bits": BITS[pack.mode], "group_size": pack.group_size, "scale_dtype": dtype_name(dtype),
        "weights": "model.safetensors", "shard_bytes": SHARD_BYTES,
        "quantized": {m: {"mode": pack.mode, "bits": BITS[pack.mode], "solver": "published",
                          "role": role_of(f"{m}.weight"), "shape": list(shape), "rule": f"published {pack.format}"}
                      for m, shape in pack.quantized.items()},
        "kept": {n: {"dtype": dtype_name(pack.kept[n]), "role": pack.specs[n].role, "shape": list(pack.specs[n].shape),
                     "rule": f"published {pack.format}"} for n in pack.kept},
        "skipped_patterns": pack.skip_patterns,
        "recipe": {"name": f"published-{pack.layout}-{pack.mode}", "mode": pack.mode},
        "source": {"layout": pack.format, "folder": pack.folder.name, "quantization_config": pack.info,
                   "scale_dtype": dtype_name(pack.side_dtype), "lossless": not lossy, "tolerance": TOLERANCE,
                   "lossy_tensors": lossy},
    }


def repack_published(src: Path, target: str, out: Path, force: bool = False, verbose: bool = False) -> dict:
    if target not in TARGETS:
        raise PackError(f"repack target {target!r}; valid: {', '.join(TARGETS)}")
    start = time.perf_counter()
    folder = published_folder(src)
    pack = open_published(folder)
    layers = survey(pack)
    dtype = choose_scale_dtype(layers)
    lossy = lossy_tensors(layers, dtype)
    qconfig = PackConfig.from_dict(converted_qconfig(pack, dtype, lossy), "quantization_config", require_format=False)
    slots = []
    for name, spec in pack.specs.items():
        module = name.removesuffix(".weight")
        if module in pack.quantized and name.endswith(".weight"):
            slots.append(Slot(name, spec.shape, "quantize", mode=pack.mode))
        else:
            slots.append(Slot(name, spec.shape, "keep", kept_dtype=pack.kept[name]))
    planned = sum(e.nbytes for e in pack_entries(target, qconfig.for_target(target), slots))
    check_free_space(Path(out).parent, planned, f"repacking to {target}")
    with atomic_output(Path(out), force=force, sources=(src,)) as tmp:
        with PackSet({target: tmp}, folder / "config.json", qconfig, slots) as packs:
            for slot in tqdm(slots, desc=f"repack -> {target}", unit="tensor", file=sys.stderr,
                             disable=not (verbose and sys.stderr.isatty())):
                if slot.action == "keep":
                    packs.kept(slot, pack.get(slot.name))
                    continue
                d = pack.decode(slot.module)
                packs.quantized(slot, d.codes, d.s.to(dtype))
        files_bytes = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
    return {"source": str(folder), "target": target, "out": str(out), "tensors": len(slots),
            "files_bytes": files_bytes, "seconds": round(time.perf_counter() - start, 3),
            "scale_dtype": dtype_name(dtype), "lossless": not lossy, "lossy_tensors": lossy}
