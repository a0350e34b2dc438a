"""Describe a pack folder from its quantization_config.json and safetensors headers (no weights are read)."""

from __future__ import annotations

from pathlib import Path

from .consumers import CONSUMERS, layout_problems
from .pack_check import check_pack
from .packing.folders import pack_folders
from .packing.targets import TARGETS


def describe(path: Path) -> list[dict]:
    from .readers.published import describe_published, find_published

    published = find_published(path)
    if published:
        return [describe_published(folder) for folder in published]
    result = []
    for folder in pack_folders(path):
        pack = check_pack(folder)
        config, headers = pack.qconfig, pack.headers
        quant_bytes = weights = 0
        for module, q in config.quantized.items():
            weights += q.shape[0] * q.shape[1]
            quant_bytes += sum(i.nbytes for n, i in headers.items() if n.rsplit(".", 1)[0] == module)
        kept_bytes = sum(headers[n].nbytes for n in config.kept if n in headers)
        result.append({
            "folder": str(folder), "format": config.format, "mode": config.get("mode"),
            "bits": config.get("bits"), "group_size": config.group_size,
            "scale_dtype": config.get("scale_dtype"), "tool": config.get("tool"),
            "quantized_tensors": len(config.quantized), "kept_tensors": len(config.kept),
            "quantized_weights": weights, "quantized_bytes": quant_bytes, "kept_bytes": kept_bytes,
            "bits_per_weight": 8 * quant_bytes / weights if weights else 0.0,
            "files_bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
            # consumer -> None when it loads this pack (placed as its folder), else why it does not
            "consumers": layout_problems(config, sorted(p.name for p in folder.glob("*.safetensors"))),
        })
    return result


def _consumer_lines(problems: dict[str, str | None]) -> list[str]:
    loads = [f"{n} (as <model folder>/{CONSUMERS[n].folder}/)" for n, why in problems.items() if why is None]
    lines = [f"  layouts satisfied: {', '.join(loads) if loads else 'none of the Mac applications'}"]
    lines += [f"  not for {n}: {why}" for n, why in problems.items() if why is not None]
    return lines


def format_description(info: list[dict]) -> str:
    lines = []
    for p in info:
        target = TARGETS.get(p["format"])  # a published layout stores bits-wide slots, as our runtime targets do
        slots = ((target.slots if target else None) or {}).get(p["mode"], f"{p['bits']}-bit slots")
        lines += [f"{p['folder']}: {p['format']} pack, {p['mode']} ({slots}), group {p['group_size']}, "
                  f"{p['scale_dtype']} scales",
                  f"  {p['quantized_tensors']} quantized tensors ({p['quantized_weights']:,} weights, "
                  f"{p['quantized_bytes']:,} bytes, {p['bits_per_weight']:.3f} bits/weight)",
                  f"  {p['kept_tensors']} kept tensors ({p['kept_bytes']:,} bytes); {p['files_bytes']:,} bytes on disk"]
        if p.get("skip_patterns"):
            lines.append(f"  skip_patterns: {', '.join(p['skip_patterns'])}")
        lines += _consumer_lines(p.get("consumers", {}))  # published packs: none recorded
    return "\n".join(lines)
