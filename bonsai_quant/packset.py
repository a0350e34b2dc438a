"""Writing one quantized model into several pack folders at once, in one fixed, reproducible layout.

`convert` feeds it from a checkpoint and the quantizers; `repack` from a compact pack. Both describe the
model the same way (slots in architecture order, one quantization_config whose only per-target field is
"format"), so the same model gives byte-identical packs whichever way it arrives.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .checkpoint import Entry, ShardedWriter
from .describe import CONFIG_NAME
from .manifest import write_manifest
from .plan import KEPT_DTYPES, SCALE_DTYPES, packer

PACK_STEM = "model"
SAFETENSORS_FORMAT = {"mlx": "mlx", "gemlite": "pt", "bonsai": "pt"}


@dataclass(frozen=True)
class Slot:
    """One source tensor's place in every pack."""
    name: str
    shape: tuple[int, ...]
    action: str                          # "quantize" | "keep"
    mode: str | None = None              # quantized only
    kept_dtype: torch.dtype | None = None

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")


def slot_entries(slot: Slot, target: str, group_size: int, scale_dtype: torch.dtype) -> list[Entry]:
    if slot.action == "keep":
        return [Entry(slot.name, slot.kept_dtype, slot.shape)]
    layout = packer(target).layout(*slot.shape, slot.mode, group_size, scale_dtype)
    return [Entry(f"{slot.module}.{suffix}", dtype, tuple(shape)) for suffix, (dtype, shape) in layout.items()]


def slots_from_qconfig(qconfig: dict, specs) -> list[Slot]:
    """Slots of a pack described by its quantization_config, in architecture (inventory) order."""
    slots = []
    for name, spec in specs.items():
        module = name.removesuffix(".weight")
        if module in qconfig["quantized"] and name.endswith(".weight"):
            slots.append(Slot(name, spec.shape, "quantize", mode=qconfig["quantized"][module]["mode"]))
        else:
            slots.append(Slot(name, spec.shape, "keep", kept_dtype=KEPT_DTYPES[qconfig["kept"][name]["dtype"]]))
    return slots


class PackSet:
    def __init__(self, folders: dict[str, Path], config_json: Path, qconfig: dict, slots: list[Slot]):
        """folders: target -> pack folder to fill (made if missing)."""
        self.folders = {t: Path(f) for t, f in folders.items()}
        group, scale_dtype = qconfig["group_size"], SCALE_DTYPES[qconfig["scale_dtype"]]
        self.group_size = group
        recipe = qconfig["recipe"]
        meta_common = {"producer": f"bonsai-quant {__version__}", "recipe": recipe["name"], "mode": recipe["mode"]}
        self.writers: dict[str, ShardedWriter] = {}
        try:
            for target, folder in self.folders.items():
                folder.mkdir(exist_ok=True)
                shutil.copyfile(config_json, folder / "config.json")
                (folder / CONFIG_NAME).write_text(json.dumps({**qconfig, "format": target}, indent=2) + "\n")
                entries = [e for s in slots for e in slot_entries(s, target, group, scale_dtype)]
                self.writers[target] = ShardedWriter(folder, entries, PACK_STEM, qconfig["shard_bytes"],
                                                     {"format": SAFETENSORS_FORMAT[target], **meta_common})
        except BaseException:
            self.abort()
            raise

    def kept(self, slot: Slot, tensor: torch.Tensor) -> None:
        for writer in self.writers.values():
            writer.write(slot.name, tensor)

    def quantized(self, slot: Slot, codes: torch.Tensor, scales: torch.Tensor) -> None:
        for target, writer in self.writers.items():
            for suffix, packed in packer(target).pack(codes, scales, slot.mode, self.group_size).items():
                writer.write(f"{slot.module}.{suffix}", packed)

    def close(self) -> None:
        for target, writer in self.writers.items():
            writer.close()
            write_manifest(self.folders[target])

    def abort(self) -> None:
        for writer in self.writers.values():
            writer.abort()
